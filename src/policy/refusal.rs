//! Refusals: why the rules said no, as typed facts. Each variant has one
//! `Display` that writes one whole sentence; front ends map variants to
//! their protocol's codes (gRPC in `api/`), never the text.

use super::table::{Duty, Operation};
use crate::id::KeyId;
use crate::region::{IdentityError, Region, Role};
use std::fmt;

/// Why the identity, role, region or grant rules refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The client certificate carries no usable identity.
    NoIdentity(IdentityError),
    /// The identity's trust domain is not the broker's.
    TrustDomain {
        /// The caller's.
        caller: String,
        /// The broker's.
        broker: String,
    },
    /// Separation of duties: this role never calls this operation.
    Role {
        /// The caller's role.
        role: Role,
        /// What it asked for.
        op: Operation,
    },
    /// The operation is for callers of the broker's region only.
    OutsideRegion {
        /// What was asked.
        op: Operation,
        /// The caller's region.
        caller: Region,
        /// The broker's region.
        broker: Region,
    },
    /// The residency rule: plaintext of a region stays with callers of
    /// that region.
    Residency {
        /// What was asked.
        op: Operation,
        /// The caller's region.
        caller: Region,
        /// The home region of the data (its key).
        data: Region,
    },
    /// No grant (and no break-glass grant) names this caller for this
    /// operation on this key.
    NoGrant {
        /// What was asked.
        op: Operation,
        /// The caller's SPIFFE id.
        principal: String,
        /// The key.
        key: KeyId,
    },
    /// Aggregates are for the region's auditors and the configured readers.
    NotAggregateReader {
        /// The caller's SPIFFE id.
        principal: String,
        /// The broker's region.
        region: Region,
    },
    /// Only the services the operators named may create keys of their own.
    NotKeyCreator {
        /// The caller's SPIFFE id.
        principal: String,
        /// The broker's region.
        region: Region,
    },
    /// Break-glass needs approvals from operators other than the requester.
    SelfApproval {
        /// The grant's id.
        grant: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoIdentity(why) => write!(f, "no valid caller identity: {why}"),
            Self::TrustDomain { caller, broker } => write!(
                f,
                "caller trust domain {caller} is not this broker's trust domain {broker}"
            ),
            Self::Role { role, op } => role_refusal(f, *role, *op),
            Self::OutsideRegion { op, caller, broker } => write!(
                f,
                "caller region {caller} may not {} at the broker of region {broker}",
                op.action()
            ),
            Self::Residency { op, caller, data } => match op {
                Operation::GenerateDataKey => write!(
                    f,
                    "caller region {caller} may not receive plaintext data keys of region {data}"
                ),
                Operation::ReEncrypt => write!(
                    f,
                    "caller region {caller} may not re-encrypt data of region {data}"
                ),
                Operation::ExportKey => write!(
                    f,
                    "caller region {caller} may not receive key material of region {data}"
                ),
                _ => write!(
                    f,
                    "caller region {caller} may not decrypt data of region {data}"
                ),
            },
            Self::NoGrant { op, principal, key } => write!(
                f,
                "{principal} has no grant to {} with key {key}",
                op.action()
            ),
            Self::NotAggregateReader { principal, region } => write!(
                f,
                "{principal} may not read the audit aggregates of region {region}: only its auditors and the configured aggregate readers may"
            ),
            Self::NotKeyCreator { principal, region } => write!(
                f,
                "{principal} may not create keys of its own: only the services named in [kmip] key_creators of the broker of region {region} may"
            ),
            Self::SelfApproval { grant } => write!(
                f,
                "the requester of break-glass grant {grant} cannot approve it; another operator must"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

fn role_refusal(f: &mut fmt::Formatter<'_>, role: Role, op: Operation) -> fmt::Result {
    let action = op.action();
    if op.rule().creators_only {
        return write!(
            f,
            "{} identities may not {action}: only service identities named in [kmip] key_creators do; operators create keys with create-key",
            role.as_str()
        );
    }
    match (op.rule().duty, role) {
        (Duty::Crypto, Role::Operator) => write!(
            f,
            "operator identities may not {action}: operators manage keys and never get plaintext or call cryptography"
        ),
        (Duty::Crypto, _) => write!(
            f,
            "auditor identities may not {action}: auditors read attributes and logs and call no cryptography"
        ),
        (Duty::Manage, _) => write!(
            f,
            "{} identities may not {action}: only operators manage keys and break-glass grants",
            role.as_str()
        ),
        (Duty::Read, _) => write!(
            f,
            "service identities may not {action}: services use keys through grants and do not read or manage them"
        ),
        (Duty::Audit, _) => write!(
            f,
            "{} identities may not {action}: only auditors of the region read audit records",
            role.as_str()
        ),
        (Duty::Attest, _) => write!(
            f,
            "{} identities may not {action}: only auditors of the region request TPM quotes",
            role.as_str()
        ),
        (Duty::Inform | Duty::Internal, _) => write!(
            f,
            "{} identities may not {action}: the broker does this itself",
            role.as_str()
        ),
    }
}
