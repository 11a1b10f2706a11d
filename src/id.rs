//! The key id and the key's lifecycle state: the vocabulary every layer
//! passes around (envelope header, policy table, store, audit), so it lives
//! below all of them.

use std::fmt;

/// A key id: 1–64 of `[A-Za-z0-9_-]`. Generated ids look like `k-<32 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

/// A string that is not a key id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid key id {shown:?}: use 1-64 letters, digits, '-' or '_'")]
pub struct KeyIdError {
    /// The offending text, cut to 80 characters.
    shown: String,
}

impl KeyId {
    /// Parses and validates a key id.
    pub fn parse(s: &str) -> Result<Self, KeyIdError> {
        if (1..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            Ok(Self(s.to_owned()))
        } else {
            Err(KeyIdError {
                shown: truncate(s, 80).to_owned(),
            })
        }
    }

    /// A fresh random id.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut b = [0u8; 16];
        rng.fill(&mut b)?;
        Ok(Self(format!("k-{}", hex::encode(b))))
    }

    /// The id of the key created by `caller`'s request `request_id` in
    /// `region`: the same for every retry of that request, at any broker
    /// of the region, so a retried create finds the key its first attempt
    /// made instead of making a second one.
    pub fn for_request(region: &str, caller: &str, request_id: &str) -> Self {
        Self(format!(
            "k-{}",
            request_digest(&["sovkms/v1/create-key", region, caller, request_id])
        ))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 128 bits of SHA-256 over length-prefixed `parts`, in hex: names one
/// caller's request without storing who asked in the clear.
pub fn request_digest(parts: &[&str]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finish().as_ref()[..16])
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl TryFrom<String> for KeyId {
    type Error = KeyIdError;
    fn try_from(s: String) -> Result<Self, KeyIdError> {
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
