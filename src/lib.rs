//! sovkms: a sovereign key-management and HSM broker.
//!
//! One broker runs per region. It holds that region's keys under a root of
//! trust in the region's hardware, performs AES-256-GCM envelope encryption
//! for services over mutual-TLS gRPC, and refuses plaintext to any caller
//! outside its region.
//!
//! ```text
//!  client ──mTLS──▶ api/ (tonic; cert → Caller; Error → Status)
//!                     │
//!                     ▼
//!                  broker/ ── region.rs (residency rule) ── policy/ (roles, grants)
//!                     │
//!          ┌──────────┼───────────┐
//!          ▼          ▼           ▼
//!     envelope/     keys/       store/ (sled; wrapped material only)
//!   (format, GCM) (KEK cache)
//!                     │
//!                     ▼
//!                  root/ (RootOfTrust: PKCS#11 HSM, TPM 2.0, software dev root)
//! ```

pub mod api;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod pki;
pub mod policy;
pub mod region;
pub mod root;
pub mod secret;
pub mod server;
pub mod store;

/// Lowercase hex, as `hex::encode` writes it, without its char-by-char
/// iterator (this runs several times per request).
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_lower_matches_the_hex_crate() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(super::hex_lower(&all), hex::encode(&all));
        assert_eq!(super::hex_lower(&[]), "");
    }
}
