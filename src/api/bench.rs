//! The benchmark's echo ceiling (`sovkms.bench.v1`): the same listener,
//! TLS, runtime and message limits as a broker, answering each request with
//! its own payload. Its own proto package, started only by
//! `sovkms bench-echo`; `sovkms serve` never registers or reflects it.

use super::{bind, launch, server_builder, RunningServer, ServeError, MAX_MESSAGE_BYTES};
use crate::config::Settings;
use tonic::{Request, Response, Status};

/// Generated types of `sovkms.bench.v1`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("sovkms.bench.v1");
}

/// Echoes its payload; the durable form first makes an audit record of a
/// Decrypt's size durable in `log`.
struct Echo {
    log: std::sync::Arc<dyn crate::audit::AuditSink>,
}

#[tonic::async_trait]
impl proto::echo_service_server::EchoService for Echo {
    async fn echo(
        &self,
        req: Request<proto::EchoMessage>,
    ) -> Result<Response<proto::EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }

    async fn durable_echo(
        &self,
        req: Request<proto::EchoMessage>,
    ) -> Result<Response<proto::EchoMessage>, Status> {
        use crate::audit::{Event, Kind};
        let caller = req
            .extensions()
            .get::<super::tls::PeerInfo>()
            .and_then(|i| i.caller.clone().ok());
        let mut ev = Event::system(Kind::Request, "decrypt", "");
        ev.caller = caller;
        ev.key_id = "k-0123456789abcdef0123456789abcdef".into();
        ev.key_version = 1;
        ev.context_sha256 = "ab".repeat(32);
        ev.request_id = crate::broker::new_request_id();
        let ticket = self
            .log
            .append_ticket(ev)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        ticket
            .wait_async()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(req.into_inner()))
    }
}

/// Starts the echo ceilings (plain, and durable through `log`) with a
/// broker config's TLS setup.
pub async fn start_echo(
    settings: &Settings,
    log: std::sync::Arc<dyn crate::audit::AuditSink>,
) -> Result<RunningServer, ServeError> {
    let (listener, local_addr, tls) = bind(settings).await?;
    let router = server_builder().add_service(
        proto::echo_service_server::EchoServiceServer::new(Echo { log })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    Ok(launch(
        router,
        listener,
        tls,
        local_addr,
        std::sync::Arc::default(),
    ))
}
