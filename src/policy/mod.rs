//! Roles, grants, the table of operations and the refusals it produces.
//!
//! Separation of duties is fixed: services do cryptography per grants,
//! operators manage keys, auditors read. [`table`] says, per operation, who
//! may call it and where; the broker's one gate reads it. The region rule
//! itself is [`crate::region::check_residency`].

pub mod breakglass;
mod refusal;
pub mod table;

pub use refusal::Refusal;
pub use table::{Operation, Reach, Rule};

use crate::region::{Caller, Region, Role, SpiffeError};
use std::fmt;

/// A cryptographic operation a grant can allow.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum CryptoOp {
    /// Encrypt (allowed cross-region where granted).
    Encrypt,
    /// Decrypt (in-region only).
    Decrypt,
    /// Data key with plaintext (in-region only).
    GenerateDataKey,
    /// Wrapped data key only (allowed cross-region where granted).
    GenerateDataKeyWithoutPlaintext,
    /// Re-encrypt (in-region only).
    ReEncrypt,
    /// The key's material itself, e.g. KMIP Get (in-region only; only for
    /// keys that may be exported).
    Export,
    /// Lifecycle and attributes of this one key, by the service that owns
    /// it (in-region only; never the grants themselves).
    Manage,
}

impl CryptoOp {
    /// Every operation.
    pub const ALL: [CryptoOp; 7] = [
        Self::Encrypt,
        Self::Decrypt,
        Self::GenerateDataKey,
        Self::GenerateDataKeyWithoutPlaintext,
        Self::ReEncrypt,
        Self::Export,
        Self::Manage,
    ];

    /// Operations that hand plaintext or key material to the caller, or
    /// process it inside the broker on the caller's behalf: in-region only.
    pub fn is_residency_bound(self) -> bool {
        matches!(
            self,
            Self::Decrypt | Self::GenerateDataKey | Self::ReEncrypt | Self::Export
        )
    }

    /// Operations a grant can give only to callers of the broker's region.
    pub fn is_in_region_only(self) -> bool {
        self.is_residency_bound() || self == Self::Manage
    }

    /// Name used in the CLI and configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::GenerateDataKey => "generate-data-key",
            Self::GenerateDataKeyWithoutPlaintext => "generate-data-key-without-plaintext",
            Self::ReEncrypt => "re-encrypt",
            Self::Export => "export",
            Self::Manage => "manage",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.name() == s)
    }
}

impl fmt::Display for CryptoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Who a grant names: one SPIFFE id, or every name of one role in one
/// region (`spiffe://td/region/<r>/<role>/*`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Principal {
    text: String,
    trust_domain: String,
    region: Region,
    role: Role,
    /// `None` for the wildcard.
    name: Option<String>,
}

impl Principal {
    /// Parses a principal.
    pub fn parse(s: &str) -> Result<Self, PrincipalError> {
        let (probe, wildcard) = match s.strip_suffix("/*") {
            Some(prefix) => (format!("{prefix}/x"), true),
            None => (s.to_owned(), false),
        };
        let c = Caller::parse_spiffe(&probe).map_err(|e| {
            if wildcard {
                PrincipalError::Wildcard(s.chars().take(300).collect())
            } else {
                PrincipalError::Spiffe(e)
            }
        })?;
        Ok(Self {
            text: s.to_owned(),
            trust_domain: c.trust_domain,
            region: c.region,
            role: c.role,
            name: (!wildcard).then_some(c.name),
        })
    }

    /// The principal naming exactly `caller`.
    pub fn exact(caller: &Caller) -> Self {
        Self {
            text: caller.spiffe_id(),
            trust_domain: caller.trust_domain.clone(),
            region: caller.region.clone(),
            role: caller.role,
            name: Some(caller.name.clone()),
        }
    }

    /// True when `caller` is named by this principal.
    pub fn matches(&self, caller: &Caller) -> bool {
        self.trust_domain == caller.trust_domain
            && self.region == caller.region
            && self.role == caller.role
            && self.name.as_ref().is_none_or(|n| *n == caller.name)
    }

    /// The principal's region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The principal's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True for a `.../<role>/*` principal.
    pub fn is_wildcard(&self) -> bool {
        self.name.is_none()
    }

    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A string that is not a grant principal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    /// A wildcard whose prefix is not `spiffe://td/region/<r>/<role>`.
    #[error("invalid grant principal {0:?}: the part before /* must be spiffe://<trust-domain>/region/<region>/<role>")]
    Wildcard(String),
    /// Not a sovkms SPIFFE id.
    #[error("invalid grant principal: {0}")]
    Spiffe(SpiffeError),
}

impl TryFrom<String> for Principal {
    type Error = PrincipalError;
    fn try_from(s: String) -> Result<Self, PrincipalError> {
        Self::parse(&s)
    }
}

impl From<Principal> for String {
    fn from(p: Principal) -> String {
        p.text
    }
}

/// Allows `principal` the listed operations on one key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// Who.
    pub principal: Principal,
    /// What (sorted, no duplicates).
    pub operations: Vec<CryptoOp>,
}

/// A grant that could never take effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// Empty operation list.
    #[error("grant to {principal} names no operation")]
    NoOperation {
        /// Who.
        principal: String,
    },
    /// Operators and auditors are never granted cryptography.
    #[error("grant to {principal} can never take effect: only service identities may be granted cryptographic operations")]
    NotService {
        /// Who.
        principal: String,
    },
    /// A residency-bound operation for another region's principal.
    #[error("grant of {op} to {principal} can never take effect: {op} is only ever allowed to callers of region {broker}")]
    OtherRegion {
        /// The operation.
        op: CryptoOp,
        /// Who.
        principal: String,
        /// This broker's region.
        broker: Region,
    },
}

impl Grant {
    /// Builds a grant, refusing ones that could never take effect so an
    /// operator does not believe in a permission the code will not give.
    pub fn new(
        principal: Principal,
        mut operations: Vec<CryptoOp>,
        broker_region: &Region,
    ) -> Result<Self, GrantError> {
        operations.sort();
        operations.dedup();
        let who = || principal.as_str().to_owned();
        if operations.is_empty() {
            return Err(GrantError::NoOperation { principal: who() });
        }
        if principal.role != Role::Service {
            return Err(GrantError::NotService { principal: who() });
        }
        if principal.region != *broker_region {
            if let Some(op) = operations.iter().find(|o| o.is_in_region_only()) {
                return Err(GrantError::OtherRegion {
                    op: *op,
                    principal: who(),
                    broker: broker_region.clone(),
                });
            }
        }
        Ok(Self {
            principal,
            operations,
        })
    }

    /// True when this grant names `caller` for `op`.
    pub fn allows(&self, caller: &Caller, op: CryptoOp) -> bool {
        self.operations.contains(&op) && self.principal.matches(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(s: &str) -> Caller {
        Caller::parse_spiffe(s).unwrap()
    }
    fn eu() -> Region {
        Region::parse("eu-central").unwrap()
    }

    #[test]
    fn wildcard_and_exact() {
        let p = Principal::parse("spiffe://td/region/eu-central/service/*").unwrap();
        assert!(p.matches(&caller("spiffe://td/region/eu-central/service/a")));
        assert!(!p.matches(&caller("spiffe://td/region/us-east/service/a")));
        assert!(!p.matches(&caller("spiffe://td/region/eu-central/operator/a")));
        assert!(!p.matches(&caller("spiffe://other/region/eu-central/service/a")));
        let p = Principal::parse("spiffe://td/region/eu-central/service/a").unwrap();
        assert!(p.matches(&caller("spiffe://td/region/eu-central/service/a")));
        assert!(!p.matches(&caller("spiffe://td/region/eu-central/service/b")));
        assert!(Principal::parse("spiffe://td/*").is_err());
    }

    #[test]
    fn ineffective_grants_are_refused() {
        let us = Principal::parse("spiffe://td/region/us-east/service/x").unwrap();
        let e = Grant::new(us.clone(), vec![CryptoOp::Decrypt], &eu()).unwrap_err();
        assert!(e.to_string().contains("can never take effect"), "{e}");
        assert!(Grant::new(us, vec![CryptoOp::Encrypt], &eu()).is_ok());
        let op = Principal::parse("spiffe://td/region/eu-central/operator/x").unwrap();
        assert!(Grant::new(op, vec![CryptoOp::Encrypt], &eu()).is_err());
    }
}
