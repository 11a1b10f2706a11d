//! THE seam: the root of trust that wraps key version material.
//!
//! Implementations: [`pkcs11::Pkcs11Root`] (an HSM), [`tpm::TpmRoot`] (a
//! secret sealed to the host's TPM 2.0) and [`software::SoftwareRoot`]
//! (development only).

mod encoding;
mod pin;
pub mod pkcs11;
pub mod software;
pub mod tpm;

pub use encoding::{p256_spki_der, p256_spki_pem};
pub use pin::PinSource;
pub use tpm::{Quote, NONCE_BYTES};

use crate::secret::KeyMaterial;
use std::fmt;

/// Key version material as it leaves the root of trust: wrapped, and tagged
/// with the root key that wrapped it (so a root rotation can find what is
/// left to re-wrap). Safe to store.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WrappedKey {
    /// Identifies the root key (e.g. its check value).
    pub root_key_id: String,
    /// Opaque wrapped bytes, hex in the store.
    #[serde(with = "hex::serde")]
    pub blob: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "WrappedKey(root={}, {} bytes)",
            self.root_key_id,
            self.blob.len()
        )
    }
}

impl WrappedKey {
    /// Refuses material wrapped by a root key other than `root_key_id`.
    pub fn check_root(&self, root_key_id: &str) -> Result<(), RootError> {
        if self.root_key_id == root_key_id {
            return Ok(());
        }
        Err(RootError::new(
            RootErrorKind::UnknownRootKey,
            format!(
                "key material was wrapped by root key {}, which this broker does not hold",
                self.root_key_id
            ),
        ))
    }
}

/// 256 bits of version material from the system RNG (the roots that wrap
/// in software draw it there).
pub fn system_material(rng: &dyn ring::rand::SecureRandom) -> Result<KeyMaterial, RootError> {
    let mut b = [0u8; crate::secret::KEY_LEN];
    rng.fill(&mut b)
        .map_err(|_| RootError::new(RootErrorKind::Unavailable, "random generator failed"))?;
    Ok(KeyMaterial::from_array(&mut b))
}

/// The error for a wrapped blob that fails its integrity check.
pub fn integrity_error() -> RootError {
    RootError::new(
        RootErrorKind::Integrity,
        "wrapped key material failed its integrity check",
    )
}

/// What kind of failure, so callers can tell "retry later" from "gone".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootErrorKind {
    /// Device or token unreachable; may come back. Maps to UNAVAILABLE.
    Unavailable,
    /// The root key named by a wrapped blob is not in this root of trust.
    UnknownRootKey,
    /// A wrapped blob failed its integrity check (altered, or another root).
    Integrity,
    /// Login failed.
    Auth,
    /// Misconfiguration or unprovisioned root.
    Config,
}

/// A root-of-trust failure. `message` is safe to log; it never holds a secret.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct RootError {
    /// Category.
    pub kind: RootErrorKind,
    /// Human-readable, secret-free.
    pub message: String,
}

impl RootError {
    /// Builds an error.
    pub fn new(kind: RootErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// What a root of trust is, for logs, `GetInfo` and (later) provenance.
#[derive(Clone, Debug)]
pub struct RootInfo {
    /// `software`, `pkcs11`, `tpm`.
    pub kind: &'static str,
    /// Model, token, serial: whatever identifies the device.
    pub description: String,
    /// Id of the current root key (stored in every `WrappedKey` it makes).
    pub root_key_id: String,
    /// True when the root gives no hardware protection.
    pub development_only: bool,
    /// How version material is made and wrapped (for provenance).
    pub mechanism: String,
}

/// The root of trust of one broker.
///
/// Contract: `wrap` and `generate_material` have no persistent side effect
/// in the broker's store (the broker persists the result itself), so a
/// failure halfway through leaves nothing to clean up. `unwrap` of a blob
/// made by `wrap` of the same root returns the same material, across
/// restarts. Calls may block (hardware I/O): call them off the async runtime.
pub trait RootOfTrust: Send + Sync {
    /// Describes the root.
    fn info(&self) -> RootInfo;
    /// Ok when the root can serve requests now.
    fn health(&self) -> Result<(), RootError>;
    /// Fresh 256-bit material from the root's random generator.
    fn generate_material(&self) -> Result<KeyMaterial, RootError>;
    /// Wraps material under the current root key.
    fn wrap(&self, material: &KeyMaterial) -> Result<WrappedKey, RootError>;
    /// Unwraps material wrapped by this root (current or retained root key).
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<KeyMaterial, RootError>;
    /// Signs `message` with the root's signing key: ECDSA P-256 over
    /// SHA-256(message), as the fixed 64-byte `r || s` (what PKCS#11 returns).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, RootError>;
    /// The signing public key (uncompressed SEC1 point), for auditors.
    fn signing_public_key(&self) -> Result<Vec<u8>, RootError>;
}

/// Proof of the host's platform state for the region's auditors (a TPM
/// quote). Separate from [`RootOfTrust`]: a PKCS#11 root on a host with a
/// TPM still attests, and a TPM root could be configured without it.
pub trait Attestor: Send + Sync {
    /// Quotes the configured PCRs with the auditor's nonce
    /// ([`NONCE_BYTES`]). May block; serialises its own device access.
    fn quote(&self, nonce: &[u8]) -> Result<Quote, RootError>;
    /// The PCR selection quoted, as `bank:i,j,…`.
    fn pcr_selection(&self) -> String;
}

#[doc(hidden)]
pub mod conformance;
