//! The embedded store on sled. One tree of key records, JSON-encoded, keyed
//! by key id. Every write is followed by a flush (fsync) before returning.

use super::{Store, StoreError};
use crate::keys::{KeyId, KeyRecord};
use crate::policy::breakglass::BreakGlass;
use std::path::Path;

/// sled-backed store.
pub struct SledStore {
    keys: sled::Tree,
    break_glass: sled::Tree,
    meta: sled::Tree,
    db: sled::Db,
    group: FlushGroup,
}

/// Group commit for flushes: a writer that asks for durability after its
/// insert is covered by the first flush that *starts* after it asked;
/// concurrent writers share that flush instead of queueing one each.
#[derive(Default)]
struct FlushGroup {
    state: std::sync::Mutex<FlushState>,
    done: std::sync::Condvar,
}

#[derive(Default)]
struct FlushState {
    requested: u64,
    completed: u64,
    running: bool,
}

fn unavailable(e: sled::Error) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match &e {
                // sled's file lock: another broker (or an offline command)
                // has this directory open.
                sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                    StoreError::Locked(dir.display().to_string())
                }
                _ => unavailable(e),
            })?;
        let keys = db.open_tree("keys").map_err(unavailable)?;
        let break_glass = db.open_tree("break-glass").map_err(unavailable)?;
        let meta = db.open_tree("meta").map_err(unavailable)?;
        Ok(Self {
            keys,
            break_glass,
            meta,
            db,
            group: FlushGroup::default(),
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        let g = &self.group;
        let lock = || g.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = lock();
        s.requested += 1;
        let mine = s.requested;
        loop {
            if s.completed >= mine {
                return Ok(());
            }
            if !s.running {
                s.running = true;
                let target = s.requested;
                drop(s);
                let r = self.db.flush();
                s = lock();
                s.running = false;
                if r.is_ok() {
                    s.completed = s.completed.max(target);
                }
                g.done.notify_all();
                r.map_err(unavailable)?;
                continue;
            }
            s = g.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The stored bytes of `rec`'s key if they are at `rec.revision`.
    fn current(&self, rec: &KeyRecord) -> Result<sled::IVec, StoreError> {
        let id = rec.id.as_str();
        let old = self
            .keys
            .get(id)
            .map_err(unavailable)?
            .ok_or_else(|| StoreError::Conflict(rec.id.clone()))?;
        if Self::decode(id.as_bytes(), &old)?.revision != rec.revision {
            return Err(StoreError::Conflict(rec.id.clone()));
        }
        Ok(old)
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<KeyRecord, StoreError> {
        serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
            id: String::from_utf8_lossy(k).into_owned(),
            source: e,
        })
    }

    fn encode(rec: &KeyRecord) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(rec).map_err(|source| StoreError::Corrupt {
            id: rec.id.to_string(),
            source,
        })
    }
}

impl SledStore {
    /// Bulk load for benchmarks: insert without a flush per record.
    pub fn insert_unflushed(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.keys
            .insert(rec.id.as_str(), Self::encode(rec)?)
            .map_err(unavailable)?;
        Ok(())
    }

    /// Flushes everything written so far.
    pub fn flush_now(&self) -> Result<(), StoreError> {
        self.flush()
    }
}

impl Store for SledStore {
    fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        match self.keys.get(id.as_str()).map_err(unavailable)? {
            Some(v) => Ok(Some(Self::decode(id.as_str().as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    fn insert(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        let v = Self::encode(rec)?;
        self.keys
            .compare_and_swap(rec.id.as_str(), None::<&[u8]>, Some(v))
            .map_err(unavailable)?
            .map_err(|_| StoreError::AlreadyExists(rec.id.clone()))?;
        self.flush()
    }

    fn update(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        let old = self.current(rec)?;
        let v = Self::encode(&super::next_revision(rec))?;
        self.keys
            .compare_and_swap(rec.id.as_str(), Some(old), Some(v))
            .map_err(unavailable)?
            .map_err(|_| StoreError::Conflict(rec.id.clone()))?;
        self.flush()
    }

    fn write_batch(
        &self,
        inserts: &[&KeyRecord],
        updates: &[&KeyRecord],
    ) -> Result<(), StoreError> {
        // Callers hold the lifecycle lock, so nothing inserts between the
        // check and the batch on this node; sled is single-process.
        let mut batch = sled::Batch::default();
        for r in inserts {
            if self.keys.contains_key(r.id.as_str()).map_err(unavailable)? {
                return Err(StoreError::AlreadyExists(r.id.clone()));
            }
            batch.insert(r.id.as_str(), Self::encode(r)?);
        }
        for r in updates {
            self.current(r)?;
            batch.insert(r.id.as_str(), Self::encode(&super::next_revision(r))?);
        }
        self.keys.apply_batch(batch).map_err(unavailable)?;
        self.flush()
    }

    fn scan(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        filter: &dyn Fn(&KeyRecord) -> bool,
    ) -> Result<(Vec<KeyRecord>, bool), StoreError> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.as_str().as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.keys.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = item.map_err(unavailable)?;
            let rec = Self::decode(&k, &v)?;
            if filter(&rec) {
                if out.len() == limit {
                    return Ok((out, true));
                }
                out.push(rec);
            }
        }
        Ok((out, false))
    }

    fn put_break_glass(&self, bg: &BreakGlass) -> Result<(), StoreError> {
        let v = serde_json::to_vec(bg).map_err(|source| StoreError::Corrupt {
            id: bg.id.clone(),
            source,
        })?;
        self.break_glass
            .insert(bg.id.as_str(), v)
            .map_err(unavailable)?;
        self.flush()
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .meta
            .get(name)
            .map_err(unavailable)?
            .map(|v| v.to_vec()))
    }

    fn put_meta_once(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let now = match self
            .meta
            .compare_and_swap(name, None::<&[u8]>, Some(value))
            .map_err(unavailable)?
        {
            Ok(()) => value.to_vec(),
            Err(e) => e.current.map(|v| v.to_vec()).unwrap_or_default(),
        };
        self.flush()?;
        Ok(now)
    }

    fn replace_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.insert(name, value).map_err(unavailable)?;
        self.flush()
    }

    fn list_break_glass(&self) -> Result<Vec<BreakGlass>, StoreError> {
        self.break_glass
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(unavailable)?;
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                    id: String::from_utf8_lossy(&k).into_owned(),
                    source: e,
                })
            })
            .collect()
    }
}
