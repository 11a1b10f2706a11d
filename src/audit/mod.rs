//! Audit: every request becomes a record in a hash chain; checkpoints of the
//! chain head are signed by the root of trust; auditors verify offline with
//! the public key only; the central plane sees aggregates, never records.

mod log;
pub mod record;
pub mod segments;
pub mod table;
mod verify;

pub use log::{AuditLog, LogSettings, WitnessLine};
pub use record::{Kind, Record};
pub use verify::{
    aggregate, complete_lines, export, parse_public_key, rfc3339,
    syslog_line as verify_syslog_line, verify, verify_anchored, witness_anchors, AggregateRow,
    Aggregator, Anchor, ExportFormat, PublicKeyError, ReadError, VerifyFailure, VerifyReport,
};

use crate::region::Caller;

/// Why an audit write failed. Cloneable (one failed batch answers many
/// waiters), so sources are shared.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file could not be opened, written or synced (disk full, I/O error).
    #[error("audit log {what}: {source}")]
    Io {
        /// The file or step.
        what: String,
        /// The cause.
        source: std::sync::Arc<std::io::Error>,
    },
    /// A record could not be encoded.
    #[error("audit record cannot be encoded: {0}")]
    Encode(std::sync::Arc<serde_json::Error>),
    /// The writer thread is gone (shutdown, or it could not start).
    #[error("the audit writer has stopped")]
    Stopped,
    /// The existing log is damaged.
    #[error("audit log corrupt: {0}")]
    Corrupt(String),
    /// The log does not verify against its own checkpoints or its witness
    /// (rewritten, cut, or signed by another key): the broker does not
    /// continue such a chain.
    #[error("audit log rejected: {0}")]
    Rejected(String),
    /// The queue of records waiting for the writer is full (the disk cannot
    /// keep up): requests that need a durable record are refused.
    #[error("the audit queue is full")]
    Busy,
    /// The root of trust cannot sign checkpoints.
    #[error("audit checkpoints cannot be signed: {0}")]
    Unsigned(String),
}

impl AuditError {
    /// An I/O failure of `what` (a path or a step).
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        Self::Io {
            what: what.to_string(),
            source: std::sync::Arc::new(e),
        }
    }
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Done as asked.
    Allowed,
    /// Refused by identity, role, region, grant or state rules, or bad input.
    Refused,
    /// Failed for an operational reason (root of trust, store, audit).
    Failed,
}

impl Outcome {
    /// Name in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// What the core hands the log; the log adds sequence, time and hashes.
#[derive(Clone, Debug)]
pub struct Event {
    /// Record kind.
    pub kind: Kind,
    /// Request id.
    pub request_id: String,
    /// Authenticated caller, if any.
    pub caller: Option<std::sync::Arc<Caller>>,
    /// Operation name.
    pub operation: &'static str,
    /// Key id, if known.
    pub key_id: String,
    /// Key version, 0 if none.
    pub key_version: u32,
    /// SHA-256 hex of the canonical context, if one was given.
    pub context_sha256: String,
    /// Outcome.
    pub outcome: Outcome,
    /// gRPC code name.
    pub code: &'static str,
    /// Reason told to the caller.
    pub reason: String,
    /// Front end (`kmip`), or empty for the gRPC API and the broker itself.
    pub protocol: &'static str,
}

impl Event {
    /// A record the broker writes on its own behalf (start, checkpoint).
    pub fn system(kind: Kind, operation: &'static str, reason: &str) -> Self {
        Self {
            kind,
            request_id: String::new(),
            caller: None,
            operation,
            key_id: String::new(),
            key_version: 0,
            context_sha256: String::new(),
            outcome: Outcome::Allowed,
            code: "OK",
            reason: reason.to_owned(),
            protocol: "",
        }
    }
}

/// A record on its way to disk; wait for it before releasing anything.
pub struct Ticket(pub(crate) tokio::sync::oneshot::Receiver<Result<u64, AuditError>>);

impl Ticket {
    /// Blocks until the record is durable (or failed). Not on an async thread.
    pub fn wait(self) -> Result<u64, AuditError> {
        self.0.blocking_recv().map_err(|_| AuditError::Stopped)?
    }

    /// Waits asynchronously until the record is durable (or failed).
    pub async fn wait_async(self) -> Result<u64, AuditError> {
        self.0.await.map_err(|_| AuditError::Stopped)?
    }
}

/// Where audit events go.
///
/// Contract: `append_durable` returns only once the record is on stable
/// storage (its sequence number is returned), or fails and then the record
/// is not in the log and the chain did not advance. `append` may buffer the
/// record for the next group commit (milliseconds) and loses it if that
/// commit fails or the process dies first.
pub trait AuditSink: Send + Sync {
    /// Buffered append.
    fn append(&self, event: Event);
    /// Append whose durability the caller waits for through the ticket.
    fn append_ticket(&self, event: Event) -> Result<Ticket, AuditError>;
    /// Durable append (blocking).
    fn append_durable(&self, event: Event) -> Result<u64, AuditError> {
        self.append_ticket(event)?.wait()
    }
    /// Writes what is buffered and a final signed checkpoint, then stops.
    fn close(&self);
    /// Proves the log takes durable records now: a durable record synced
    /// within `fresh` suffices; otherwise a probe record is written and
    /// synced.
    fn probe(&self, fresh: std::time::Duration) -> Result<(), AuditError> {
        let _ = fresh;
        self.append_durable(Event::system(Kind::Probe, "readiness-probe", ""))
            .map(|_| ())
    }
}
