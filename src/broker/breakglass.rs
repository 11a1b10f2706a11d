//! Break-glass operations: request, approve (a quorum of other operators),
//! revoke, list. Every step is audited before it takes effect. A grant only
//! ever names one in-region service, so it cannot cross the region rule or
//! hand plaintext to an operator.

use super::{store_err, Broker, CallCtx, Note};
use crate::error::{NotFound, Precondition, Result};
use crate::keys::KeyId;
use crate::policy::breakglass::{BreakGlass, BreakGlassInvalid, State};
use crate::policy::{CryptoOp, Operation, Principal, Refusal};
use crate::region::Role;

/// A break-glass request as asked.
#[derive(Clone, Debug)]
pub struct BreakGlassAsk {
    /// Service identity to grant to.
    pub principal: Principal,
    /// Key.
    pub key_id: KeyId,
    /// Operations.
    pub operations: Vec<CryptoOp>,
    /// Why.
    pub reason: String,
    /// Minutes, at most the configured maximum.
    pub duration_minutes: u32,
}

impl Broker {
    /// Loads stored break-glass grants (at start).
    pub fn load_break_glass(&self) -> Result<()> {
        let all = self.store.list_break_glass().map_err(store_err)?;
        *self.break_glass.write().unwrap_or_else(|p| p.into_inner()) = all;
        Ok(())
    }

    fn find_break_glass(&self, id: &str) -> Result<BreakGlass> {
        self.break_glass
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|g| g.id == id)
            .cloned()
            .ok_or_else(|| NotFound::BreakGlass(id.to_owned()).into())
    }

    fn save_break_glass(&self, g: BreakGlass) -> Result<BreakGlass> {
        self.store.put_break_glass(&g).map_err(store_err)?;
        let mut all = self.break_glass.write().unwrap_or_else(|p| p.into_inner());
        match all.iter_mut().find(|x| x.id == g.id) {
            Some(x) => *x = g.clone(),
            None => all.push(g.clone()),
        }
        Ok(g)
    }

    /// The break-glass grant that allows this, if any (its id for the audit record).
    pub(super) fn break_glass_allowing(
        &self,
        cx: &CallCtx,
        key: &KeyId,
        op: CryptoOp,
    ) -> Option<String> {
        let now = self.clock.now_unix();
        self.break_glass
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|g| g.allows(&cx.caller, key, op, now))
            .map(|g| g.id.clone())
    }

    /// An operator asks for a break-glass grant. It does nothing until a
    /// quorum of other operators approves it.
    pub fn request_break_glass(&self, cx: &CallCtx, ask: BreakGlassAsk) -> Result<BreakGlass> {
        let caller = &cx.caller;
        let op = Operation::RequestBreakGlass;
        self.audit_first(
            Some(cx),
            op,
            |note: &mut Note| {
                note.key(&ask.key_id, 0);
                self.gate(cx, op, None, note)?;
                let p = &ask.principal;
                if p.region() != &self.settings.region {
                    return Err(BreakGlassInvalid::OtherRegion {
                        principal: p.as_str().to_owned(),
                        region: self.settings.region.clone(),
                    }
                    .into());
                }
                if p.role() != Role::Service || p.is_wildcard() {
                    return Err(BreakGlassInvalid::NotOneService.into());
                }
                if ask.operations.is_empty() {
                    return Err(BreakGlassInvalid::NoOperation.into());
                }
                if ask.operations.contains(&CryptoOp::Manage) {
                    return Err(BreakGlassInvalid::Manage.into());
                }
                let max = self.settings.break_glass_max_minutes;
                if !(1..=max).contains(&ask.duration_minutes) {
                    return Err(BreakGlassInvalid::Duration {
                        minutes: ask.duration_minutes,
                        max,
                    }
                    .into());
                }
                if ask.reason.trim().is_empty()
                    || ask.reason.len() > 1024
                    || ask.reason.chars().any(char::is_control)
                {
                    return Err(BreakGlassInvalid::Reason.into());
                }
                self.load(&ask.key_id)?;
                let mut b = [0u8; 8];
                ring::rand::SecureRandom::fill(&self.rng, &mut b).map_err(|_| super::rng_err())?;
                let now = self.clock.now_unix();
                let mut ops = ask.operations.clone();
                ops.sort();
                ops.dedup();
                let id = format!("bg-{}", hex::encode(b));
                note.via = format!(
                    "break-glass grant {id} asks {} for {} on key {} for {} minutes",
                    ask.principal.as_str(),
                    ops.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "),
                    ask.key_id,
                    ask.duration_minutes
                );
                Ok(BreakGlass {
                    id,
                    principal: ask.principal.clone(),
                    key_id: ask.key_id.clone(),
                    operations: ops,
                    reason: ask.reason.clone(),
                    duration_minutes: ask.duration_minutes,
                    requested_by: caller.spiffe_id(),
                    requested_at: now,
                    approved_by: Vec::new(),
                    quorum: self.settings.break_glass_quorum,
                    activated_at: None,
                    approval_deadline: now
                        + i64::from(self.settings.break_glass_approval_minutes) * 60,
                    revoked_by: None,
                    mac: String::new(),
                })
            },
            |g, _| self.save_break_glass(g),
        )
    }

    /// Another operator approves; the quorum-th approval activates it.
    pub fn approve_break_glass(&self, cx: &CallCtx, id: &str) -> Result<BreakGlass> {
        let caller = &cx.caller;
        let _g = self.lock_lifecycle()?;
        // Another broker may have changed it: read the stored grants.
        self.load_break_glass()?;
        let op = Operation::ApproveBreakGlass;
        self.audit_first(
            Some(cx),
            op,
            |note: &mut Note| {
                self.gate(cx, op, None, note)?;
                let mut g = self.find_break_glass(id)?;
                note.key(&g.key_id, 0);
                let now = self.clock.now_unix();
                let state = g.state(now);
                if state != State::Pending {
                    return Err(Precondition::BreakGlassState {
                        id: id.to_owned(),
                        state: state.as_str(),
                    }
                    .into());
                }
                let me = caller.spiffe_id();
                if me == g.requested_by {
                    return Err(Refusal::SelfApproval { grant: id.to_owned() }.into());
                }
                if g.approved_by.contains(&me) {
                    return Err(Precondition::AlreadyApproved {
                        principal: me,
                        id: id.to_owned(),
                    }
                    .into());
                }
                g.approved_by.push(me);
                if g.approved_by.len() as u32 >= g.quorum {
                    g.activated_at = Some(now);
                }
                note.via = format!(
                    "approval {} of {} for break-glass grant {id} ({} may {} on key {} for {} minutes){}",
                    g.approved_by.len(),
                    g.quorum,
                    g.principal.as_str(),
                    g.operations.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "),
                    g.key_id,
                    g.duration_minutes,
                    if g.activated_at.is_some() { "; the grant is now active" } else { "" }
                );
                Ok(g)
            },
            |g, _| {
                if g.activated_at.is_some() {
                    tracing::warn!(grant = %g.id, principal = g.principal.as_str(), key = %g.key_id, "BREAK-GLASS grant active");
                }
                self.save_break_glass(g)
            },
        )
    }

    /// Withdraws a pending or active grant.
    pub fn revoke_break_glass(&self, cx: &CallCtx, id: &str) -> Result<BreakGlass> {
        let caller = &cx.caller;
        let _g = self.lock_lifecycle()?;
        // Another broker may have changed it: read the stored grants.
        self.load_break_glass()?;
        let op = Operation::RevokeBreakGlass;
        self.audit_first(
            Some(cx),
            op,
            |note: &mut Note| {
                self.gate(cx, op, None, note)?;
                let mut g = self.find_break_glass(id)?;
                note.key(&g.key_id, 0);
                let state = g.state(self.clock.now_unix());
                if !matches!(state, State::Pending | State::Active) {
                    return Err(Precondition::BreakGlassState {
                        id: id.to_owned(),
                        state: state.as_str(),
                    }
                    .into());
                }
                g.revoked_by = Some(caller.spiffe_id());
                Ok(g)
            },
            |g, _| self.save_break_glass(g),
        )
    }

    /// All grants with their current state (operators and auditors of the region).
    pub fn list_break_glass(&self, cx: &CallCtx) -> Result<Vec<(BreakGlass, State)>> {
        let op = Operation::ListBreakGlass;
        self.audited(cx, op, None, |note| {
            self.gate(cx, op, None, note)?;
            let now = self.clock.now_unix();
            Ok(self
                .break_glass
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|g| (g.clone(), g.state(now)))
                .collect())
        })
    }
}
