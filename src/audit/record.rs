//! One audit record, its canonical encoding and its hash.
//!
//! The hash chains records: `hash = SHA-256("sovkms/v1/audit-record" ||
//! canonical(record without hash))`, and `canonical` starts with the previous
//! record's hash. Every field is length-prefixed in a fixed order, so a
//! change to any field, a deleted, inserted or reordered record changes what
//! the next record's `prev_hash` must be.

use ring::digest;
use serde::{Deserialize, Serialize};

/// Hash of "no previous record".
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A request, allowed or refused.
    Request,
    /// A signed checkpoint of the chain head.
    Checkpoint,
    /// The broker started (with its root of trust).
    Start,
    /// A readiness probe: the log took a durable record (written only when
    /// no other durable record was synced recently).
    Probe,
}

/// A signed statement about the chain head (the record before this one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// Sequence number of the head it signs.
    pub head_seq: u64,
    /// Hash of that record.
    pub head_hash: String,
    /// Root key id of the signer (informational; the auditor brings the public key).
    pub signer: String,
    /// ECDSA P-256 over SHA-256 of [`checkpoint_message`], `r || s`, hex.
    pub signature: String,
}

/// One line of the audit log. Never holds plaintext, key material, PINs or
/// the encryption context itself (only its SHA-256).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1, 2, 3, ... without gaps.
    pub seq: u64,
    /// Milliseconds since the unix epoch.
    pub time_unix_ms: u64,
    /// Region of the broker.
    pub region: String,
    /// Broker instance.
    pub broker_id: String,
    /// Record kind.
    pub kind: Kind,
    /// Request id (random per request).
    pub request_id: String,
    /// Caller's SPIFFE id, or "" when the connection carried none.
    pub caller: String,
    /// Caller's trust domain, region, role and name (empty when unknown).
    pub caller_trust_domain: String,
    /// Caller's region.
    pub caller_region: String,
    /// Caller's role.
    pub caller_role: String,
    /// Caller's name.
    pub caller_name: String,
    /// Operation (`decrypt`, `create-key`, ...).
    pub operation: String,
    /// Key id, if the request named or reached one.
    pub key_id: String,
    /// Key version, 0 if none.
    pub key_version: u32,
    /// SHA-256 (hex) of the canonical encryption context, if any.
    pub context_sha256: String,
    /// `allowed`, `refused` or `failed`.
    pub outcome: String,
    /// gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub code: String,
    /// Refusal or failure reason, as told to the caller.
    pub reason: String,
    /// Checkpoint body (checkpoint records only).
    pub checkpoint: Option<CheckpointBody>,
    /// The front end the request came through: `kmip`, or empty for the
    /// gRPC API (and the broker's own records). Hashed only when set, so
    /// records written before the field existed keep their hashes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Hash of the previous record (hex).
    pub prev_hash: String,
    /// Hash of this record (hex).
    pub hash: String,
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u64).to_be_bytes());
    out.extend_from_slice(field);
}

impl Record {
    /// Canonical encoding of everything but `hash`.
    pub fn canonical(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(512);
        put(&mut o, b"sovkms/v1/audit-record");
        put(&mut o, self.prev_hash.as_bytes());
        put(&mut o, &self.seq.to_be_bytes());
        put(&mut o, &self.time_unix_ms.to_be_bytes());
        put(&mut o, self.region.as_bytes());
        put(&mut o, self.broker_id.as_bytes());
        let kind: &[u8] = match self.kind {
            Kind::Request => b"request",
            Kind::Checkpoint => b"checkpoint",
            Kind::Start => b"start",
            Kind::Probe => b"probe",
        };
        put(&mut o, kind);
        for f in [
            &self.request_id,
            &self.caller,
            &self.caller_trust_domain,
            &self.caller_region,
            &self.caller_role,
            &self.caller_name,
            &self.operation,
            &self.key_id,
        ] {
            put(&mut o, f.as_bytes());
        }
        put(&mut o, &self.key_version.to_be_bytes());
        for f in [
            &self.context_sha256,
            &self.outcome,
            &self.code,
            &self.reason,
        ] {
            put(&mut o, f.as_bytes());
        }
        match &self.checkpoint {
            None => put(&mut o, b""),
            Some(c) => {
                put(&mut o, b"checkpoint");
                put(&mut o, &c.head_seq.to_be_bytes());
                put(&mut o, c.head_hash.as_bytes());
                put(&mut o, c.signer.as_bytes());
                put(&mut o, c.signature.as_bytes());
            }
        }
        if !self.protocol.is_empty() {
            put(&mut o, b"protocol");
            put(&mut o, self.protocol.as_bytes());
        }
        o
    }

    /// The hash this record must carry.
    pub fn compute_hash(&self) -> String {
        crate::hex_lower(digest::digest(&digest::SHA256, &self.canonical()).as_ref())
    }
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(
    head_seq: u64,
    head_hash: &str,
    time_unix_ms: u64,
    region: &str,
    broker_id: &str,
) -> Vec<u8> {
    let mut o = Vec::new();
    put(&mut o, b"sovkms/v1/audit-checkpoint");
    put(&mut o, &head_seq.to_be_bytes());
    put(&mut o, head_hash.as_bytes());
    put(&mut o, &time_unix_ms.to_be_bytes());
    put(&mut o, region.as_bytes());
    put(&mut o, broker_id.as_bytes());
    o
}
