//! Backups: a consistent snapshot of a store as JSON lines (a header, then
//! one item per line), holding only what the store holds, wrapped
//! material, so a backup is useless without the region's root of trust.
//! Restored only into an empty store.

use super::{Item, Store, StoreError};
use std::io::{BufRead, Write};

/// The first line of a backup.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// Always "sovkms-backup".
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// The region whose store this is.
    pub region: String,
    /// When it was taken (unix seconds).
    pub taken_at: i64,
    /// The region's record key, wrapped by its root of trust (JSON), which
    /// authenticates every item: a restore checks each before writing.
    #[serde(default)]
    pub record_key: Option<String>,
}

/// What a backup or restore moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Key records.
    pub keys: u64,
    /// Break-glass grants.
    pub break_glass: u64,
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backup file could not be read or written.
    #[error("backup file: {0}")]
    Io(#[from] std::io::Error),
    /// A line of the backup is not what a backup holds.
    #[error("backup line {line}: {why}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The backup is of another region.
    #[error("the backup is of region {found}; this broker's region is {want}")]
    Region {
        /// The backup's region.
        found: String,
        /// This broker's.
        want: String,
    },
    /// The target store already holds keys.
    #[error("the store is not empty; restore only into an empty store")]
    NotEmpty,
    /// The target store has a record key of its own (it has served).
    #[error("the store has a record key of its own (a broker has served on it); restore into a store no broker has served on")]
    OtherRecordKey,
}

/// Writes a snapshot of `store` to `out`.
pub fn write(
    store: &dyn Store,
    region: &str,
    now: i64,
    out: &mut dyn Write,
) -> Result<Counts, BackupError> {
    let record_key = store
        .meta(super::authenticated::RECORD_KEY)?
        .map(|v| String::from_utf8_lossy(&v).into_owned());
    let header = Header {
        format: "sovkms-backup".into(),
        version: 1,
        region: region.to_owned(),
        taken_at: now,
        record_key,
    };
    let line = |v: &dyn erased::Line, out: &mut dyn Write| -> Result<(), std::io::Error> {
        out.write_all(v.json()?.as_bytes())?;
        out.write_all(b"\n")
    };
    line(&header, out)?;
    let mut counts = Counts::default();
    let mut failed: Option<std::io::Error> = None;
    store
        .snapshot(&mut |item| {
            match &item {
                Item::Key(_) => counts.keys += 1,
                Item::BreakGlass(_) => counts.break_glass += 1,
            }
            line(&item, out).map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                StoreError::Unavailable(msg.into())
            })
        })
        .map_err(|e| match failed.take() {
            Some(io) => BackupError::Io(io),
            None => BackupError::Store(e),
        })?;
    out.flush()?;
    Ok(counts)
}

/// Restores a backup of `region` into `store` (the plain store, not its
/// authenticating wrapper), which must be empty and never served. The
/// backup is read twice (`open` gives it from its start): the record key
/// is opened with `root` and every item is checked against it before the
/// first is written, so an altered backup, or one of another root of
/// trust, restores nothing.
pub fn restore(
    store: &dyn Store,
    region: &str,
    root: &dyn crate::root::RootOfTrust,
    open: &dyn Fn() -> std::io::Result<Box<dyn BufRead>>,
) -> Result<Counts, BackupError> {
    use super::authenticated::{RecordKey, ALL_AUTHENTICATED, RECORD_KEY};
    let header = read_header(region, &mut *open()?)?;
    let key = header
        .record_key
        .as_deref()
        .map(|k| RecordKey::unwrap(k.as_bytes(), root))
        .transpose()?;
    let mut line = 1;
    read(region, &mut *open()?, &mut |item| {
        line += 1;
        match &key {
            Some(k) => k.check_item(&item),
            None => Ok(()),
        }
    })
    .map_err(|e| match e {
        BackupError::Store(StoreError::Tampered(what)) => BackupError::Malformed {
            line,
            why: format!("{what} does not match the backup's record key: the backup was altered"),
        },
        other => other,
    })?;
    if !store.scan(None, 1, &|_| true)?.0.is_empty() {
        return Err(BackupError::NotEmpty);
    }
    if let Some(k) = &header.record_key {
        if store.put_meta_once(RECORD_KEY, k.as_bytes())? != k.as_bytes() {
            return Err(BackupError::OtherRecordKey);
        }
    }
    let n = read(region, &mut *open()?, &mut |item| match item {
        Item::Key(rec) => store.insert(&rec),
        Item::BreakGlass(bg) => store.put_break_glass(&bg),
    })?;
    if header.record_key.is_some() {
        store.put_meta_once(ALL_AUTHENTICATED, b"1")?;
    }
    Ok(n)
}

fn read_header(region: &str, input: &mut dyn BufRead) -> Result<Header, BackupError> {
    let bad = |why: String| BackupError::Malformed { line: 1, why };
    let mut first = String::new();
    if input.read_line(&mut first)? == 0 {
        return Err(bad("the file is empty".into()));
    }
    let header: Header =
        serde_json::from_str(&first).map_err(|e| bad(format!("not a backup header: {e}")))?;
    if header.format != "sovkms-backup" || header.version != 1 {
        return Err(bad(format!(
            "format {} version {} is not one this sovkms reads",
            header.format, header.version
        )));
    }
    if header.region != region {
        return Err(BackupError::Region {
            found: header.region,
            want: region.to_owned(),
        });
    }
    Ok(header)
}

/// Checks a backup of `region` line by line and hands each item to `each`.
fn read(
    region: &str,
    input: &mut dyn BufRead,
    each: &mut dyn FnMut(Item) -> Result<(), StoreError>,
) -> Result<Counts, BackupError> {
    let bad = |line: usize, why: String| BackupError::Malformed { line, why };
    read_header(region, input)?;
    let lines = input.lines();
    let mut counts = Counts::default();
    for (i, text) in lines.enumerate() {
        let text = text?;
        let item = serde_json::from_str::<Item>(&text).map_err(|e| bad(i + 2, e.to_string()))?;
        match &item {
            Item::Key(rec) if rec.home_region.as_str() != region => {
                return Err(bad(
                    i + 2,
                    format!("key {} belongs to region {}", rec.id, rec.home_region),
                ))
            }
            Item::Key(_) => counts.keys += 1,
            Item::BreakGlass(_) => counts.break_glass += 1,
        }
        each(item)?;
    }
    Ok(counts)
}

mod erased {
    /// Something written as one JSON line.
    pub trait Line {
        fn json(&self) -> std::io::Result<String>;
    }
    impl<T: serde::Serialize> Line for T {
        fn json(&self) -> std::io::Result<String> {
            serde_json::to_string(self).map_err(std::io::Error::other)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyRecord, KeyState};
    use crate::store::authenticated::Authenticated;
    use crate::store::SledStore;
    use std::sync::Arc;

    fn root(dir: &std::path::Path) -> crate::root::software::SoftwareRoot {
        crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).unwrap()
    }

    fn from_buf(b: Vec<u8>) -> impl Fn() -> std::io::Result<Box<dyn BufRead>> {
        move || Ok(Box::new(std::io::Cursor::new(b.clone())))
    }

    #[test]
    fn a_store_round_trips_and_a_wrong_region_root_or_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let r = root(dir.path());
        let raw = Arc::new(SledStore::open(&dir.path().join("a")).unwrap());
        let from = Authenticated::open(raw as Arc<dyn Store>, &r).unwrap();
        for id in ["k-1", "k-2", "k-3"] {
            from.insert(&KeyRecord::example(id, "eu-central", KeyState::Active))
                .unwrap();
        }
        let mut buf = Vec::new();
        let n = write(&from, "eu-central", 7, &mut buf).unwrap();
        assert_eq!(n.keys, 3);
        let good = from_buf(buf.clone());
        let to = Arc::new(SledStore::open(&dir.path().join("b")).unwrap());
        assert_eq!(
            restore(to.as_ref(), "eu-central", &r, &good).unwrap().keys,
            3
        );
        // What was restored reads back authenticated, under the same key.
        let back = Authenticated::open(Arc::clone(&to) as Arc<dyn Store>, &r).unwrap();
        assert_eq!(back.scan(None, 10, &|_| true).unwrap().0.len(), 3);
        assert!(matches!(
            restore(to.as_ref(), "eu-central", &r, &good),
            Err(BackupError::NotEmpty)
        ));
        let other = SledStore::open(&dir.path().join("c")).unwrap();
        let e = restore(&other, "us-east", &r, &good).unwrap_err();
        assert!(e.to_string().contains("region eu-central"), "{e}");
        let mut bad = buf.clone();
        bad.extend_from_slice(b"{\"key\": 3}\n");
        let e = restore(&other, "eu-central", &r, &from_buf(bad)).unwrap_err();
        assert!(e.to_string().starts_with("backup line 5:"), "{e}");
        // An edited item: named, nothing written.
        let text = String::from_utf8(buf.clone()).unwrap();
        let edited = text.replacen("\"state\":\"active\"", "\"state\":\"deactivated\"", 1);
        assert_ne!(edited, text);
        let e = restore(&other, "eu-central", &r, &from_buf(edited.into_bytes())).unwrap_err();
        assert!(e.to_string().contains("the backup was altered"), "{e}");
        // Another root of trust opens nothing.
        let elsewhere = tempfile::tempdir().unwrap();
        let e = restore(&other, "eu-central", &root(elsewhere.path()), &good).unwrap_err();
        assert!(
            e.to_string().contains("does not open with this root"),
            "{e}"
        );
        assert!(other.scan(None, 1, &|_| true).unwrap().0.is_empty());
    }
}
