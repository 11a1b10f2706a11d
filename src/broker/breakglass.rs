//! Break-glass operations: request, approve (a quorum of other operators),
//! revoke, list. Every step is audited before it takes effect. A grant only
//! ever names one in-region service, so it cannot cross the region rule or
//! hand plaintext to an operator.

use super::{store_err, Broker, CallCtx, Note};
use crate::error::{Error, Result};
use crate::keys::KeyId;
use crate::policy::breakglass::{BreakGlass, State};
use crate::policy::{self, CryptoOp, Principal};
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
            .ok_or_else(|| Error::NotFound(format!("break-glass grant {id} not found")))
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
        self.audit_first(
            Some(cx),
            "request-break-glass",
            |note: &mut Note| {
                note.key(&ask.key_id, 0);
                self.admit(caller)?;
                policy::require_key_manager(caller, &self.settings.region, "request break-glass grants")?;
                let p = &ask.principal;
                if p.region() != &self.settings.region {
                    return Err(Error::invalid(format!(
                        "break-glass never crosses the region rule: {} is not in region {}",
                        p.as_str(),
                        self.settings.region
                    )));
                }
                if p.role() != Role::Service || p.is_wildcard() {
                    return Err(Error::invalid(
                        "break-glass grants name exactly one service identity (never an operator, auditor or wildcard)",
                    ));
                }
                if ask.operations.is_empty() {
                    return Err(Error::invalid("break-glass grant names no operation"));
                }
                let max = self.settings.break_glass_max_minutes;
                if !(1..=max).contains(&ask.duration_minutes) {
                    return Err(Error::invalid(format!(
                        "duration {} minutes; break-glass grants last 1 to {max} minutes here",
                        ask.duration_minutes
                    )));
                }
                if ask.reason.trim().is_empty() || ask.reason.len() > 1024 {
                    return Err(Error::invalid("a break-glass request needs a reason (at most 1024 bytes)"));
                }
                self.load(&ask.key_id)?;
                let mut b = [0u8; 8];
                ring::rand::SecureRandom::fill(&self.rng, &mut b).map_err(|_| super::rng_err())?;
                let now = self.clock.now_unix();
                let mut ops = ask.operations.clone();
                ops.sort();
                ops.dedup();
                Ok(BreakGlass {
                    id: format!("bg-{}", hex::encode(b)),
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
                    approval_deadline: now + i64::from(self.settings.break_glass_approval_minutes) * 60,
                    revoked_by: None,
                })
            },
            |g, _| self.save_break_glass(g),
        )
    }

    /// Another operator approves; the quorum-th approval activates it.
    pub fn approve_break_glass(&self, cx: &CallCtx, id: &str) -> Result<BreakGlass> {
        let caller = &cx.caller;
        let _g = self.lock_lifecycle();
        self.audit_first(
            Some(cx),
            "approve-break-glass",
            |note: &mut Note| {
                self.admit(caller)?;
                policy::require_key_manager(caller, &self.settings.region, "approve break-glass grants")?;
                let mut g = self.find_break_glass(id)?;
                note.key(&g.key_id, 0);
                let now = self.clock.now_unix();
                let state = g.state(now);
                if state != State::Pending {
                    return Err(Error::precondition(format!("break-glass grant {id} is {}", state.as_str())));
                }
                let me = caller.spiffe_id();
                if me == g.requested_by {
                    return Err(Error::PermissionDenied(crate::region::Refusal::Role {
                        role: "operator",
                        op: "approve",
                        why: "the requester of a break-glass grant cannot approve it",
                    }));
                }
                if g.approved_by.contains(&me) {
                    return Err(Error::precondition(format!("{me} already approved {id}")));
                }
                g.approved_by.push(me);
                if g.approved_by.len() as u32 >= g.quorum {
                    g.activated_at = Some(now);
                }
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
        let _g = self.lock_lifecycle();
        self.audit_first(
            Some(cx),
            "revoke-break-glass",
            |note: &mut Note| {
                self.admit(caller)?;
                policy::require_key_manager(
                    caller,
                    &self.settings.region,
                    "revoke break-glass grants",
                )?;
                let mut g = self.find_break_glass(id)?;
                note.key(&g.key_id, 0);
                let state = g.state(self.clock.now_unix());
                if !matches!(state, State::Pending | State::Active) {
                    return Err(Error::precondition(format!(
                        "break-glass grant {id} is {}",
                        state.as_str()
                    )));
                }
                g.revoked_by = Some(caller.spiffe_id());
                Ok(g)
            },
            |g, _| self.save_break_glass(g),
        )
    }

    /// All grants with their current state (operators and auditors of the region).
    pub fn list_break_glass(&self, cx: &CallCtx) -> Result<Vec<(BreakGlass, State)>> {
        self.audited(cx, "list-break-glass", None, false, |_| {
            self.admit(&cx.caller)?;
            policy::require_reader(&cx.caller, &self.settings.region, "list break-glass grants")?;
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
