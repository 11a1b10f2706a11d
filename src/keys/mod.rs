//! Keys and key versions: ids, lifecycle states, the stored record (wrapped
//! material only), and the in-memory cache of unwrapped version material.

mod cache;
mod keyring;
pub mod provenance;

pub use cache::{CacheStats, KekCache};
pub use keyring::{Halt, Keyring, Wait};

use crate::policy::Grant;
use crate::region::Region;
use crate::root::WrappedKey;

pub use crate::id::{KeyId, KeyState};

/// Why a key was revoked (KMIP revocation reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    /// Not given.
    Unspecified,
    /// Replaced by another key.
    Superseded,
    /// No longer needed.
    CessationOfOperation,
    /// Owner changed.
    AffiliationChanged,
    /// The key may be known to others.
    KeyCompromise,
}

/// One version of a key: its material, wrapped by the root of trust.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VersionRecord {
    /// 1, 2, ...
    pub version: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// The wrapped material; `None` once the key is destroyed.
    pub wrapped: Option<WrappedKey>,
    /// Signed origin of this version.
    #[serde(default)]
    pub provenance: Option<provenance::Provenance>,
    /// For a managed object (not an envelope key): the object's own bytes
    /// sealed in an envelope under this version's material, so they are
    /// as safe as the material itself; `None` once destroyed.
    #[serde(default, with = "opt_hex", skip_serializing_if = "Option::is_none")]
    pub sealed_object: Option<Vec<u8>>,
    /// The ReKey request that made this version, when its client named
    /// one (`id::request_digest` of region, caller and request id): a
    /// retry of that request, at any broker, finds it instead of adding
    /// another version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// What a key is. Envelope keys never leave the broker; the others are
/// objects a KMIP client created or registered, whose bytes the broker
/// holds (sealed) and may hand back to their in-region owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum ObjectKind {
    /// The broker's own key: envelope encryption, never exported.
    #[default]
    Envelope,
    /// An AES key of `bits` (128, 192 or 256).
    SymmetricKey {
        /// Key length in bits.
        bits: u16,
    },
    /// Opaque secret bytes, with the client's classification of them
    /// (KMIP Secret Data Type: 1 password, 2 seed).
    SecretData {
        /// The classification, returned as given.
        data_type: u32,
    },
    /// An RSA private key (PKCS#8 DER) of `bits`.
    PrivateKey {
        /// Modulus length in bits.
        bits: u16,
    },
    /// An RSA public key (PKCS#1 DER) of `bits`.
    PublicKey {
        /// Modulus length in bits.
        bits: u16,
    },
}

/// A client-defined attribute (KMIP `x-…` names, Operation Policy Name…),
/// kept as the front end encoded it and returned unchanged.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CustomAttribute {
    /// Attribute name.
    pub name: String,
    /// Encoded value (opaque to the core).
    #[serde(with = "hex::serde")]
    pub value: Vec<u8>,
}

/// A key as the store keeps it. Holds wrapped material only: the unwrapped
/// type (`KeyMaterial`) is not serializable, so it cannot end up here.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    /// Id.
    pub id: KeyId,
    /// Operator-chosen name (not unique).
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Free text.
    pub description: String,
    /// Fixed at creation to the broker's region; never changes.
    pub home_region: Region,
    /// Lifecycle state.
    pub state: KeyState,
    /// Set by Revoke.
    pub revocation_reason: Option<RevocationReason>,
    /// Set by Revoke.
    pub revocation_message: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// Scheduled destruction time (unix seconds), if any.
    pub destroy_after: Option<i64>,
    /// Version used for new encryptions.
    pub primary_version: u32,
    /// All versions, oldest first; `versions[i].version == i + 1`.
    pub versions: Vec<VersionRecord>,
    /// Who may do what with this key.
    pub grants: Vec<Grant>,
    /// SPIFFE id of the creating operator.
    pub created_by: String,
    /// Envelope key or managed object.
    #[serde(default)]
    pub kind: ObjectKind,
    /// True when the material may be exported (KMIP Get) to callers with
    /// an `export` grant: registered objects, and created ones that asked.
    #[serde(default)]
    pub exportable: bool,
    /// When it became active (unix seconds).
    #[serde(default)]
    pub activated_at: Option<i64>,
    /// When it was revoked (unix seconds).
    #[serde(default)]
    pub deactivated_at: Option<i64>,
    /// Client-defined attributes.
    #[serde(default)]
    pub custom_attributes: Vec<CustomAttribute>,
    /// Related objects: the other half of a key pair, the key that
    /// replaced this one or that this one replaced.
    #[serde(default)]
    pub links: Vec<ObjectLink>,
    /// Bumped by the store at every write of this record; a write based
    /// on an older read is refused as a conflict (two brokers over one
    /// database), never applied over a newer one.
    #[serde(default)]
    pub revision: u64,
    /// The store's authentication code of this record (HMAC under the
    /// region's record key, wrapped by the root of trust), hex; checked on
    /// every read, so an edit behind the broker's back is refused.
    #[serde(default)]
    pub mac: String,
}

/// How another object relates to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    /// This key pair's public key.
    PublicKey,
    /// This key pair's private key.
    PrivateKey,
    /// The key that replaced this one (ReKey).
    Replacement,
    /// The key this one replaced (ReKey).
    Replaced,
}

/// A link to another object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectLink {
    /// How it relates.
    pub kind: LinkKind,
    /// Its id.
    pub id: KeyId,
}

impl KeyRecord {
    /// A new key of `home_region` with its first version, active or
    /// pre-active, created by `created_by` at `now`; names, grants and
    /// attributes empty, an envelope key unless the caller says otherwise.
    pub fn new(
        id: KeyId,
        home_region: Region,
        version: VersionRecord,
        activate: bool,
        now: i64,
        created_by: String,
    ) -> Self {
        Self {
            id,
            name: String::new(),
            tenant: String::new(),
            description: String::new(),
            home_region,
            state: if activate {
                KeyState::Active
            } else {
                KeyState::PreActive
            },
            revocation_reason: None,
            revocation_message: String::new(),
            created_at: now,
            updated_at: now,
            destroy_after: None,
            primary_version: version.version,
            versions: vec![version],
            grants: Vec::new(),
            created_by,
            kind: ObjectKind::Envelope,
            exportable: false,
            activated_at: activate.then_some(now),
            deactivated_at: None,
            custom_attributes: Vec::new(),
            links: Vec::new(),
            revision: 0,
            mac: String::new(),
        }
    }

    /// The version record for `v`, if it exists.
    pub fn version(&self, v: u32) -> Option<&VersionRecord> {
        let i = usize::try_from(v).ok()?.checked_sub(1)?;
        self.versions.get(i)
    }
}

#[cfg(test)]
impl KeyRecord {
    /// A record for unit tests: one key, no versions, no grants.
    pub(crate) fn example(id: &str, home: &str, state: KeyState) -> Self {
        Self {
            id: KeyId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            name: id.into(),
            tenant: String::new(),
            description: String::new(),
            home_region: Region::parse(home).unwrap_or_else(|e| panic!("{e}")),
            state,
            revocation_reason: None,
            revocation_message: String::new(),
            created_at: 0,
            updated_at: 0,
            destroy_after: None,
            primary_version: 1,
            versions: Vec::new(),
            grants: Vec::new(),
            created_by: String::new(),
            kind: ObjectKind::Envelope,
            exportable: false,
            activated_at: None,
            deactivated_at: None,
            custom_attributes: Vec::new(),
            links: Vec::new(),
            revision: 0,
            mac: String::new(),
        }
    }
}
