//! Re-wrapping stored key versions under the current root key, after a root
//! rotation. Crash-safe by construction: each record is rewritten whole and
//! durably, both root keys stay available until the end, so every version is
//! decryptable at every instant; running it again finishes the job.

use crate::keys::KeyRecord;
use crate::root::RootOfTrust;
use crate::store::Store;

/// What a re-wrap did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RewrapReport {
    /// Versions moved to the current root key.
    pub versions_rewrapped: usize,
    /// Key records rewritten.
    pub keys_updated: usize,
    /// Versions already under the current root key.
    pub versions_current: usize,
}

/// A re-wrap failure, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("re-wrapping key {key}: {msg}")]
pub struct RewrapError {
    /// Key id (or "-").
    pub key: String,
    /// Cause.
    pub msg: String,
}

/// A deliberate crash for tests of crash safety (`danger_` by name): the
/// process aborts after this many records were rewritten.
#[derive(Clone, Copy, Debug)]
pub struct DangerCrashAfter(pub usize);

/// Moves every version not wrapped by the current root key under it.
pub fn rewrap_all(
    store: &dyn Store,
    root: &dyn RootOfTrust,
    danger_crash_after: Option<DangerCrashAfter>,
) -> Result<RewrapReport, RewrapError> {
    let current = root.info().root_key_id;
    let stale = |r: &KeyRecord| {
        r.versions
            .iter()
            .any(|v| v.wrapped.as_ref().is_some_and(|w| w.root_key_id != current))
    };
    let err = |key: &str, msg: String| RewrapError {
        key: key.to_owned(),
        msg,
    };
    let mut report = RewrapReport::default();
    // The region's record key (which authenticates the stored records).
    if let Some((mut w, _)) = record_key(store)? {
        if w.root_key_id == current {
            report.versions_current += 1;
        } else {
            let key = crate::store::authenticated::RECORD_KEY;
            let material = root.unwrap(&w).map_err(|e| err(key, e.message))?;
            w = root.wrap(&material).map_err(|e| err(key, e.message))?;
            let bytes = serde_json::to_vec(&w).map_err(|e| err(key, e.to_string()))?;
            store
                .replace_meta(key, &bytes)
                .map_err(|e| err(key, e.to_string()))?;
            report.versions_rewrapped += 1;
        }
    }
    let mut after = None;
    loop {
        let (page, more) = store
            .scan(after.as_ref(), 200, &|_| true)
            .map_err(|e| err("-", e.to_string()))?;
        for rec in &page {
            if !stale(rec) {
                report.versions_current +=
                    rec.versions.iter().filter(|v| v.wrapped.is_some()).count();
                continue;
            }
            let mut new = rec.clone();
            for v in &mut new.versions {
                let Some(w) = &v.wrapped else { continue };
                if w.root_key_id == current {
                    report.versions_current += 1;
                    continue;
                }
                let material = root
                    .unwrap(w)
                    .map_err(|e| err(rec.id.as_str(), e.message))?;
                v.wrapped = Some(
                    root.wrap(&material)
                        .map_err(|e| err(rec.id.as_str(), e.message))?,
                );
                report.versions_rewrapped += 1;
            }
            store
                .update(&new)
                .map_err(|e| err(rec.id.as_str(), e.to_string()))?;
            report.keys_updated += 1;
            if danger_crash_after.is_some_and(|DangerCrashAfter(n)| report.keys_updated >= n) {
                tracing::error!(
                    after = report.keys_updated,
                    "DANGER: deliberate crash for a crash-safety test"
                );
                std::process::abort();
            }
        }
        if !more {
            return Ok(report);
        }
        after = page.last().map(|r| r.id.clone());
    }
}

/// The stored record key, wrapped, if the store has one.
fn record_key(
    store: &dyn Store,
) -> Result<Option<(crate::root::WrappedKey, Vec<u8>)>, RewrapError> {
    let key = crate::store::authenticated::RECORD_KEY;
    let bad = |msg: String| RewrapError {
        key: key.into(),
        msg,
    };
    let Some(bytes) = store.meta(key).map_err(|e| bad(e.to_string()))? else {
        return Ok(None);
    };
    let w = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    Ok(Some((w, bytes)))
}

/// How many stored versions each root key wraps (the region's record key
/// counts as one).
pub fn versions_per_root(
    store: &dyn Store,
) -> Result<std::collections::BTreeMap<String, usize>, RewrapError> {
    let mut out = std::collections::BTreeMap::new();
    if let Some((w, _)) = record_key(store)? {
        *out.entry(w.root_key_id).or_insert(0) += 1;
    }
    let mut after = None;
    loop {
        let (page, more) = store
            .scan(after.as_ref(), 500, &|_| true)
            .map_err(|e| RewrapError {
                key: "-".into(),
                msg: e.to_string(),
            })?;
        for r in &page {
            for w in r.versions.iter().filter_map(|v| v.wrapped.as_ref()) {
                *out.entry(w.root_key_id.clone()).or_insert(0) += 1;
            }
        }
        if !more {
            return Ok(out);
        }
        after = page.last().map(|r| r.id.clone());
    }
}
