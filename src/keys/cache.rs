//! Bounded, expiring cache of unwrapped key version material, so that a
//! steady-state request makes no root-of-trust call.
//!
//! Entries are dropped (and so zeroized) on eviction, on expiry and on every
//! state change of their key. An epoch counter keeps a request that started
//! before an invalidation from re-inserting what was just invalidated.

use super::KeyId;
use crate::envelope::Kek;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Entry {
    material: Arc<Kek>,
    inserted: Instant,
}

struct Inner {
    map: HashMap<(KeyId, u32), Entry>,
    epoch: u64,
}

/// Counters for benchmarks and `GetInfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that needed the root of trust.
    pub misses: u64,
    /// Entries now held.
    pub entries: u64,
}

/// The KEK cache.
pub struct KekCache {
    inner: Mutex<Inner>,
    max_entries: usize,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl KekCache {
    /// A cache of at most `max_entries` (>= 1) entries, each kept at most `ttl`.
    pub fn new(max_entries: usize, ttl: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                epoch: 0,
            }),
            max_entries: max_entries.max(1),
            ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every mutation is a single HashMap call), so poison is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks up a version's material. On a miss, returns the epoch to pass to
    /// [`insert`](Self::insert).
    pub fn get(&self, id: &KeyId, version: u32) -> Result<Arc<Kek>, u64> {
        let r = self.peek(id, version);
        let counter = if r.is_ok() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        r
    }

    /// Like [`get`](Self::get), without counting (a second look by the same request).
    pub fn peek(&self, id: &KeyId, version: u32) -> Result<Arc<Kek>, u64> {
        let mut g = self.lock();
        let k = (id.clone(), version);
        match g.map.get(&k) {
            Some(e) if e.inserted.elapsed() < self.ttl => Ok(Arc::clone(&e.material)),
            Some(_) => {
                g.map.remove(&k);
                Err(g.epoch)
            }
            None => Err(g.epoch),
        }
    }

    /// Inserts material unwrapped after a miss at `epoch`; ignored if an
    /// invalidation happened since.
    pub fn insert(&self, id: &KeyId, version: u32, material: Arc<Kek>, epoch: u64) {
        let mut g = self.lock();
        if g.epoch != epoch {
            return;
        }
        if g.map.len() >= self.max_entries {
            let ttl = self.ttl;
            g.map.retain(|_, e| e.inserted.elapsed() < ttl);
            if g.map.len() >= self.max_entries {
                if let Some(oldest) = g
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.inserted)
                    .map(|(k, _)| k.clone())
                {
                    g.map.remove(&oldest);
                }
            }
        }
        g.map.insert(
            (id.clone(), version),
            Entry {
                material,
                inserted: Instant::now(),
            },
        );
    }

    /// Drops every version of `id`. Called on each state change of the key.
    pub fn invalidate(&self, id: &KeyId) {
        let mut g = self.lock();
        g.epoch += 1;
        g.map.retain(|(k, _), _| k != id);
    }

    /// Drops everything (root of trust lost, shutdown).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.epoch += 1;
        g.map.clear();
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        let entries = self.lock().map.len() as u64;
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> KeyId {
        KeyId::parse(s).unwrap()
    }

    fn mat() -> Arc<Kek> {
        Arc::new(Kek::new(crate::secret::KeyMaterial::from_slice(&[1; 32]).unwrap()).unwrap())
    }

    #[test]
    fn hit_miss_and_bound() {
        let c = KekCache::new(2, Duration::from_secs(60));
        let e = c.get(&id("a"), 1).unwrap_err();
        c.insert(&id("a"), 1, mat(), e);
        assert!(c.get(&id("a"), 1).is_ok());
        c.insert(&id("b"), 1, mat(), e);
        c.insert(&id("c"), 1, mat(), e);
        assert_eq!(c.stats().entries, 2);
        assert_eq!(c.stats().hits, 1);
        assert_eq!(c.stats().misses, 1);
    }

    #[test]
    fn invalidation_beats_a_late_insert() {
        let c = KekCache::new(10, Duration::from_secs(60));
        let e = c.get(&id("a"), 1).unwrap_err();
        c.insert(&id("a"), 1, mat(), e);
        let e2 = c.get(&id("a"), 2).unwrap_err();
        c.invalidate(&id("a"));
        assert!(c.get(&id("a"), 1).is_err());
        c.insert(&id("a"), 2, mat(), e2);
        assert!(c.get(&id("a"), 2).is_err(), "stale insert must be ignored");
    }

    #[test]
    fn expiry() {
        let c = KekCache::new(10, Duration::from_millis(0));
        let e = c.get(&id("a"), 1).unwrap_err();
        c.insert(&id("a"), 1, mat(), e);
        assert!(c.get(&id("a"), 1).is_err());
    }
}
