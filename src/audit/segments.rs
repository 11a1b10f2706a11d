//! The log on disk: closed segments `<log>.<first seq, 20 digits>`, each
//! ending with a signed checkpoint, then the active file `<log>` itself.
//! Readers see one chain: the segments in order, then the active file.
//! The broker never deletes a segment (an auditor's decision; the chain
//! starts at sequence 1 and is verified from there at every start).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Digits of the first sequence number in a segment's name.
const DIGITS: usize = 20;

/// The name of the segment whose first record has sequence `first_seq`.
pub fn segment_path(active: &Path, first_seq: u64) -> PathBuf {
    let mut name = active.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{first_seq:0DIGITS$}"));
    active.with_file_name(name)
}

/// Closed segments of the log at `active`, by first sequence number.
pub fn closed(active: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = match active.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(base) = active.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(base))
            .and_then(|n| n.strip_prefix('.'))
        else {
            continue;
        };
        if rest.len() == DIGITS && rest.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(seq) = rest.parse() {
                out.push((seq, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every file of the log, oldest first, each with its first sequence
/// number (the active file's is read from its first line; `None` while it
/// is empty).
fn files(active: &Path) -> std::io::Result<Vec<(Option<u64>, PathBuf)>> {
    let mut out: Vec<_> = closed(active)?
        .into_iter()
        .map(|(s, p)| (Some(s), p))
        .collect();
    if active.exists() {
        out.push((first_seq(active)?, active.to_path_buf()));
    }
    Ok(out)
}

/// The sequence number of a file's first record; `None` if it has none.
pub(super) fn first_seq(path: &Path) -> std::io::Result<Option<u64>> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    let mut line = String::new();
    BufReader::new(File::open(path)?).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Ok(None);
    }
    Ok(serde_json::from_str::<Seq>(&line).ok().map(|s| s.seq))
}

/// A place in the log that survives rotation: the file is named by its
/// first record's sequence number, whether it is still active or closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// First sequence number of the file (0: the start of the log).
    pub file_first_seq: u64,
    /// Bytes of complete lines read in that file.
    pub offset: u64,
}

/// The whole log as one reader, oldest segment first.
pub fn open(active: &Path) -> std::io::Result<Chain> {
    Chain::from(active, Position::default())
}

/// One reader over the log's files, from a position on; `position()` says
/// where the complete lines read so far end.
pub struct Chain {
    files: std::vec::IntoIter<(Option<u64>, PathBuf)>,
    current: Option<(u64, BufReader<File>)>,
    position: Position,
}

impl Chain {
    /// The log from `at` on: files before it are skipped unopened. A file
    /// that is gone (rotated since `at` was taken) is found under its
    /// segment name.
    pub fn from(active: &Path, at: Position) -> std::io::Result<Self> {
        let all = files(active)?;
        let start = all
            .iter()
            .rposition(|(s, _)| s.is_some_and(|s| s <= at.file_first_seq))
            .unwrap_or(0);
        let mut files: Vec<_> = all.into_iter().skip(start).collect();
        let mut position = Position::default();
        let mut current = None;
        if let Some((s, p)) = files.first().cloned() {
            if s == Some(at.file_first_seq) {
                files.remove(0);
                let mut f = File::open(&p)?;
                f.seek(SeekFrom::Start(at.offset))?;
                position = at;
                current = Some((at.file_first_seq, BufReader::new(f)));
            }
        }
        Ok(Self {
            files: files.into_iter(),
            current,
            position,
        })
    }

    /// Where the complete lines returned so far end.
    pub fn position(&self) -> Position {
        self.position
    }

    /// The next complete line (without its newline); a last line still
    /// being written is not returned and not counted.
    pub fn next_line(&mut self) -> Option<std::io::Result<String>> {
        loop {
            if self.current.is_none() {
                let (s, p) = self.files.next()?;
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) => return Some(Err(e)),
                };
                // An active file still empty has no first sequence yet:
                // nothing to read from it.
                let s = s?;
                self.current = Some((s, BufReader::new(f)));
                self.position = Position {
                    file_first_seq: s,
                    offset: 0,
                };
            }
            let (_, r) = self.current.as_mut()?;
            let mut buf = Vec::new();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) => self.current = None,
                // A line still being written, or the room made ahead of
                // the records (zeros: see `audit::log`): the file ends here.
                Ok(_) if buf.last() != Some(&b'\n') || buf.contains(&0) => self.current = None,
                Ok(n) => {
                    self.position.offset += n as u64;
                    buf.pop();
                    return Some(
                        String::from_utf8(buf)
                            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                    );
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

impl Read for Chain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.current.is_none() {
                let Some((s, p)) = self.files.next() else {
                    return Ok(0);
                };
                self.current = Some((s.unwrap_or(0), BufReader::new(File::open(&p)?)));
            }
            let Some((_, r)) = self.current.as_mut() else {
                return Ok(0);
            };
            match r.read(buf)? {
                0 => self.current = None,
                // The room made ahead of the records ends the file.
                n => match buf[..n].iter().position(|b| *b == 0) {
                    None => return Ok(n),
                    Some(end) => {
                        self.current = None;
                        if end > 0 {
                            return Ok(end);
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_read_in_order_and_positions_survive_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let active = dir.path().join("audit.log");
        let line = |s: u64| format!("{{\"seq\":{s}}}\n");
        std::fs::write(segment_path(&active, 1), line(1) + &line(2)).unwrap();
        std::fs::write(segment_path(&active, 3), line(3)).unwrap();
        std::fs::write(&active, line(4) + "{\"seq\":5").unwrap();
        std::fs::write(dir.path().join("audit.log.old"), "not a segment").unwrap();
        let mut all = String::new();
        open(&active).unwrap().read_to_string(&mut all).unwrap();
        assert!(all.starts_with(&(line(1) + &line(2) + &line(3) + &line(4))));

        let mut c = open(&active).unwrap();
        let seqs: Vec<String> = std::iter::from_fn(|| c.next_line())
            .map(Result::unwrap)
            .collect();
        assert_eq!(seqs.len(), 4, "the torn last line is not returned");
        let at = c.position();
        assert_eq!(at.file_first_seq, 4);
        // The active file is rotated and grows on: reading from the old
        // position finds it under its segment name.
        std::fs::write(&active, line(4) + &line(5)).unwrap();
        std::fs::rename(&active, segment_path(&active, 4)).unwrap();
        std::fs::write(&active, line(6)).unwrap();
        let mut c = Chain::from(&active, at).unwrap();
        let rest: Vec<String> = std::iter::from_fn(|| c.next_line())
            .map(Result::unwrap)
            .collect();
        assert_eq!(rest, vec!["{\"seq\":5}", "{\"seq\":6}"]);
        assert_eq!(
            c.position(),
            Position {
                file_first_seq: 6,
                offset: line(6).len() as u64
            }
        );
    }
}
