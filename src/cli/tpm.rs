//! `sovkms tpm`: binding the broker to its host's TPM 2.0.

use super::{print_json, CliError, ConfigArg};
use crate::config::Settings;
use crate::root::tpm::{self, Purpose, SealReport, Tpm, TpmSettings};
use crate::root::PinSource;
use crate::root::RootError;
use std::path::PathBuf;

/// TPM commands.
#[derive(clap::Subcommand)]
pub enum TpmCmd {
    /// Manufacturer, firmware, PCR banks, and the configured PCRs' values.
    Info {
        #[command(flatten)]
        c: ConfigArg,
    },
    /// Provision: generate a root secret in the TPM and seal it (with a new
    /// signing key) to the configured PCRs. Never overwrites.
    SealRoot {
        #[command(flatten)]
        c: ConfigArg,
    },
    /// Provision: seal the HSM user PIN to the configured PCRs, into the
    /// config's `root.pin_tpm_sealed`. Never overwrites.
    SealPin {
        #[command(flatten)]
        c: ConfigArg,
        /// File holding the HSM user PIN (read once; delete it afterwards).
        #[arg(long, conflicts_with = "pin_env")]
        pin_file: Option<PathBuf>,
        /// Environment variable holding the HSM user PIN.
        #[arg(long)]
        pin_env: Option<String>,
    },
    /// Unseal the configured blob now (proves the next start will work)
    /// and report how long the TPM took.
    Check {
        #[command(flatten)]
        c: ConfigArg,
    },
    /// Re-bind the sealed secret to new PCR values ahead of a planned change
    /// (firmware update, new PCR selection). Writes `<blob>.new`; the old
    /// blob stays until `--confirm`.
    Reseal {
        #[command(flatten)]
        c: ConfigArg,
        /// Expected value of a configured PCR after the change, `INDEX=HEX`
        /// (repeat for each configured PCR; default: the current values).
        #[arg(long = "expect-pcr", value_name = "INDEX=HEX")]
        expect_pcr: Vec<String>,
        /// After the change: check the pending blob unseals, then make it the blob.
        #[arg(long, conflicts_with = "expect_pcr")]
        confirm: bool,
    },
    /// Quote the configured PCRs with a nonce; writes files that
    /// `tpm2_checkquote` verifies (see README, "Auditing a TPM-bound broker").
    Attest {
        #[command(flatten)]
        c: ConfigArg,
        /// The auditor's nonce, hex (8 to 64 bytes).
        #[arg(long)]
        nonce: String,
        /// Directory for the files.
        #[arg(long)]
        out: PathBuf,
    },
}

fn load(c: &ConfigArg) -> Result<(Settings, TpmSettings), CliError> {
    let s =
        Settings::load(&c.config).map_err(|e| CliError::new(e.to_string(), "fix the config"))?;
    let t = s.tpm.clone().ok_or_else(|| {
        CliError::new(
            format!("{} has no [tpm] section", c.config.display()),
            "add [tpm] with tcti = \"device:/dev/tpmrm0\" (and pcrs = [7] or your selection)",
        )
    })?;
    Ok((s, t))
}

/// The TPM settings and the blob the config names, and what it holds.
fn load_sealed(c: &ConfigArg) -> Result<(TpmSettings, PathBuf, Purpose), CliError> {
    let (s, t) = load(c)?;
    let (path, purpose) = s.tpm_sealed().ok_or_else(no_target)?;
    Ok((t, path, purpose))
}

fn no_target() -> CliError {
    CliError::new(
        "the config seals nothing to the TPM",
        "use [root] kind = \"tpm\" (root sealed to the TPM), or kind = \"pkcs11\" with \
         pin_tpm_sealed = \"hsm-pin.sealed\" (HSM PIN sealed to the TPM)",
    )
}

fn tpm_err(e: RootError) -> CliError {
    use crate::root::RootErrorKind as K;
    let hint = match e.kind {
        K::Unavailable => "is the TPM reachable through the configured tcti? (`sovkms tpm info`)",
        K::Auth => "the host's boot state (PCRs) or the auth value differs from the sealed policy",
        K::Integrity => "this blob belongs to another TPM, or was altered",
        K::Config | K::UnknownRootKey => "check the [tpm] and [root] sections of the config",
    };
    CliError::new(e.message, hint)
}

fn report(r: &SealReport, json: bool, what: &str) -> Result<(), CliError> {
    if json {
        return print_json(&serde_json::to_value(r).map_err(|e| CliError::new(e.to_string(), ""))?);
    }
    outln!("{what}: {}", r.path);
    outln!(
        "policy           PCR {} = {}",
        r.policy,
        r.pcr_values.join(",")
    );
    if let Some(id) = &r.root_key_id {
        outln!("root key         {id}");
    }
    if r.unseal_ms > 0.0 {
        outln!("unseal           {:.1} ms", r.unseal_ms);
    }
    Ok(())
}

fn parse_expected(specs: &[String], t: &TpmSettings) -> Result<Option<Vec<Vec<u8>>>, CliError> {
    if specs.is_empty() {
        return Ok(None);
    }
    let hint = "give --expect-pcr INDEX=HEX once for each configured PCR";
    let mut out = vec![None; t.policy.pcrs.len()];
    for s in specs {
        let (i, v) = s
            .split_once('=')
            .ok_or_else(|| CliError::new(format!("--expect-pcr {s:?} is not INDEX=HEX"), hint))?;
        let i: u8 = i
            .trim()
            .parse()
            .map_err(|_| CliError::new(format!("--expect-pcr {s:?}: bad PCR index"), hint))?;
        let pos = t.policy.pcrs.iter().position(|p| *p == i).ok_or_else(|| {
            CliError::new(
                format!(
                    "PCR {i} is not in the configured policy {}",
                    t.policy.spec()
                ),
                hint,
            )
        })?;
        let v = hex::decode(v.trim().trim_start_matches("0x"))
            .map_err(|_| CliError::new(format!("--expect-pcr {s:?}: value is not hex"), hint))?;
        out[pos] = Some(v);
    }
    out.into_iter()
        .collect::<Option<Vec<_>>>()
        .map(Some)
        .ok_or_else(|| CliError::new("an expected value is missing", hint))
}

/// Prints where a quote's files went and how to verify them.
pub(super) fn print_attestation(r: &tpm::AttestReport, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(&serde_json::to_value(r).map_err(|e| CliError::new(e.to_string(), ""))?);
    }
    outln!("quote written to {}", r.dir);
    outln!("pcrs             {} = {}", r.pcrs, r.pcr_values.join(","));
    outln!("ak fingerprint   {}", r.ak_fingerprint);
    outln!("quote            {:.1} ms", r.quote_ms);
    outln!("verify with      (cd {} && {})", r.dir, r.verify_with);
    Ok(())
}

/// Runs a `sovkms tpm` command (blocking: TPM I/O).
pub fn run(cmd: TpmCmd) -> Result<(), CliError> {
    match cmd {
        TpmCmd::Info { c } => {
            let (_, t) = load(&c)?;
            let mut tpm = Tpm::connect(&t.tcti).map_err(tpm_err)?;
            let f = tpm.facts().map_err(tpm_err)?;
            let values = tpm.pcr_values(&t.policy).map_err(tpm_err)?;
            let values: Vec<String> = values.iter().map(hex::encode).collect();
            if super::json() {
                return print_json(&serde_json::json!({
                    "tcti": t.tcti, "manufacturer": f.manufacturer, "vendor": f.vendor,
                    "firmware": f.firmware, "pcr_banks": f.pcr_banks,
                    "policy": t.policy.spec(), "pcr_values": values,
                }));
            }
            outln!("tcti             {}", t.tcti);
            outln!("manufacturer     {} ({})", f.manufacturer, f.vendor);
            outln!("firmware         {}", f.firmware);
            outln!("pcr banks        {}", f.pcr_banks.join(", "));
            for (p, v) in t.policy.pcrs.iter().zip(&values) {
                outln!("pcr {}:{p:<8}  {v}", t.policy.bank);
            }
            Ok(())
        }
        TpmCmd::SealRoot { c } => {
            let (t, path, purpose) = load_sealed(&c)?;
            if purpose != Purpose::Root {
                return Err(CliError::new(
                    "this config's root is an HSM; seal its PIN with `sovkms tpm seal-pin`",
                    "",
                ));
            }
            let r = tpm::seal_root(&t, &path).map_err(tpm_err)?;
            report(&r, super::json(), "sealed root written")
        }
        TpmCmd::SealPin {
            c,
            pin_file,
            pin_env,
        } => {
            let (t, path, purpose) = load_sealed(&c)?;
            if purpose != Purpose::HsmPin {
                return Err(CliError::new(
                    "this config's root is the TPM itself; use `sovkms tpm seal-root`",
                    "",
                ));
            }
            let source = match (pin_file, pin_env) {
                (Some(f), None) => PinSource::File(f),
                (None, Some(v)) => PinSource::Env(v),
                _ => {
                    return Err(CliError::new(
                        "give --pin-file or --pin-env with the HSM user PIN",
                        "never put the PIN on the command line",
                    ))
                }
            };
            let pin = source.read().map_err(tpm_err)?;
            let r = tpm::seal_pin(&t, &path, &pin).map_err(tpm_err)?;
            report(&r, super::json(), "sealed HSM PIN written")
        }
        TpmCmd::Check { c } => {
            let (t, path, purpose) = load_sealed(&c)?;
            let r = tpm::check(&t, &path, purpose).map_err(tpm_err)?;
            report(&r, super::json(), "unseals")
        }
        TpmCmd::Reseal {
            c,
            expect_pcr,
            confirm,
        } => {
            let (t, path, purpose) = load_sealed(&c)?;
            if confirm {
                let r = tpm::confirm_reseal(&t, &path, purpose).map_err(tpm_err)?;
                return report(&r, super::json(), "reseal confirmed");
            }
            let expected = parse_expected(&expect_pcr, &t)?;
            let r = tpm::reseal(&t, &path, purpose, expected).map_err(tpm_err)?;
            report(
                &r,
                super::json(),
                "pending reseal written (confirm with `sovkms tpm reseal --confirm` after the change)",
            )
        }
        TpmCmd::Attest { c, nonce, out } => {
            let (_, t) = load(&c)?;
            let nonce = hex::decode(nonce.trim()).map_err(|_| {
                CliError::new("--nonce is not hex", "e.g. --nonce $(openssl rand -hex 16)")
            })?;
            let (q, ms) = tpm::quote(&t, &nonce).map_err(tpm_err)?;
            let r = tpm::write_attestation(&out, &t.policy.spec(), &nonce, &q, ms)
                .map_err(|e| CliError::new(e, ""))?;
            print_attestation(&r, super::json())
        }
    }
}
