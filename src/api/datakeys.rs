//! Opt-in caching of data keys, as the AWS Encryption SDK's caching
//! materials manager does: one GenerateDataKey serves several messages of
//! the same key, region and context, within limits on messages, bytes and
//! age per data key. Evicted keys are zeroized (dropped). Off unless a
//! caller builds a [`DataKeyCache`]: every message then shares its data
//! key with up to `max_messages - 1` others, which is the trade the caller
//! makes for fewer broker calls.
//!
//! ```no_run
//! # async fn demo(client: sovkms::client::Regional) -> Result<(), sovkms::client::RegionalError> {
//! use sovkms::client::{CacheLimits, DataKeyCache};
//! use std::time::Duration;
//! let cache = DataKeyCache::new(CacheLimits {
//!     max_messages: 1000,
//!     max_bytes: 1 << 30,
//!     max_age: Duration::from_secs(300),
//!     max_entries: 64,
//! });
//! let dk = cache
//!     .data_key(&client, "eu-central", "alias/records", &Default::default(), 4096)
//!     .await?;
//! // seal with dk.plaintext, store dk.wrapped beside the ciphertext
//! # let _ = dk; Ok(()) }
//! ```

use super::regional::{Regional, RegionalError};
use crate::secret::KeyMaterial;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A data key: its plaintext (zeroized on drop) and the broker's wrapped
/// form, which only a broker of its region opens.
pub struct DataKey {
    /// The key to seal with.
    pub plaintext: KeyMaterial,
    /// The data key wrapped under the broker's key (envelope format).
    pub wrapped: Vec<u8>,
}

/// Limits per cached data key.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// Messages one data key may seal.
    pub max_messages: u64,
    /// Bytes one data key may seal (a message larger than this gets a
    /// fresh, uncached key).
    pub max_bytes: u64,
    /// How long a data key is used after it was generated.
    pub max_age: Duration,
    /// Data keys held at once (oldest evicted first).
    pub max_entries: usize,
}

struct Entry {
    key: Arc<DataKey>,
    created: Instant,
    messages: u64,
    bytes: u64,
}

/// Which requests may share a data key: same region, key and context.
type CacheId = (String, String, BTreeMap<String, String>);

/// The cache (share one per process, or per tenant).
pub struct DataKeyCache {
    limits: CacheLimits,
    entries: Mutex<HashMap<CacheId, Entry>>,
}

impl DataKeyCache {
    /// An empty cache with these limits.
    pub fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheId, Entry>> {
        // Each change is a single map call: a panic elsewhere leaves no
        // broken entry, so poison is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Data keys held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no data key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every data key (zeroized).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// A data key for a message of `bytes` bytes under `key_id` at a
    /// broker of `region`: a cached one if it stays within the limits
    /// counting this message, else a new one from the broker.
    pub async fn data_key(
        &self,
        client: &Regional,
        region: &str,
        key_id: &str,
        context: &HashMap<String, String>,
        bytes: u64,
    ) -> Result<Arc<DataKey>, RegionalError> {
        let id: CacheId = (
            region.to_owned(),
            key_id.to_owned(),
            context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        self.get_or_fetch(id, bytes, || {
            client.generate_data_key(region, key_id, context.clone())
        })
        .await
    }

    async fn get_or_fetch<F, Fut>(
        &self,
        id: CacheId,
        bytes: u64,
        fetch: F,
    ) -> Result<Arc<DataKey>, RegionalError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<DataKey, RegionalError>>,
    {
        let l = self.limits;
        if bytes > l.max_bytes || l.max_messages == 0 || l.max_entries == 0 {
            return Ok(Arc::new(fetch().await?));
        }
        {
            let mut entries = self.lock();
            if let Some(e) = entries.get_mut(&id) {
                if e.created.elapsed() < l.max_age
                    && e.messages < l.max_messages
                    && e.bytes.saturating_add(bytes) <= l.max_bytes
                {
                    e.messages += 1;
                    e.bytes += bytes;
                    return Ok(Arc::clone(&e.key));
                }
                // Spent or too old: out (zeroized once the last user drops it).
                entries.remove(&id);
            }
        }
        let key = Arc::new(fetch().await?);
        let mut entries = self.lock();
        entries.retain(|_, e| e.created.elapsed() < l.max_age);
        while entries.len() >= l.max_entries {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => entries.remove(&k),
                None => break,
            };
        }
        entries.insert(
            id,
            Entry {
                key: Arc::clone(&key),
                created: Instant::now(),
                messages: 1,
                bytes,
            },
        );
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CacheLimits {
        CacheLimits {
            max_messages: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(60),
            max_entries: 2,
        }
    }

    fn id(key: &str) -> CacheId {
        ("eu-central".into(), key.into(), BTreeMap::new())
    }

    /// Fresh keys numbered by how many were fetched.
    async fn get(
        c: &DataKeyCache,
        key: &str,
        bytes: u64,
        fetched: &std::sync::atomic::AtomicU8,
    ) -> u8 {
        let k = c
            .get_or_fetch(id(key), bytes, || async {
                let n = fetched.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                Ok(DataKey {
                    plaintext: KeyMaterial::from_slice(&[n; 32]).unwrap(),
                    wrapped: vec![n],
                })
            })
            .await
            .unwrap();
        k.wrapped[0]
    }

    #[tokio::test]
    async fn limits_on_messages_bytes_age_and_entries_hold() {
        let n = std::sync::atomic::AtomicU8::new(0);
        let c = DataKeyCache::new(limits());
        // Three messages share a key; the fourth gets a new one.
        assert_eq!(
            [
                get(&c, "a", 10, &n).await,
                get(&c, "a", 10, &n).await,
                get(&c, "a", 10, &n).await
            ],
            [1, 1, 1]
        );
        assert_eq!(get(&c, "a", 10, &n).await, 2);
        // Bytes: 2's 10 + 90 fits, one more byte does not.
        assert_eq!(get(&c, "a", 90, &n).await, 2);
        assert_eq!(get(&c, "a", 1, &n).await, 3);
        // A message over the byte limit: a fresh key, not cached.
        assert_eq!(get(&c, "a", 101, &n).await, 4);
        assert_eq!(get(&c, "a", 1, &n).await, 3);
        // Another key id (or context) never shares; two entries at most.
        assert_eq!(get(&c, "b", 1, &n).await, 5);
        assert_eq!(get(&c, "c", 1, &n).await, 6);
        assert_eq!(c.len(), 2);
        // Age.
        let old = DataKeyCache::new(CacheLimits {
            max_age: Duration::ZERO,
            ..limits()
        });
        assert_eq!(get(&old, "a", 1, &n).await, 7);
        assert_eq!(get(&old, "a", 1, &n).await, 8);
        c.clear();
        assert!(c.is_empty());
    }
}
