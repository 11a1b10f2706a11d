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
}

/// Writes a snapshot of `store` to `out`.
pub fn write(
    store: &dyn Store,
    region: &str,
    now: i64,
    out: &mut dyn Write,
) -> Result<Counts, BackupError> {
    let header = Header {
        format: "sovkms-backup".into(),
        version: 1,
        region: region.to_owned(),
        taken_at: now,
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

/// Restores a backup of `region` into `store`, which must be empty. The
/// backup is read twice (`open` gives it from its start): every line is
/// checked before the first is written, so a bad file restores nothing.
pub fn restore(
    store: &dyn Store,
    region: &str,
    open: &dyn Fn() -> std::io::Result<Box<dyn BufRead>>,
) -> Result<Counts, BackupError> {
    read(region, &mut *open()?, &mut |_| Ok(()))?;
    if !store.scan(None, 1, &|_| true)?.0.is_empty() {
        return Err(BackupError::NotEmpty);
    }
    read(region, &mut *open()?, &mut |item| match item {
        Item::Key(rec) => store.insert(&rec),
        Item::BreakGlass(bg) => store.put_break_glass(&bg),
    })
}

/// Checks a backup of `region` line by line and hands each item to `each`.
fn read(
    region: &str,
    input: &mut dyn BufRead,
    each: &mut dyn FnMut(Item) -> Result<(), StoreError>,
) -> Result<Counts, BackupError> {
    let bad = |line: usize, why: String| BackupError::Malformed { line, why };
    let mut lines = input.lines();
    let first = lines
        .next()
        .ok_or_else(|| bad(1, "the file is empty".into()))??;
    let header: Header =
        serde_json::from_str(&first).map_err(|e| bad(1, format!("not a backup header: {e}")))?;
    if header.format != "sovkms-backup" || header.version != 1 {
        return Err(bad(
            1,
            format!(
                "format {} version {} is not one this sovkms reads",
                header.format, header.version
            ),
        ));
    }
    if header.region != region {
        return Err(BackupError::Region {
            found: header.region,
            want: region.to_owned(),
        });
    }
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
    use crate::store::SledStore;

    #[test]
    fn a_sled_store_round_trips_and_a_wrong_region_or_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let from = SledStore::open(&dir.path().join("a")).unwrap();
        for id in ["k-1", "k-2", "k-3"] {
            from.insert(&KeyRecord::example(id, "eu-central", KeyState::Active))
                .unwrap();
        }
        let mut buf = Vec::new();
        let n = write(&from, "eu-central", 7, &mut buf).unwrap();
        assert_eq!(n.keys, 3);
        let to = SledStore::open(&dir.path().join("b")).unwrap();
        let from_buf = |b: Vec<u8>| {
            move || -> std::io::Result<Box<dyn BufRead>> {
                Ok(Box::new(std::io::Cursor::new(b.clone())))
            }
        };
        let good = from_buf(buf.clone());
        assert_eq!(restore(&to, "eu-central", &good).unwrap().keys, 3);
        let (all, _) = to.scan(None, 10, &|_| true).unwrap();
        assert_eq!(all.len(), 3);
        assert!(matches!(
            restore(&to, "eu-central", &good),
            Err(BackupError::NotEmpty)
        ));
        let other = SledStore::open(&dir.path().join("c")).unwrap();
        let e = restore(&other, "us-east", &good).unwrap_err();
        assert!(e.to_string().contains("region eu-central"), "{e}");
        let mut bad = buf.clone();
        bad.extend_from_slice(b"{\"key\": 3}\n");
        let e = restore(&other, "eu-central", &from_buf(bad)).unwrap_err();
        assert!(e.to_string().starts_with("backup line 5:"), "{e}");
        // Checked before anything was written.
        assert!(other.scan(None, 1, &|_| true).unwrap().0.is_empty());
    }
}
