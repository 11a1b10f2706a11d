//! Proto ↔ core conversions and the one mapping of core errors to `Status`.

use super::proto as pb;
use crate::broker::GrantRequest;
use crate::envelope::EncryptionContext;
use crate::error::Error;
use crate::keys::{KeyId, KeyRecord, KeyState, RevocationReason};
use crate::policy::{CryptoOp, Principal};
use std::collections::HashMap;
use tonic::Status;

/// The only place a core error becomes a gRPC status. Internal details are
/// logged here and replaced by a generic message.
pub fn to_status(e: Error) -> Status {
    let text = e.to_string();
    let reason = e.reason();
    let mut status = match e {
        Error::Invalid(_) => Status::invalid_argument(text),
        Error::NotFound(_) => Status::not_found(text),
        Error::Precondition(_) => Status::failed_precondition(text),
        Error::Refused(_) => {
            tracing::info!(reason = %text, "request refused");
            Status::permission_denied(text)
        }
        Error::Unavailable(_) => Status::unavailable(text),
        Error::Limit(_) => Status::resource_exhausted(text),
        Error::Internal(fault) => {
            tracing::error!(detail = %fault, "internal error");
            Status::internal(text)
        }
    };
    status.metadata_mut().insert(
        super::client::REASON_HEADER,
        tonic::metadata::MetadataValue::from_static(reason),
    );
    status
}

pub fn key_id(field: &str, s: &str) -> Result<KeyId, Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    KeyId::parse(s).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

pub fn context(field: &str, m: HashMap<String, String>) -> Result<EncryptionContext, Status> {
    EncryptionContext::new(m).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

pub fn op_from_pb(v: i32) -> Result<CryptoOp, Status> {
    match pb::Operation::try_from(v) {
        Ok(pb::Operation::Encrypt) => Ok(CryptoOp::Encrypt),
        Ok(pb::Operation::Decrypt) => Ok(CryptoOp::Decrypt),
        Ok(pb::Operation::GenerateDataKey) => Ok(CryptoOp::GenerateDataKey),
        Ok(pb::Operation::GenerateDataKeyWithoutPlaintext) => {
            Ok(CryptoOp::GenerateDataKeyWithoutPlaintext)
        }
        Ok(pb::Operation::ReEncrypt) => Ok(CryptoOp::ReEncrypt),
        Ok(pb::Operation::Export) => Ok(CryptoOp::Export),
        Ok(pb::Operation::Manage) => Ok(CryptoOp::Manage),
        Ok(pb::Operation::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "grant operation {v} is not a known operation"
        ))),
    }
}

pub fn op_to_pb(o: CryptoOp) -> pb::Operation {
    match o {
        CryptoOp::Encrypt => pb::Operation::Encrypt,
        CryptoOp::Decrypt => pb::Operation::Decrypt,
        CryptoOp::GenerateDataKey => pb::Operation::GenerateDataKey,
        CryptoOp::GenerateDataKeyWithoutPlaintext => pb::Operation::GenerateDataKeyWithoutPlaintext,
        CryptoOp::ReEncrypt => pb::Operation::ReEncrypt,
        CryptoOp::Export => pb::Operation::Export,
        CryptoOp::Manage => pb::Operation::Manage,
    }
}

pub fn grants(gs: Vec<pb::Grant>) -> Result<Vec<GrantRequest>, Status> {
    gs.into_iter()
        .map(|g| {
            let principal = Principal::parse(&g.principal)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let operations = g
                .operations
                .into_iter()
                .map(op_from_pb)
                .collect::<Result<_, _>>()?;
            Ok(GrantRequest {
                principal,
                operations,
            })
        })
        .collect()
}

pub fn state_from_pb(v: i32) -> Result<Option<KeyState>, Status> {
    Ok(match pb::KeyState::try_from(v) {
        Ok(pb::KeyState::Unspecified) => None,
        Ok(pb::KeyState::PreActive) => Some(KeyState::PreActive),
        Ok(pb::KeyState::Active) => Some(KeyState::Active),
        Ok(pb::KeyState::Deactivated) => Some(KeyState::Deactivated),
        Ok(pb::KeyState::Compromised) => Some(KeyState::Compromised),
        Ok(pb::KeyState::Destroyed) => Some(KeyState::Destroyed),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "state {v} is not a known key state"
            )))
        }
    })
}

fn state_to_pb(s: KeyState) -> pb::KeyState {
    match s {
        KeyState::PreActive => pb::KeyState::PreActive,
        KeyState::Active => pb::KeyState::Active,
        KeyState::Deactivated => pb::KeyState::Deactivated,
        KeyState::Compromised => pb::KeyState::Compromised,
        KeyState::Destroyed => pb::KeyState::Destroyed,
    }
}

pub fn reason_from_pb(v: i32) -> Result<RevocationReason, Status> {
    match pb::RevocationReason::try_from(v) {
        Ok(pb::RevocationReason::Unspecified) => Ok(RevocationReason::Unspecified),
        Ok(pb::RevocationReason::Superseded) => Ok(RevocationReason::Superseded),
        Ok(pb::RevocationReason::CessationOfOperation) => {
            Ok(RevocationReason::CessationOfOperation)
        }
        Ok(pb::RevocationReason::AffiliationChanged) => Ok(RevocationReason::AffiliationChanged),
        Ok(pb::RevocationReason::KeyCompromise) => Ok(RevocationReason::KeyCompromise),
        Err(_) => Err(Status::invalid_argument(format!(
            "revocation reason {v} is not known"
        ))),
    }
}

fn reason_to_pb(r: RevocationReason) -> pb::RevocationReason {
    match r {
        RevocationReason::Unspecified => pb::RevocationReason::Unspecified,
        RevocationReason::Superseded => pb::RevocationReason::Superseded,
        RevocationReason::CessationOfOperation => pb::RevocationReason::CessationOfOperation,
        RevocationReason::AffiliationChanged => pb::RevocationReason::AffiliationChanged,
        RevocationReason::KeyCompromise => pb::RevocationReason::KeyCompromise,
    }
}

pub fn metadata(r: &KeyRecord) -> pb::KeyMetadata {
    pb::KeyMetadata {
        key_id: r.id.to_string(),
        name: r.name.clone(),
        tenant: r.tenant.clone(),
        description: r.description.clone(),
        home_region: r.home_region.to_string(),
        state: state_to_pb(r.state) as i32,
        revocation_reason: r.revocation_reason.map_or(0, |x| reason_to_pb(x) as i32),
        revocation_message: r.revocation_message.clone(),
        created_at_unix: r.created_at,
        updated_at_unix: r.updated_at,
        destroy_after_unix: r.destroy_after.unwrap_or(0),
        primary_version: r.primary_version,
        versions: r
            .versions
            .iter()
            .map(|v| pb::KeyVersionInfo {
                version: v.version,
                created_at_unix: v.created_at,
                root_key_id: v
                    .wrapped
                    .as_ref()
                    .map(|w| w.root_key_id.clone())
                    .unwrap_or_default(),
                provenance_json: v
                    .provenance
                    .as_ref()
                    .and_then(|p| serde_json::to_string(p).ok())
                    .unwrap_or_default(),
            })
            .collect(),
        grants: r
            .grants
            .iter()
            .map(|g| pb::Grant {
                principal: g.principal.as_str().to_owned(),
                operations: g.operations.iter().map(|o| op_to_pb(*o) as i32).collect(),
            })
            .collect(),
        created_by: r.created_by.clone(),
    }
}
