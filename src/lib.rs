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
//!                  root/ (RootOfTrust: software dev root; HSM, TPM next)
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
