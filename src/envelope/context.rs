//! Encryption context: caller-chosen string pairs bound to a ciphertext as
//! associated data. Not secret (it is logged as a digest later), but it must
//! match exactly to decrypt.

use std::collections::BTreeMap;

/// Most pairs in one context.
pub const MAX_ENTRIES: usize = 64;
/// Most bytes in all keys and values together.
pub const MAX_TOTAL_BYTES: usize = 8 * 1024;

/// An encryption context over its limits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// Too many pairs.
    #[error("encryption context has {0} entries; the limit is {MAX_ENTRIES}")]
    Entries(usize),
    /// A pair with an empty key.
    #[error("encryption context keys must not be empty")]
    EmptyKey,
    /// Too many bytes.
    #[error("encryption context is {0} bytes; the limit is {MAX_TOTAL_BYTES}")]
    Bytes(usize),
}

/// A validated encryption context, kept sorted so its encoding is canonical.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    /// Validates a context: at most 64 pairs, 8 KiB in all, no empty key.
    pub fn new<I: IntoIterator<Item = (String, String)>>(pairs: I) -> Result<Self, ContextError> {
        let map: BTreeMap<String, String> = pairs.into_iter().collect();
        if map.len() > MAX_ENTRIES {
            return Err(ContextError::Entries(map.len()));
        }
        if map.keys().any(String::is_empty) {
            return Err(ContextError::EmptyKey);
        }
        let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total > MAX_TOTAL_BYTES {
            return Err(ContextError::Bytes(total));
        }
        Ok(Self(map))
    }

    /// The pairs, sorted by key.
    pub fn pairs(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    /// SHA-256 (hex) of the canonical encoding, for audit records; "" when empty.
    pub fn digest_hex(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        // Hashed as encoded, piece by piece: no buffer per request.
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        h.update(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            h.update(&(k.len() as u32).to_be_bytes());
            h.update(k.as_bytes());
            h.update(&(v.len() as u32).to_be_bytes());
            h.update(v.as_bytes());
        }
        crate::hex_lower(h.finish().as_ref())
    }

    /// Canonical encoding: u32 count, then per pair (sorted by key bytes)
    /// u32 key length, key, u32 value length, value; integers big-endian.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Bounded by MAX_ENTRIES and MAX_TOTAL_BYTES, so the casts are exact.
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (k, v) in &self.0 {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audited_digest_is_sha256_of_the_canonical_encoding() {
        let c = EncryptionContext::new([
            ("tenant".to_string(), "acme".to_string()),
            ("a".to_string(), "".to_string()),
            ("ünï".to_string(), "çødé".to_string()),
        ])
        .unwrap();
        let mut b = Vec::new();
        c.encode_into(&mut b);
        let want = hex::encode(ring::digest::digest(&ring::digest::SHA256, &b));
        assert_eq!(c.digest_hex(), want);
        assert_eq!(EncryptionContext::new([]).unwrap().digest_hex(), "");
    }
}
