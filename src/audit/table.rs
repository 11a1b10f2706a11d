//! Audit chains kept in the region's database instead of a file: each
//! broker appends its own chain (broker id, sequence), one transaction per
//! group commit, so a host lost for good loses no acknowledged record.
//! The records, hashes and checkpoints are the file's, line for line.

use std::io::Read;
use std::sync::Arc;

pub use crate::store::{ChainTable, TableRef};

/// Records read per round trip.
const PAGE: usize = 10_000;

/// One broker's chain as JSON lines, read page by page (the verifier and
/// exports read it like a file).
pub struct ChainReader {
    table: Arc<dyn ChainTable>,
    broker_id: String,
    after: u64,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ChainReader {
    /// `broker_id`'s chain from the record after `after_seq`.
    pub fn new(table: Arc<dyn ChainTable>, broker_id: &str, after_seq: u64) -> Self {
        Self {
            table,
            broker_id: broker_id.to_owned(),
            after: after_seq,
            buf: Vec::new(),
            pos: 0,
            done: false,
        }
    }

    /// Sequence number of the last record read from the table.
    pub fn read_up_to(&self) -> u64 {
        self.after
    }
}

impl Read for ChainReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            let rows = self.table.page(&self.broker_id, self.after, PAGE)?;
            self.done = rows.len() < PAGE;
            self.buf.clear();
            self.pos = 0;
            for (seq, line) in rows {
                self.after = seq;
                self.buf.extend_from_slice(line.as_bytes());
                self.buf.push(b'\n');
            }
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
