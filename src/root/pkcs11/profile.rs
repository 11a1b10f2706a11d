//! HSM profiles: what differs between HSMs, as data (`hsm-profiles/*.toml`).

use cryptoki::mechanism::{Mechanism, MechanismType};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A validated HSM profile.
#[derive(Clone, Debug)]
pub struct HsmProfile {
    /// Profile name, e.g. "SoftHSM2".
    pub name: String,
    /// Whether this profile runs in our test suite.
    pub tested: bool,
    /// Default PKCS#11 module path.
    pub module: PathBuf,
    /// Wrap mechanism for key version material.
    pub wrap: WrapMechanism,
    /// Logged-in sessions kept open.
    pub pool_size: usize,
    /// Set `CKA_MODIFIABLE = false` on the root key.
    pub root_key_unmodifiable: bool,
    /// After the token disappears, recovery needs `C_Finalize` + `C_Initialize`
    /// (SoftHSM2 never re-reads a token it lost).
    pub reinitialize_to_recover: bool,
    /// Known quirks, for operators.
    pub notes: Vec<String>,
    /// Further mechanisms (PKCS#11 names) the token must offer, e.g. what
    /// a site's policy requires; checked at start like the ones sovkms uses.
    pub extra_required: Vec<String>,
}

/// Supported wrap mechanisms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrapMechanism {
    /// `CKM_AES_KEY_WRAP_PAD` (RFC 5649).
    AesKeyWrapPad,
    /// `CKM_AES_KEY_WRAP` (RFC 3394; 32-byte material needs no padding).
    AesKeyWrap,
}

impl WrapMechanism {
    pub(super) fn mechanism(self) -> Mechanism<'static> {
        match self {
            Self::AesKeyWrapPad => Mechanism::AesKeyWrapPad,
            Self::AesKeyWrap => Mechanism::AesKeyWrap,
        }
    }

    pub(super) fn mechanism_type(self) -> MechanismType {
        match self {
            Self::AesKeyWrapPad => MechanismType::AES_KEY_WRAP_PAD,
            Self::AesKeyWrap => MechanismType::AES_KEY_WRAP,
        }
    }

    /// The PKCS#11 name.
    pub fn name(self) -> &'static str {
        match self {
            Self::AesKeyWrapPad => "CKM_AES_KEY_WRAP_PAD",
            Self::AesKeyWrap => "CKM_AES_KEY_WRAP",
        }
    }
}

// Fields only humans read (description, token_selection, login, notes) are
// accepted so that `deny_unknown_fields` still catches typos.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawProfile {
    name: String,
    tested: bool,
    #[serde(default)]
    description: String,
    module: PathBuf,
    #[serde(default)]
    token_selection: String,
    #[serde(default)]
    login: String,
    mechanisms: RawMechanisms,
    sessions: RawSessions,
    #[serde(default)]
    quirks: RawQuirks,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMechanisms {
    wrap: String,
    #[serde(default)]
    also_require: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawSessions {
    pool_size: usize,
    #[serde(default)]
    notes: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawQuirks {
    #[serde(default = "yes")]
    root_key_unmodifiable: bool,
    #[serde(default)]
    reinitialize_to_recover: bool,
    #[serde(default)]
    notes: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Mechanisms every profile needs besides its wrap mechanism.
pub(super) const REQUIRED: [(MechanismType, &str); 3] = [
    (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
    (MechanismType::ECC_KEY_PAIR_GEN, "CKM_EC_KEY_PAIR_GEN"),
    (MechanismType::ECDSA, "CKM_ECDSA"),
];

/// A profile that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The file cannot be read.
    #[error("HSM profile {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file's content is wrong.
    #[error("HSM profile {path}: {source}")]
    In {
        /// The file.
        path: String,
        /// What is wrong.
        source: Box<ProfileError>,
    },
    /// Not TOML of the profile's shape.
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    /// A wrap mechanism the backend does not implement.
    #[error(
        "mechanisms.wrap = {0:?} is not supported; use CKM_AES_KEY_WRAP_PAD or CKM_AES_KEY_WRAP"
    )]
    WrapMechanism(String),
    /// Neither a file nor a built-in name.
    #[error("HSM profile {0:?} is neither a file nor a built-in profile (softhsm2, thales-luna7, entrust-nshield, yubihsm2, aws-cloudhsm)")]
    Unknown(String),
    /// Session pool size out of range.
    #[error("sessions.pool_size = {0} must be between 1 and 256")]
    PoolSize(usize),
}

/// The profiles shipped in `hsm-profiles/`, built into the binary so that a
/// config can name one (`profile = "softhsm2"`) wherever sovkms is installed.
const BUILT_IN: [(&str, &str); 5] = [
    (
        "softhsm2",
        include_str!("../../../hsm-profiles/softhsm2.toml"),
    ),
    (
        "thales-luna7",
        include_str!("../../../hsm-profiles/thales-luna7.toml"),
    ),
    (
        "entrust-nshield",
        include_str!("../../../hsm-profiles/entrust-nshield.toml"),
    ),
    (
        "yubihsm2",
        include_str!("../../../hsm-profiles/yubihsm2.toml"),
    ),
    (
        "aws-cloudhsm",
        include_str!("../../../hsm-profiles/aws-cloudhsm.toml"),
    ),
];

impl HsmProfile {
    /// The names of the built-in profiles.
    pub fn built_in_names() -> impl Iterator<Item = &'static str> {
        BUILT_IN.iter().map(|(n, _)| *n)
    }

    /// A profile by built-in name (`softhsm2`) or by file path (anything
    /// with a `/` or ending in `.toml`; relative paths against `base`).
    pub fn find(spec: &str, base: &Path) -> Result<Self, ProfileError> {
        if spec.contains('/') || spec.ends_with(".toml") {
            let p = Path::new(spec);
            return Self::load(&if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            });
        }
        let (_, text) = BUILT_IN
            .iter()
            .find(|(n, _)| *n == spec)
            .ok_or_else(|| ProfileError::Unknown(spec.to_owned()))?;
        Self::parse(text).map_err(|e| ProfileError::In {
            path: format!("built-in profile {spec}"),
            source: Box::new(e),
        })
    }

    /// Reads and validates a profile file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let at = || path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| ProfileError::Read { path: at(), source })?;
        Self::parse(&text).map_err(|e| ProfileError::In {
            path: at(),
            source: Box::new(e),
        })
    }

    /// Parses profile TOML.
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        let raw: RawProfile = toml::from_str(text)?;
        let wrap = match raw.mechanisms.wrap.as_str() {
            "CKM_AES_KEY_WRAP_PAD" => WrapMechanism::AesKeyWrapPad,
            "CKM_AES_KEY_WRAP" => WrapMechanism::AesKeyWrap,
            other => return Err(ProfileError::WrapMechanism(other.to_owned())),
        };
        if !(1..=256).contains(&raw.sessions.pool_size) {
            return Err(ProfileError::PoolSize(raw.sessions.pool_size));
        }
        Ok(Self {
            name: raw.name,
            tested: raw.tested,
            module: raw.module,
            wrap,
            pool_size: raw.sessions.pool_size,
            root_key_unmodifiable: raw.quirks.root_key_unmodifiable,
            reinitialize_to_recover: raw.quirks.reinitialize_to_recover,
            notes: raw.quirks.notes,
            extra_required: raw.mechanisms.also_require,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-profiles");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let prof = HsmProfile::load(&p).unwrap();
                assert!(!prof.name.is_empty());
                n += 1;
            }
        }
        assert!(n >= 4, "softhsm2 plus at least three real HSM profiles");
    }

    #[test]
    fn built_in_profiles_are_the_shipped_files() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-profiles");
        for name in HsmProfile::built_in_names() {
            let b = HsmProfile::find(name, Path::new("/nowhere")).unwrap();
            let f = HsmProfile::load(&dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(b.name, f.name);
        }
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(
            n,
            HsmProfile::built_in_names().count(),
            "a profile file is not built in"
        );
        assert!(HsmProfile::find("nosuch", Path::new(".")).is_err());
    }

    #[test]
    fn unknown_mechanism_is_refused() {
        let t = "name='x'\ntested=false\nmodule='/x.so'\n[mechanisms]\nwrap='CKM_DES3_ECB'\n[sessions]\npool_size=4\n";
        assert!(HsmProfile::parse(t)
            .unwrap_err()
            .to_string()
            .contains("CKM_DES3_ECB"));
    }
}
