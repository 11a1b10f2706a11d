//! Reading the audit log for auditors (raw records, in-region only) and for
//! aggregate readers (counts only, any region the policy names).

use super::{Broker, CallCtx};
use crate::audit::{self, complete_lines, AggregateRow, ExportFormat, Record};
use crate::error::{Error, Fault, Invalid, Precondition, Result, Unavailable};
use crate::policy::Operation;
use crate::root::{Quote, NONCE_BYTES};
use std::io::BufReader;

fn read_err(e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "the audit log cannot be read");
    Unavailable::AuditRead.into()
}

impl Broker {
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
        let op = Operation::ExportAuditRecords;
        self.audited(cx, op, None, |note| {
            self.gate(cx, op, None, note)?;
            let mut n = 0;
            let log: Box<dyn std::io::Read> = match &self.audit_table {
                // This broker's chain in the region's database.
                Some(t) => Box::new(audit::table::ChainReader::new(
                    std::sync::Arc::clone(&t.0),
                    &self.settings.broker_id,
                    from_seq.saturating_sub(1),
                )),
                None => {
                    // Closed segments that end before `from_seq` are not read.
                    let path = &self.settings.audit_path;
                    let first = audit::segments::closed(path)
                        .map_err(read_err)?
                        .iter()
                        .rev()
                        .find(|(s, _)| *s <= from_seq)
                        .map_or(0, |(s, _)| *s);
                    Box::new(
                        audit::segments::Chain::from(
                            path,
                            audit::segments::Position {
                                file_first_seq: first,
                                offset: 0,
                            },
                        )
                        .map_err(read_err)?,
                    )
                }
            };
            for line in complete_lines(BufReader::new(log)) {
                let line = line.map_err(read_err)?;
                let r: Record = serde_json::from_str(&line).map_err(Fault::AuditRecord)?;
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
        let op = Operation::ReadAuditAggregates;
        self.audited(cx, op, None, |note| {
            self.gate(cx, op, None, note)?;
            // Whole past UTC days only: windows cut at arbitrary
            // milliseconds, or a day still being written, let a reader
            // difference two answers down to a single (suppressed) record.
            const DAY_MS: u64 = 86_400_000;
            let today = u64::try_from(self.clock.now_unix()).unwrap_or(0) * 1000 / DAY_MS * DAY_MS;
            let to = if to_ms == 0 { today } else { to_ms };
            if from_ms % DAY_MS != 0 || to % DAY_MS != 0 || to > today || from_ms > to {
                return Err(Invalid::AggregateWindow.into());
            }
            let min = self.settings.aggregate_min_group;
            let mut cache = self.aggregates.lock().unwrap_or_else(|p| p.into_inner());
            let agg = &mut *cache;
            match &self.audit_table {
                // Every broker's chain: the region's counts.
                Some(t) => {
                    for broker in t.0.brokers().map_err(read_err)? {
                        let after = agg.chains.get(&broker).copied().unwrap_or(0);
                        let mut log = audit::table::ChainReader::new(
                            std::sync::Arc::clone(&t.0),
                            &broker,
                            after,
                        );
                        for line in complete_lines(BufReader::new(&mut log)) {
                            let line = line.map_err(read_err)?;
                            agg.counts
                                .add(serde_json::from_str(&line).map_err(Fault::AuditRecord)?);
                        }
                        agg.chains.insert(broker, log.read_up_to());
                    }
                }
                None => {
                    let mut log = audit::segments::Chain::from(&self.settings.audit_path, agg.at)
                        .map_err(read_err)?;
                    while let Some(line) = log.next_line() {
                        let line = line.map_err(read_err)?;
                        agg.counts
                            .add(serde_json::from_str(&line).map_err(Fault::AuditRecord)?);
                        agg.at = log.position();
                    }
                }
            }
            Ok((agg.counts.rows(from_ms, to, min), min))
        })
    }
}

impl Broker {
    /// A TPM quote for an auditor of this region, with the PCR selection
    /// it covers.
    pub fn attest(&self, cx: &CallCtx, nonce: &[u8]) -> Result<(Quote, String)> {
        let op = Operation::Attest;
        self.audited(cx, op, None, |note| {
            self.gate(cx, op, None, note)?;
            let tpm = self.attestor.as_ref().ok_or(Precondition::NoTpm)?;
            if !NONCE_BYTES.contains(&nonce.len()) {
                return Err(Invalid::NonceLength(nonce.len()).into());
            }
            let q = tpm.quote(nonce).map_err(|e| {
                tracing::warn!(error = %e, "TPM quote failed");
                Error::from(Unavailable::Tpm)
            })?;
            Ok((q, tpm.pcr_selection()))
        })
    }
}
