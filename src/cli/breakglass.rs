//! `sovkms break-glass`: emergency grants with quorum approval.

use super::{print_json, CliError, ConnArgs};
use crate::api::proto as pb;
use crate::policy::CryptoOp;

/// Break-glass commands.
#[derive(clap::Subcommand)]
pub enum BreakGlassCmd {
    /// Ask for a time-boxed grant to an in-region service; needs a quorum of other operators.
    Request {
        #[command(flatten)]
        conn: ConnArgs,
        /// The service identity (full SPIFFE id).
        #[arg(long)]
        principal: String,
        /// Key id.
        #[arg(long)]
        key_id: String,
        /// Operations, comma-separated (encrypt, decrypt, ...).
        #[arg(long)]
        ops: String,
        /// Why (audited).
        #[arg(long)]
        reason: String,
        /// Duration once approved.
        #[arg(long, default_value_t = 30)]
        minutes: u32,
    },
    /// Approve a request (not your own).
    Approve(IdArg),
    /// Revoke a pending or active grant.
    Revoke(IdArg),
    /// List grants and their state.
    List(ConnArgs),
}

/// A connection and a grant id.
#[derive(clap::Args)]
pub struct IdArg {
    #[command(flatten)]
    conn: ConnArgs,
    /// Grant id (bg-...).
    id: String,
}

fn show(g: &pb::BreakGlassGrant) {
    outln!(
        "{}  {:<8} {} on {}  approvals {}/{}  {}",
        g.id,
        g.state,
        g.principal,
        g.key_id,
        g.approved_by.len(),
        g.quorum,
        if g.expires_at_unix > 0 {
            format!(
                "expires at {}",
                crate::audit::rfc3339(g.expires_at_unix.max(0) as u64 * 1000)
            )
        } else {
            String::new()
        }
    );
}

fn json(g: &pb::BreakGlassGrant) -> serde_json::Value {
    serde_json::json!({
        "id": g.id, "state": g.state, "principal": g.principal, "key_id": g.key_id, "reason": g.reason,
        "duration_minutes": g.duration_minutes, "requested_by": g.requested_by, "approved_by": g.approved_by,
        "quorum": g.quorum, "expires_at_unix": g.expires_at_unix, "revoked_by": g.revoked_by,
    })
}

pub async fn run(c: BreakGlassCmd) -> Result<(), CliError> {
    let g = match c {
        BreakGlassCmd::Request {
            conn,
            principal,
            key_id,
            ops,
            reason,
            minutes,
        } => {
            let operations = ops
                .split(',')
                .map(|o| {
                    CryptoOp::parse(o.trim())
                        .map(|op| super::key::op_pb(op) as i32)
                        .ok_or_else(|| {
                            CliError::new(
                                format!("unknown operation {o:?}"),
                                "use encrypt, decrypt, generate-data-key, re-encrypt",
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            let req = pb::BreakGlassRequest {
                principal,
                key_id,
                operations,
                reason,
                duration_minutes: minutes,
            };
            let g = conn.connect().await?.request_break_glass(req).await?;
            g
        }
        BreakGlassCmd::Approve(a) => {
            let g = a
                .conn
                .connect()
                .await?
                .approve_break_glass(pb::BreakGlassRef { id: a.id.clone() })
                .await?;
            g
        }
        BreakGlassCmd::Revoke(a) => {
            let g = a
                .conn
                .connect()
                .await?
                .revoke_break_glass(pb::BreakGlassRef { id: a.id.clone() })
                .await?;
            g
        }
        BreakGlassCmd::List(conn) => {
            let r = conn
                .connect()
                .await?
                .list_break_glass(pb::ListBreakGlassRequest {})
                .await?;
            if super::json() {
                return print_json(
                    &serde_json::json!({"grants": r.grants.iter().map(json).collect::<Vec<_>>()}),
                );
            }
            for g in &r.grants {
                show(g);
            }
            return Ok(());
        }
    };
    if super::json() {
        return print_json(&json(&g));
    }
    show(&g);
    Ok(())
}
