//! gRPC AuditService: streams records to auditors, aggregates to the readers
//! the broker's policy names.

use super::convert::to_status;
use super::proto as pb;
use super::service::{reply, Api};
use crate::audit::ExportFormat;
use crate::keys::KeyId;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type LineStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecordLine, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for Api {
    type ExportRecordsStream = LineStream;

    async fn export_records(
        &self,
        req: Request<pb::ExportRecordsRequest>,
    ) -> Result<Response<Self::ExportRecordsStream>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::ExportAuditRecords)?;
        let r = req.into_inner();
        let format = match r.format.as_str() {
            "" | "jsonl" => ExportFormat::JsonLines,
            "syslog" => ExportFormat::Syslog,
            other => {
                return Err(Status::invalid_argument(format!(
                    "format {other:?}: use jsonl or syslog"
                )))
            }
        };
        let key = if r.key_id.is_empty() {
            None
        } else {
            Some(
                KeyId::parse(&r.key_id)
                    .map_err(|e| Status::invalid_argument(format!("key_id: {e}")))?,
            )
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let broker = Arc::clone(&self.broker);
        let cx2 = cx.clone();
        tokio::task::spawn_blocking(move || {
            let mut send = |seq, line| {
                tx.blocking_send(Ok(pb::AuditRecordLine { seq, line }))
                    .is_ok()
            };
            let res = broker.export_audit(
                &cx2,
                r.from_seq,
                r.since_unix_ms,
                key.as_ref().map(|k| k.as_str()),
                format,
                &mut send,
            );
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(to_status(e)));
            }
        });
        let stream: LineStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(reply(&cx, stream))
    }

    async fn get_aggregates(
        &self,
        req: Request<pb::AggregatesRequest>,
    ) -> Result<Response<pb::AggregatesResponse>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::ReadAuditAggregates)?;
        let r = req.into_inner();
        let (cx, (rows, min)) = self
            .run(cx, move |b, cx| {
                b.audit_aggregates(cx, r.from_unix_ms, r.to_unix_ms)
            })
            .await?;
        Ok(reply(
            &cx,
            pb::AggregatesResponse {
                cells: rows
                    .into_iter()
                    .map(|c| pb::AggregateCell {
                        day: c.day,
                        key_id: c.key_id,
                        operation: c.operation,
                        outcome: c.outcome,
                        count: c.count,
                    })
                    .collect(),
                min_group_size: min,
            },
        ))
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::Attest)?;
        let nonce = req.into_inner().nonce;
        let (cx, (q, spec)) = self.run(cx, move |b, cx| b.attest(cx, &nonce)).await?;
        Ok(reply(
            &cx,
            pb::AttestResponse {
                quote_message: q.message,
                quote_signature: q.signature,
                pcr_values: q.pcr_values.concat(),
                pcr_selection: spec,
                ak_public: q.ak_public,
                ak_public_pem: crate::root::p256_spki_pem(&q.ak_sec1),
            },
        ))
    }
}
