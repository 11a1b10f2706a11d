//! The benchmark's echo service: decode, answer the same bytes.

use super::proto as pb;
use tonic::{Request, Response, Status};

/// Echoes its payload.
pub struct Echo;

#[tonic::async_trait]
impl pb::bench_echo_service_server::BenchEchoService for Echo {
    async fn echo(
        &self,
        req: Request<pb::EchoMessage>,
    ) -> Result<Response<pb::EchoMessage>, Status> {
        Ok(Response::new(req.into_inner()))
    }
}
