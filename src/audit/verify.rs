//! Offline work on an exported log or a stopped broker's log file: verify
//! the chain and checkpoint signatures, export, aggregate.

use super::record::{checkpoint_message, Kind, Record, GENESIS};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};

/// Lines that end in a newline; a last line still being written is
/// skipped, and a NUL byte (the room a broker's log file keeps ahead of
/// its records) ends the input.
pub fn complete_lines(r: impl BufRead) -> impl Iterator<Item = std::io::Result<String>> {
    let mut r = r;
    std::iter::from_fn(move || {
        let mut buf = Vec::new();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) if buf.last() != Some(&b'\n') || buf.contains(&0) => None,
            Ok(_) => {
                buf.pop();
                Some(
                    String::from_utf8(buf)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                )
            }
            Err(e) => Some(Err(e)),
        }
    })
}

/// Where and why a log fails verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log broken at line {line}, sequence {seq}: {why}")]
pub struct VerifyFailure {
    /// 1-based line of the file.
    pub line: u64,
    /// The first bad sequence number (the one expected there).
    pub seq: u64,
    /// What is wrong.
    pub why: String,
}

/// What verification saw.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Signed checkpoints checked.
    pub checkpoints: u64,
    /// Last sequence number.
    pub last_seq: u64,
    /// Last sequence number covered by a verified checkpoint.
    pub last_checkpoint_head: u64,
    /// The last record's hash: with `last_seq`, the anchor an auditor keeps.
    pub last_hash: String,
}

/// Parses an auditor's public key: SubjectPublicKeyInfo PEM (as `sovkms hsm
/// init` prints it) or the hex of the uncompressed point.
pub fn parse_public_key(text: &str) -> Result<Vec<u8>, PublicKeyError> {
    use base64::Engine;
    let t = text.trim();
    if t.starts_with("-----BEGIN CERTIFICATE-----") {
        return Err(PublicKeyError::Certificate);
    }
    let bytes = if t.starts_with("-----BEGIN PUBLIC KEY-----") {
        let b64: String = t.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| PublicKeyError::Base64)?;
        if der.len() != 91 || der[..4] != [0x30, 0x59, 0x30, 0x13] {
            return Err(PublicKeyError::NotP256Spki);
        }
        der[26..].to_vec()
    } else {
        hex::decode(t).map_err(|_| PublicKeyError::Format)?
    };
    if bytes.len() != 65 || bytes[0] != 0x04 {
        return Err(PublicKeyError::NotP256Point);
    }
    Ok(bytes)
}

/// Text that is not the broker's signing public key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublicKeyError {
    /// A certificate (e.g. a CA) where the public key belongs.
    #[error("this is a certificate, not the broker's signing public key; get the key with `sovkms audit pubkey` or from `sovkms hsm init`")]
    Certificate,
    /// PEM whose body is not base64.
    #[error("public key PEM does not decode as base64")]
    Base64,
    /// Another key type.
    #[error("public key PEM is not an ECDSA P-256 SubjectPublicKeyInfo")]
    NotP256Spki,
    /// Neither PEM nor hex.
    #[error("public key is neither a PEM nor hex")]
    Format,
    /// Hex of something else.
    #[error("public key is not an uncompressed P-256 point")]
    NotP256Point,
}

/// An audit log that cannot be read through.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The file could not be read at a line.
    #[error("audit log line {line}: {source}")]
    Io {
        /// 1-based line number.
        line: usize,
        /// The cause.
        source: std::io::Error,
    },
    /// A line that is not a record.
    #[error("audit log line {line} is not a record: {source}")]
    Record {
        /// 1-based line number.
        line: usize,
        /// The decoder's complaint.
        source: serde_json::Error,
    },
    /// The output could not be written.
    #[error("cannot write the export: {0}")]
    Write(#[source] std::io::Error),
}

/// Each complete line of a log as a parsed record, with its text.
fn records(input: impl BufRead) -> impl Iterator<Item = Result<(String, Record), ReadError>> {
    complete_lines(input).enumerate().map(|(i, line)| {
        let line = line.map_err(|source| ReadError::Io {
            line: i + 1,
            source,
        })?;
        let r = serde_json::from_str(&line).map_err(|source| ReadError::Record {
            line: i + 1,
            source,
        })?;
        Ok((line, r))
    })
}

/// A record an auditor (or a witness) holds: the log must contain exactly
/// this record at this sequence number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// Sequence number.
    pub seq: u64,
    /// The record's hash (hex).
    pub hash: String,
}

/// Text that is not `SEQ:HASH`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "anchor {0:?} is not SEQ:HASH (a sequence number, a colon and the record's 64 hex digit hash)"
)]
pub struct AnchorError(String);

impl std::str::FromStr for Anchor {
    type Err = AnchorError;
    /// `SEQ:HASH`, as `audit verify` prints a head.
    fn from_str(s: &str) -> Result<Self, AnchorError> {
        let bad = || AnchorError(s.chars().take(200).collect());
        let (seq, hash) = s.split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Self {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// The checkpoints a witness file holds, as anchors.
pub fn witness_anchors(path: &std::path::Path) -> Result<Vec<Anchor>, ReadError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ReadError::Io { line: 0, source }),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let w: super::log::WitnessLine =
                serde_json::from_str(l).map_err(|source| ReadError::Record {
                    line: i + 1,
                    source,
                })?;
            Ok(Anchor {
                seq: w.seq,
                hash: w.hash,
            })
        })
        .collect()
}

/// Checks every link and every checkpoint signature. With
/// `require_checkpoint`, the log must end with a checkpoint, so a tail cut
/// off after the last checkpoint is detected.
pub fn verify(
    input: impl BufRead,
    public_key: &[u8],
    require_checkpoint: bool,
) -> Result<VerifyReport, VerifyFailure> {
    verify_anchored(input, public_key, require_checkpoint, &[])
}

/// [`verify`], and every anchor must be a record of the log: a log
/// rewritten from an anchored record on (hashes recomputed, later
/// checkpoints dropped) or cut before it fails, naming the anchor.
pub fn verify_anchored(
    input: impl BufRead,
    public_key: &[u8],
    require_checkpoint: bool,
    anchors: &[Anchor],
) -> Result<VerifyReport, VerifyFailure> {
    let mut pending: std::collections::BTreeMap<u64, &str> =
        anchors.iter().map(|a| (a.seq, a.hash.as_str())).collect();
    let key = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key);
    let mut rep = VerifyReport::default();
    let mut prev = GENESIS.to_owned();
    let mut last_kind = None;
    for (i, line) in input.lines().enumerate() {
        let line_no = i as u64 + 1;
        let expected = rep.last_seq + 1;
        let fail = |why: String| VerifyFailure {
            line: line_no,
            seq: expected,
            why,
        };
        let line = line.map_err(|e| fail(format!("cannot read: {e}")))?;
        let r: Record =
            serde_json::from_str(&line).map_err(|e| fail(format!("record does not parse: {e}")))?;
        if r.seq != expected {
            return Err(fail(if r.seq > expected {
                format!(
                    "found sequence {} where {expected} belongs: record {expected} was deleted",
                    r.seq
                )
            } else {
                format!("found sequence {} where {expected} belongs: records were inserted or reordered", r.seq)
            }));
        }
        if r.prev_hash != prev {
            return Err(fail(
                "its prev_hash is not the hash of the record before it: a record before it was removed, inserted or altered"
                    .into(),
            ));
        }
        if r.compute_hash() != r.hash {
            return Err(fail(
                "its content does not match its hash: the record was altered".into(),
            ));
        }
        if r.kind == Kind::Checkpoint {
            let cp = r
                .checkpoint
                .as_ref()
                .ok_or_else(|| fail("checkpoint record without a checkpoint body".into()))?;
            if cp.head_seq + 1 != r.seq || cp.head_hash != r.prev_hash {
                return Err(fail(
                    "checkpoint does not cover the record before it".into(),
                ));
            }
            let sig = hex::decode(&cp.signature)
                .map_err(|_| fail("checkpoint signature is not hex".into()))?;
            let msg = checkpoint_message(
                cp.head_seq,
                &cp.head_hash,
                r.time_unix_ms,
                &r.region,
                &r.broker_id,
            );
            key.verify(&msg, &sig).map_err(|_| {
                fail("checkpoint signature does not verify with the given public key".into())
            })?;
            rep.checkpoints += 1;
            rep.last_checkpoint_head = cp.head_seq;
        }
        if let Some(want) = pending.remove(&r.seq) {
            if want != r.hash {
                return Err(fail(format!(
                    "record {} is not the one anchored (hash {want}): the log was rewritten from there on",
                    r.seq
                )));
            }
        }
        prev = r.hash.clone();
        rep.last_hash = r.hash.clone();
        rep.last_seq = r.seq;
        rep.records += 1;
        last_kind = Some(r.kind);
    }
    // Failures found at the end of the log point just past its last record.
    let at_end = |why: String| VerifyFailure {
        line: rep.records + 1,
        seq: rep.last_seq + 1,
        why,
    };
    if let Some((seq, _)) = pending.first_key_value() {
        return Err(at_end(format!(
            "the log ends at sequence {} but an anchor holds record {seq}: records were cut off or rewritten",
            rep.last_seq
        )));
    }
    if require_checkpoint && last_kind != Some(Kind::Checkpoint) {
        return Err(at_end(format!(
            "the log does not end with a signed checkpoint (last checkpoint covers up to sequence {}): its tail may have been cut off",
            rep.last_checkpoint_head
        )));
    }
    Ok(rep)
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The records as JSON lines, unchanged (verifiable).
    JsonLines,
    /// RFC 5424 syslog lines with the fields as structured data.
    Syslog,
}

/// RFC 3339 UTC time of a record.
pub fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

fn sd_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// One RFC 5424 line (facility 13, log audit; notice for allowed, warning otherwise).
pub fn syslog_line(r: &Record) -> String {
    let severity = if r.outcome == "allowed" { 5 } else { 4 };
    let pri = 13 * 8 + severity;
    let mut sd = format!("[sovkms@32473 seq=\"{}\"", r.seq);
    for (k, v) in [
        ("kind", format!("{:?}", r.kind).to_lowercase()),
        ("region", r.region.clone()),
        ("request_id", r.request_id.clone()),
        ("caller", r.caller.clone()),
        ("operation", r.operation.clone()),
        ("key_id", r.key_id.clone()),
        ("key_version", r.key_version.to_string()),
        ("context_sha256", r.context_sha256.clone()),
        ("outcome", r.outcome.clone()),
        ("code", r.code.clone()),
        ("reason", r.reason.clone()),
        ("hash", r.hash.clone()),
    ] {
        if !v.is_empty() {
            sd.push_str(&format!(" {k}=\"{}\"", sd_escape(&v)));
        }
    }
    sd.push(']');
    format!(
        "<{pri}>1 {} {} sovkms - {} {sd} {} {}",
        rfc3339(r.time_unix_ms),
        if r.broker_id.is_empty() {
            "-"
        } else {
            &r.broker_id
        },
        if r.kind == Kind::Checkpoint {
            "CHECKPOINT"
        } else {
            "AUDIT"
        },
        r.operation,
        r.outcome
    )
}

/// Copies records with `seq >= from_seq` and time `>= since_ms` to `out`.
pub fn export(
    input: impl BufRead,
    out: &mut dyn Write,
    format: ExportFormat,
    from_seq: u64,
    since_ms: u64,
) -> Result<u64, ReadError> {
    let mut n = 0;
    for item in records(input) {
        let (line, r) = item?;
        if r.seq < from_seq || r.time_unix_ms < since_ms {
            continue;
        }
        let text = match format {
            ExportFormat::JsonLines => line,
            ExportFormat::Syslog => syslog_line(&r),
        };
        writeln!(out, "{text}").map_err(ReadError::Write)?;
        n += 1;
    }
    Ok(n)
}

/// One cell of the aggregate: counts only, no identities.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AggregateRow {
    /// UTC day, YYYY-MM-DD.
    pub day: String,
    /// Key id ("" for requests that reached no key).
    pub key_id: String,
    /// Operation.
    pub operation: String,
    /// allowed / refused / failed.
    pub outcome: String,
    /// Number of requests (at least the minimum group size).
    pub count: u64,
}

/// Counts of request records per UTC day × key × operation × outcome,
/// built up record by record (the broker keeps one and feeds it only the
/// records written since its last answer).
#[derive(Default)]
pub struct Aggregator {
    cells: BTreeMap<(u64, String, String, String), u64>,
}

const DAY_MS: u64 = 86_400_000;

impl Aggregator {
    /// Counts one record (checkpoints and system records are not requests).
    pub fn add(&mut self, r: Record) {
        if r.kind != Kind::Request {
            return;
        }
        *self
            .cells
            .entry((r.time_unix_ms / DAY_MS, r.key_id, r.operation, r.outcome))
            .or_insert(0) += 1;
    }

    /// Cells of the days that begin in `[from_ms, to_ms)`, both day
    /// boundaries; cells below `min_group` are suppressed.
    pub fn rows(&self, from_ms: u64, to_ms: u64, min_group: u64) -> Vec<AggregateRow> {
        let (from, to) = (from_ms.div_ceil(DAY_MS), to_ms / DAY_MS);
        self.cells
            .iter()
            .filter(|((day, ..), n)| (from..to).contains(day) && **n >= min_group)
            .map(|((day, key_id, operation, outcome), count)| AggregateRow {
                day: rfc3339(day * DAY_MS).chars().take(10).collect(),
                key_id: key_id.clone(),
                operation: operation.clone(),
                outcome: outcome.clone(),
                count: *count,
            })
            .collect()
    }
}

/// Counts per day × key × operation × outcome of request records of the
/// whole UTC days in `[from_ms, to_ms)`; cells below `min_group` are
/// suppressed.
pub fn aggregate(
    input: impl BufRead,
    from_ms: u64,
    to_ms: u64,
    min_group: u64,
) -> Result<Vec<AggregateRow>, ReadError> {
    let mut agg = Aggregator::default();
    for item in records(input) {
        agg.add(item?.1);
    }
    Ok(agg.rows(from_ms, to_ms, min_group))
}
