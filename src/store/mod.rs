//! The store of key records. Records hold wrapped material only.
//!
//! Contract: a write method returns only after the write is durable (on
//! disk, fsynced). If it fails, the write may or may not have happened; the
//! broker then reports an error and does not acknowledge, and a retry of a
//! lifecycle call is safe because each reads the current record first.

mod sled_store;

pub use sled_store::SledStore;

use crate::keys::{KeyId, KeyRecord};
use crate::policy::breakglass::BreakGlass;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An id that must be new already exists.
    #[error("key {0} already exists")]
    AlreadyExists(KeyId),
    /// Another process holds the data directory.
    #[error("the data directory {0} is in use by another sovkms process (a running broker?); stop it first")]
    Locked(String),
    /// I/O or database failure; the store may be unavailable.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record cannot be decoded (or encoded).
    #[error("stored record {id} is corrupt: {source}")]
    Corrupt {
        /// The record's id.
        id: String,
        /// The decoder's complaint.
        source: serde_json::Error,
    },
}

/// Persistent key records.
pub trait Store: Send + Sync {
    /// Reads one key.
    fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new key; `AlreadyExists` if the id is taken. Durable on return.
    fn insert(&self, rec: &KeyRecord) -> Result<(), StoreError>;
    /// Replaces an existing key's record. Durable on return.
    fn update(&self, rec: &KeyRecord) -> Result<(), StoreError>;
    /// Adds `inserts` and replaces `updates` in one atomic write (all or
    /// nothing: a key pair; a rekeyed object and its predecessor, whose
    /// name moved). `AlreadyExists` if an inserted id is taken. Durable on
    /// return.
    fn write_batch(&self, inserts: &[&KeyRecord], updates: &[&KeyRecord])
        -> Result<(), StoreError>;
    /// Up to `limit` records with ids greater than `after`, in id order,
    /// that satisfy `filter`; and whether more may follow.
    fn scan(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        filter: &dyn Fn(&KeyRecord) -> bool,
    ) -> Result<(Vec<KeyRecord>, bool), StoreError>;
    /// Writes a break-glass grant (insert or replace). Durable on return.
    fn put_break_glass(&self, bg: &BreakGlass) -> Result<(), StoreError>;
    /// Every break-glass grant ever made.
    fn list_break_glass(&self) -> Result<Vec<BreakGlass>, StoreError>;
}
