//! TPM 2.0 binding: a root of trust sealed to the host's TPM, an HSM PIN
//! sealed the same way, and quotes for auditors.
//!
//! Files: `policy.rs` (PCR selection), `sealed.rs` (the sealed-blob file
//! format, seal and unseal), `ops.rs` (the operator's seal-root, seal-pin,
//! check and reseal), `attest.rs` (quotes and their files), `root.rs`
//! (`TpmRoot`), `device.rs` (TPM commands) and `error.rs` (the one response
//! code mapping).
//!
//! The TPM is used at start (unseal) and for attestation only: the unsealed
//! root secret lives in a zeroizing buffer and wraps key versions in
//! software (AES-256 key wrap, RFC 3394), so requests never wait on the TPM.

mod attest;
mod device;
mod error;
mod ops;
mod policy;
mod root;
mod sealed;

// Shared between the files of this folder.
use ops::root_key_id;
use root::{derive, signing_aead, SIGNING_AAD, WRAP_LABEL};
use sealed::{seal_to, unseal_file};

pub use attest::{files, quote, write_attestation, AttestReport, TpmAttestor, NONCE_BYTES};
pub use ops::{check, confirm_reseal, reseal, seal_pin, seal_root, unseal_pin, SealReport};
pub use policy::{PcrPolicy, PcrPolicyError};
pub use root::TpmRoot;
pub use sealed::{pending_path, unseal_configured, SealedFile};

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

fn cfg(m: impl Into<String>) -> RootError {
    RootError::new(RootErrorKind::Config, m)
}
