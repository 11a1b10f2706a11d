//! Regions, caller identities and the residency rule.
//!
//! This file holds the line that refuses a cross-region decrypt:
//! [`check_residency`]. It is a pure function of three regions, with no
//! configuration input, so there is nothing to switch off.

use std::fmt;

/// A region name such as `eu-central`: 1–32 of `[a-z0-9-]`, starting with a letter.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl Region {
    /// Parses and validates a region name.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok_len = (1..=32).contains(&s.len());
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok_start = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if ok_len && ok_chars && ok_start && !s.ends_with('-') {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid region name {s:?}: use 1-32 lowercase letters, digits and '-', starting with a letter"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Region {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Region> for String {
    fn from(r: Region) -> String {
        r.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Region({})", self.0)
    }
}

/// What a caller is for. Separation of duties follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Does cryptography per key grants; manages no keys.
    Service,
    /// Manages keys; never gets plaintext.
    Operator,
    /// Reads attributes and logs; calls no cryptography.
    Auditor,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "service" => Some(Self::Service),
            "operator" => Some(Self::Operator),
            "auditor" => Some(Self::Auditor),
            _ => None,
        }
    }

    /// The path segment used in SPIFFE ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Operator => "operator",
            Self::Auditor => "auditor",
        }
    }
}

/// An authenticated caller, parsed from the URI SAN of its client certificate:
/// `spiffe://<trust-domain>/region/<region>/<role>/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// The caller's region.
    pub region: Region,
    /// The caller's role.
    pub role: Role,
    /// Workload or person name.
    pub name: String,
}

fn valid_segment(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Caller {
    /// Parses a SPIFFE id of the sovkms shape.
    pub fn parse_spiffe(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{uri:?} is not a spiffe:// URI"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let shape =
            "expected spiffe://<trust-domain>/region/<region>/<service|operator|auditor>/<name>";
        let [td, "region", region, role, name] = parts.as_slice() else {
            return Err(format!("{uri:?}: {shape}"));
        };
        if !valid_segment(td, 255) {
            return Err(format!("{uri:?}: invalid trust domain"));
        }
        let region = Region::parse(region)?;
        let role =
            Role::parse(role).ok_or_else(|| format!("{uri:?}: unknown role {role:?}; {shape}"))?;
        if !valid_segment(name, 128) {
            return Err(format!("{uri:?}: invalid name"));
        }
        Ok(Self {
            trust_domain: (*td).to_owned(),
            region,
            role,
            name: (*name).to_owned(),
        })
    }

    /// The SPIFFE id.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/region/{}/{}/{}",
            self.trust_domain,
            self.region,
            self.role.as_str(),
            self.name
        )
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_id())
    }
}

/// Why a call was refused. Shown to the caller as is, and (later) audited.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client certificate carries no usable identity.
    #[error("no valid caller identity: {0}")]
    NoIdentity(String),
    /// The identity's trust domain is not the broker's.
    #[error("caller trust domain {caller} is not this broker's trust domain {broker}")]
    TrustDomain {
        /// caller's
        caller: String,
        /// broker's
        broker: String,
    },
    /// The residency rule: plaintext stays in its region.
    #[error("caller region {caller} may not {op} data of region {data}")]
    Region {
        /// caller's region
        caller: Region,
        /// what it tried
        op: &'static str,
        /// the data's (key's) home region
        data: Region,
    },
    /// Separation of duties.
    #[error("{role} identities may not {op}: {why}")]
    Role {
        /// caller's role
        role: &'static str,
        /// what it tried
        op: &'static str,
        /// the rule
        why: &'static str,
    },
    /// No grant names this caller for this operation on this key.
    #[error("{caller} has no grant to {op} with key {key_id}")]
    NoGrant {
        /// caller's SPIFFE id
        caller: String,
        /// what it tried
        op: &'static str,
        /// the key
        key_id: String,
    },
}

/// The residency rule for operations that release plaintext or key material
/// (decrypt, re-encrypt, data-key plaintext, export): the caller, the broker
/// and the data must all be in the same region. Not configurable.
pub fn check_residency(
    caller: &Region,
    broker: &Region,
    data_home: &Region,
    op: &'static str,
) -> Result<(), Refusal> {
    if caller != data_home {
        return Err(Refusal::Region {
            caller: caller.clone(),
            op,
            data: data_home.clone(),
        });
    }
    if caller != broker {
        return Err(Refusal::Region {
            caller: caller.clone(),
            op,
            data: broker.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Region {
        Region::parse(s).unwrap()
    }

    #[test]
    fn residency_rule_exhaustive_over_three_regions() {
        let regions = [r("eu-central"), r("us-east"), r("central")];
        for c in &regions {
            for b in &regions {
                for d in &regions {
                    let res = check_residency(c, b, d, "decrypt");
                    assert_eq!(res.is_ok(), c == b && b == d, "{c} {b} {d}");
                }
            }
        }
    }

    #[test]
    fn refusal_names_both_regions() {
        let e = check_residency(&r("us-east"), &r("eu-central"), &r("eu-central"), "decrypt")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "caller region us-east may not decrypt data of region eu-central"
        );
    }

    #[test]
    fn region_names() {
        for ok in ["eu-central", "us-east-1", "a"] {
            assert!(Region::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "EU", "-eu", "eu-", "eu central", "1eu", &"a".repeat(33)] {
            assert!(Region::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn spiffe_ids() {
        let c = Caller::parse_spiffe("spiffe://sovkms.example/region/eu-central/service/billing")
            .unwrap();
        assert_eq!(c.region, r("eu-central"));
        assert_eq!(c.role, Role::Service);
        assert_eq!(c.name, "billing");
        assert_eq!(
            c.spiffe_id(),
            "spiffe://sovkms.example/region/eu-central/service/billing"
        );
        for bad in [
            "https://x/region/eu/service/a",
            "spiffe://td/region/eu/admin/a",
            "spiffe://td/region/eu/service",
            "spiffe://td/region/eu/service/a/b",
            "spiffe://td/zone/eu/service/a",
            "spiffe://td/region/EU/service/a",
            "spiffe:///region/eu/service/a",
            "spiffe://td/region/eu/service/a b",
        ] {
            assert!(Caller::parse_spiffe(bad).is_err(), "{bad}");
        }
    }
}
