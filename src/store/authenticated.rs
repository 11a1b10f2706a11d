//! Stored records authenticated by the region's root of trust: every key
//! record and break-glass grant carries an HMAC-SHA256 under the region's
//! record key, which is generated once, kept in the store only wrapped by
//! the root, and unwrapped by each broker at start. Every read checks it,
//! so whoever can write the data directory or the database (but not use
//! the root) cannot grant a key, change its state or swap records unseen:
//! such a record is refused as tampered. A record read back at an older
//! authenticated revision than this process has already read (the revision
//! is under the code) is refused as rolled back; one rolled back before
//! this process first read it is not detected here (SECURITY.md G22).

use super::{ChangeHandler, Item, LifecycleLock, Store, StoreError};
use crate::keys::{KeyId, KeyRecord};
use crate::policy::breakglass::BreakGlass;
use crate::root::{RootOfTrust, WrappedKey};
use std::sync::Arc;

/// The store's name of the wrapped record key.
pub const RECORD_KEY: &str = "record-key";
/// Set once every record in the store carries a code: from then on a
/// record without one is refused.
pub const ALL_AUTHENTICATED: &str = "records-authenticated";

fn root_err(what: &str, e: crate::root::RootError) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}").into())
}

fn encode<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|source| StoreError::Corrupt {
        id: what.to_owned(),
        source,
    })
}

/// The region's record key, unwrapped.
pub struct RecordKey(ring::hmac::Key);

impl RecordKey {
    /// Unwraps a stored record key (`RECORD_KEY`'s value) with `root`.
    pub fn unwrap(stored: &[u8], root: &dyn RootOfTrust) -> Result<Self, StoreError> {
        let wrapped: WrappedKey =
            serde_json::from_slice(stored).map_err(|source| StoreError::Corrupt {
                id: RECORD_KEY.into(),
                source,
            })?;
        let material = root.unwrap(&wrapped).map_err(|e| {
            root_err(
                "the record key does not open with this root of trust (another region's, or a retired root key)",
                e,
            )
        })?;
        Ok(Self(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            material.expose_secret(),
        )))
    }

    fn message(domain: &[u8], body: Vec<u8>) -> Vec<u8> {
        let mut m = domain.to_vec();
        m.extend_from_slice(&body);
        m
    }

    fn key_message(rec: &KeyRecord) -> Result<Vec<u8>, StoreError> {
        let mut bare = rec.clone();
        bare.mac.clear();
        Ok(Self::message(
            b"sovkms/v1/key-record\0",
            encode(rec.id.as_str(), &bare)?,
        ))
    }

    fn grant_message(bg: &BreakGlass) -> Result<Vec<u8>, StoreError> {
        let mut bare = bg.clone();
        bare.mac.clear();
        Ok(Self::message(
            b"sovkms/v1/break-glass\0",
            encode(&bg.id, &bare)?,
        ))
    }

    fn sign(&self, message: &[u8]) -> String {
        hex::encode(ring::hmac::sign(&self.0, message).as_ref())
    }

    /// The code of `rec` (its `mac` field left out).
    pub fn key_code(&self, rec: &KeyRecord) -> Result<String, StoreError> {
        Ok(self.sign(&Self::key_message(rec)?))
    }

    fn grant_code(&self, bg: &BreakGlass) -> Result<String, StoreError> {
        Ok(self.sign(&Self::grant_message(bg)?))
    }

    /// Constant-time check of a hex code against `message`.
    fn check(
        &self,
        message: &[u8],
        code: &str,
        what: impl FnOnce() -> String,
    ) -> Result<(), StoreError> {
        let tag = hex::decode(code).unwrap_or_default();
        ring::hmac::verify(&self.0, message, &tag).map_err(|_| StoreError::Tampered(what()))
    }

    /// Checks a key record's code.
    pub fn check_key(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.check(&Self::key_message(rec)?, &rec.mac, || {
            format!("key {}", rec.id)
        })
    }

    /// Checks a break-glass grant's code.
    pub fn check_grant(&self, bg: &BreakGlass) -> Result<(), StoreError> {
        self.check(&Self::grant_message(bg)?, &bg.mac, || {
            format!("break-glass grant {}", bg.id)
        })
    }

    /// Checks one item of a backup.
    pub fn check_item(&self, item: &Item) -> Result<(), StoreError> {
        match item {
            Item::Key(r) => self.check_key(r),
            Item::BreakGlass(bg) => self.check_grant(bg),
        }
    }
}

/// A store whose records are authenticated (see the module's docs).
pub struct Authenticated {
    inner: Arc<dyn Store>,
    key: RecordKey,
    seen: Seen,
}

/// Keys whose revisions are remembered, at most (~32 bytes each); past it
/// the memory starts again (detection resumes as keys are read again).
const MAX_SEEN: usize = 1 << 20;

/// The highest revision of each key this process has read or written,
/// by a 128-bit digest of the key's id.
#[derive(Default)]
struct Seen(std::sync::Mutex<std::collections::HashMap<u128, u64>>);

impl Seen {
    fn slot(id: &KeyId) -> u128 {
        let d = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d.as_ref()[..16]);
        u128::from_be_bytes(b)
    }

    /// Refuses `rec` if it is older than a revision already seen, and
    /// remembers it otherwise.
    fn read(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let slot = Self::slot(&rec.id);
        match m.get_mut(&slot) {
            Some(seen) if rec.revision < *seen => Err(StoreError::RolledBack {
                id: rec.id.to_string(),
                found: rec.revision,
                seen: *seen,
            }),
            Some(seen) => {
                *seen = rec.revision;
                Ok(())
            }
            None => {
                if m.len() >= MAX_SEEN {
                    m.clear();
                }
                m.insert(slot, rec.revision);
                Ok(())
            }
        }
    }

    /// Remembers what this process wrote: `inserts` at their revision,
    /// `updates` at the next one (the revision the store keeps).
    fn wrote(&self, inserts: &[&KeyRecord], updates: &[&KeyRecord]) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let written = inserts
            .iter()
            .map(|r| (r, r.revision))
            .chain(updates.iter().map(|r| (r, r.revision.wrapping_add(1))));
        for (r, revision) in written {
            if m.len() >= MAX_SEEN {
                m.clear();
            }
            let seen = m.entry(Self::slot(&r.id)).or_insert(revision);
            *seen = (*seen).max(revision);
        }
    }
}

impl Authenticated {
    /// Wraps `inner`: unwraps the region's record key with `root`, making
    /// it first if the store has none (brokers starting together agree on
    /// one), and authenticates the records of a store that had none yet.
    pub fn open(inner: Arc<dyn Store>, root: &dyn RootOfTrust) -> Result<Self, StoreError> {
        let stored = match inner.meta(RECORD_KEY)? {
            Some(v) => v,
            None => {
                let material = root
                    .generate_material()
                    .map_err(|e| root_err("record key", e))?;
                let wrapped = root
                    .wrap(&material)
                    .map_err(|e| root_err("record key", e))?;
                inner.put_meta_once(RECORD_KEY, &encode(RECORD_KEY, &wrapped)?)?
            }
        };
        let store = Self {
            key: RecordKey::unwrap(&stored, root)?,
            inner,
            seen: Seen::default(),
        };
        if store.inner.meta(ALL_AUTHENTICATED)?.is_none() {
            store.authenticate_existing()?;
        }
        Ok(store)
    }

    /// Gives every record of a store written before records were
    /// authenticated its code (trusting the store's state at this moment),
    /// then marks the store so that a record without one is refused.
    fn authenticate_existing(&self) -> Result<(), StoreError> {
        let mut n = 0;
        let mut after: Option<KeyId> = None;
        loop {
            let (page, more) = self.inner.scan(after.as_ref(), 500, &|_| true)?;
            after = page.last().map(|r| r.id.clone());
            for r in page.iter().filter(|r| self.key.check_key(r).is_err()) {
                self.update(r)?;
                n += 1;
            }
            if !more {
                break;
            }
        }
        for bg in self.inner.list_break_glass()? {
            if self.key.check_grant(&bg).is_err() {
                self.put_break_glass(&bg)?;
                n += 1;
            }
        }
        self.inner.put_meta_once(ALL_AUTHENTICATED, b"1")?;
        if n > 0 {
            tracing::warn!(
                records = n,
                "stored records authenticated for the first time (trusting the store as it is now)"
            );
        }
        Ok(())
    }

    /// The record key (for tools that write records directly).
    pub fn record_key(&self) -> &RecordKey {
        &self.key
    }

    fn signed(&self, rec: &KeyRecord) -> Result<KeyRecord, StoreError> {
        let mut r = rec.clone();
        r.mac = self.key.key_code(rec)?;
        Ok(r)
    }

    /// `rec` with the code of what the inner store will keep: its next
    /// revision.
    fn signed_update(&self, rec: &KeyRecord) -> Result<KeyRecord, StoreError> {
        let mut r = rec.clone();
        r.mac = self.key.key_code(&super::next_revision(rec))?;
        Ok(r)
    }
}

impl Store for Authenticated {
    fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let r = self.inner.get(id)?;
        if let Some(r) = &r {
            self.key.check_key(r)?;
            self.seen.read(r)?;
        }
        Ok(r)
    }

    fn insert(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.inner.insert(&self.signed(rec)?)?;
        self.seen.wrote(&[rec], &[]);
        Ok(())
    }

    fn update(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.inner.update(&self.signed_update(rec)?)?;
        self.seen.wrote(&[], &[rec]);
        Ok(())
    }

    fn write_batch(
        &self,
        inserts: &[&KeyRecord],
        updates: &[&KeyRecord],
    ) -> Result<(), StoreError> {
        let ins = inserts
            .iter()
            .map(|r| self.signed(r))
            .collect::<Result<Vec<_>, _>>()?;
        let upd = updates
            .iter()
            .map(|r| self.signed_update(r))
            .collect::<Result<Vec<_>, _>>()?;
        self.inner.write_batch(
            &ins.iter().collect::<Vec<_>>(),
            &upd.iter().collect::<Vec<_>>(),
        )?;
        self.seen.wrote(inserts, updates);
        Ok(())
    }

    fn scan(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        filter: &dyn Fn(&KeyRecord) -> bool,
    ) -> Result<(Vec<KeyRecord>, bool), StoreError> {
        let (page, more) = self.inner.scan(after, limit, filter)?;
        for r in &page {
            self.key.check_key(r)?;
            self.seen.read(r)?;
        }
        Ok((page, more))
    }

    fn put_break_glass(&self, bg: &BreakGlass) -> Result<(), StoreError> {
        let mut b = bg.clone();
        b.mac = self.key.grant_code(bg)?;
        self.inner.put_break_glass(&b)
    }

    fn list_break_glass(&self) -> Result<Vec<BreakGlass>, StoreError> {
        let all = self.inner.list_break_glass()?;
        for bg in &all {
            self.key.check_grant(bg)?;
        }
        Ok(all)
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.meta(name)
    }

    fn put_meta_once(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.put_meta_once(name, value)
    }

    fn replace_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.replace_meta(name, value)
    }

    fn lifecycle_lock(&self) -> Result<LifecycleLock, StoreError> {
        self.inner.lifecycle_lock()
    }

    fn snapshot(
        &self,
        each: &mut dyn FnMut(Item) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let key = &self.key;
        self.inner.snapshot(&mut |item| {
            key.check_item(&item)?;
            each(item)
        })
    }

    fn on_change(&self, handler: ChangeHandler) {
        self.inner.on_change(handler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyState;
    use crate::store::SledStore;

    fn root(dir: &std::path::Path) -> crate::root::software::SoftwareRoot {
        crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).unwrap()
    }

    #[test]
    fn revisions_read_back_only_go_forward() {
        let seen = Seen::default();
        let mut r = KeyRecord::example("k-a", "eu-central", KeyState::Active);
        r.revision = 3;
        seen.read(&r).unwrap();
        seen.read(&r).unwrap();
        r.revision = 2;
        let e = seen.read(&r).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::RolledBack {
                    found: 2,
                    seen: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("k-a"), "{e}");
        // What this process wrote counts as seen.
        r.revision = 4;
        seen.wrote(&[], &[&r]);
        assert!(seen.read(&r).is_err());
        r.revision = 6;
        seen.read(&r).unwrap();
        // Each key is its own.
        seen.read(&KeyRecord::example("k-b", "eu-central", KeyState::Active))
            .unwrap();
    }

    #[test]
    fn edits_behind_the_broker_are_refused_and_old_stores_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let raw = Arc::new(SledStore::open(&dir.path().join("s")).unwrap());
        // Written before records were authenticated.
        raw.insert(&KeyRecord::example("k-old", "eu-central", KeyState::Active))
            .unwrap();
        let r = root(dir.path());
        let store = Authenticated::open(Arc::clone(&raw) as Arc<dyn Store>, &r).unwrap();
        let old = store.get(&KeyId::parse("k-old").unwrap()).unwrap().unwrap();
        assert!(!old.mac.is_empty());
        store
            .insert(&KeyRecord::example("k-new", "eu-central", KeyState::Active))
            .unwrap();
        let mut rec = store.get(&KeyId::parse("k-new").unwrap()).unwrap().unwrap();
        rec.state = KeyState::Deactivated;
        store.update(&rec).unwrap();
        let rec = store.get(&rec.id).unwrap().unwrap();
        assert_eq!(rec.state, KeyState::Deactivated);

        // Someone with the data directory reactivates it behind the broker.
        let mut forged = rec.clone();
        forged.state = KeyState::Active;
        raw.update(&forged).unwrap();
        let e = store.get(&rec.id).unwrap_err();
        assert!(matches!(e, StoreError::Tampered(_)), "{e}");
        assert!(e.to_string().contains("k-new"), "{e}");
        assert!(store.scan(None, 10, &|_| true).is_err());
        // A record slipped in without a code.
        raw.insert(&KeyRecord::example(
            "k-slipped",
            "eu-central",
            KeyState::Active,
        ))
        .unwrap();
        assert!(matches!(
            store.get(&KeyId::parse("k-slipped").unwrap()),
            Err(StoreError::Tampered(_))
        ));
        // The record key opens with this root only.
        let other = tempfile::tempdir().unwrap();
        let e = Authenticated::open(raw as Arc<dyn Store>, &root(other.path())).err();
        assert!(e.is_some_and(|e| e.to_string().contains("does not open with this root")));
    }
}
