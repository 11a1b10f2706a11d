//! Break-glass grants: time-boxed, scoped, quorum-approved, in-region only.

use super::{CryptoOp, Principal};
use crate::id::KeyId;
use crate::region::Caller;
use serde::{Deserialize, Serialize};

/// Where a break-glass grant is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Waiting for approvals.
    Pending,
    /// In force until it expires.
    Active,
    /// Ran out (or was never approved in time).
    Expired,
    /// Withdrawn by an operator.
    Revoked,
}

impl State {
    /// Name for messages and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }
}

/// A break-glass grant as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BreakGlass {
    /// `bg-<hex>`.
    pub id: String,
    /// One in-region service identity (no wildcard).
    pub principal: Principal,
    /// The key.
    pub key_id: KeyId,
    /// What it allows.
    pub operations: Vec<CryptoOp>,
    /// Why (free text, audited).
    pub reason: String,
    /// How long it lasts once active.
    pub duration_minutes: u32,
    /// Operator who asked.
    pub requested_by: String,
    /// Unix seconds.
    pub requested_at: i64,
    /// Distinct operators (never the requester) who approved.
    pub approved_by: Vec<String>,
    /// Approvals needed.
    pub quorum: u32,
    /// When the quorum was reached.
    pub activated_at: Option<i64>,
    /// Pending requests lapse at this time.
    pub approval_deadline: i64,
    /// Operator who revoked it.
    pub revoked_by: Option<String>,
    /// The store's authentication code (see `KeyRecord::mac`).
    #[serde(default)]
    pub mac: String,
}

impl BreakGlass {
    /// The state at `now`.
    pub fn state(&self, now: i64) -> State {
        if self.revoked_by.is_some() {
            return State::Revoked;
        }
        match self.activated_at {
            Some(_) if self.expires_at().is_some_and(|t| now < t) => State::Active,
            Some(_) => State::Expired,
            None if now >= self.approval_deadline => State::Expired,
            None => State::Pending,
        }
    }

    /// End of the active period, once active.
    pub fn expires_at(&self) -> Option<i64> {
        self.activated_at
            .map(|t| t + i64::from(self.duration_minutes) * 60)
    }

    /// Does this grant allow `caller` to do `op` with `key` now?
    pub fn allows(&self, caller: &Caller, key: &KeyId, op: CryptoOp, now: i64) -> bool {
        self.state(now) == State::Active
            && self.key_id == *key
            && self.operations.contains(&op)
            && self.principal.matches(caller)
    }
}

/// A break-glass request that the rules never allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BreakGlassInvalid {
    /// The principal is of another region.
    #[error("break-glass never crosses the region rule: {principal} is not in region {region}")]
    OtherRegion {
        /// Who.
        principal: String,
        /// This broker's region.
        region: crate::region::Region,
    },
    /// Not exactly one service identity.
    #[error("break-glass grants name exactly one service identity (never an operator, auditor or wildcard)")]
    NotOneService,
    /// Empty operation list.
    #[error("break-glass grant names no operation")]
    NoOperation,
    /// Outside 1..=max minutes.
    #[error("a duration of {minutes} minutes is not allowed; break-glass grants last 1 to {max} minutes here")]
    Duration {
        /// Asked.
        minutes: u32,
        /// The configured maximum.
        max: u32,
    },
    /// Ownership is not an emergency permission.
    #[error("break-glass grants cryptography and export, never manage: ownership of a key is given by an operator's grant")]
    Manage,
    /// Empty, too long, or with control characters.
    #[error(
        "a break-glass request needs a reason of at most 1024 bytes without control characters"
    )]
    Reason,
}
