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

/// Echoes its payload.
struct Echo;

#[tonic::async_trait]
impl proto::echo_service_server::EchoService for Echo {
    async fn echo(
        &self,
        req: Request<proto::EchoMessage>,
    ) -> Result<Response<proto::EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}

/// Starts the echo ceiling with a broker config's TLS setup.
pub async fn start_echo(settings: &Settings) -> Result<RunningServer, ServeError> {
    let (listener, local_addr, tls) = bind(settings).await?;
    let router = server_builder().add_service(
        proto::echo_service_server::EchoServiceServer::new(Echo)
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
