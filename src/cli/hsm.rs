//! `sovkms hsm`: PKCS#11 operator commands.

use super::{print_json, CliError, ConfigArg};
use crate::broker::rewrap::{self, DangerCrashAfter};
use crate::config::{RootSettings, Settings};
use crate::root::pkcs11::{admin, profile::HsmProfile, Pkcs11Root, Pkcs11Settings};
use crate::root::PinSource;
use crate::root::RootOfTrust;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// HSM commands.
#[derive(clap::Subcommand)]
pub enum HsmCmd {
    /// List slots and tokens with their mechanisms.
    List {
        /// PKCS#11 module; default: the module of --profile.
        #[arg(long)]
        module: Option<PathBuf>,
        /// HSM profile whose module to use: a built-in name or a profile file.
        #[arg(long, default_value = "softhsm2")]
        profile: String,
        /// Also print every mechanism.
        #[arg(long)]
        mechanisms: bool,
    },
    /// Create a development token (SoftHSM2) in the first free slot. Real
    /// HSMs are initialized with their vendor's tools.
    InitToken {
        /// HSM profile whose module to use: a built-in name or a profile file.
        #[arg(long, default_value = "softhsm2")]
        profile: String,
        /// Token label.
        #[arg(long)]
        label: String,
        /// File holding the new user PIN.
        #[arg(long)]
        pin_file: PathBuf,
        /// File holding the new SO PIN.
        #[arg(long)]
        so_pin_file: PathBuf,
    },
    /// Provision the root key and signing key on the broker's token (idempotent; never overwrites).
    Init(ConfigArg),
    /// Show the token, the keys and their attributes.
    Status(ConfigArg),
    /// Create a new root key and re-wrap every stored key version under it
    /// (broker stopped). Crash-safe; run it again to finish an interrupted run.
    RotateRoot {
        #[command(flatten)]
        c: ConfigArg,
        /// Only finish an interrupted rotation; never create a new root key.
        #[arg(long)]
        resume_only: bool,
        /// Test hook, debug builds only: abort the process after this many
        /// keys were rewritten (release builds have no such switch).
        #[cfg(debug_assertions)]
        #[arg(long, hide = true)]
        danger_crash_after: Option<usize>,
    },
    /// Destroy a retained (old) root key that no stored version uses any more.
    RetireRoot {
        #[command(flatten)]
        c: ConfigArg,
        /// Root key id, as `hsm status` shows it (p11:...).
        root_key_id: String,
    },
    /// Measure wrap and unwrap rates of the token.
    Bench {
        #[command(flatten)]
        c: ConfigArg,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Concurrent callers.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn load(c: &ConfigArg) -> Result<(Settings, Pkcs11Settings), CliError> {
    let s =
        Settings::load(&c.config).map_err(|e| CliError::new(e.to_string(), "fix the config"))?;
    match &s.root {
        RootSettings::Pkcs11(p) => {
            let p = (**p).clone();
            Ok((s, p))
        }
        RootSettings::Software { .. } | RootSettings::Tpm { .. } => Err(CliError::new(
            "this broker's root is not an HSM",
            "set [root] kind = \"pkcs11\" with a profile, token_label and PIN source",
        )),
    }
}

fn root_err(e: crate::root::RootError) -> CliError {
    CliError::new(
        e.message,
        "check the token label, the PIN source and `sovkms hsm list`",
    )
}

pub fn run(cmd: HsmCmd) -> Result<(), CliError> {
    match cmd {
        HsmCmd::List {
            module,
            profile,
            mechanisms,
        } => {
            let module = match module {
                Some(m) => m,
                None => {
                    HsmProfile::find(&profile, std::path::Path::new("."))
                        .map_err(|e| CliError::new(e, "pass --module or --profile"))?
                        .module
                }
            };
            let slots = admin::list(&module).map_err(root_err)?;
            if super::json() {
                return print_json(
                    &serde_json::to_value(&slots).map_err(|e| CliError::new(e.to_string(), ""))?,
                );
            }
            outln!("module {}", module.display());
            for s in &slots {
                if !s.initialized {
                    outln!("  slot {:<10} (no initialized token)", s.slot_id);
                    continue;
                }
                outln!(
                    "  slot {:<10} token '{}'  {} {}  serial {}  {} mechanisms",
                    s.slot_id,
                    s.label,
                    s.manufacturer,
                    s.model,
                    s.serial,
                    s.mechanisms.len()
                );
                if mechanisms {
                    for m in &s.mechanisms {
                        outln!("      {m}");
                    }
                }
            }
            Ok(())
        }
        HsmCmd::InitToken {
            profile,
            label,
            pin_file,
            so_pin_file,
        } => {
            let prof = HsmProfile::find(&profile, std::path::Path::new("."))
                .map_err(|e| CliError::new(e, "pass --profile"))?;
            let pin = PinSource::File(pin_file)
                .read()
                .map_err(|e| CliError::new(e.message, ""))?;
            let so = PinSource::File(so_pin_file)
                .read()
                .map_err(|e| CliError::new(e.message, ""))?;
            admin::init_dev_token(&prof.module, &label, &so, &pin).map_err(root_err)?;
            outln!("token '{label}' initialized");
            Ok(())
        }
        HsmCmd::Init(c) => {
            let (_, p) = load(&c)?;
            let r = admin::provision(&p).map_err(root_err)?;
            if super::json() {
                return print_json(
                    &serde_json::to_value(&r).map_err(|e| CliError::new(e.to_string(), ""))?,
                );
            }
            if r.created {
                outln!("provisioned token '{}'", p.token_label);
            } else {
                outln!(
                    "token '{}' was already provisioned; nothing was changed",
                    p.token_label
                );
            }
            outln!("root key        {}", r.root_key_id);
            outln!("check value     {}", r.check_value);
            outln!("signing key     {}", r.signing_public_key_hex);
            out!("{}", r.signing_public_key_pem);
            Ok(())
        }
        HsmCmd::Status(c) => {
            let (_, p) = load(&c)?;
            let st = admin::status(&p).map_err(root_err)?;
            if super::json() {
                return print_json(
                    &serde_json::to_value(&st).map_err(|e| CliError::new(e.to_string(), ""))?,
                );
            }
            outln!(
                "token    '{}' ({}), profile {}",
                st.token,
                st.device,
                st.profile
            );
            for o in &st.objects {
                outln!("\n{}  label '{}'  id {}", o.role, o.label, o.id);
                if !o.check_value.is_empty() {
                    outln!("  CKA_CHECK_VALUE        {}", o.check_value);
                }
                for (k, v) in &o.flags {
                    outln!("  {k:<22} {v}");
                }
            }
            Ok(())
        }
        HsmCmd::RotateRoot {
            c,
            resume_only,
            #[cfg(debug_assertions)]
            danger_crash_after,
        } => {
            #[cfg(not(debug_assertions))]
            let danger_crash_after: Option<usize> = None;
            let (settings, p) = load(&c)?;
            let store = crate::server::open_store(&settings).map_err(|e| {
                CliError::new(
                    e.to_string(),
                    "stop the broker first: rotation needs its store exclusively",
                )
            })?;
            let root = std::sync::Arc::new(Pkcs11Root::open(p).map_err(root_err)?);
            // Rewritten records get their codes under the region's record key.
            let store = crate::server::authenticate(store, &*root)
                .map_err(|e| CliError::new(e.to_string(), ""))?;
            let current = root.info().root_key_id;
            let per_root = rewrap::versions_per_root(store.as_ref())
                .map_err(|e| CliError::new(e.to_string(), ""))?;
            let stale: usize = per_root
                .iter()
                .filter(|(k, _)| **k != current)
                .map(|(_, n)| n)
                .sum();
            let new_root = if stale > 0 || resume_only {
                outln!("resuming: {stale} key version(s) still wrapped by an older root key");
                None
            } else {
                let k = root.add_root_generation().map_err(root_err)?;
                outln!(
                    "created root key {} (generation {}, check value {})",
                    k.id_str,
                    k.generation,
                    k.check_value
                );
                Some(k.id_str)
            };
            let report = rewrap::rewrap_all(
                store.as_ref(),
                &*root,
                danger_crash_after.map(DangerCrashAfter),
            )
            .map_err(|e| CliError::new(e.to_string(), "run the same command again to finish"))?;
            drop(store);
            crate::server::audit_offline(
                &settings,
                root.clone(),
                "rotate-root",
                &format!(
                    "offline on the broker host: root key {} is current ({}); {} version(s) re-wrapped in {} key(s)",
                    root.info().root_key_id,
                    new_root.as_deref().map_or("resumed rotation".to_owned(), |k| format!("created {k}")),
                    report.versions_rewrapped,
                    report.keys_updated
                ),
            )
            .map_err(|e| CliError::new(e, "the rotation is done; its audit record was not written"))?;
            if super::json() {
                return print_json(&serde_json::json!({
                    "new_root_key_id": new_root, "current_root_key_id": root.info().root_key_id, "report": report,
                }));
            }
            outln!(
                "re-wrapped {} version(s) in {} key(s); {} already current. Current root key: {}",
                report.versions_rewrapped,
                report.keys_updated,
                report.versions_current,
                root.info().root_key_id
            );
            outln!("older root keys are kept; retire them with `sovkms hsm retire-root`");
            Ok(())
        }
        HsmCmd::RetireRoot { c, root_key_id } => {
            let (settings, p) = load(&c)?;
            let store = crate::server::open_store(&settings)
                .map_err(|e| CliError::new(e.to_string(), "stop the broker first"))?;
            let per_root = rewrap::versions_per_root(store.as_ref())
                .map_err(|e| CliError::new(e.to_string(), ""))?;
            if let Some(n) = per_root.get(&root_key_id) {
                return Err(CliError::new(
                    format!("root key {root_key_id} still wraps {n} key version(s)"),
                    "run `sovkms hsm rotate-root --resume-only` first",
                ));
            }
            let root = std::sync::Arc::new(Pkcs11Root::open(p).map_err(root_err)?);
            root.destroy_root(&root_key_id).map_err(root_err)?;
            drop(store);
            crate::server::audit_offline(
                &settings,
                root,
                "retire-root",
                &format!("offline on the broker host: root key {root_key_id} destroyed"),
            )
            .map_err(|e| {
                CliError::new(e, "the key is destroyed; its audit record was not written")
            })?;
            outln!("root key {root_key_id} destroyed");
            Ok(())
        }
        HsmCmd::Bench {
            c,
            seconds,
            threads,
        } => {
            let (_, p) = load(&c)?;
            let root = std::sync::Arc::new(Pkcs11Root::open(p).map_err(root_err)?);
            let m = root.generate_material().map_err(root_err)?;
            let w = root.wrap(&m).map_err(root_err)?;
            let dur = Duration::from_secs(seconds.max(1));
            let threads = threads.clamp(1, 64);
            let measure = |op: &'static str| -> Result<f64, CliError> {
                let start = Instant::now();
                let counts: Vec<Result<u64, CliError>> = std::thread::scope(|sc| {
                    let hs: Vec<_> = (0..threads)
                        .map(|_| {
                            let root = &root;
                            let (m, w) = (&m, &w);
                            sc.spawn(move || {
                                let mut n = 0u64;
                                while start.elapsed() < dur {
                                    match op {
                                        "wrap" => root.wrap(m).map(|_| ()),
                                        _ => root.unwrap(w).map(|_| ()),
                                    }
                                    .map_err(root_err)?;
                                    n += 1;
                                }
                                Ok(n)
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| {
                            h.join()
                                .unwrap_or_else(|_| Err(CliError::new("bench thread failed", "")))
                        })
                        .collect()
                });
                let mut total = 0;
                for c in counts {
                    total += c?;
                }
                Ok(total as f64 / start.elapsed().as_secs_f64())
            };
            let wrap = measure("wrap")?;
            let unwrap = measure("unwrap")?;
            if super::json() {
                return print_json(
                    &serde_json::json!({"threads": threads, "wrap_per_s": wrap, "unwrap_per_s": unwrap}),
                );
            }
            outln!(
                "{threads} thread(s): wrap {wrap:.0}/s, unwrap {unwrap:.0}/s ({})",
                root.info().description
            );
            Ok(())
        }
    }
}
