//! The audit log: an append-only JSON-lines file with group commit (or,
//! with the PostgreSQL store, the same lines in the region's database:
//! one transaction per batch instead of one `fdatasync`).
//!
//! One writer thread owns the file. Callers hand it events; it assigns
//! sequence numbers and chain hashes, writes a whole batch with one
//! `pwrite` and one `fdatasync`, then wakes the callers that wait for
//! durability. If a write or sync fails, the file is cut back to its last
//! durable length, the chain does not advance, and every caller in the batch
//! gets an error: nothing after a failed record claims it as its predecessor.
//! A torn last line after a crash (never acknowledged) is cut off at start.
//!
//! The active file is grown ahead of the records in zero-filled steps and
//! records overwrite the zeros, so most syncs write data only, not a new
//! file size. Records never contain a NUL byte (JSON escapes it), so the
//! first NUL ends the log: readers stop there, and at start the file is
//! cut there (a crash can leave zeros, or unsynced bytes after them).

use super::record::{checkpoint_message, CheckpointBody, Kind, Record, GENESIS};
use super::{AuditError, AuditSink, Event};
use crate::root::RootOfTrust;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The active file grows ahead of its records by this much at a time
/// (zeros, written and synced with the records that need the room).
/// Overwriting blocks that exist spares `fdatasync` the file-size update:
/// on ext4 here a 3 KiB write plus sync took 120 instead of 160 µs, and a
/// fifth less CPU.
const GROW_BY: u64 = 1 << 20;
/// After the disk had no room for a step, the next attempt waits this long.
const NO_ROOM_RETRY: Duration = Duration::from_secs(1);
/// Largest batch written with one sync.
const MAX_BATCH: usize = 4096;
/// Events waiting for the writer, at most: beyond, a request that needs a
/// durable record is refused (backpressure) and a buffered record is
/// counted instead of queued (one record then says how many).
const MAX_QUEUED: usize = 65_536;
/// Buffered records (nobody waits for them) wait at most this long for
/// company before the writer wakes for them.
const BUFFER_DELAY: Duration = Duration::from_millis(2);
/// Free space is measured again at least this often (and whenever the
/// estimate nears the reserve).
const FREE_RECHECK: Duration = Duration::from_millis(100);
/// While a checkpoint cannot be signed, signing is retried this often.
const SIGN_RETRY: Duration = Duration::from_millis(250);
/// Buffered records (nobody waits for them) are synced at least this often.
const SYNC_AT_LEAST_EVERY: Duration = Duration::from_millis(100);

/// Checkpoint and identity settings of the log.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// The log file.
    pub path: PathBuf,
    /// Region (in every record).
    pub region: String,
    /// Broker id (in every record).
    pub broker_id: String,
    /// Sign a checkpoint after this many records...
    pub checkpoint_every: u64,
    /// ...or after this long with unsigned records.
    pub checkpoint_interval: Duration,
    /// Where each signed checkpoint head is also appended (a file on an
    /// append-only or remote medium the host cannot rewrite); None: none.
    pub witness: Option<PathBuf>,
    /// The active file is closed as a segment at the first checkpoint
    /// after it reaches this size.
    pub segment_bytes: u64,
    /// Free space on the log's file system kept for records somebody waits
    /// for (plaintext releases, lifecycle changes): below it, buffered
    /// records (refusals, encrypts, reads) are counted instead of written.
    pub reserve_bytes: u64,
    /// The region's database, when the chain lives there instead of in
    /// `path` (brokers over PostgreSQL): no segments, no disk reserve.
    pub table: Option<super::table::TableRef>,
}

/// Why records could not be written: encoding (nothing written) or I/O.
enum WriteError {
    Encode(AuditError),
    Io(std::io::Error),
}

/// The active log file: records end at `end`; zeros (room made ahead)
/// follow up to `room`.
struct Active {
    file: File,
    end: u64,
    room: u64,
    /// After a failed attempt (a full disk), no room is made before this.
    no_room_until: Option<Instant>,
}

impl Active {
    fn new(file: File, end: u64) -> Self {
        Self {
            file,
            end,
            room: end,
            no_room_until: None,
        }
    }

    /// Writes `bytes` at the end, then, if `grow` and the room ran out,
    /// zeros up to the next step. The room is all or nothing: a disk too
    /// full for it keeps none (the log never takes the last free bytes
    /// for zeros), and records then extend the file one batch at a time.
    fn append(&mut self, bytes: &[u8], grow: bool) -> std::io::Result<()> {
        self.file.write_all_at(bytes, self.end)?;
        self.end += bytes.len() as u64;
        self.room = self.room.max(self.end);
        let now = Instant::now();
        if grow && self.end == self.room && self.no_room_until.is_none_or(|t| now >= t) {
            let room = self.end.div_ceil(GROW_BY) * GROW_BY + GROW_BY;
            let zeros = vec![0u8; (room - self.end) as usize];
            match self.file.write_all_at(&zeros, self.end) {
                Ok(()) => self.room = room,
                Err(_) => {
                    let _ = self.file.set_len(self.end);
                    self.no_room_until = Some(now + NO_ROOM_RETRY);
                }
            }
        }
        Ok(())
    }

    /// Cuts the file to its records (no zeros after them): before it is
    /// closed as a segment, and when the writer stops.
    fn trim(&mut self) -> std::io::Result<()> {
        if self.room > self.end {
            self.file.set_len(self.end)?;
            self.file.sync_data()?;
            self.room = self.end;
        }
        Ok(())
    }
}

/// Where the writer's records go.
enum Output {
    File(Active),
    /// Records wait in `pending` until the next sync inserts them in one
    /// transaction.
    Table {
        table: Arc<dyn super::table::ChainTable>,
        broker_id: String,
        pending: Vec<(u64, String)>,
    },
}

impl Output {
    /// Writes records, one JSON line each; returns the bytes written.
    /// `buf` is scratch space, kept by the caller between batches; `grow`:
    /// the file may take room ahead (the disk is well above its reserve).
    fn write(
        &mut self,
        records: &[Record],
        buf: &mut Vec<u8>,
        grow: bool,
    ) -> Result<u64, WriteError> {
        let encode = |e| WriteError::Encode(AuditError::Encode(Arc::new(e)));
        match self {
            Self::File(f) => {
                buf.clear();
                for r in records {
                    serde_json::to_writer(&mut *buf, r).map_err(encode)?;
                    buf.push(b'\n');
                }
                f.append(buf, grow).map_err(WriteError::Io)?;
                Ok(buf.len() as u64)
            }
            Self::Table { pending, .. } => {
                // All encoded before any is queued: a failure queues none.
                let lines = records
                    .iter()
                    .map(|r| Ok((r.seq, serde_json::to_string(r).map_err(encode)?)))
                    .collect::<Result<Vec<_>, WriteError>>()?;
                let n = lines.iter().map(|(_, l)| l.len() as u64 + 1).sum();
                pending.extend(lines);
                Ok(n)
            }
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Self::File(f) => f.file.sync_data(),
            Self::Table {
                table,
                broker_id,
                pending,
            } => {
                let Some((_, last)) = pending.last() else {
                    return Ok(());
                };
                let last = last.clone();
                match table.append(broker_id, std::mem::take(pending)) {
                    Ok(()) => Ok(()),
                    // A commit whose answer was lost may have landed: the
                    // table's head says, if it is this batch's last record
                    // to the byte (else the next batch would repeat its
                    // sequence numbers; a record of the same number from
                    // another process is not ours).
                    Err(e) => match table.last(broker_id) {
                        Ok(Some(line)) if line == last => Ok(()),
                        _ => Err(e),
                    },
                }
            }
        }
    }

    /// Drops what was written after `durable_len` (not synced).
    fn cut(&mut self, durable_len: u64) {
        match self {
            Self::File(f) => {
                let _ = f.file.set_len(durable_len);
                f.end = durable_len;
                f.room = durable_len;
            }
            Self::Table { pending, .. } => pending.clear(),
        }
    }
}

/// Where the writer reports a durable record's sequence number.
type Waiter = tokio::sync::oneshot::Sender<Result<u64, AuditError>>;

/// A queued event and who waits for it, if anybody.
type Queued = (Event, Option<Waiter>);

/// Events waiting for the writer. Buffered events do not wake it (it
/// collects them for up to `BUFFER_DELAY`); an event somebody waits for,
/// a full batch, or a stop does.
#[derive(Default)]
struct Queue {
    events: Vec<Queued>,
    waiters: usize,
    first_at: Option<Instant>,
    shutdown: bool,
    /// The writer sleeps on the condvar: only then is a notify (a futex
    /// syscall per request under load) worth making.
    writer_waiting: bool,
    /// Buffered records dropped because the queue was full.
    dropped: u64,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The last checkpoint could not be signed: nothing that needs a durable
    /// record is accepted until one is (fail closed).
    unsigned: std::sync::atomic::AtomicBool,
    metrics: crate::metrics::AuditMetrics,
    /// When (ms since the epoch) a batch somebody waited for was last synced.
    last_durable_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The file-backed audit log.
pub struct AuditLog {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Cuts the file at its first NUL byte: the room a writer that did not
/// stop cleanly had made ahead of its records, and whatever a crash left
/// after it (never synced, so never acknowledged: synced records are
/// whole from the start of the file and hold no NUL).
fn cut_at_first_nul(f: &mut File) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    f.seek(SeekFrom::Start(0))?;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        if let Some(i) = buf[..n].iter().position(|b| *b == 0) {
            let len = f.metadata()?.len();
            tracing::info!(
                bytes = len - (at + i as u64),
                "cutting the audit file's room ahead of its records (the writer did not stop cleanly)"
            );
            f.set_len(at + i as u64)?;
            return f.sync_data();
        }
        at += n as u64;
    }
}

/// Reads the last complete record, cutting off a torn final line.
fn recover_tail(f: &mut File, path: &Path) -> Result<(u64, String, u64), AuditError> {
    let io = |e: std::io::Error| AuditError::io(path.display(), e);
    let len = f.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok((0, GENESIS.to_owned(), 0));
    }
    // Read backwards until the buffer holds the last complete line.
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut buf = Vec::new();
        f.take(len - start).read_to_end(&mut buf).map_err(io)?;
        let end = match buf.iter().rposition(|b| *b == b'\n') {
            Some(i) => i,
            None if start == 0 => {
                // Only a torn first line: nothing was ever durable.
                f.set_len(0).map_err(io)?;
                return Ok((0, GENESIS.to_owned(), 0));
            }
            None => {
                chunk *= 2;
                continue;
            }
        };
        let durable_len = start + end as u64 + 1;
        let line_start = match buf[..end].iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if start == 0 => 0,
            None => {
                chunk *= 2;
                continue;
            }
        };
        let rec: Record = serde_json::from_slice(&buf[line_start..end]).map_err(|e| {
            AuditError::Corrupt(format!(
                "{}: the last record does not parse ({e}); run `sovkms audit verify`",
                path.display()
            ))
        })?;
        if rec.compute_hash() != rec.hash {
            return Err(AuditError::Corrupt(format!(
                "{}: the last record (seq {}) fails its hash; run `sovkms audit verify`",
                path.display(),
                rec.seq
            )));
        }
        if durable_len < len {
            tracing::warn!(
                bytes = len - durable_len,
                "cutting a torn final audit line (never acknowledged)"
            );
            f.set_len(durable_len).map_err(io)?;
        }
        return Ok((rec.seq, rec.hash, durable_len));
    }
}

/// One line of the witness: a signed checkpoint, enough for an auditor to
/// check a log against it (`sovkms audit verify --witness`).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct WitnessLine {
    /// The checkpoint record's sequence number.
    pub seq: u64,
    /// The checkpoint record's hash.
    pub hash: String,
    /// The last record it covers.
    pub head_seq: u64,
    /// That record's hash.
    pub head_hash: String,
    /// Broker that wrote it.
    pub broker_id: String,
    /// ECDSA P-256 signature of the head (hex), as in the record.
    pub signature: String,
}

impl WitnessLine {
    fn of(r: &Record) -> Self {
        let cp = r.checkpoint.as_ref();
        Self {
            seq: r.seq,
            hash: r.hash.clone(),
            head_seq: cp.map_or(0, |c| c.head_seq),
            head_hash: cp.map(|c| c.head_hash.clone()).unwrap_or_default(),
            broker_id: r.broker_id.clone(),
            signature: cp.map(|c| c.signature.clone()).unwrap_or_default(),
        }
    }
}

/// Before the broker appends to a log: its signing key works, the whole
/// chain verifies against it (every link, every checkpoint signature), and
/// the last head the witness holds is in the log. A host insider who
/// rewrote records and recomputed their hashes is caught here instead of
/// having the broker sign the forgery at its next checkpoint.
fn check_before_continuing(
    settings: &LogSettings,
    root: &dyn RootOfTrust,
) -> Result<(), AuditError> {
    let pk = root
        .signing_public_key()
        .map_err(|e| AuditError::Unsigned(e.to_string()))?;
    let probe = b"sovkms/v1/audit-signing-probe";
    let sig = root
        .sign(probe)
        .map_err(|e| AuditError::Unsigned(e.to_string()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &pk)
        .verify(probe, &sig)
        .map_err(|_| {
            AuditError::Unsigned(
                "the signing key's signature does not verify with its public key".into(),
            )
        })?;
    let anchors = match &settings.witness {
        Some(w) => {
            super::verify::witness_anchors(w).map_err(|e| AuditError::Rejected(e.to_string()))?
        }
        None => Vec::new(),
    };
    let (reader, name): (Box<dyn Read>, String) = match &settings.table {
        Some(t) => (
            Box::new(super::table::ChainReader::new(
                Arc::clone(&t.0),
                &settings.broker_id,
                0,
            )),
            format!("the database chain of broker {}", settings.broker_id),
        ),
        None => (
            Box::new(
                super::segments::open(&settings.path)
                    .map_err(|e| AuditError::io(settings.path.display(), e))?,
            ),
            settings.path.display().to_string(),
        ),
    };
    super::verify::verify_anchored(std::io::BufReader::new(reader), &pk, false, &anchors)
        .map_err(|e| AuditError::Rejected(format!("{name}: {e}; the broker does not continue this chain (`sovkms audit verify` names the record)")))?;
    Ok(())
}

/// The record that stands for buffered records not written: `full` were
/// dropped because the queue was full, `shed` because free space was
/// below the reserve.
fn unwritten_event(full: u64, shed: u64) -> Event {
    let mut why = Vec::new();
    if full > 0 {
        why.push(format!("{full} because the audit queue was full"));
    }
    if shed > 0 {
        why.push(format!(
            "{shed} because free disk space was below the reserve kept for plaintext releases"
        ));
    }
    Event {
        kind: Kind::Request,
        request_id: String::new(),
        caller: None,
        operation: "dropped-records",
        key_id: String::new(),
        key_version: 0,
        context_sha256: String::new(),
        outcome: super::Outcome::Failed,
        code: "RESOURCE_EXHAUSTED",
        reason: format!(
            "buffered audit records were not written: {}",
            why.join(", ")
        ),
        protocol: "",
    }
}

/// Free bytes for unprivileged writers on the file system holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Shedding of buffered records when the disk runs low.
struct Reserve {
    /// Estimated free bytes (measured, minus what was written since).
    free: u64,
    measured_at: Option<Instant>,
    /// Buffered records not written since the last record saying so.
    shed: u64,
    /// Records lost to a full queue, not yet reported.
    full: u64,
    shedding: bool,
}

struct Writer {
    out: Output,
    settings: LogSettings,
    root: Arc<dyn RootOfTrust>,
    seq: u64,
    hash: String,
    durable_len: u64,
    written_len: u64,
    /// Sequence and hash of the last synced record.
    synced: (u64, String),
    /// When the oldest written-but-unsynced record was written.
    unsynced_since: Option<Instant>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Sequence number of the active file's first record.
    active_first: u64,
    reserve: Reserve,
    metrics: crate::metrics::AuditMetrics,
    last_durable_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Kept from batch to batch (see `write_batch`).
    spare: Vec<Queued>,
    records: Vec<Record>,
    waiters: Vec<Option<Waiter>>,
    lines: Vec<u8>,
}

impl Writer {
    /// The record of an event (consumed: its strings move into the record).
    fn build(&self, seq: u64, prev_hash: String, e: Event, time_unix_ms: u64) -> Record {
        let (td, region, role, name, id) = match e.caller {
            Some(c) => (
                c.trust_domain.clone(),
                c.region.to_string(),
                c.role.as_str().to_owned(),
                c.name.clone(),
                c.spiffe_id(),
            ),
            None => Default::default(),
        };
        let mut r = Record {
            seq,
            time_unix_ms,
            region: self.settings.region.clone(),
            broker_id: self.settings.broker_id.clone(),
            kind: e.kind,
            request_id: e.request_id,
            caller: id,
            caller_trust_domain: td,
            caller_region: region,
            caller_role: role,
            caller_name: name,
            operation: e.operation.to_owned(),
            key_id: e.key_id,
            key_version: e.key_version,
            context_sha256: e.context_sha256,
            outcome: e.outcome.as_str().to_owned(),
            code: e.code.to_owned(),
            reason: e.reason,
            checkpoint: None,
            protocol: e.protocol.to_owned(),
            prev_hash,
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    /// Writes records, and syncs them (and everything written before) when
    /// `sync`. On failure cuts the file back to the last synced length and
    /// resets the chain to the last synced record: buffered records written
    /// since are lost, and nothing after a lost record claims it.
    fn commit(&mut self, records: &[Record], sync: bool) -> Result<(), AuditError> {
        // Room ahead never eats into the space kept for durable records.
        let grow = self.reserve.free >= self.settings.reserve_bytes.saturating_add(2 * GROW_BY);
        let written = match self.out.write(records, &mut self.lines, grow) {
            Ok(n) => n,
            Err(WriteError::Encode(e)) => return Err(e),
            Err(WriteError::Io(e)) => return self.fail(e),
        };
        self.written_len += written;
        self.reserve.free = self.reserve.free.saturating_sub(written);
        if let Some(last) = records.last() {
            self.seq = last.seq;
            self.hash = last.hash.clone();
        }
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        if sync {
            self.sync()
        } else {
            Ok(())
        }
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        let start = Instant::now();
        let synced = self.out.sync();
        self.metrics
            .sync_seconds
            .observe(start.elapsed().as_secs_f64());
        match synced {
            Ok(()) => {
                self.unsynced_since = None;
                self.durable_len = self.written_len;
                self.synced = (self.seq, self.hash.clone());
                Ok(())
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: std::io::Error) -> Result<(), AuditError> {
        self.metrics.write_failures.inc();
        self.out.cut(self.durable_len);
        self.written_len = self.durable_len;
        (self.seq, self.hash) = self.synced.clone();
        self.unsynced_since = None;
        tracing::error!(error = %e, "audit log write failed; requests that need a durable record are refused");
        Err(AuditError::io("write", e))
    }

    /// Syncs buffered records that have waited long enough.
    fn sync_if_due(&mut self) {
        if self
            .unsynced_since
            .is_some_and(|t| t.elapsed() >= SYNC_AT_LEAST_EVERY)
        {
            let _ = self.sync();
        }
    }

    /// Whether free space is below the reserve (measured again when due).
    fn below_reserve(&mut self) -> bool {
        let want = self.settings.reserve_bytes;
        if want == 0 {
            return false;
        }
        let r = &mut self.reserve;
        let stale = r.measured_at.is_none_or(|t| t.elapsed() >= FREE_RECHECK);
        if stale || r.free < want.saturating_mul(2) {
            match free_bytes(&self.settings.path) {
                Ok(free) => {
                    r.free = free;
                    r.measured_at = Some(Instant::now());
                }
                // Unknown free space: keep the last estimate.
                Err(e) => tracing::warn!(error = %e, "cannot measure free space for the audit log"),
            }
        }
        let below = r.free < want;
        if below != r.shedding {
            r.shedding = below;
            self.metrics.below_reserve.set(i64::from(below));
            if below {
                tracing::warn!(free = r.free, reserve = want, "audit log disk below its reserve: buffered records (refusals, encrypts, reads) are counted, not written, until space returns");
            } else {
                tracing::info!(free = r.free, "audit log disk above its reserve again");
            }
        }
        below
    }

    /// Drops buffered events when the disk is below the reserve, and adds
    /// one record counting those not written once a batch has a record
    /// somebody waits for or space has returned.
    fn shed(&mut self, batch: &mut Vec<Queued>) {
        if self.below_reserve() {
            let before = batch.len();
            batch.retain(|(_, w)| w.is_some());
            let shed = (before - batch.len()) as u64;
            self.reserve.shed += shed;
            self.metrics.unwritten.inc_by(shed);
            if batch.is_empty() {
                return;
            }
        }
        let r = &mut self.reserve;
        if r.shed + r.full > 0 {
            batch.push((unwritten_event(r.full, r.shed), None));
            (r.full, r.shed) = (0, 0);
        }
    }

    /// Writes (and, when somebody waits, syncs) a batch; leaves `batch`
    /// empty. The vectors and the line buffer are kept from batch to batch:
    /// allocating them anew cost the writer a fresh, kernel-zeroed mapping
    /// per batch under load.
    fn write_batch(&mut self, batch: &mut Vec<Queued>) {
        self.shed(batch);
        if batch.is_empty() {
            return;
        }
        self.metrics.batch_records.observe(batch.len() as f64);
        let t = now_ms();
        let mut records = std::mem::take(&mut self.records);
        let mut waiters = std::mem::take(&mut self.waiters);
        let (mut seq, mut prev) = (self.seq, self.hash.clone());
        for (e, w) in batch.drain(..) {
            seq += 1;
            let r = self.build(seq, prev, e, t);
            prev = r.hash.clone();
            records.push(r);
            waiters.push(w);
        }
        let sync = waiters.iter().any(Option::is_some);
        let res = self.commit(&records, sync);
        if sync && res.is_ok() {
            self.last_durable_ms
                .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        }
        for (waiter, r) in waiters.drain(..).zip(&records) {
            if let Some(w) = waiter {
                let _ = w.send(res.clone().map(|_| r.seq));
            }
        }
        if res.is_ok() {
            self.since_checkpoint += records.len() as u64;
        }
        records.clear();
        self.records = records;
        self.waiters = waiters;
    }

    fn checkpoint_due(&self) -> bool {
        self.since_checkpoint >= self.settings.checkpoint_every
            || (self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval)
    }

    fn checkpoint(&mut self, shared: &Shared) {
        let t = now_ms();
        let msg = checkpoint_message(
            self.seq,
            &self.hash,
            t,
            &self.settings.region,
            &self.settings.broker_id,
        );
        let sig = match self.root.sign(&msg) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "audit checkpoint not signed: refusing plaintext releases until one is");
                shared
                    .unsigned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.last_checkpoint = Instant::now();
                return;
            }
        };
        let ev = Event::system(Kind::Checkpoint, "checkpoint", "");
        let mut r = self.build(self.seq + 1, self.hash.clone(), ev, t);
        r.checkpoint = Some(CheckpointBody {
            head_seq: self.seq,
            head_hash: self.hash.clone(),
            signer: self.root.info().root_key_id,
            signature: hex::encode(sig),
        });
        r.hash = r.compute_hash();
        if self.commit(std::slice::from_ref(&r), true).is_ok() {
            if let Err(e) = self.witness(&r) {
                tracing::error!(error = %e, "audit witness not written: refusing plaintext releases until it is");
                shared
                    .unsigned
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.last_checkpoint = Instant::now();
                return;
            }
            shared
                .unsigned
                .store(false, std::sync::atomic::Ordering::SeqCst);
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
            if self.written_len >= self.settings.segment_bytes {
                self.rotate();
            }
        }
    }

    /// Closes the active file (synced, ending with a signed checkpoint) as
    /// a segment and starts a new one. A failure leaves the active file in
    /// place and is retried at the next checkpoint.
    fn rotate(&mut self) {
        let Output::File(active) = &mut self.out else {
            return;
        };
        // A segment ends with its last record, never with room ahead.
        if let Err(e) = active.trim() {
            tracing::error!(error = %e, "audit log not rotated: its room ahead cannot be cut");
            return;
        }
        let path = self.settings.path.clone();
        let closed = super::segments::segment_path(&path, self.active_first);
        if closed.exists() {
            tracing::error!(segment = %closed.display(), "audit segment already exists; not rotating");
            return;
        }
        if let Err(e) = std::fs::rename(&path, &closed) {
            tracing::error!(error = %e, "audit log not rotated");
            return;
        }
        // Not O_APPEND: records overwrite the room made ahead of them.
        let opened = OpenOptions::new()
            .mode(0o600)
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path);
        let dir = closed.parent().map(File::open);
        match opened {
            Ok(f) => {
                self.out = Output::File(Active::new(f, 0));
                self.durable_len = 0;
                self.written_len = 0;
                self.active_first = self.seq + 1;
                if let Some(Err(e)) = dir.map(|d| d.and_then(|d| d.sync_all())) {
                    tracing::warn!(error = %e, "audit directory not synced after rotation");
                }
                tracing::info!(segment = %closed.display(), "audit log rotated");
            }
            Err(e) => {
                // The old handle still writes to the renamed file: put it back.
                let _ = std::fs::rename(&closed, &path);
                tracing::error!(error = %e, "audit log not rotated: the new file cannot be created");
            }
        }
    }

    /// Appends a signed checkpoint to the witness, synced.
    fn witness(&self, r: &Record) -> Result<(), AuditError> {
        let Some(path) = &self.settings.witness else {
            return Ok(());
        };
        let line = serde_json::to_string(&WitnessLine::of(r))
            .map_err(|e| AuditError::Encode(Arc::new(e)))?;
        let mut f = OpenOptions::new()
            .mode(0o600)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| AuditError::io(path.display(), e))?;
        f.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| AuditError::io(path.display(), e))
    }

    fn run(mut self, shared: Arc<Shared>) {
        loop {
            let deadline = Instant::now()
                + if self.unsynced_since.is_some() {
                    SYNC_AT_LEAST_EVERY
                } else if shared.unsigned.load(std::sync::atomic::Ordering::SeqCst) {
                    // Releases wait for a signed checkpoint: retry soon.
                    SIGN_RETRY
                } else {
                    self.settings.checkpoint_interval
                };
            let (batch, shutdown) = {
                let mut q = shared.lock();
                loop {
                    if q.shutdown || q.waiters > 0 || q.events.len() >= MAX_BATCH {
                        break;
                    }
                    let now = Instant::now();
                    let wake_at = match q.first_at {
                        Some(t) => (t + BUFFER_DELAY).min(deadline),
                        None => deadline,
                    };
                    if now >= wake_at {
                        break;
                    }
                    q.writer_waiting = true;
                    q = shared
                        .wake
                        .wait_timeout(q, wake_at - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    q.writer_waiting = false;
                }
                q.waiters = 0;
                q.first_at = None;
                self.reserve.full += std::mem::take(&mut q.dropped);
                shared.metrics.queue_depth.set(0);
                // The emptied vector of the last batch takes the queue's
                // place: pushes do not grow a fresh one.
                let spare = std::mem::take(&mut self.spare);
                (std::mem::replace(&mut q.events, spare), q.shutdown)
            };
            let mut batch = batch;
            if !batch.is_empty() || self.reserve.full + self.reserve.shed > 0 {
                self.write_batch(&mut batch);
            }
            batch.clear();
            self.spare = batch;
            self.sync_if_due();
            let unsigned = shared.unsigned.load(std::sync::atomic::Ordering::SeqCst);
            if self.checkpoint_due() || unsigned || (shutdown && self.since_checkpoint > 0) {
                self.checkpoint(&shared);
            }
            if shutdown {
                // A stopped broker's file ends with its last record.
                if let Output::File(active) = &mut self.out {
                    if let Err(e) = active.trim() {
                        tracing::warn!(error = %e, "audit file's room ahead not cut at stop (cut at the next start)");
                    }
                }
                return;
            }
        }
    }
}

/// The writer's output, head (seq, hash), durable length and the active
/// file's first sequence number.
type Opened = (Output, u64, String, u64, u64);

/// Opens (or creates) the log file and recovers its head.
fn open_file(path: &Path) -> Result<Opened, AuditError> {
    if let Some(dir) = path.parent() {
        crate::files::create_private_dir(dir).map_err(|e| AuditError::io(dir.display(), e))?;
    }
    // Not O_APPEND: records overwrite the room made ahead of them.
    let mut file = OpenOptions::new()
        .mode(0o600)
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| AuditError::io(path.display(), e))?;
    cut_at_first_nul(&mut file).map_err(|e| AuditError::io(path.display(), e))?;
    let (mut seq, mut hash, durable_len) = recover_tail(&mut file, path)?;
    // A fresh active file after a rotation: the chain goes on from the
    // last closed segment.
    let active_first = if durable_len > 0 {
        super::segments::first_seq(path)
            .map_err(|e| AuditError::io(path.display(), e))?
            .unwrap_or(seq)
    } else {
        let closed =
            super::segments::closed(path).map_err(|e| AuditError::io(path.display(), e))?;
        if let Some((_, last)) = closed.last() {
            let mut f = File::open(last).map_err(|e| AuditError::io(last.display(), e))?;
            (seq, hash, _) = recover_tail(&mut f, last)?;
        }
        seq + 1
    };
    Ok((
        Output::File(Active::new(file, durable_len)),
        seq,
        hash,
        durable_len,
        active_first,
    ))
}

/// Recovers the head of `broker_id`'s chain in the database.
fn open_table(
    table: &Arc<dyn super::table::ChainTable>,
    broker_id: &str,
) -> Result<Opened, AuditError> {
    let what = || format!("the database chain of broker {broker_id}");
    let (seq, hash) = match table
        .last(broker_id)
        .map_err(|e| AuditError::io(what(), e))?
    {
        None => (0, GENESIS.to_owned()),
        Some(line) => {
            let rec: Record = serde_json::from_str(&line).map_err(|e| {
                AuditError::Corrupt(format!(
                    "{}: the last record does not parse ({e}); run `sovkms audit verify`",
                    what()
                ))
            })?;
            if rec.compute_hash() != rec.hash {
                return Err(AuditError::Corrupt(format!(
                    "{}: the last record (seq {}) fails its hash; run `sovkms audit verify`",
                    what(),
                    rec.seq
                )));
            }
            (rec.seq, rec.hash)
        }
    };
    let out = Output::Table {
        table: Arc::clone(table),
        broker_id: broker_id.to_owned(),
        pending: Vec::new(),
    };
    Ok((out, seq, hash, 0, 0))
}

impl AuditLog {
    /// Opens (or creates) the log, recovers its head, and starts the writer.
    pub fn open(settings: LogSettings, root: Arc<dyn RootOfTrust>) -> Result<Self, AuditError> {
        let (out, seq, hash, durable_len, active_first) = match &settings.table {
            Some(t) => open_table(&t.0, &settings.broker_id)?,
            None => open_file(&settings.path)?,
        };
        check_before_continuing(&settings, root.as_ref())?;
        let mut writer = Writer {
            metrics: crate::metrics::AuditMetrics::default(),
            last_durable_ms: Arc::default(),
            out,
            settings,
            root,
            synced: (seq, hash.clone()),
            seq,
            hash,
            durable_len,
            written_len: durable_len,
            unsynced_since: None,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            active_first,
            reserve: Reserve {
                free: u64::MAX,
                measured_at: None,
                shed: 0,
                full: 0,
                shedding: false,
            },
            spare: Vec::new(),
            records: Vec::new(),
            waiters: Vec::new(),
            lines: Vec::new(),
        };
        let metrics = crate::metrics::AuditMetrics::default();
        writer.metrics = metrics.clone();
        let last_durable_ms = Arc::clone(&writer.last_durable_ms);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            unsigned: std::sync::atomic::AtomicBool::new(false),
            metrics,
            last_durable_ms,
        });
        let for_writer = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("sovkms-audit".into())
            .spawn(move || writer.run(for_writer))
            .map_err(|e| AuditError::io("writer thread", e))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn push(&self, event: Event, waiter: Option<Waiter>) -> Result<(), AuditError> {
        if waiter.is_some()
            && self
                .shared
                .unsigned
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(AuditError::Unsigned(
                "the last checkpoint could not be signed or witnessed".into(),
            ));
        }
        let mut q = self.shared.lock();
        if q.shutdown {
            return Err(AuditError::Stopped);
        }
        if q.events.len() >= MAX_QUEUED {
            if waiter.is_some() {
                return Err(AuditError::Busy);
            }
            q.dropped += 1;
            self.shared.metrics.unwritten.inc();
            return Ok(());
        }
        // The first buffered event of a window wakes the writer once, so that
        // it arms its BUFFER_DELAY timer; later ones ride along silently.
        let wake = q.writer_waiting
            && (waiter.is_some() || q.first_at.is_none() || q.events.len() + 1 >= MAX_BATCH);
        if waiter.is_some() {
            q.waiters += 1;
        }
        if q.first_at.is_none() {
            q.first_at = Some(Instant::now());
        }
        q.events.push((event, waiter));
        let depth = q.events.len();
        drop(q);
        self.shared.metrics.queue_depth.set(depth as i64);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// The writer's metrics (shared series: register them once).
    pub fn metrics(&self) -> crate::metrics::AuditMetrics {
        self.shared.metrics.clone()
    }

    /// Writes a final checkpoint and stops the writer.
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl AuditSink for AuditLog {
    fn append(&self, event: Event) {
        if let Err(e) = self.push(event, None) {
            tracing::error!(error = %e, "audit record dropped");
        }
    }

    fn append_ticket(&self, event: Event) -> Result<super::Ticket, AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.push(event, Some(tx))?;
        Ok(super::Ticket(rx))
    }

    fn close(&self) {
        self.shutdown();
    }

    fn probe(&self, fresh: Duration) -> Result<(), AuditError> {
        let last = self
            .shared
            .last_durable_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let fresh_ms = u64::try_from(fresh.as_millis()).unwrap_or(u64::MAX);
        if last > 0 && now_ms().saturating_sub(last) < fresh_ms {
            return Ok(());
        }
        self.append_durable(Event::system(Kind::Probe, "readiness-probe", ""))
            .map(|_| ())
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> AuditLog {
        let root = Arc::new(
            crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).unwrap(),
        );
        AuditLog::open(
            LogSettings {
                path: dir.join("audit.log"),
                region: "eu-central".into(),
                broker_id: "t".into(),
                checkpoint_every: 1000,
                checkpoint_interval: Duration::from_secs(60),
                witness: None,
                segment_bytes: 64 << 20,
                reserve_bytes: 0,
                table: None,
            },
            root,
        )
        .unwrap()
    }

    #[test]
    fn buffered_records_reach_the_file_within_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        log.append(Event::system(Kind::Request, "encrypt", ""));
        let start = Instant::now();
        loop {
            let log_file = super::super::segments::open(&dir.path().join("audit.log")).unwrap();
            if std::io::read_to_string(log_file).unwrap().lines().count() == 1 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_millis(500),
                "buffered record not written"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        log.close();
    }

    #[test]
    fn a_durable_append_wakes_an_idle_writer() {
        // The writer sleeps up to the checkpoint interval (60 s here) when
        // idle; only the push's notify can make this return in time.
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        std::thread::sleep(Duration::from_millis(50));
        for _ in 0..3 {
            let start = Instant::now();
            log.append_durable(Event::system(Kind::Request, "decrypt", ""))
                .unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "writer not woken"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        log.close();
    }

    #[test]
    fn torn_tail_is_cut_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let first = log
            .append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        assert_eq!(first, 1);
        drop(log);
        // A crash mid-write leaves half a line behind.
        let path = dir.path().join("audit.log");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":99,\"tim");
        std::fs::write(&path, text).unwrap();
        let log = open(dir.path());
        let next = log
            .append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        drop(log);
        let recs: Vec<Record> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // seq 1, the final checkpoint of the first run (2), then ours.
        assert_eq!(next, 3);
        assert_eq!(
            recs.last().map(|r| r.seq),
            Some(4),
            "a clean stop adds a checkpoint"
        );
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
    }

    #[test]
    fn room_made_ahead_and_what_a_crash_left_after_it_are_cut_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = open(dir.path());
        log.append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        // Running: zeros follow the record (synced with it); readers stop there.
        let bytes = std::fs::read(&path).unwrap();
        let end = bytes.iter().position(|b| *b == 0).unwrap();
        assert!(bytes.len() as u64 >= GROW_BY && bytes[end..].iter().all(|b| *b == 0));
        let read = std::io::read_to_string(super::super::segments::open(&path).unwrap()).unwrap();
        assert_eq!(read.as_bytes(), &bytes[..end]);
        drop(log);
        // A clean stop cuts the room.
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.contains(&0) && bytes.ends_with(b"\n"));
        // A crash: room, then bytes written but never synced after it.
        bytes.extend_from_slice(&[0; 4096]);
        bytes.extend_from_slice(b"{\"seq\":99}\n");
        bytes.extend_from_slice(&[0; 100]);
        std::fs::write(&path, &bytes).unwrap();
        let log = open(dir.path());
        // seq 1, the first run's final checkpoint (2), then this one.
        let next = log
            .append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        assert_eq!(next, 3);
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        let recs: Vec<Record> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
    }

    #[test]
    fn segments_close_at_checkpoints_and_the_chain_runs_through_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let root = Arc::new(
            crate::root::software::SoftwareRoot::open_or_create(&dir.path().join("root")).unwrap(),
        );
        let open = || {
            AuditLog::open(
                LogSettings {
                    path: path.clone(),
                    region: "eu-central".into(),
                    broker_id: "t".into(),
                    checkpoint_every: 5,
                    checkpoint_interval: Duration::from_secs(60),
                    witness: None,
                    segment_bytes: 2048,
                    reserve_bytes: 0,
                    table: None,
                },
                Arc::clone(&root) as Arc<dyn RootOfTrust>,
            )
            .unwrap()
        };
        let ev = || Event::system(Kind::Request, "decrypt", "");
        let log = open();
        for _ in 0..60 {
            log.append_durable(ev()).unwrap();
        }
        drop(log);
        let closed = super::super::segments::closed(&path).unwrap();
        assert!(closed.len() >= 3, "{closed:?}");
        for (first, p) in &closed {
            let text = std::fs::read_to_string(p).unwrap();
            let recs: Vec<Record> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(
                recs[0].seq, *first,
                "a segment is named by its first record"
            );
            assert_eq!(
                recs.last().unwrap().kind,
                Kind::Checkpoint,
                "every closed segment ends with a signed checkpoint"
            );
        }
        // A new run continues the chain (from the last segment if the
        // active file is empty), and the whole chain verifies.
        let log = open();
        let seq = log.append_durable(ev()).unwrap();
        drop(log);
        let pk = root.signing_public_key().unwrap();
        let rep = crate::audit::verify(
            std::io::BufReader::new(super::super::segments::open(&path).unwrap()),
            &pk,
            true,
        )
        .unwrap();
        assert!(rep.last_seq > seq && seq > 60, "{seq} {}", rep.last_seq);
        // Removing a closed segment breaks the chain.
        std::fs::remove_file(&closed[1].1).unwrap();
        let cut = crate::audit::verify(
            std::io::BufReader::new(super::super::segments::open(&path).unwrap()),
            &pk,
            false,
        )
        .unwrap_err();
        assert_eq!(cut.seq, closed[1].0, "{cut}");
    }

    /// A named fake: the software root whose signing can be switched off,
    /// because a real HSM does not fail a signature on demand mid-run.
    struct FailingSigner {
        inner: crate::root::software::SoftwareRoot,
        fail: std::sync::atomic::AtomicBool,
    }

    impl RootOfTrust for FailingSigner {
        fn info(&self) -> crate::root::RootInfo {
            self.inner.info()
        }
        fn health(&self) -> Result<(), crate::root::RootError> {
            self.inner.health()
        }
        fn generate_material(&self) -> Result<crate::secret::KeyMaterial, crate::root::RootError> {
            self.inner.generate_material()
        }
        fn wrap(
            &self,
            m: &crate::secret::KeyMaterial,
        ) -> Result<crate::root::WrappedKey, crate::root::RootError> {
            self.inner.wrap(m)
        }
        fn unwrap(
            &self,
            w: &crate::root::WrappedKey,
        ) -> Result<crate::secret::KeyMaterial, crate::root::RootError> {
            self.inner.unwrap(w)
        }
        fn sign(&self, m: &[u8]) -> Result<Vec<u8>, crate::root::RootError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::root::RootError::new(
                    crate::root::RootErrorKind::Unavailable,
                    "signing switched off by the test",
                ));
            }
            self.inner.sign(m)
        }
        fn signing_public_key(&self) -> Result<Vec<u8>, crate::root::RootError> {
            self.inner.signing_public_key()
        }
    }

    /// A checkpoint that cannot be signed stops plaintext releases (durable
    /// appends) until one is signed again.
    #[test]
    fn an_unsigned_checkpoint_fails_closed_until_signing_returns() {
        let dir = tempfile::tempdir().unwrap();
        let root = Arc::new(FailingSigner {
            inner: crate::root::software::SoftwareRoot::open_or_create(&dir.path().join("root"))
                .unwrap(),
            fail: std::sync::atomic::AtomicBool::new(false),
        });
        let log = AuditLog::open(
            LogSettings {
                path: dir.path().join("audit.log"),
                region: "eu-central".into(),
                broker_id: "t".into(),
                checkpoint_every: 1,
                checkpoint_interval: Duration::from_secs(60),
                witness: None,
                segment_bytes: 64 << 20,
                reserve_bytes: 0,
                table: None,
            },
            Arc::clone(&root) as Arc<dyn RootOfTrust>,
        )
        .unwrap();
        log.append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        root.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        // This record is written; the checkpoint after it fails to sign.
        log.append_durable(Event::system(Kind::Request, "decrypt", ""))
            .unwrap();
        let start = Instant::now();
        let refused = loop {
            match log.append_durable(Event::system(Kind::Request, "decrypt", "")) {
                Err(AuditError::Unsigned(_)) => break true,
                _ if start.elapsed() > Duration::from_secs(5) => break false,
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert!(
            refused,
            "plaintext releases went on without signed checkpoints"
        );
        root.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let start = Instant::now();
        while log
            .append_durable(Event::system(Kind::Request, "decrypt", ""))
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "signing returned but releases did not"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        log.close();
    }
}
