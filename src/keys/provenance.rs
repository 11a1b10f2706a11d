//! Key provenance: who made a key version, where, with what, signed by the
//! root of trust at creation so an auditor can check it offline.

use serde::{Deserialize, Serialize};

/// The signed origin of one key version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// Key id.
    pub key_id: String,
    /// Version.
    pub version: u32,
    /// Region of the broker (the key's home region).
    pub region: String,
    /// Broker instance.
    pub broker_id: String,
    /// SPIFFE id of the operator who asked for it.
    pub creator: String,
    /// Unix seconds.
    pub created_at_unix: i64,
    /// Root of trust kind (`pkcs11`, `software`, ...).
    pub root_kind: String,
    /// Device: model, serial, token label.
    pub root_description: String,
    /// Root key id (with check value) that wrapped the material.
    pub root_key_id: String,
    /// How the material was made and wrapped.
    pub mechanism: String,
    /// Sequence number of the audit record of its creation.
    pub audit_seq: u64,
    /// ECDSA P-256 over SHA-256 of [`Provenance::canonical`], `r || s`, hex.
    pub signature: String,
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

impl Provenance {
    /// The signed bytes: every field but the signature, length-prefixed.
    pub fn canonical(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(512);
        put(&mut o, b"sovkms/v1/key-provenance");
        put(&mut o, self.key_id.as_bytes());
        put(&mut o, &self.version.to_be_bytes());
        put(&mut o, self.region.as_bytes());
        put(&mut o, self.broker_id.as_bytes());
        put(&mut o, self.creator.as_bytes());
        put(&mut o, &self.created_at_unix.to_be_bytes());
        put(&mut o, self.root_kind.as_bytes());
        put(&mut o, self.root_description.as_bytes());
        put(&mut o, self.root_key_id.as_bytes());
        put(&mut o, self.mechanism.as_bytes());
        put(&mut o, &self.audit_seq.to_be_bytes());
        o
    }

    /// Checks the signature with the root's public key (uncompressed point).
    pub fn verify(&self, public_key: &[u8]) -> Result<(), ProvenanceError> {
        use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let sig = hex::decode(&self.signature).map_err(|_| ProvenanceError::NotHex)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
            .verify(&self.canonical(), &sig)
            .map_err(|_| ProvenanceError::Signature {
                key: self.key_id.clone(),
                version: self.version,
            })
    }
}

/// A provenance record that does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProvenanceError {
    /// The signature field is not hex.
    #[error("provenance signature is not hex")]
    NotHex,
    /// The signature does not match the record and key.
    #[error("provenance of {key} version {version} does not verify")]
    Signature {
        /// Key id.
        key: String,
        /// Version.
        version: u32,
    },
}
