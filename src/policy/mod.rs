//! Roles, grants and the order in which they are checked.
//!
//! Separation of duties is fixed: services do cryptography per grants,
//! operators manage keys, auditors read. The region rule lives in
//! [`crate::region::check_residency`] and is applied by the broker before
//! any grant is consulted.

pub mod breakglass;

use crate::keys::KeyId;
use crate::region::{Caller, Refusal, Region, Role};
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
}

impl CryptoOp {
    /// Every operation.
    pub const ALL: [CryptoOp; 5] = [
        Self::Encrypt,
        Self::Decrypt,
        Self::GenerateDataKey,
        Self::GenerateDataKeyWithoutPlaintext,
        Self::ReEncrypt,
    ];

    /// The verb used in refusals.
    pub fn verb(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::GenerateDataKey => "generate data keys of",
            Self::GenerateDataKeyWithoutPlaintext => "generate wrapped data keys of",
            Self::ReEncrypt => "re-encrypt",
        }
    }

    /// Operations that hand plaintext or key material to the caller, or
    /// process it inside the broker on the caller's behalf: in-region only.
    pub fn is_residency_bound(self) -> bool {
        matches!(
            self,
            Self::Decrypt | Self::GenerateDataKey | Self::ReEncrypt
        )
    }

    /// Name used in the CLI and configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::GenerateDataKey => "generate-data-key",
            Self::GenerateDataKeyWithoutPlaintext => "generate-data-key-without-plaintext",
            Self::ReEncrypt => "re-encrypt",
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
    pub fn parse(s: &str) -> Result<Self, String> {
        let (probe, wildcard) = match s.strip_suffix("/*") {
            Some(prefix) => (format!("{prefix}/x"), true),
            None => (s.to_owned(), false),
        };
        let c = Caller::parse_spiffe(&probe).map_err(|e| {
            if wildcard {
                format!("invalid grant principal {s:?}: the part before /* must be spiffe://<trust-domain>/region/<region>/<role>")
            } else {
                format!("invalid grant principal: {e}")
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

impl TryFrom<String> for Principal {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
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

impl Grant {
    /// Builds a grant, refusing ones that could never take effect so an
    /// operator does not believe in a permission the code will not give.
    pub fn new(
        principal: Principal,
        mut operations: Vec<CryptoOp>,
        broker_region: &Region,
    ) -> Result<Self, String> {
        operations.sort();
        operations.dedup();
        if operations.is_empty() {
            return Err(format!(
                "grant to {} names no operation",
                principal.as_str()
            ));
        }
        if principal.role != Role::Service {
            return Err(format!(
                "grant to {}: only service identities may be granted cryptographic operations",
                principal.as_str()
            ));
        }
        if principal.region != *broker_region {
            if let Some(op) = operations.iter().find(|o| o.is_residency_bound()) {
                return Err(format!(
                    "grant of {op} to {} can never take effect: callers of region {} may not {} data of region {broker_region}",
                    principal.as_str(),
                    principal.region,
                    op.verb()
                ));
            }
        }
        Ok(Self {
            principal,
            operations,
        })
    }
}

/// Crypto calls are for services only.
pub fn require_service(caller: &Caller, op: CryptoOp) -> Result<(), Refusal> {
    match caller.role {
        Role::Service => Ok(()),
        Role::Operator => Err(Refusal::Role {
            role: "operator",
            op: op.verb(),
            why: "operators manage keys and never get plaintext or call cryptography",
        }),
        Role::Auditor => Err(Refusal::Role {
            role: "auditor",
            op: op.verb(),
            why: "auditors read attributes and logs and call no cryptography",
        }),
    }
}

/// Lifecycle changes are for operators of the broker's region.
pub fn require_key_manager(
    caller: &Caller,
    broker: &Region,
    what: &'static str,
) -> Result<(), Refusal> {
    if caller.role != Role::Operator {
        return Err(Refusal::Role {
            role: caller.role.as_str(),
            op: what,
            why: "only operators manage keys",
        });
    }
    region_must_match(caller, broker, what)
}

/// Reading key attributes is for operators and auditors of the region.
pub fn require_reader(caller: &Caller, broker: &Region, what: &'static str) -> Result<(), Refusal> {
    if caller.role == Role::Service {
        return Err(Refusal::Role {
            role: "service",
            op: what,
            why: "services use keys through grants and do not read or manage them",
        });
    }
    region_must_match(caller, broker, what)
}

fn region_must_match(caller: &Caller, broker: &Region, what: &'static str) -> Result<(), Refusal> {
    if caller.region != *broker {
        return Err(Refusal::Region {
            caller: caller.region.clone(),
            op: what,
            data: broker.clone(),
        });
    }
    Ok(())
}

/// Raw audit records are for auditors of the broker's region only.
pub fn require_auditor(
    caller: &Caller,
    broker: &Region,
    what: &'static str,
) -> Result<(), Refusal> {
    if caller.role != Role::Auditor {
        return Err(Refusal::Role {
            role: caller.role.as_str(),
            op: what,
            why: "only auditors of the region read raw audit records",
        });
    }
    region_must_match(caller, broker, what)
}

/// Is `caller` granted `op` on this key?
pub fn check_grant(
    grants: &[Grant],
    caller: &Caller,
    op: CryptoOp,
    key_id: &KeyId,
) -> Result<(), Refusal> {
    let granted = grants
        .iter()
        .any(|g| g.operations.contains(&op) && g.principal.matches(caller));
    if granted {
        Ok(())
    } else {
        Err(Refusal::NoGrant {
            caller: caller.spiffe_id(),
            op: op.verb(),
            key_id: key_id.to_string(),
        })
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
        assert!(e.contains("can never take effect"), "{e}");
        assert!(Grant::new(us, vec![CryptoOp::Encrypt], &eu()).is_ok());
        let op = Principal::parse("spiffe://td/region/eu-central/operator/x").unwrap();
        assert!(Grant::new(op, vec![CryptoOp::Encrypt], &eu()).is_err());
    }

    #[test]
    fn roles() {
        let op = caller("spiffe://td/region/eu-central/operator/o");
        assert!(require_service(&op, CryptoOp::Decrypt).is_err());
        assert!(require_key_manager(&op, &eu(), "create keys").is_ok());
        let us_op = caller("spiffe://td/region/us-east/operator/o");
        assert!(require_key_manager(&us_op, &eu(), "create keys").is_err());
        let aud = caller("spiffe://td/region/eu-central/auditor/a");
        assert!(require_reader(&aud, &eu(), "read keys").is_ok());
        assert!(require_key_manager(&aud, &eu(), "create keys").is_err());
        let svc = caller("spiffe://td/region/eu-central/service/s");
        assert!(require_reader(&svc, &eu(), "read keys").is_err());
    }
}
