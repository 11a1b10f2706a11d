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
    ticket: Option<Ticket>,
}

impl<T> AfterAudit<T> {
    /// Waits (asynchronously) for the audit record, then releases the value.
    /// If the record could not be written the value is dropped (zeroized).
    pub async fn released(self) -> Result<T> {
        if let Some(t) = self.ticket {
            t.wait_async().await.map_err(audit_err)?;
        }
        Ok(self.value)
    }

    /// Blocking form of [`released`](Self::released), for non-async callers.
    pub fn released_blocking(self) -> Result<T> {
        if let Some(t) = self.ticket {
            t.wait().map_err(audit_err)?;
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
        let mut note = Note::default();
        let value = match f(&mut note) {
            Ok(v) => v,
            Err(Halt::WouldBlock) => return Err(Halt::WouldBlock),
            Err(Halt::Failed(e)) => {
                self.record_failure(
                    self.event(Some(cx), op, context, &note, Some(&e)),
                    &e,
                    Some(cx),
                );
                return Err(Halt::Failed(e));
            }
        };
        let ev = self.event(Some(cx), op, context, &note, None);
        let ticket = if op.rule().releases_plaintext {
            Some(self.audit.append_ticket(ev).map_err(audit_err)?)
        } else {
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
        let mut note = Note::default();
        let p = match prepare(&mut note) {
            Ok(p) => p,
            Err(e) => {
                self.record_failure(self.event(cx, op, None, &note, Some(&e)), &e, cx);
                return Err(e);
            }
        };
        let seq = self
            .audit
            .append_durable(self.event(cx, op, None, &note, None))
            .map_err(audit_err)?;
        commit(p, seq).inspect_err(|e| {
            let mut ev = self.event(cx, op, None, &note, Some(e));
            ev.reason = format!(
                "the change recorded at audit sequence {seq} was not committed: {}",
                ev.reason
            );
            self.audit.append(ev);
        })
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
