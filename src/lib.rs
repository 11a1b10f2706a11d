//! sovkms: a sovereign key-management and HSM broker.
//!
//! One broker runs per region. It holds that region's keys under a root of
//! trust in the region's hardware, performs AES-256-GCM envelope encryption
//! for services over mutual-TLS gRPC, and refuses plaintext to any caller
//! outside its region.
//!
//! ```text
//!  client ──mTLS──▶ api/ (the gRPC front end: cert → Caller; Error → Status once)
//!                     │
//!                     ▼
//!                  broker/ ── gate.rs: the one gate, reading policy/table.rs
//!                     │         (role, region — region.rs: residency — grant, state)
//!          ┌──────────┼───────────┐
//!          ▼          ▼           ▼
//!     envelope/     keys/       store/ (sled; wrapped material only)
//!   (format, GCM) (keyring)       audit/ (hash chain, audit-before-release)
//!                     │
//!                     ▼
//!                  root/ (RootOfTrust: PKCS#11 HSM, TPM 2.0, software dev root)
//! ```
//!
//! The core returns typed results and typed errors (`error.rs`); a front
//! end is a thin adapter that maps them to its protocol once.

pub mod admin;
pub mod api;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod envelope;
pub mod error;
pub mod file;
pub mod files;
pub mod hardening;
pub mod id;
pub mod keys;
pub mod kmip;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod region;
pub mod root;
pub mod secret;
pub mod server;
pub mod store;

pub use api::client;

/// Lowercase hex, as `hex::encode` writes it, but through the crate's
/// slice encoder instead of its char-by-char iterator (this runs several
/// times per request).
pub(crate) fn hex_lower(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    // Fails only on a length mismatch, which the sizing above rules out.
    let _ = hex::encode_to_slice(bytes, &mut out);
    // Hex digits are ASCII: this never falls back.
    String::from_utf8(out).unwrap_or_default()
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
