//! Keys and key versions: ids, lifecycle states, the stored record (wrapped
//! material only), and the in-memory cache of unwrapped version material.

mod cache;
pub mod provenance;
pub mod rewrap;

pub use cache::{CacheStats, KekCache};

use crate::policy::Grant;
use crate::region::Region;
use crate::root::WrappedKey;
use std::fmt;

/// A key id: 1–64 of `[A-Za-z0-9_-]`. Generated ids look like `k-<32 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// Parses and validates a key id.
    pub fn parse(s: &str) -> Result<Self, String> {
        if (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid key id {:?}: use 1-64 letters, digits, '-' or '_'",
                truncate(s, 80)
            ))
        }
    }

    /// A fresh random id.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut b = [0u8; 16];
        rng.fill(&mut b)?;
        Ok(Self(format!("k-{}", hex::encode(b))))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// KMIP lifecycle states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// Created, not yet usable.
    PreActive,
    /// Encrypts and decrypts.
    Active,
    /// Revoked for a benign reason: decrypts, never encrypts.
    Deactivated,
    /// Revoked because the key may be known to others: only ReEncrypt away from it.
    Compromised,
    /// Material erased; nothing under this key can be decrypted again.
    Destroyed,
}

impl KeyState {
    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PreActive => "pre-active",
            Self::Active => "active",
            Self::Deactivated => "deactivated",
            Self::Compromised => "compromised",
            Self::Destroyed => "destroyed",
        }
    }
}

/// Why a key was revoked (KMIP revocation reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    /// Not given.
    Unspecified,
    /// Replaced by another key.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// Owner changed.
    AffiliationChanged,
    /// The key may be known to others.
    KeyCompromise,
}

/// One version of a key: its material, wrapped by the root of trust.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VersionRecord {
    /// 1, 2, ...
    pub version: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// The wrapped material; `None` once the key is destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Signed origin of this version.
    #[serde(default)]
    pub provenance: Option<provenance::Provenance>,
}

/// A key as the store keeps it. Holds wrapped material only: the unwrapped
/// type (`KeyMaterial`) is not serializable, so it cannot end up here.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// Id.
    pub id: KeyId,
    /// Operator-chosen name (not unique).
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Free text.
    pub description: String,
    /// Fixed at creation to the broker's region; never changes.
    pub home_region: Region,
    /// Lifecycle state.
    pub state: KeyState,
    /// Set by Revoke.
    pub revocation_reason: Option<RevocationReason>,
    /// Set by Revoke.
    pub revocation_message: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// Scheduled destruction time (unix seconds), if any.
    pub destroy_after: Option<i64>,
    /// Version used for new encryptions.
    pub primary_version: u32,
    /// All versions, oldest first; `versions[i].version == i + 1`.
    pub versions: Vec<VersionRecord>,
    /// Who may do what with this key.
    pub grants: Vec<Grant>,
    /// SPIFFE id of the creating operator.
    pub created_by: String,
}

impl KeyRecord {
    /// The version record for `v`, if it exists.
    pub fn version(&self, v: u32) -> Option<&VersionRecord> {
        let i = usize::try_from(v).ok()?.checked_sub(1)?;
        self.versions.get(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids() {
        assert!(KeyId::parse("k-0123abcd").is_ok());
        assert!(KeyId::parse("payments_2026").is_ok());
        for bad in ["", "a b", "ü", "a/b", &"x".repeat(65)] {
            assert!(KeyId::parse(bad).is_err(), "{bad}");
        }
        let rng = ring::rand::SystemRandom::new();
        let id = KeyId::generate(&rng).unwrap();
        assert!(KeyId::parse(id.as_str()).is_ok());
        assert_eq!(id.as_str().len(), 34);
    }
}
