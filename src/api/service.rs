//! gRPC handlers: authenticate the connection's caller, convert the
//! request, run the core off the async runtime, convert the answer.

use super::convert::{self, to_status};
use super::proto as pb;
use super::tls::PeerInfo;
use crate::broker::{Broker, CallCtx, LocateFilter};
use crate::error::{Error, Fault};
use crate::keys::{Halt, KeyRecord, Wait};
use crate::policy::{Operation, Refusal};
use crate::region::IdentityError;
use crate::secret::Plaintext;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Handler state shared by the services.
pub struct Api {
    pub(super) broker: Arc<Broker>,
}

pub(super) const REQUEST_ID: &str = "x-request-id";

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

use crate::broker::new_request_id;

/// The client's own request id (not one made up here): it makes a retried
/// CreateKey or ReKey idempotent.
fn client_request_id<T>(req: &Request<T>, cx: &CallCtx) -> Option<String> {
    req.metadata()
        .get(REQUEST_ID)
        .is_some_and(|v| v.to_str().is_ok_and(|v| v == cx.request_id))
        .then(|| cx.request_id.clone())
}

/// The response header. Marked sensitive only so that HPACK sends it as a
/// literal: a value unique per response would just churn both ends'
/// dynamic tables (it is not secret).
fn request_id_value(id: &str) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let mut v: tonic::metadata::MetadataValue<_> = id.parse().ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// A status carrying the request id.
pub(super) fn tagged(cx: &CallCtx, e: Error) -> Status {
    let mut st = to_status(e);
    if let Some(v) = request_id_value(&cx.request_id) {
        st.metadata_mut().insert(REQUEST_ID, v);
    }
    st
}

/// A response carrying the request id.
pub(super) fn reply<T>(cx: &CallCtx, m: T) -> Response<T> {
    let mut r = Response::new(m);
    if let Some(v) = request_id_value(&cx.request_id) {
        r.metadata_mut().insert(REQUEST_ID, v);
    }
    r
}

impl Api {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    /// Runs a blocking core call on the blocking pool; tags an error with
    /// the request id.
    pub(super) async fn run<T: Send + 'static>(
        &self,
        cx: CallCtx,
        f: impl FnOnce(&Broker, &CallCtx) -> Result<T, Error> + Send + 'static,
    ) -> Result<(CallCtx, T), Status> {
        let b = Arc::clone(&self.broker);
        let id = request_id_value(&cx.request_id);
        let joined = tokio::task::spawn_blocking(move || f(&b, &cx).map(|t| (cx, t))).await;
        joined
            .map_err(|e| Error::from(Fault::Task(e.to_string())))
            .and_then(|r| r)
            .map_err(|e| {
                let mut st = to_status(e);
                if let Some(v) = id {
                    st.metadata_mut().insert(REQUEST_ID, v);
                }
                st
            })
    }

    /// Runs a core call on this async thread when it need not wait (hot
    /// key, nothing to read), else again on the blocking pool.
    pub(super) async fn run_fast<T: Send + 'static>(
        &self,
        cx: CallCtx,
        f: impl Fn(&Broker, &CallCtx, Wait) -> Result<T, Halt<Error>> + Send + Sync + 'static,
    ) -> Result<(CallCtx, T), Status> {
        match f(&self.broker, &cx, Wait::Refused) {
            Err(Halt::WouldBlock) => {
                self.run(cx, move |b, cx| match f(b, cx, Wait::Allowed) {
                    Ok(t) => Ok(t),
                    Err(Halt::Failed(e)) => Err(e),
                    Err(Halt::WouldBlock) => {
                        Err(Fault::Task("a blocking call was refused a wait".into()).into())
                    }
                })
                .await
            }
            Ok(t) => Ok((cx, t)),
            Err(Halt::Failed(e)) => Err(tagged(&cx, e)),
        }
    }

    async fn key_call(
        &self,
        cx: CallCtx,
        f: impl FnOnce(&Broker, &CallCtx) -> Result<KeyRecord, Error> + Send + 'static,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let (cx, rec) = self.run(cx, f).await?;
        Ok(reply(&cx, convert::metadata(&rec)))
    }

    /// The call context of a request: its authenticated caller and request
    /// id (the client's `x-request-id` if well-formed). A connection without
    /// an identity is refused, and the refusal audited.
    pub(super) fn ctx<T>(&self, req: &Request<T>, op: Operation) -> Result<CallCtx, Status> {
        let request_id = req
            .metadata()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=64).contains(&v.len())
                    && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
            .map(str::to_owned)
            .unwrap_or_else(new_request_id);
        let caller = match req.extensions().get::<PeerInfo>() {
            None => Err(IdentityError::NotMutualTls),
            // Identity is fixed per connection; its certificate's end is
            // checked per request, so a long-lived connection cannot outlive it.
            Some(info) if info.caller.is_ok() && now_unix() > info.not_after => {
                Err(IdentityError::Expired {
                    at: crate::audit::rfc3339(u64::try_from(info.not_after).unwrap_or(0) * 1000),
                })
            }
            Some(info) => info.caller.clone(),
        };
        match caller {
            Ok(caller) => Ok(CallCtx {
                caller,
                request_id,
                front: crate::broker::Front::Grpc,
            }),
            Err(why) => {
                let refusal = Refusal::NoIdentity(why);
                self.broker.audit_unauthenticated(
                    &request_id,
                    op,
                    &refusal,
                    crate::broker::Front::Grpc,
                );
                Err(to_status(refusal.into()))
            }
        }
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for Api {
    async fn create(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::CreateKey)?;
        let request_id = client_request_id(&req, &cx);
        let r = req.into_inner();
        let create = crate::broker::CreateKey {
            request_id,
            name: r.name,
            tenant: r.tenant,
            description: r.description,
            grants: convert::grants(r.grants)?,
            activate: r.activate,
        };
        self.key_call(cx, move |b, cx| b.create_key(cx, create))
            .await
    }

    async fn activate(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::ActivateKey)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(cx, move |b, cx| b.activate(cx, &id)).await
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::RevokeKey)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let reason = convert::reason_from_pb(r.reason)?;
        self.key_call(cx, move |b, cx| b.revoke(cx, &id, reason, r.message))
            .await
    }

    async fn destroy(
        &self,
        req: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::ScheduleKeyDestruction)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let days = (r.pending_window_days != 0).then_some(r.pending_window_days);
        self.key_call(cx, move |b, cx| b.schedule_destroy(cx, &id, days))
            .await
    }

    async fn cancel_destroy(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::CancelKeyDestruction)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(cx, move |b, cx| b.cancel_destroy(cx, &id))
            .await
    }

    async fn re_key(&self, req: Request<pb::KeyRef>) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::Rekey)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        let request_id = client_request_id(&req, &cx);
        self.key_call(cx, move |b, cx| b.rekey(cx, &id, request_id.as_deref()))
            .await
    }

    async fn get_attributes(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::GetAttributes)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(cx, move |b, cx| b.get_attributes(cx, &id))
            .await
    }

    async fn locate(
        &self,
        req: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let cx = self.ctx(&req, Operation::Locate)?;
        let r = req.into_inner();
        let filter = LocateFilter {
            name: (!r.name.is_empty()).then_some(r.name),
            state: convert::state_from_pb(r.state)?,
            tenant: (!r.tenant.is_empty()).then_some(r.tenant),
        };
        let token = if r.page_token.is_empty() {
            None
        } else {
            Some(convert::key_id("page_token", &r.page_token)?)
        };
        let size = r.page_size as usize;
        let (cx, (keys, next)) = self
            .run(cx, move |b, cx| b.locate(cx, &filter, size, token.as_ref()))
            .await?;
        Ok(reply(
            &cx,
            pb::LocateResponse {
                keys: keys.iter().map(convert::metadata).collect(),
                next_page_token: next.map(|k| k.to_string()).unwrap_or_default(),
            },
        ))
    }

    async fn set_grants(
        &self,
        req: Request<pb::SetGrantsRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let cx = self.ctx(&req, Operation::SetGrants)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let grants = convert::grants(r.grants)?;
        self.key_call(cx, move |b, cx| b.set_grants(cx, &id, grants))
            .await
    }
}

#[tonic::async_trait]
impl pb::crypto_service_server::CryptoService for Api {
    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let cx = self.ctx(&req, Operation::Encrypt)?;
        let mut r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", std::mem::take(&mut r.context))?;
        let pt = Plaintext::new(std::mem::take(&mut r.plaintext));
        let (cx, s) = self
            .run_fast(cx, move |b, cx, w| b.encrypt_with(w, cx, &id, &pt, &ctx))
            .await?;
        Ok(reply(
            &cx,
            pb::EncryptResponse {
                ciphertext: s.ciphertext,
                key_id: s.key_id.to_string(),
                key_version: s.key_version,
            },
        ))
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let cx = self.ctx(&req, Operation::Decrypt)?;
        let r = req.into_inner();
        let ctx = convert::context("context", r.context)?;
        let ct = r.ciphertext;
        let (cx, o) = self
            .run_fast(cx, move |b, cx, w| b.decrypt_with(w, cx, &ct, &ctx))
            .await?;
        let o = o.released().await.map_err(|e| tagged(&cx, e))?;
        Ok(reply(
            &cx,
            pb::DecryptResponse {
                key_id: o.key_id.to_string(),
                key_version: o.key_version,
                plaintext: o.plaintext.into_exposed(),
            },
        ))
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let cx = self.ctx(&req, Operation::GenerateDataKey)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", r.context)?;
        let (cx, d) = self
            .run_fast(cx, move |b, cx, w| {
                b.generate_data_key_with(w, cx, &id, &ctx, true)
            })
            .await?;
        let d = d.released().await.map_err(|e| tagged(&cx, e))?;
        let plaintext_key = match &d.plaintext {
            Some(k) => k.expose_secret().to_vec(),
            None => {
                return Err(tagged(
                    &cx,
                    Fault::Task("data key without plaintext".into()).into(),
                ))
            }
        };
        Ok(reply(
            &cx,
            pb::GenerateDataKeyResponse {
                plaintext_key,
                wrapped_key: d.wrapped,
                key_id: d.key_id.to_string(),
                key_version: d.key_version,
            },
        ))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let cx = self.ctx(&req, Operation::GenerateDataKeyWithoutPlaintext)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", r.context)?;
        let (cx, d) = self
            .run_fast(cx, move |b, cx, w| {
                b.generate_data_key_with(w, cx, &id, &ctx, false)
            })
            .await?;
        let d = d.released().await.map_err(|e| tagged(&cx, e))?;
        Ok(reply(
            &cx,
            pb::GenerateDataKeyWithoutPlaintextResponse {
                wrapped_key: d.wrapped,
                key_id: d.key_id.to_string(),
                key_version: d.key_version,
            },
        ))
    }

    async fn re_encrypt(
        &self,
        req: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let cx = self.ctx(&req, Operation::ReEncrypt)?;
        let r = req.into_inner();
        let src_ctx = convert::context("source_context", r.source_context)?;
        let dst_ctx = convert::context("destination_context", r.destination_context)?;
        let dst = if r.destination_key_id.is_empty() {
            None
        } else {
            Some(convert::key_id(
                "destination_key_id",
                &r.destination_key_id,
            )?)
        };
        let ct = r.ciphertext;
        let (cx, o) = self
            .run_fast(cx, move |b, cx, w| {
                b.re_encrypt_with(w, cx, &ct, &src_ctx, dst.as_ref(), &dst_ctx)
            })
            .await?;
        let o = o.released().await.map_err(|e| tagged(&cx, e))?;
        Ok(reply(
            &cx,
            pb::ReEncryptResponse {
                ciphertext: o.ciphertext,
                source_key_id: o.source.0.to_string(),
                source_key_version: o.source.1,
                key_id: o.destination.0.to_string(),
                key_version: o.destination.1,
            },
        ))
    }
}

#[tonic::async_trait]
impl pb::broker_service_server::BrokerService for Api {
    async fn get_info(
        &self,
        req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::BrokerInfo>, Status> {
        let cx = self.ctx(&req, Operation::GetInfo)?;
        let key_exchange = req
            .extensions()
            .get::<PeerInfo>()
            .map_or("unknown", |p| p.key_exchange);
        let (cx, (s, pk)) = self.run(cx, |b, cx| b.info(cx)).await?;
        Ok(reply(
            &cx,
            pb::BrokerInfo {
                region: s.region.to_string(),
                broker_id: s.broker_id,
                root_kind: s.root.kind.to_owned(),
                root_description: s.root.description,
                development_only: s.root.development_only,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                cache_hits: s.cache.hits,
                cache_misses: s.cache.misses,
                root_calls: s.root_calls,
                caller: cx.caller.spiffe_id(),
                signing_public_key_pem: pk,
                tls_key_exchange: key_exchange.to_owned(),
            },
        ))
    }
}
