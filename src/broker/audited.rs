//! Audit-before-release: every request's outcome becomes a record; a
//! result that carries plaintext is reachable only once its record is
//! durable; a lifecycle change is recorded durably before it is applied.

use super::{Broker, CallCtx, Note};
use crate::audit::{AuditError, Event, Kind, Outcome, Ticket};
use crate::envelope::EncryptionContext;
use crate::error::{Error, Result, Unavailable};
use crate::keys::Halt;
use crate::policy::{Operation, Refusal};

/// A result that may be released only once its audit record is durable.
pub struct AfterAudit<T> {
    value: T,
    ticket: Option<(Ticket, Pending)>,
}

/// A request whose metrics wait for its audit record (its outcome and
/// duration are known only then).
struct Pending {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    operation: &'static str,
    protocol: &'static str,
    started: std::time::Instant,
    request_id: String,
    caller: Option<std::sync::Arc<crate::region::Caller>>,
}

impl Pending {
    /// Counts the request once its record is durable (or is not).
    fn done<T>(self, r: std::result::Result<T, AuditError>) -> Result<T> {
        let r = r.map_err(audit_err);
        let (outcome, code) = match &r {
            Ok(_) => ("allowed", "OK"),
            Err(e) => (e.outcome().as_str(), e.code_name()),
        };
        self.metrics.request(
            self.operation,
            outcome,
            code,
            self.protocol,
            None,
            self.started.elapsed(),
        );
        let reason = r
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        log_request(
            &self.request_id,
            self.caller.as_deref(),
            self.operation,
            outcome,
            code,
            &reason,
        );
        r
    }
}

/// One log line per request: who asked for what, and how it ended. Never
/// a key, a plaintext or a context value (the reason is the refusal's
/// sentence, which names neither). Allowed requests log at debug level,
/// refusals at info, failures at warn.
fn log_request(
    request_id: &str,
    caller: Option<&crate::region::Caller>,
    operation: &str,
    outcome: &str,
    code: &str,
    reason: &str,
) {
    // Formatted only if the line is logged at all.
    let caller = tracing::field::display(Who(caller));
    match outcome {
        "allowed" => {
            tracing::debug!(target: "sovkms::request", request_id, caller, operation, outcome, code, "request")
        }
        "refused" => {
            tracing::info!(target: "sovkms::request", request_id, caller, operation, outcome, code, reason, "request")
        }
        _ => {
            tracing::warn!(target: "sovkms::request", request_id, caller, operation, outcome, code, reason, "request")
        }
    }
}

/// A caller's SPIFFE id, or nothing.
struct Who<'a>(Option<&'a crate::region::Caller>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(c) => c.fmt(f),
            None => Ok(()),
        }
    }
}

impl<T> AfterAudit<T> {
    /// Waits (asynchronously) for the audit record, then releases the value.
    /// If the record could not be written the value is dropped (zeroized).
    pub async fn released(self) -> Result<T> {
        if let Some((t, p)) = self.ticket {
            p.done(t.wait_async().await)?;
        }
        Ok(self.value)
    }

    /// Blocking form of [`released`](Self::released), for non-async callers.
    pub fn released_blocking(self) -> Result<T> {
        if let Some((t, p)) = self.ticket {
            p.done(t.wait())?;
        }
        Ok(self.value)
    }
}

pub(super) fn audit_err(e: AuditError) -> Error {
    tracing::error!(error = %e, "audit record not durable: refusing the request");
    Unavailable::AuditWrite.into()
}

/// A blocking-mode result: `WouldBlock` cannot happen there.
pub(super) fn settle<T>(r: std::result::Result<T, Halt<Error>>) -> Result<T> {
    r.map_err(|h| match h {
        Halt::Failed(e) => e,
        Halt::WouldBlock => {
            crate::error::Fault::Task("a blocking call waited where it may".into()).into()
        }
    })
}

impl Broker {
    /// Runs a request that may block and audits its outcome (buffered when
    /// the answer releases nothing, durable first when it does).
    pub(super) fn audited<T>(
        &self,
        cx: &CallCtx,
        op: Operation,
        context: Option<&EncryptionContext>,
        f: impl FnOnce(&mut Note) -> Result<T>,
    ) -> Result<T> {
        let r = self.audited_release(cx, op, context, |n| f(n).map_err(Halt::Failed));
        settle(r)?.released_blocking()
    }

    /// Runs a request and audits its outcome; the result comes back sealed
    /// until its record is durable when the operation releases plaintext
    /// (the table's `releases_plaintext`). A request that would block is
    /// handed back unaudited, to be run again where it may block.
    pub(super) fn audited_release<T>(
        &self,
        cx: &CallCtx,
        op: Operation,
        context: Option<&EncryptionContext>,
        f: impl FnOnce(&mut Note) -> std::result::Result<T, Halt<Error>>,
    ) -> std::result::Result<AfterAudit<T>, Halt<Error>> {
        let started = std::time::Instant::now();
        let mut note = Note::default();
        let value = match f(&mut note) {
            Ok(v) => v,
            Err(Halt::WouldBlock) => return Err(Halt::WouldBlock),
            Err(Halt::Failed(e)) => {
                let ev = self.event(Some(cx), op, context, &note, Some(&e));
                self.observe(&ev, Some(&e), started);
                self.record_failure(ev, &e, Some(cx));
                return Err(Halt::Failed(e));
            }
        };
        let ev = self.event(Some(cx), op, context, &note, None);
        let ticket = if op.rule().releases_plaintext {
            let pending = Pending {
                metrics: std::sync::Arc::clone(&self.metrics),
                operation: ev.operation,
                protocol: ev.protocol,
                started,
                request_id: ev.request_id.clone(),
                caller: ev.caller.clone(),
            };
            match self.audit.append_ticket(ev) {
                Ok(t) => Some((t, pending)),
                Err(e) => return pending.done(Err(e)).map_err(Halt::Failed),
            }
        } else {
            self.observe(&ev, None, started);
            self.audit.append(ev);
            None
        };
        Ok(AfterAudit { value, ticket })
    }

    /// A change, audited before it takes effect: `prepare` checks and
    /// builds it; its record is made durable; then `commit` applies it
    /// (with the record's sequence number). A commit that fails after the
    /// record gets a second record saying so.
    pub(super) fn audit_first<P, T>(
        &self,
        cx: Option<&CallCtx>,
        op: Operation,
        prepare: impl FnOnce(&mut Note) -> Result<P>,
        commit: impl FnOnce(P, u64) -> Result<T>,
    ) -> Result<T> {
        let started = std::time::Instant::now();
        let mut note = Note::default();
        let p = match prepare(&mut note) {
            Ok(p) => p,
            Err(e) => {
                let ev = self.event(cx, op, None, &note, Some(&e));
                self.observe(&ev, Some(&e), started);
                self.record_failure(ev, &e, cx);
                return Err(e);
            }
        };
        let ev = self.event(cx, op, None, &note, None);
        let (operation, protocol) = (ev.operation, ev.protocol);
        let seq = match self.audit.append_durable(ev) {
            Ok(seq) => seq,
            Err(e) => {
                let e = audit_err(e);
                self.metrics.request(
                    operation,
                    "failed",
                    e.code_name(),
                    protocol,
                    None,
                    started.elapsed(),
                );
                return Err(e);
            }
        };
        let r = commit(p, seq).inspect_err(|e| {
            let mut ev = self.event(cx, op, None, &note, Some(e));
            ev.reason = format!(
                "the change recorded at audit sequence {seq} was not committed: {}",
                ev.reason
            );
            self.audit.append(ev);
        });
        let (outcome, code) = match &r {
            Ok(_) => ("allowed", "OK"),
            Err(e) => (e.outcome().as_str(), e.code_name()),
        };
        self.metrics
            .request(operation, outcome, code, protocol, None, started.elapsed());
        r
    }

    /// Counts and logs a finished request (one whose answer waits for
    /// nothing).
    fn observe(&self, ev: &Event, e: Option<&Error>, started: std::time::Instant) {
        self.metrics.request(
            ev.operation,
            ev.outcome.as_str(),
            ev.code,
            ev.protocol,
            e.and_then(Error::refusal_reason),
            started.elapsed(),
        );
        log_request(
            &ev.request_id,
            ev.caller.as_deref(),
            ev.operation,
            ev.outcome.as_str(),
            ev.code,
            &ev.reason,
        );
    }

    /// Records a refused or failed request. Refusals (and rate-limited
    /// requests) beyond the caller's per-second record budget are counted
    /// instead, and one summary record per second says how many: a flood of
    /// refusals from another region cannot fill the disk.
    fn record_failure(&self, ev: Event, e: &Error, cx: Option<&CallCtx>) {
        let Some(cx) =
            cx.filter(|_| e.outcome() == Outcome::Refused || matches!(e, Error::Limit(_)))
        else {
            self.audit.append(ev);
            return;
        };
        let (decision, summary) = self.limits.refusal(&cx.caller);
        if let Some(s) = summary {
            self.audit.append(self.suppressed_event(s));
        }
        if decision == super::limits::RefusalRecord::Write {
            self.audit.append(ev);
        }
    }

    fn suppressed_event(&self, s: super::limits::Suppressed) -> Event {
        Event {
            kind: Kind::Request,
            request_id: String::new(),
            caller: Some(std::sync::Arc::new(s.caller)),
            operation: "suppressed-refusals",
            key_id: String::new(),
            key_version: 0,
            context_sha256: String::new(),
            outcome: Outcome::Refused,
            code: "RESOURCE_EXHAUSTED",
            reason: format!(
                "{} more refusals of this caller within one second were counted, not recorded one by one (at most {} a second are)",
                s.count,
                self.limits.refusal_budget()
            ),
            protocol: "",
        }
    }

    /// Records a request the front end cannot carry out (an operation it
    /// does not support), as a refusal of that caller.
    pub fn audit_unsupported(&self, cx: &CallCtx, what: &str) -> Error {
        let e = Error::Invalid(crate::error::Invalid::Unsupported(what.to_owned()));
        self.record_failure(
            self.event(
                Some(cx),
                Operation::GetInfo,
                None,
                &Note::default(),
                Some(&e),
            ),
            &e,
            Some(cx),
        );
        e
    }

    /// Writes the summary records of seconds that ended with suppressed
    /// refusals (run periodically by the front end).
    pub fn flush_suppressed_refusals(&self) {
        for s in self.limits.ended_windows() {
            self.audit.append(self.suppressed_event(s));
        }
    }

    fn event(
        &self,
        cx: Option<&CallCtx>,
        op: Operation,
        context: Option<&EncryptionContext>,
        note: &Note,
        err: Option<&Error>,
    ) -> Event {
        let (outcome, code, reason) = match err {
            None => (Outcome::Allowed, "OK", note.via.clone()),
            Some(e) => (e.outcome(), e.code_name(), e.to_string()),
        };
        let (operation, protocol) = match cx.map(|c| c.front) {
            Some(super::Front::Kmip(name)) => (name, "kmip"),
            _ => (op.name(), ""),
        };
        Event {
            kind: Kind::Request,
            request_id: cx.map(|c| c.request_id.clone()).unwrap_or_default(),
            caller: cx.map(|c| c.caller.clone()),
            operation,
            key_id: note.key_id.clone(),
            key_version: note.key_version,
            context_sha256: context
                .map(EncryptionContext::digest_hex)
                .unwrap_or_default(),
            outcome,
            code,
            reason,
            protocol,
        }
    }

    /// Writes a record of the broker's own (start) and waits until it is
    /// durable, on a plain thread: callers may be on the async runtime.
    pub fn audit_system(&self, ev: Event) -> std::result::Result<u64, AuditError> {
        let ticket = self.audit.append_ticket(ev)?;
        std::thread::spawn(move || ticket.wait())
            .join()
            .map_err(|_| AuditError::Stopped)?
    }

    /// Audits a request refused before it reached the core (no identity).
    pub fn audit_unauthenticated(
        &self,
        request_id: &str,
        op: Operation,
        refusal: &Refusal,
        front: super::Front,
    ) {
        let e = Error::Refused(refusal.clone());
        let mut ev = self.event(None, op, None, &Note::default(), Some(&e));
        request_id.clone_into(&mut ev.request_id);
        if let super::Front::Kmip(name) = front {
            ev.operation = name;
            ev.protocol = "kmip";
        }
        self.audit.append(ev);
    }
}
