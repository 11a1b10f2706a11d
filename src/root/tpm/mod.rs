//! TPM 2.0 binding: a root of trust sealed to the host's TPM, an HSM PIN
//! sealed the same way, and quotes for auditors.
//!
//! The TPM is used at start (unseal) and for attestation only: the unsealed
//! root secret lives in a zeroizing buffer and wraps key versions in
//! software (AES-256 key wrap, RFC 3394), so requests never wait on the TPM.

mod device;
mod error;

pub use device::{Quote, SealedParts, Tpm, TpmFacts};

use super::{RootError, RootErrorKind, RootInfo, RootOfTrust, WrappedKey};
use crate::secret::{KeyMaterial, KEY_LEN};
use error::unavailable;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use ring::{aead, digest, hkdf};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tss_esapi::structures::{Digest, PcrSelectionList, PcrSelectionListBuilder, PcrSlot};
use zeroize::Zeroizing;

/// Which PCRs a sealed secret is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrPolicy {
    /// PCR bank: `sha256` (default), `sha384` or `sha1`.
    pub bank: String,
    /// PCR indices, ascending, no duplicates.
    pub pcrs: Vec<u8>,
}

/// A PCR selection that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PcrPolicyError {
    /// Not sha1, sha256 or sha384.
    #[error("PCR bank {0:?} is not supported; use sha256, sha384 or sha1")]
    Bank(String),
    /// Empty, or an index over 23.
    #[error("tpm.pcrs must list 1 to 24 PCR indices between 0 and 23")]
    Pcrs,
}

impl PcrPolicy {
    /// Validates and normalizes (sorts, dedups) a selection.
    pub fn new(bank: &str, pcrs: &[u8]) -> Result<Self, PcrPolicyError> {
        device::bank_alg(bank).map_err(|_| PcrPolicyError::Bank(bank.to_owned()))?;
        let mut p = pcrs.to_vec();
        p.sort_unstable();
        p.dedup();
        if p.is_empty() || p.iter().any(|&i| i > 23) {
            return Err(PcrPolicyError::Pcrs);
        }
        Ok(Self {
            bank: bank.to_string(),
            pcrs: p,
        })
    }

    /// As `tpm2-tools` writes it: `sha256:7,14`.
    pub fn spec(&self) -> String {
        let list: Vec<String> = self.pcrs.iter().map(|p| p.to_string()).collect();
        format!("{}:{}", self.bank, list.join(","))
    }

    fn selection(&self) -> Result<PcrSelectionList, RootError> {
        let slots = self
            .pcrs
            .iter()
            .map(|&i| PcrSlot::try_from(1u32 << i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error::tpm_err("PCR selection", e))?;
        PcrSelectionListBuilder::new()
            .with_selection(device::bank_alg(&self.bank)?, &slots)
            .build()
            .map_err(|e| error::tpm_err("PCR selection", e))
    }

    /// SHA-256 over the concatenated values: the `pcrDigest` of PolicyPCR
    /// (sessions here use SHA-256) and of a quote signed with ECDSA-SHA256.
    fn values_digest(&self, values: &[Vec<u8>]) -> Result<Digest, RootError> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for v in values {
            ctx.update(v);
        }
        Digest::try_from(ctx.finish().as_ref().to_vec())
            .map_err(|e| error::tpm_err("PCR digest", e))
    }
}

/// How to reach the TPM and what to bind secrets to (`[tpm]` in the config).
/// Holds the auth value's file path, never the value, so the derived
/// `Debug` prints no secret.
#[derive(Clone, Debug)]
pub struct TpmSettings {
    /// TCTI: `device:/dev/tpmrm0` in production, `swtpm:host=…,port=…` in tests.
    pub tcti: String,
    /// PCRs new seals are bound to.
    pub policy: PcrPolicy,
    /// Optional file holding an auth value (≤ 32 bytes) required besides
    /// the PCR policy.
    pub auth_file: Option<PathBuf>,
}

impl TpmSettings {
    fn auth(&self) -> Result<Option<Zeroizing<Vec<u8>>>, RootError> {
        let Some(path) = &self.auth_file else {
            return Ok(None);
        };
        let mut b = Zeroizing::new(std::fs::read(path).map_err(|e| {
            RootError::new(
                RootErrorKind::Config,
                format!("cannot read TPM auth file {}: {e}", path.display()),
            )
        })?);
        while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            b.pop();
        }
        if b.is_empty() || b.len() > 32 {
            return Err(RootError::new(
                RootErrorKind::Config,
                format!("TPM auth file {} must hold 1 to 32 bytes", path.display()),
            ));
        }
        Ok(Some(b))
    }
}

/// What a sealed blob holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// The broker's root secret (`kind = "tpm"`).
    Root,
    /// The HSM user PIN (`pin_tpm_sealed`).
    HsmPin,
}

const FORMAT: &str = "sovkms-tpm-sealed/v1";

/// A sealed blob file (JSON). Everything in it is either public or
/// encrypted by the TPM (the private part) or under the sealed secret (the
/// signing key): a copy is useless without this TPM in this state.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedFile {
    format: String,
    /// What the blob holds.
    pub purpose: Purpose,
    /// The PCR bank of the policy.
    pub pcr_bank: String,
    /// The PCRs of the policy.
    pub pcrs: Vec<u8>,
    /// The PCR values the policy requires (hex), in `pcrs` order.
    pub pcr_values: Vec<String>,
    /// Whether an auth value is required besides the PCRs.
    pub auth_value: bool,
    /// When it was sealed (RFC 3339).
    pub sealed_at: String,
    #[serde(with = "hex::serde")]
    tpm_public: Vec<u8>,
    #[serde(with = "hex::serde")]
    tpm_private: Vec<u8>,
    /// Root only: the audit/provenance signing key (PKCS#8), AES-256-GCM
    /// under a key derived from the sealed root secret: nonce || ct || tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signing_key: Option<String>,
}

impl SealedFile {
    /// The policy this blob was sealed to.
    pub fn policy(&self) -> Result<PcrPolicy, RootError> {
        PcrPolicy::new(&self.pcr_bank, &self.pcrs)
            .map_err(|m| RootError::new(RootErrorKind::Integrity, m.to_string()))
    }

    /// Reads and parses a sealed file.
    pub fn read(path: &Path) -> Result<Self, RootError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RootError::new(
                RootErrorKind::Config,
                format!(
                    "cannot read sealed blob {}: {e} (provision it with `sovkms tpm seal-root` \
                     or `sovkms tpm seal-pin`)",
                    path.display()
                ),
            )
        })?;
        let f: Self = serde_json::from_str(&text).map_err(|e| {
            RootError::new(
                RootErrorKind::Integrity,
                format!("{} is not a sovkms sealed blob: {e}", path.display()),
            )
        })?;
        if f.format != FORMAT {
            return Err(RootError::new(
                RootErrorKind::Integrity,
                format!("{}: unknown format {:?}", path.display(), f.format),
            ));
        }
        Ok(f)
    }

    fn write_new(&self, path: &Path) -> Result<(), RootError> {
        if path.exists() {
            return Err(RootError::new(
                RootErrorKind::Config,
                format!(
                    "{} already exists; sovkms never overwrites a sealed blob (it may be the \
                     only copy of a root). Move it away first if you really mean to replace it",
                    path.display()
                ),
            ));
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| RootError::new(RootErrorKind::Config, e.to_string()))?;
        crate::files::write_file_durably(path, text.as_bytes(), 0o600).map_err(|e| {
            RootError::new(
                RootErrorKind::Config,
                format!("cannot write {}: {e}", path.display()),
            )
        })
    }
}

/// The path a reseal writes to, next to the blob it replaces.
pub fn pending_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Seals `secret` to the configured policy as the current PCR values (or
/// `expected`, when resealing ahead of a planned change).
fn seal_to(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    purpose: Purpose,
    secret: &[u8],
    expected: Option<Vec<Vec<u8>>>,
    signing_key: Option<String>,
) -> Result<SealedFile, RootError> {
    let policy = &settings.policy;
    let values = match expected {
        Some(v) => v,
        None => tpm.pcr_values(policy)?,
    };
    let auth = settings.auth()?;
    let parts = tpm.seal(policy, &values, auth.as_deref().map(|a| &a[..]), secret)?;
    Ok(SealedFile {
        format: FORMAT.into(),
        purpose,
        pcr_bank: policy.bank.clone(),
        pcrs: policy.pcrs.clone(),
        pcr_values: values.iter().map(hex::encode).collect(),
        auth_value: auth.is_some(),
        sealed_at: now_rfc3339(),
        tpm_public: parts.public,
        tpm_private: parts.private,
        signing_key,
    })
}

/// Unseals one file; on a policy failure the message names the file, the
/// policy, the values it requires and the TPM's current values.
fn unseal_file(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    path: &Path,
    file: &SealedFile,
) -> Result<Zeroizing<Vec<u8>>, RootError> {
    let policy = file.policy()?;
    let auth = if file.auth_value {
        match settings.auth()? {
            Some(a) => Some(a),
            None => {
                return Err(RootError::new(
                    RootErrorKind::Config,
                    format!(
                        "{} was sealed with an auth value; set tpm.auth_file",
                        path.display()
                    ),
                ))
            }
        }
    } else {
        None
    };
    let parts = SealedParts {
        public: file.tpm_public.clone(),
        private: file.tpm_private.clone(),
    };
    tpm.unseal(&policy, &parts, auth.as_deref().map(|a| &a[..]))
        .map_err(|e| {
            if e.kind != RootErrorKind::Auth {
                return RootError::new(e.kind, format!("{}: {}", path.display(), e.message));
            }
            let now = tpm
                .pcr_values(&policy)
                .map(|v| v.iter().map(hex::encode).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|_| "unreadable".into());
            RootError::new(
                RootErrorKind::Auth,
                format!(
                    "the TPM refused to unseal {}: its policy requires PCR {} = {} (sealed {}){}; \
                     the TPM's current values are {now}. The host's boot state changed, or this \
                     is another host. If the change was planned, reseal from a state that still \
                     unseals (`sovkms tpm reseal --expect-pcr ...`) [{}]",
                    path.display(),
                    policy.spec(),
                    file.pcr_values.join(","),
                    file.sealed_at,
                    if file.auth_value {
                        " and an auth value"
                    } else {
                        ""
                    },
                    e.message
                ),
            )
        })
}

/// Unseals the configured blob through `tpm`, falling back to a pending
/// reseal (`.new`) when the current blob's policy no longer matches.
/// Returns the secret, the file it came from and that file's path.
pub fn unseal_configured(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<(Zeroizing<Vec<u8>>, SealedFile, PathBuf), RootError> {
    let file = SealedFile::read(path)?;
    if file.purpose != purpose {
        return Err(RootError::new(
            RootErrorKind::Config,
            format!(
                "{} holds a sealed {:?}, not a {:?}",
                path.display(),
                file.purpose,
                purpose
            ),
        ));
    }
    match unseal_file(tpm, settings, path, &file) {
        Ok(s) => Ok((s, file, path.to_path_buf())),
        Err(e) if e.kind == RootErrorKind::Auth => {
            let pending = pending_path(path);
            let Ok(next) = SealedFile::read(&pending) else {
                return Err(e);
            };
            match unseal_file(tpm, settings, &pending, &next) {
                Ok(s) if next.purpose == purpose => {
                    tracing::warn!(
                        blob = %pending.display(),
                        "unsealed the pending reseal: the PCR change it was made for has \
                         happened; run `sovkms tpm reseal --confirm` to make it the blob"
                    );
                    Ok((s, next, pending))
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn derive(secret: &[u8], label: &'static [u8]) -> Result<Zeroizing<[u8; KEY_LEN]>, RootError> {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sovkms/v1/tpm-root").extract(secret);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    prk.expand(&[label], Len)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| RootError::new(RootErrorKind::Config, "key derivation failed"))?;
    Ok(out)
}

const WRAP_LABEL: &[u8] = b"wrap";
const SIGNING_LABEL: &[u8] = b"signing-key";
const SIGNING_AAD: &[u8] = b"sovkms/v1/tpm-root/signing-key";

fn signing_aead(secret: &[u8]) -> Result<aead::LessSafeKey, RootError> {
    let k = derive(secret, SIGNING_LABEL)?;
    aead::UnboundKey::new(&aead::AES_256_GCM, &k[..])
        .map(aead::LessSafeKey::new)
        .map_err(|_| RootError::new(RootErrorKind::Config, "bad derived key"))
}

fn cfg(m: impl Into<String>) -> RootError {
    RootError::new(RootErrorKind::Config, m)
}

/// Result of provisioning or checking a blob, for the CLI.
#[derive(Debug, serde::Serialize)]
pub struct SealReport {
    /// File written or checked.
    pub path: String,
    /// `sha256:7`.
    pub policy: String,
    /// Values sealed to.
    pub pcr_values: Vec<String>,
    /// Root only: the root key id that wrapped keys will carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_key_id: Option<String>,
    /// Milliseconds the TPM took to unseal (connect + load + policy + unseal).
    pub unseal_ms: f64,
}

/// `sovkms tpm seal-root`: a fresh root secret from the TPM's generator
/// and a fresh signing key, sealed to the current PCR values. Refuses to
/// overwrite. Unseals the result before returning, so a blob that would
/// not open at the next start is never left behind silently.
pub fn seal_root(settings: &TpmSettings, path: &Path) -> Result<SealReport, RootError> {
    if path.exists() {
        return Err(cfg(format!(
            "{} already exists; sovkms never overwrites a sealed root (use `sovkms tpm reseal` \
             to re-bind it to new PCR values)",
            path.display()
        )));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let secret = tpm.random(KEY_LEN)?;
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| cfg("cannot generate the signing key"))?;
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce)
        .map_err(|_| unavailable("random generator failed".into()))?;
    let mut buf = Zeroizing::new(pkcs8.as_ref().to_vec());
    let tag = signing_aead(&secret)?
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(SIGNING_AAD),
            &mut buf,
        )
        .map_err(|_| cfg("cannot encrypt the signing key"))?;
    let mut enc = nonce.to_vec();
    enc.extend_from_slice(&buf);
    enc.extend_from_slice(tag.as_ref());
    let file = seal_to(
        &mut tpm,
        settings,
        Purpose::Root,
        &secret,
        None,
        Some(hex::encode(enc)),
    )?;
    drop(tpm);
    file.write_new(path)?;
    check(settings, path, Purpose::Root)
}

/// `sovkms tpm seal-pin`: seals the HSM user PIN. Refuses to overwrite.
pub fn seal_pin(
    settings: &TpmSettings,
    path: &Path,
    pin: &crate::secret::Pin,
) -> Result<SealReport, RootError> {
    if pin.expose_secret().is_empty() || pin.expose_secret().len() > 128 {
        return Err(cfg("the HSM PIN must be 1 to 128 bytes"));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let file = seal_to(
        &mut tpm,
        settings,
        Purpose::HsmPin,
        pin.expose_secret().as_bytes(),
        None,
        None,
    )?;
    drop(tpm);
    file.write_new(path)?;
    check(settings, path, Purpose::HsmPin)
}

/// `sovkms tpm check`: unseals the blob now and reports how long it took.
pub fn check(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<SealReport, RootError> {
    let t = Instant::now();
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let (secret, file, used) = unseal_configured(&mut tpm, settings, path, purpose)?;
    let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
    let root_key_id = key_id_of(purpose, &secret)?;
    Ok(SealReport {
        path: used.display().to_string(),
        policy: file.policy()?.spec(),
        pcr_values: file.pcr_values.clone(),
        root_key_id,
        unseal_ms,
    })
}

/// `sovkms tpm reseal`: unseals the current blob (which must still open in
/// the current state) and seals the same secret to the configured PCRs at
/// `expected` values (default: current) into `<blob>.new`. The old blob
/// stays until [`confirm_reseal`].
pub fn reseal(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
    expected: Option<Vec<Vec<u8>>>,
) -> Result<SealReport, RootError> {
    let pending = pending_path(path);
    if pending.exists() {
        return Err(cfg(format!(
            "{} already holds a pending reseal; confirm it (`sovkms tpm reseal --confirm`) or \
             remove it first",
            pending.display()
        )));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let file = SealedFile::read(path)?;
    if file.purpose != purpose {
        return Err(cfg(format!(
            "{} holds a sealed {:?}",
            path.display(),
            file.purpose
        )));
    }
    let secret = unseal_file(&mut tpm, settings, path, &file)?;
    if let Some(v) = &expected {
        let want = settings.policy.pcrs.len();
        if v.len() != want {
            return Err(cfg(format!(
                "give an expected value for each of the {want} PCRs of {}",
                settings.policy.spec()
            )));
        }
    }
    let next = seal_to(
        &mut tpm,
        settings,
        purpose,
        &secret,
        expected,
        file.signing_key.clone(),
    )?;
    drop(tpm);
    next.write_new(&pending)?;
    Ok(SealReport {
        path: pending.display().to_string(),
        policy: next.policy()?.spec(),
        pcr_values: next.pcr_values.clone(),
        root_key_id: key_id_of(purpose, &secret)?,
        unseal_ms: 0.0,
    })
}

/// `sovkms tpm reseal --confirm`: the pending blob must unseal now; then it
/// replaces the old one (atomically, by rename).
pub fn confirm_reseal(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<SealReport, RootError> {
    let pending = pending_path(path);
    let file = SealedFile::read(&pending)?;
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let t = Instant::now();
    let secret = unseal_file(&mut tpm, settings, &pending, &file)?;
    let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(tpm);
    std::fs::rename(&pending, path)
        .and_then(|_| std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all())
        .map_err(|e| cfg(format!("cannot replace {}: {e}", path.display())))?;
    Ok(SealReport {
        path: path.display().to_string(),
        policy: file.policy()?.spec(),
        pcr_values: file.pcr_values.clone(),
        root_key_id: key_id_of(purpose, &secret)?,
        unseal_ms,
    })
}

/// Unseals a sealed HSM PIN (the PKCS#11 root's `pin_tpm_sealed`).
pub fn unseal_pin(settings: &TpmSettings, path: &Path) -> Result<crate::secret::Pin, RootError> {
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let (secret, _, _) = unseal_configured(&mut tpm, settings, path, Purpose::HsmPin)?;
    let s = String::from_utf8(secret.to_vec())
        .map_err(|_| RootError::new(RootErrorKind::Integrity, "the sealed PIN is not UTF-8"))?;
    Ok(crate::secret::Pin::new(s))
}

/// The root key id a sealed root secret gives (none for a PIN).
fn key_id_of(purpose: Purpose, secret: &[u8]) -> Result<Option<String>, RootError> {
    match purpose {
        Purpose::Root => root_key_id(secret).map(Some),
        Purpose::HsmPin => Ok(None),
    }
}

fn root_key_id(secret: &[u8]) -> Result<String, RootError> {
    let k = derive(secret, WRAP_LABEL)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"sovkms/v1/root-key-check-value");
    ctx.update(&k[..]);
    Ok(format!("tpm:{}", hex::encode(&ctx.finish().as_ref()[..8])))
}

/// A quote written as files for `tpm2_checkquote`.
#[derive(Debug, serde::Serialize)]
pub struct AttestReport {
    /// Directory holding the files.
    pub dir: String,
    /// `sha256:7`.
    pub pcrs: String,
    /// Quoted values (hex), in order.
    pub pcr_values: Vec<String>,
    /// The nonce (hex).
    pub nonce: String,
    /// SHA-256 of the attestation key's SubjectPublicKeyInfo (hex): what an
    /// auditor pins.
    pub ak_fingerprint: String,
    /// Milliseconds for the quote (connect, create AK, quote, read PCRs).
    pub quote_ms: f64,
    /// The command that verifies the files.
    pub verify_with: String,
}

/// The attestation files' names, shared by the CLI and the gRPC client.
pub mod files {
    /// TPMS_ATTEST.
    pub const MESSAGE: &str = "quote.msg";
    /// TPMT_SIGNATURE.
    pub const SIGNATURE: &str = "quote.sig";
    /// PCR values, concatenated in selection order.
    pub const PCRS: &str = "pcrs.bin";
    /// Attestation key, TPM2B_PUBLIC.
    pub const AK_PUBLIC: &str = "ak.pub";
    /// Attestation key, SubjectPublicKeyInfo PEM.
    pub const AK_PEM: &str = "ak.pem";
    /// Summary.
    pub const SUMMARY: &str = "attest.json";
}

/// Accepted nonce lengths for a quote, in bytes (the TPM takes up to 64).
pub const NONCE_BYTES: std::ops::RangeInclusive<usize> = 8..=64;

/// Quotes the configured PCRs with `nonce` ([`NONCE_BYTES`]).
pub fn quote(settings: &TpmSettings, nonce: &[u8]) -> Result<(Quote, f64), RootError> {
    if !NONCE_BYTES.contains(&nonce.len()) {
        return Err(RootError::new(
            RootErrorKind::Config,
            "the nonce must be 8 to 64 bytes (16 or more random bytes recommended)",
        ));
    }
    let t = Instant::now();
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let q = tpm.quote(&settings.policy, nonce)?;
    Ok((q, t.elapsed().as_secs_f64() * 1e3))
}

/// The host's TPM as an [`Attestor`](crate::root::Attestor): one quote at
/// a time (a TPM without a resource manager takes one client).
pub struct TpmAttestor {
    settings: TpmSettings,
    one: std::sync::Mutex<()>,
}

impl TpmAttestor {
    /// Quotes through the TPM `settings` name.
    pub fn new(settings: TpmSettings) -> Self {
        Self {
            settings,
            one: std::sync::Mutex::new(()),
        }
    }
}

impl crate::root::Attestor for TpmAttestor {
    fn quote(&self, nonce: &[u8]) -> Result<Quote, RootError> {
        // The guarded value is `()`: a poisoned lock protects no state.
        let _one = self.one.lock().unwrap_or_else(|p| p.into_inner());
        quote(&self.settings, nonce).map(|(q, _)| q)
    }

    fn pcr_selection(&self) -> String {
        self.settings.policy.spec()
    }
}

/// Writes a quote's files into `dir` (created) and returns the summary.
pub fn write_attestation(
    dir: &Path,
    policy_spec: &str,
    nonce: &[u8],
    q: &Quote,
    quote_ms: f64,
) -> Result<AttestReport, crate::files::FileError> {
    use crate::files::FileError;
    let point = &q.ak_sec1;
    let pem = crate::root::p256_spki_pem(point);
    let fingerprint = hex::encode(digest::digest(
        &digest::SHA256,
        &crate::root::p256_spki_der(point),
    ));
    std::fs::create_dir_all(dir).map_err(|e| FileError::at(dir, e))?;
    let pcrs: Vec<u8> = q.pcr_values.concat();
    let n = hex::encode(nonce);
    let report = AttestReport {
        dir: dir.display().to_string(),
        pcrs: policy_spec.to_string(),
        pcr_values: q.pcr_values.iter().map(hex::encode).collect(),
        nonce: n.clone(),
        ak_fingerprint: fingerprint,
        quote_ms,
        verify_with: format!(
            "tpm2_checkquote -u {} -m {} -s {} -f {} -l {policy_spec} -g sha256 -q {n}",
            files::AK_PEM,
            files::MESSAGE,
            files::SIGNATURE,
            files::PCRS
        ),
    };
    let summary = serde_json::to_vec_pretty(&report)
        .map_err(|e| FileError::at(&dir.join(files::SUMMARY), e.into()))?;
    for (name, bytes) in [
        (files::MESSAGE, &q.message[..]),
        (files::SIGNATURE, &q.signature[..]),
        (files::PCRS, &pcrs[..]),
        (files::AK_PUBLIC, &q.ak_public[..]),
        (files::AK_PEM, pem.as_bytes()),
        (files::SUMMARY, &summary[..]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| FileError::at(&p, e))?;
    }
    Ok(report)
}

/// The TPM-bound root of trust.
pub struct TpmRoot {
    /// AES-256 key wrap under the key derived from the unsealed secret; its
    /// key schedule zeroizes on drop (`aes` with its `zeroize` feature).
    kek: aes_kw::KekAes256,
    key_id: String,
    signer: EcdsaKeyPair,
    rng: SystemRandom,
    description: String,
}

impl TpmRoot {
    /// Unseals the root secret from `sealed` (fails closed: any TPM, policy
    /// or blob problem is an error and the broker does not start).
    pub fn open(settings: &TpmSettings, sealed: &Path) -> Result<Self, RootError> {
        let t = Instant::now();
        let mut tpm = Tpm::connect(&settings.tcti)?;
        let (secret, file, used) = unseal_configured(&mut tpm, settings, sealed, Purpose::Root)?;
        let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
        let policy = file.policy()?;
        if policy != settings.policy {
            tracing::warn!(
                sealed_to = %policy.spec(),
                configured = %settings.policy.spec(),
                "the root is sealed to other PCRs than the config names; \
                 run `sovkms tpm reseal` to bind it to the configured ones"
            );
        }
        let enc = file
            .signing_key
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > 12 + 16)
            .ok_or_else(|| {
                RootError::new(
                    RootErrorKind::Integrity,
                    format!(
                        "{}: the signing key is missing or malformed",
                        used.display()
                    ),
                )
            })?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&enc[..12]);
        let mut buf = Zeroizing::new(enc[12..].to_vec());
        let pkcs8 = signing_aead(&secret)?
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(SIGNING_AAD),
                &mut buf,
            )
            .map_err(|_| {
                RootError::new(
                    RootErrorKind::Integrity,
                    format!(
                        "{}: the signing key does not belong to this root secret",
                        used.display()
                    ),
                )
            })?;
        let rng = SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|_| RootError::new(RootErrorKind::Integrity, "signing key is corrupt"))?;
        // Built from a reference: no stray copy of the key on the stack.
        let wk = derive(&secret, WRAP_LABEL)?;
        let kek = aes_kw::KekAes256::new(aes::cipher::generic_array::GenericArray::from_slice(
            &wk[..],
        ));
        let key_id = root_key_id(&secret)?;
        let facts = tpm
            .facts()
            .map(|f| format!("{} {} firmware {}", f.manufacturer, f.vendor, f.firmware))
            .unwrap_or_else(|_| "TPM 2.0".into());
        tracing::info!(unseal_ms, blob = %used.display(), policy = %policy.spec(), "TPM root unsealed");
        Ok(Self {
            kek,
            key_id,
            signer,
            rng,
            description: format!(
                "TPM 2.0 ({facts}) via {}; root sealed to PCR {}",
                settings.tcti,
                policy.spec()
            ),
        })
    }
}

impl RootOfTrust for TpmRoot {
    fn info(&self) -> RootInfo {
        RootInfo {
            kind: "tpm",
            description: self.description.clone(),
            root_key_id: self.key_id.clone(),
            development_only: false,
            mechanism: "system RNG; AES-256 key wrap (RFC 3394) under a key derived (HKDF-SHA256) \
                        from a TPM-generated root secret sealed to the TPM's PCR policy"
                .into(),
        }
    }

    fn health(&self) -> Result<(), RootError> {
        // The secret was unsealed at start; requests do not need the TPM.
        Ok(())
    }

    fn generate_material(&self) -> Result<KeyMaterial, RootError> {
        super::system_material(&self.rng)
    }

    fn wrap(&self, material: &KeyMaterial) -> Result<WrappedKey, RootError> {
        let mut out = vec![0u8; KEY_LEN + 8];
        self.kek
            .wrap(material.expose_secret(), &mut out)
            .map_err(|_| cfg("AES key wrap failed"))?;
        Ok(WrappedKey {
            root_key_id: self.key_id.clone(),
            blob: out,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<KeyMaterial, RootError> {
        wrapped.check_root(&self.key_id)?;
        let integrity = super::integrity_error;
        if wrapped.blob.len() != KEY_LEN + 8 {
            return Err(integrity());
        }
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        self.kek
            .unwrap(&wrapped.blob, &mut out[..])
            .map_err(|_| integrity())?;
        Ok(KeyMaterial::from_array(&mut out))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, RootError> {
        self.signer
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| unavailable("signing failed".into()))
    }

    fn signing_public_key(&self) -> Result<Vec<u8>, RootError> {
        Ok(self.signer.public_key().as_ref().to_vec())
    }
}
