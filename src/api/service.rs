//! gRPC handlers: authenticate the connection's caller, convert the
//! request, run the core off the async runtime, convert the answer.

use super::convert::{self, to_status};
use super::proto as pb;
use super::tls::PeerInfo;
use crate::broker::{Broker, LocateFilter};
use crate::error::Error;
use crate::keys::KeyRecord;
use crate::region::{Caller, Refusal};
use crate::secret::Plaintext;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Handler state shared by the three services.
pub struct Api {
    broker: Arc<Broker>,
}

impl Api {
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    /// Runs a blocking core call on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Broker) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Status> {
        let b = Arc::clone(&self.broker);
        tokio::task::spawn_blocking(move || f(&b))
            .await
            .map_err(|e| to_status(Error::Internal(format!("handler task failed: {e}"))))?
            .map_err(to_status)
    }

    async fn key_call(
        &self,
        caller: Caller,
        f: impl FnOnce(&Broker, &Caller) -> Result<KeyRecord, Error> + Send + 'static,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let rec = self.run(move |b| f(b, &caller)).await?;
        Ok(Response::new(convert::metadata(&rec)))
    }
}

/// The authenticated caller of a request, or PERMISSION_DENIED.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let info = req.extensions().get::<PeerInfo>().ok_or_else(|| {
        to_status(Refusal::NoIdentity("connection is not mutual TLS".into()).into())
    })?;
    info.caller
        .clone()
        .map_err(|why| to_status(Refusal::NoIdentity(why).into()))
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for Api {
    async fn create(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let create = crate::broker::CreateKey {
            name: r.name,
            tenant: r.tenant,
            description: r.description,
            grants: convert::grants(r.grants)?,
            activate: r.activate,
        };
        self.key_call(c, move |b, c| b.create_key(c, create)).await
    }

    async fn activate(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(c, move |b, c| b.activate(c, &id)).await
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let reason = convert::reason_from_pb(r.reason)?;
        self.key_call(c, move |b, c| b.revoke(c, &id, reason, r.message))
            .await
    }

    async fn destroy(
        &self,
        req: Request<pb::DestroyRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let days = (r.pending_window_days != 0).then_some(r.pending_window_days);
        self.key_call(c, move |b, c| b.schedule_destroy(c, &id, days))
            .await
    }

    async fn cancel_destroy(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(c, move |b, c| b.cancel_destroy(c, &id)).await
    }

    async fn re_key(&self, req: Request<pb::KeyRef>) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(c, move |b, c| b.rekey(c, &id)).await
    }

    async fn get_attributes(
        &self,
        req: Request<pb::KeyRef>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let id = convert::key_id("key_id", &req.get_ref().key_id)?;
        self.key_call(c, move |b, c| b.get_attributes(c, &id)).await
    }

    async fn locate(
        &self,
        req: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let c = caller(&req)?;
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
        let (keys, next) = self
            .run(move |b| b.locate(&c, &filter, size, token.as_ref()))
            .await?;
        Ok(Response::new(pb::LocateResponse {
            keys: keys.iter().map(convert::metadata).collect(),
            next_page_token: next.map(|k| k.to_string()).unwrap_or_default(),
        }))
    }

    async fn set_grants(
        &self,
        req: Request<pb::SetGrantsRequest>,
    ) -> Result<Response<pb::KeyMetadata>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let grants = convert::grants(r.grants)?;
        self.key_call(c, move |b, c| b.set_grants(c, &id, grants))
            .await
    }
}

#[tonic::async_trait]
impl pb::crypto_service_server::CryptoService for Api {
    async fn encrypt(
        &self,
        req: Request<pb::EncryptRequest>,
    ) -> Result<Response<pb::EncryptResponse>, Status> {
        let c = caller(&req)?;
        let mut r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", std::mem::take(&mut r.context))?;
        let pt = Plaintext::new(std::mem::take(&mut r.plaintext));
        let s = self.run(move |b| b.encrypt(&c, &id, pt, &ctx)).await?;
        Ok(Response::new(pb::EncryptResponse {
            ciphertext: s.ciphertext,
            key_id: s.key_id.to_string(),
            key_version: s.key_version,
        }))
    }

    async fn decrypt(
        &self,
        req: Request<pb::DecryptRequest>,
    ) -> Result<Response<pb::DecryptResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let ctx = convert::context("context", r.context)?;
        let ct = r.ciphertext;
        let o = self.run(move |b| b.decrypt(&c, &ct, &ctx)).await?;
        Ok(Response::new(pb::DecryptResponse {
            key_id: o.key_id.to_string(),
            key_version: o.key_version,
            plaintext: o.plaintext.into_exposed(),
        }))
    }

    async fn generate_data_key(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", r.context)?;
        let d = self
            .run(move |b| b.generate_data_key(&c, &id, &ctx, true))
            .await?;
        let plaintext_key = match &d.plaintext {
            Some(k) => k.expose_secret().to_vec(),
            None => {
                return Err(to_status(Error::Internal(
                    "data key without plaintext".into(),
                )))
            }
        };
        Ok(Response::new(pb::GenerateDataKeyResponse {
            plaintext_key,
            wrapped_key: d.wrapped,
            key_id: d.key_id.to_string(),
            key_version: d.key_version,
        }))
    }

    async fn generate_data_key_without_plaintext(
        &self,
        req: Request<pb::GenerateDataKeyRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let c = caller(&req)?;
        let r = req.into_inner();
        let id = convert::key_id("key_id", &r.key_id)?;
        let ctx = convert::context("context", r.context)?;
        let d = self
            .run(move |b| b.generate_data_key(&c, &id, &ctx, false))
            .await?;
        Ok(Response::new(pb::GenerateDataKeyWithoutPlaintextResponse {
            wrapped_key: d.wrapped,
            key_id: d.key_id.to_string(),
            key_version: d.key_version,
        }))
    }

    async fn re_encrypt(
        &self,
        req: Request<pb::ReEncryptRequest>,
    ) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let c = caller(&req)?;
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
        let o = self
            .run(move |b| b.re_encrypt(&c, &ct, &src_ctx, dst.as_ref(), &dst_ctx))
            .await?;
        Ok(Response::new(pb::ReEncryptResponse {
            ciphertext: o.ciphertext,
            source_key_id: o.source.0.to_string(),
            source_key_version: o.source.1,
            key_id: o.destination.0.to_string(),
            key_version: o.destination.1,
        }))
    }
}

#[tonic::async_trait]
impl pb::broker_service_server::BrokerService for Api {
    async fn get_info(
        &self,
        req: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::BrokerInfo>, Status> {
        let c = caller(&req)?;
        let s = self.broker.status();
        Ok(Response::new(pb::BrokerInfo {
            region: s.region.to_string(),
            broker_id: s.broker_id,
            root_kind: s.root.kind.to_owned(),
            root_description: s.root.description,
            development_only: s.root.development_only,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cache_hits: s.cache.hits,
            cache_misses: s.cache.misses,
            root_calls: s.root_calls,
            caller: c.spiffe_id(),
        }))
    }
}
