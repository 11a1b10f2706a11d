//! Regions, caller identities and the residency rule.
//!
//! This file holds the line that refuses a cross-region decrypt:
//! [`check_residency`]. It is a pure function of three regions, with no
//! configuration input, so there is nothing to switch off. The broker's
//! one gate (`broker/gate.rs`) calls it for every operation that the table
//! (`policy/table.rs`) marks resident.

use std::fmt;

/// A region name such as `eu-central`: 1–32 of `[a-z0-9-]`, starting with a letter.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

impl Region {
    /// Parses and validates a region name.
    pub fn parse(s: &str) -> Result<Self, RegionError> {
        let ok_len = (1..=32).contains(&s.len());
        let ok_chars = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok_start = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        if ok_len && ok_chars && ok_start && !s.ends_with('-') {
            Ok(Self(s.to_owned()))
        } else {
            Err(RegionError {
                name: s.chars().take(64).collect(),
            })
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A string that is not a region name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid region name {name:?}: use 1-32 lowercase letters, digits and '-', starting with a letter")]
pub struct RegionError {
    name: String,
}

impl TryFrom<String> for Region {
    type Error = RegionError;
    fn try_from(s: String) -> Result<Self, RegionError> {
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
    // `.` and `..` are path navigation, never a name (SPIFFE forbids them).
    (1..=max).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Why a URI is not a sovkms SPIFFE id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// Another scheme.
    #[error("{0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    /// Not five segments of the expected shape.
    #[error("{0:?} does not have the shape spiffe://<trust-domain>/region/<region>/<service|operator|auditor>/<name>")]
    Shape(String),
    /// Empty or invalid trust domain.
    #[error("{0:?} has an invalid trust domain")]
    TrustDomain(String),
    /// Invalid region segment.
    #[error("{uri:?} names an {source}")]
    Region {
        /// The URI.
        uri: String,
        /// Why.
        source: RegionError,
    },
    /// A role other than service, operator or auditor.
    #[error("{uri:?} names the unknown role {role:?}; roles are service, operator and auditor")]
    Role {
        /// The URI.
        uri: String,
        /// The segment.
        role: String,
    },
    /// Invalid name segment.
    #[error("{0:?} has an invalid name")]
    Name(String),
}

/// Why a connection carries no usable caller identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A plain connection reached a handler.
    #[error("the connection is not mutual TLS")]
    NotMutualTls,
    /// No client certificate.
    #[error("no client certificate was presented")]
    NoCertificate,
    /// DER that does not parse.
    #[error("the client certificate cannot be parsed")]
    Unparseable,
    /// subjectAltName that does not parse.
    #[error("the client certificate has a malformed subjectAltName")]
    MalformedSan,
    /// No spiffe:// URI SAN.
    #[error("the client certificate has no URI SAN with a SPIFFE id")]
    NoSpiffeId,
    /// More than one.
    #[error("the client certificate has more than one SPIFFE id")]
    SeveralSpiffeIds,
    /// A URI SAN besides the SPIFFE id: two names for one caller.
    #[error("the client certificate carries a URI SAN besides its SPIFFE id")]
    OtherUri,
    /// No clientAuth extended key usage.
    #[error("the client certificate is not marked for client authentication (extended key usage clientAuth)")]
    NotForClients,
    /// One that does not parse.
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// The certificate expired after the connection was opened.
    #[error("the client certificate expired at {at}; reconnect with a valid one")]
    Expired {
        /// When, RFC 3339.
        at: String,
    },
    /// Issued by a CA that may not vouch for the region it names.
    #[error("the certificate of {caller} was not issued by a CA trusted for region {region}")]
    UntrustedForRegion {
        /// The identity it claims.
        caller: String,
        /// Its region.
        region: Region,
    },
}

impl Caller {
    /// Parses a SPIFFE id of the sovkms shape.
    pub fn parse_spiffe(uri: &str) -> Result<Self, SpiffeError> {
        let shown = || uri.chars().take(300).collect::<String>();
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::NotSpiffe(shown()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [td, "region", region, role, name] = parts.as_slice() else {
            return Err(SpiffeError::Shape(shown()));
        };
        if !valid_segment(td, 255) {
            return Err(SpiffeError::TrustDomain(shown()));
        }
        let region = Region::parse(region).map_err(|source| SpiffeError::Region {
            uri: shown(),
            source,
        })?;
        let role = Role::parse(role).ok_or_else(|| SpiffeError::Role {
            uri: shown(),
            role: role.chars().take(64).collect(),
        })?;
        if !valid_segment(name, 128) {
            return Err(SpiffeError::Name(shown()));
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

/// Which part of the residency rule a request breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breach {
    /// The caller is not of the broker's region.
    CallerOutsideBroker,
    /// The data (its key) is not of the caller's region.
    DataElsewhere,
}

/// The residency rule for operations that release plaintext or key material
/// (decrypt, re-encrypt, data-key plaintext, export): the caller, the broker
/// and the data must all be in the same region. Not configurable.
pub fn check_residency(caller: &Region, broker: &Region, data_home: &Region) -> Result<(), Breach> {
    if caller != broker {
        return Err(Breach::CallerOutsideBroker);
    }
    if caller != data_home {
        return Err(Breach::DataElsewhere);
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
                    let res = check_residency(c, b, d);
                    assert_eq!(res.is_ok(), c == b && b == d, "{c} {b} {d}");
                }
            }
        }
    }

    #[test]
    fn which_part_breaks() {
        let (eu, us) = (r("eu-central"), r("us-east"));
        assert_eq!(
            check_residency(&us, &eu, &eu),
            Err(Breach::CallerOutsideBroker)
        );
        assert_eq!(check_residency(&eu, &eu, &us), Err(Breach::DataElsewhere));
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
            "spiffe://td/region/eu/service/..",
            "spiffe://td/region/eu/service/.",
            "spiffe://../region/eu/service/a",
        ] {
            assert!(Caller::parse_spiffe(bad).is_err(), "{bad}");
        }
    }
}
