//! Reading the audit log for auditors (raw records, in-region only) and for
//! aggregate readers (counts only, any region the policy names).

use super::{Broker, CallCtx};
use crate::audit::{self, complete_lines, AggregateRow, ExportFormat, Record};
use crate::error::{Error, Result};
use crate::policy;
use crate::region::Refusal;
use std::io::BufReader;

impl Broker {
    fn open_log(&self) -> Result<BufReader<std::fs::File>> {
        std::fs::File::open(&self.settings.audit_path)
            .map(BufReader::new)
            .map_err(|e| Error::Unavailable(format!("the audit log cannot be read: {e}")))
    }

    /// Records for an auditor of this region, filtered, in `format`;
    /// `sink` receives each (seq, line) and returns false to stop early.
    pub fn export_audit(
        &self,
        cx: &CallCtx,
        from_seq: u64,
        since_ms: u64,
        key_id: Option<&str>,
        format: ExportFormat,
        sink: &mut dyn FnMut(u64, String) -> bool,
    ) -> Result<u64> {
        self.audited(cx, "export-audit-records", None, false, |_| {
            self.admit(&cx.caller)?;
            policy::require_auditor(&cx.caller, &self.settings.region, "read audit records")?;
            let mut n = 0;
            for line in complete_lines(self.open_log()?) {
                let line =
                    line.map_err(|e| Error::Unavailable(format!("reading the audit log: {e}")))?;
                let r: Record = serde_json::from_str(&line).map_err(|e| {
                    Error::Internal(format!("audit log record does not parse: {e}"))
                })?;
                if r.seq < from_seq
                    || r.time_unix_ms < since_ms
                    || key_id.is_some_and(|k| r.key_id != k)
                {
                    continue;
                }
                let out = match format {
                    ExportFormat::JsonLines => line,
                    ExportFormat::Syslog => audit::verify_syslog_line(&r),
                };
                n += 1;
                if !sink(r.seq, out) {
                    break;
                }
            }
            Ok(n)
        })
    }

    /// Aggregates for auditors of the region and for the principals the
    /// config names (any region): counts only, small cells suppressed.
    pub fn audit_aggregates(
        &self,
        cx: &CallCtx,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<(Vec<AggregateRow>, u64)> {
        self.audited(cx, "read-audit-aggregates", None, false, |_| {
            self.admit(&cx.caller)?;
            let named = self
                .settings
                .aggregate_readers
                .iter()
                .any(|p| p.matches(&cx.caller));
            if !named {
                policy::require_auditor(&cx.caller, &self.settings.region, "read audit aggregates")
                    .map_err(|_| Refusal::NoGrant {
                        caller: cx.caller.spiffe_id(),
                        op: "read audit aggregates of",
                        key_id: format!("region {}", self.settings.region),
                    })?;
            }
            let to = if to_ms == 0 { u64::MAX } else { to_ms };
            let min = self.settings.aggregate_min_group;
            let rows =
                audit::aggregate(self.open_log()?, from_ms, to, min).map_err(Error::Internal)?;
            Ok((rows, min))
        })
    }
}

impl Broker {
    /// A TPM quote for an auditor of this region. One at a time per broker
    /// (a TPM without a resource manager takes one client).
    pub fn attest(&self, cx: &CallCtx, nonce: &[u8]) -> Result<(crate::root::tpm::Quote, String)> {
        self.audited(cx, "attest", None, false, |_| {
            self.admit(&cx.caller)?;
            policy::require_auditor(&cx.caller, &self.settings.region, "request a TPM quote")?;
            let tpm = self.settings.tpm.as_ref().ok_or_else(|| {
                Error::FailedPrecondition(
                    "this broker has no TPM configured ([tpm] in its config)".into(),
                )
            })?;
            if !crate::root::tpm::NONCE_BYTES.contains(&nonce.len()) {
                return Err(Error::invalid("nonce must be 8 to 64 bytes"));
            }
            let _one = self.tpm_lock.lock().unwrap_or_else(|p| p.into_inner());
            let (q, _) = crate::root::tpm::quote(tpm, nonce).map_err(|e| {
                tracing::warn!(error = %e, "TPM quote failed");
                Error::Unavailable(format!("the TPM could not quote: {}", e.message))
            })?;
            Ok((q, tpm.policy.spec()))
        })
    }
}
