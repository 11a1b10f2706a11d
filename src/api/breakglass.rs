//! gRPC BreakGlassService.

use super::convert;
use super::proto as pb;
use super::service::{reply, Api};
use crate::broker::BreakGlassAsk;
use crate::policy::breakglass::{BreakGlass, State};
use crate::policy::Principal;
use tonic::{Request, Response, Status};

fn to_pb(g: &BreakGlass, state: State) -> pb::BreakGlassGrant {
    pb::BreakGlassGrant {
        id: g.id.clone(),
        principal: g.principal.as_str().to_owned(),
        key_id: g.key_id.to_string(),
        operations: g
            .operations
            .iter()
            .map(|o| convert::op_to_pb(*o) as i32)
            .collect(),
        reason: g.reason.clone(),
        duration_minutes: g.duration_minutes,
        requested_by: g.requested_by.clone(),
        requested_at_unix: g.requested_at,
        approved_by: g.approved_by.clone(),
        quorum: g.quorum,
        state: state.as_str().to_owned(),
        expires_at_unix: g.expires_at().unwrap_or(0),
        revoked_by: g.revoked_by.clone().unwrap_or_default(),
    }
}

fn bg_id(s: &str) -> Result<String, Status> {
    if s.starts_with("bg-")
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        Ok(s.to_owned())
    } else {
        Err(Status::invalid_argument(format!(
            "{s:?} is not a break-glass grant id (bg-...)"
        )))
    }
}

#[tonic::async_trait]
impl pb::break_glass_service_server::BreakGlassService for Api {
    async fn request(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassGrant>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::RequestBreakGlass)?;
        let r = req.into_inner();
        let ask = BreakGlassAsk {
            principal: Principal::parse(&r.principal)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            key_id: convert::key_id("key_id", &r.key_id)?,
            operations: r
                .operations
                .into_iter()
                .map(convert::op_from_pb)
                .collect::<Result<_, _>>()?,
            reason: r.reason,
            duration_minutes: r.duration_minutes,
        };
        let (cx, g) = self
            .run(cx, move |b, cx| b.request_break_glass(cx, ask))
            .await?;
        Ok(reply(&cx, to_pb(&g, State::Pending)))
    }

    async fn approve(
        &self,
        req: Request<pb::BreakGlassRef>,
    ) -> Result<Response<pb::BreakGlassGrant>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::ApproveBreakGlass)?;
        let id = bg_id(&req.get_ref().id)?;
        let (cx, g) = self
            .run(cx, move |b, cx| b.approve_break_glass(cx, &id))
            .await?;
        let state = if g.activated_at.is_some() {
            State::Active
        } else {
            State::Pending
        };
        Ok(reply(&cx, to_pb(&g, state)))
    }

    async fn revoke(
        &self,
        req: Request<pb::BreakGlassRef>,
    ) -> Result<Response<pb::BreakGlassGrant>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::RevokeBreakGlass)?;
        let id = bg_id(&req.get_ref().id)?;
        let (cx, g) = self
            .run(cx, move |b, cx| b.revoke_break_glass(cx, &id))
            .await?;
        Ok(reply(&cx, to_pb(&g, State::Revoked)))
    }

    async fn list(
        &self,
        req: Request<pb::ListBreakGlassRequest>,
    ) -> Result<Response<pb::ListBreakGlassResponse>, Status> {
        let cx = self.ctx(&req, crate::policy::Operation::ListBreakGlass)?;
        let (cx, all) = self.run(cx, move |b, cx| b.list_break_glass(cx)).await?;
        Ok(reply(
            &cx,
            pb::ListBreakGlassResponse {
                grants: all.iter().map(|(g, s)| to_pb(g, *s)).collect(),
            },
        ))
    }
}
