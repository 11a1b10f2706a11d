//! The keyring: which key records and which unwrapped version material are
//! usable now. It owns both in-memory caches and the single-flight unwrap,
//! and it is the one place that drops them when a key changes.
//!
//! It reads nothing itself: the caller passes the store read or the root
//! unwrap as a closure, so this module depends on neither. Both caches use
//! an epoch taken *before* the slow read: a change that commits (and calls
//! [`Keyring::forget`]) between that read and the insert bumps the epoch,
//! and the stale value is handed to the one request that read it but never
//! cached. A removed grant or a revoked key cannot come back from a cache.

use super::{CacheStats, KekCache, KeyId, KeyRecord};
use crate::envelope::Kek;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Whether the caller may wait (a store read, a root-of-trust call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// On a blocking thread: slow reads are fine.
    Allowed,
    /// On the async runtime: anything slow returns [`Halt::WouldBlock`].
    Refused,
}

/// A lookup that stopped: it would have blocked, or the read failed.
#[derive(Debug)]
pub enum Halt<E> {
    /// Retry with [`Wait::Allowed`] off the async runtime. Never a request
    /// outcome: nothing is audited for it.
    WouldBlock,
    /// The read failed.
    Failed(E),
}

impl<E> From<E> for Halt<E> {
    fn from(e: E) -> Self {
        Self::Failed(e)
    }
}

struct Records {
    map: HashMap<KeyId, (Arc<KeyRecord>, std::time::Instant)>,
    epoch: u64,
}

/// Held while one request unwraps a version; others wait on it.
type UnwrapSlot = Arc<Mutex<()>>;

/// Usable key records and version material, bounded in count and age.
pub struct Keyring {
    records: Mutex<Records>,
    max_records: usize,
    /// Longest a record is used without reading it again (None: until
    /// this broker changes it). Brokers sharing a store bound what a lost
    /// change notification can cost this way.
    record_ttl: Option<Duration>,
    keks: KekCache,
    unwrapping: Mutex<HashMap<(KeyId, u32), UnwrapSlot>>,
}

// The guarded maps are changed by single calls; a panic elsewhere while
// holding a lock leaves them consistent, so poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Keyring {
    /// At most `max_entries` records and as many versions, each version
    /// kept at most `ttl`.
    pub fn new(max_entries: usize, ttl: Duration) -> Self {
        Self {
            records: Mutex::new(Records {
                map: HashMap::new(),
                epoch: 0,
            }),
            max_records: max_entries.max(1),
            record_ttl: None,
            keks: KekCache::new(max_entries, ttl),
            unwrapping: Mutex::new(HashMap::new()),
        }
    }

    /// Records older than `ttl` are read again.
    pub fn with_record_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.record_ttl = ttl;
        self
    }

    /// A key's record, from memory or through `read` (a store read).
    pub fn record<E>(
        &self,
        id: &KeyId,
        wait: Wait,
        read: impl FnOnce() -> Result<KeyRecord, E>,
    ) -> Result<Arc<KeyRecord>, Halt<E>> {
        let epoch = {
            let g = lock(&self.records);
            if let Some((r, at)) = g.map.get(id) {
                if self.record_ttl.is_none_or(|ttl| at.elapsed() < ttl) {
                    return Ok(Arc::clone(r));
                }
            }
            g.epoch
        };
        if wait == Wait::Refused {
            return Err(Halt::WouldBlock);
        }
        let read_at = std::time::Instant::now();
        let rec = Arc::new(read()?);
        let mut g = lock(&self.records);
        if g.epoch == epoch {
            if g.map.len() >= self.max_records {
                g.map.clear();
            }
            g.map.insert(id.clone(), (Arc::clone(&rec), read_at));
        }
        Ok(rec)
    }

    /// A version's material, from memory or through `unwrap` (a root call).
    /// Concurrent first uses of a version share one unwrap: the first
    /// caller unwraps, the others wait for it and find it cached.
    pub fn kek<E>(
        &self,
        id: &KeyId,
        version: u32,
        wait: Wait,
        unwrap: impl FnOnce() -> Result<Kek, E>,
    ) -> Result<Arc<Kek>, Halt<E>> {
        if let Ok(k) = self.keks.get(id, version) {
            return Ok(k);
        }
        if wait == Wait::Refused {
            return Err(Halt::WouldBlock);
        }
        let slot = Arc::clone(
            lock(&self.unwrapping)
                .entry((id.clone(), version))
                .or_default(),
        );
        let result = {
            let _one = lock(&slot);
            match self.keks.peek(id, version) {
                Ok(k) => Ok(k),
                Err(epoch) => unwrap().map(|k| {
                    let k = Arc::new(k);
                    self.keks.insert(id, version, Arc::clone(&k), epoch);
                    k
                }),
            }
        };
        let mut f = lock(&self.unwrapping);
        if Arc::strong_count(&slot) == 2 {
            f.remove(&(id.clone(), version));
        }
        Ok(result?)
    }

    /// Drops every cached form of a key. Called after each committed change.
    pub fn forget(&self, id: &KeyId) {
        self.keks.invalidate(id);
        let mut g = lock(&self.records);
        g.epoch += 1;
        g.map.remove(id);
    }

    /// Drops every cached record and version (changes may have been
    /// missed).
    pub fn forget_all(&self) {
        self.keks.clear();
        let mut g = lock(&self.records);
        g.epoch += 1;
        g.map.clear();
    }

    /// Version-material counters.
    pub fn stats(&self) -> CacheStats {
        self.keks.stats()
    }

    /// Key records held in memory now.
    pub fn records_held(&self) -> u64 {
        lock(&self.records).map.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyState;

    fn rec(id: &str, state: KeyState) -> KeyRecord {
        KeyRecord::example(id, "eu-central", state)
    }

    /// A revoke that commits while a request's store read is in flight
    /// must not let that read's (now stale) record into the cache. The
    /// interleaving is forced by doing the commit inside the read.
    #[test]
    fn a_change_during_a_read_keeps_the_stale_record_out() {
        let ring = Keyring::new(10, Duration::from_secs(60));
        let id = KeyId::parse("k").unwrap();
        let stale = ring
            .record(&id, Wait::Allowed, || {
                let before = rec("k", KeyState::Active);
                ring.forget(&id); // the revoke commits here
                Ok::<_, ()>(before)
            })
            .unwrap();
        assert_eq!(stale.state, KeyState::Active);
        let now = ring
            .record(&id, Wait::Allowed, || {
                Ok::<_, ()>(rec("k", KeyState::Compromised))
            })
            .unwrap();
        assert_eq!(now.state, KeyState::Compromised, "stale record was cached");
        // Without a change in between, the read is cached.
        let again = ring
            .record(&id, Wait::Refused, || Err::<KeyRecord, ()>(()))
            .unwrap();
        assert_eq!(again.state, KeyState::Compromised);
    }

    #[test]
    fn refused_wait_never_reads() {
        let ring = Keyring::new(10, Duration::from_secs(60));
        let id = KeyId::parse("k").unwrap();
        let r = ring.record(&id, Wait::Refused, || -> Result<KeyRecord, ()> {
            unreachable!("read while waiting is refused")
        });
        assert!(matches!(r, Err(Halt::WouldBlock)));
        let k = ring.kek(&id, 1, Wait::Refused, || -> Result<Kek, ()> {
            unreachable!("unwrap while waiting is refused")
        });
        assert!(matches!(k, Err(Halt::WouldBlock)));
    }

    #[test]
    fn a_change_during_an_unwrap_keeps_the_material_out() {
        let ring = Keyring::new(10, Duration::from_secs(60));
        let id = KeyId::parse("k").unwrap();
        let kek = || Kek::new(crate::secret::KeyMaterial::from_slice(&[7; 32]).unwrap()).unwrap();
        ring.kek(&id, 1, Wait::Allowed, || {
            ring.forget(&id);
            Ok::<_, ()>(kek())
        })
        .unwrap();
        let mut unwrapped = false;
        ring.kek(&id, 1, Wait::Allowed, || {
            unwrapped = true;
            Ok::<_, ()>(kek())
        })
        .unwrap();
        assert!(unwrapped, "material unwrapped before the change was cached");
    }
}
