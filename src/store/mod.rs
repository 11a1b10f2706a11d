//! The store of key records. Records hold wrapped material only.
//!
//! Contract: a write method returns only after the write is durable (on
//! disk, fsynced). If it fails, the write may or may not have happened; the
//! broker then reports an error and does not acknowledge, and a retry of a
//! lifecycle call is safe because each reads the current record first.
//!
//! Several brokers may share one store (PostgreSQL): lifecycle changes
//! take the region's [`Store::lifecycle_lock`], every update names the
//! revision it read (a stale one is a [`StoreError::Conflict`], never a
//! lost update), and changes made by other brokers reach this one through
//! [`Store::on_change`].

pub mod authenticated;
pub mod backup;
pub mod cluster;
mod postgres;
mod sled_store;

pub use postgres::{url_has_password, PgPassword, PgSettings, PgStore, PgTls, SCHEMA_VERSION};
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
    /// The record changed since it was read (another broker wrote it):
    /// nothing was written.
    #[error("key {0} was changed by another broker at the same time; nothing was written, retry")]
    Conflict(KeyId),
    /// The database's schema is newer than this binary knows.
    #[error("the database schema is version {found}, newer than this sovkms knows ({known}); upgrade sovkms before starting it on this database")]
    SchemaTooNew {
        /// Version found in the database.
        found: i32,
        /// Newest version this binary applies.
        known: i32,
    },
    /// A stored record does not match its authentication code: it was
    /// changed behind the broker's back.
    #[error("stored {0} does not match its authentication code: it was changed outside sovkms (in the database or the data directory); restore it from a backup")]
    Tampered(String),
    /// A key record read back at a revision older than one this process
    /// has already seen: restored from an old copy, or a commit lost.
    #[error("stored key {id} is at revision {found}, older than revision {seen} this broker has already read: it was rolled back (restored from an old copy, or a database failover lost a commit); the key is refused until its latest change is made again or the broker restarts")]
    RolledBack {
        /// The key.
        id: String,
        /// The revision read now.
        found: u64,
        /// The highest revision read before.
        seen: u64,
    },
    /// A stored record cannot be decoded (or encoded).
    #[error("stored record {id} is corrupt: {source}")]
    Corrupt {
        /// The record's id.
        id: String,
        /// The decoder's complaint.
        source: serde_json::Error,
    },
}

/// Held while one lifecycle change (read, audit, write) runs; dropping it
/// lets the next one in, on this broker or another.
pub type LifecycleLock = Box<dyn Send>;

/// A change another broker committed, pushed to this one's caches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// This key's record changed.
    Key(KeyId),
    /// A break-glass grant changed.
    BreakGlass,
    /// Changes may have been missed (the notification channel was lost):
    /// drop everything cached.
    All,
}

/// A table of chains, one per broker (the PostgreSQL store implements it;
/// the audit log writes and reads chains through it).
pub trait ChainTable: Send + Sync {
    /// Appends records `(seq, line)` of `broker_id`'s chain, all or none,
    /// durable on return.
    fn append(&self, broker_id: &str, rows: Vec<(u64, String)>) -> std::io::Result<()>;
    /// The last record of `broker_id`'s chain, if any.
    fn last(&self, broker_id: &str) -> std::io::Result<Option<String>>;
    /// Up to `limit` records of `broker_id`'s chain after `after_seq`, in order.
    fn page(
        &self,
        broker_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> std::io::Result<Vec<(u64, String)>>;
    /// The brokers that have a chain, by id.
    fn brokers(&self) -> std::io::Result<Vec<String>>;
}

/// A chain table in settings (shown by name only).
#[derive(Clone)]
pub struct TableRef(pub std::sync::Arc<dyn ChainTable>);

impl std::fmt::Debug for TableRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChainTable")
    }
}

/// One stored item, as a backup holds it.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Item {
    /// A key record (wrapped material only).
    Key(KeyRecord),
    /// A break-glass grant.
    BreakGlass(BreakGlass),
}

/// Called with each change another broker made (from a store thread).
pub type ChangeHandler = Box<dyn Fn(Change) + Send + Sync>;

/// Persistent key records.
pub trait Store: Send + Sync {
    /// Reads one key.
    fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new key; `AlreadyExists` if the id is taken. Durable on return.
    fn insert(&self, rec: &KeyRecord) -> Result<(), StoreError>;
    /// Replaces an existing key's record, read at `rec.revision`; stores
    /// it at the next revision. `Conflict` if the stored revision is not
    /// `rec.revision` (nothing written). Durable on return.
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
    /// A value the store keeps for the broker itself, by name (the
    /// wrapped record key).
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes `value` under `name` unless a value is there; returns the
    /// value there afterwards (brokers starting together agree on one).
    /// Durable on return.
    fn put_meta_once(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Replaces `name`'s value (a re-wrap). Durable on return.
    fn replace_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Takes the region's lifecycle lock: one lifecycle change at a time
    /// across every broker sharing this store. A store of one broker has
    /// nothing to take (the broker's own mutex suffices).
    fn lifecycle_lock(&self) -> Result<LifecycleLock, StoreError> {
        Ok(Box::new(()))
    }
    /// Hands every key record, then every break-glass grant, to `each`, as
    /// of one moment (a backup). The default reads page by page: a store
    /// nobody writes meanwhile (sled, held exclusively by this process).
    fn snapshot(
        &self,
        each: &mut dyn FnMut(Item) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut after: Option<KeyId> = None;
        loop {
            let (page, more) = self.scan(after.as_ref(), 1000, &|_| true)?;
            after = page.last().map(|r| r.id.clone());
            for r in page {
                each(Item::Key(r))?;
            }
            if !more {
                break;
            }
        }
        for bg in self.list_break_glass()? {
            each(Item::BreakGlass(bg))?;
        }
        Ok(())
    }
    /// Registers the handler of changes other brokers make. A store of one
    /// broker has none to report.
    fn on_change(&self, handler: ChangeHandler) {
        let _ = handler;
    }
}

/// `rec` as stored after an update: at its next revision.
pub(crate) fn next_revision(rec: &KeyRecord) -> KeyRecord {
    let mut next = rec.clone();
    next.revision = rec.revision.wrapping_add(1);
    next
}
