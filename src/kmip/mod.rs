//! The KMIP front end: TTLV over mutual TLS (port 5696) for existing
//! software (PostgreSQL TDE, MongoDB, hypervisors, backup and storage
//! systems), on the same core as gRPC — one table of rules, one audit
//! chain, one region rule.
//!
//! `ttlv` is the codec, `message` the request/response envelope and its
//! versions (1.0–1.4, 2.0, 2.1), `attrs` the two shapes of attributes,
//! `ops` the operations, `server` the listener. Core errors map to KMIP
//! result reasons once, in [`failure`].

pub mod attrs;
pub mod bench;
pub mod client;
pub mod message;
mod ops;
pub mod server;
pub mod tag;
pub mod ttlv;

use crate::broker::{Broker, CallCtx, CipherError, Front};
use crate::error::{Error, Invalid, Limit, Precondition};
use crate::policy::{Operation, Refusal};
use crate::region::{Caller, IdentityError};
use message::{ResponseItem, Version};
use std::sync::Arc;
use tag::reason;
use ttlv::{Item, Limits};

/// A failed batch item: a Result Reason and the one-sentence Result
/// Message every failed item carries (some clients crash without it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Result Reason.
    pub reason: u32,
    /// Result Message.
    pub message: String,
}

impl Failure {
    /// A failure.
    pub fn new(reason: u32, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The core's error as a KMIP result. Only reasons KMIP 1.0 defines are
/// used, so every client version can read them; the message is the
/// core's sentence, as gRPC gives it.
pub fn failure(e: &Error) -> Failure {
    let r = match e {
        Error::Refused(_) => reason::PERMISSION_DENIED,
        Error::Invalid(Invalid::Cipher(CipherError::Failed)) => reason::CRYPTOGRAPHIC_FAILURE,
        Error::Invalid(Invalid::Unsupported(_)) => reason::OPERATION_NOT_SUPPORTED,
        Error::Invalid(_) => reason::INVALID_FIELD,
        Error::NotFound(_) => reason::ITEM_NOT_FOUND,
        Error::Precondition(Precondition::NotExportable(_) | Precondition::EnvelopeKey(_)) => {
            reason::PERMISSION_DENIED
        }
        Error::Precondition(_) => reason::ILLEGAL_OPERATION,
        Error::Limit(Limit::Plaintext { .. } | Limit::Envelope) => reason::INVALID_FIELD,
        _ => reason::GENERAL_FAILURE,
    };
    Failure::new(r, e.to_string())
}

fn walk_unknown(item: &Item) -> Option<u32> {
    if item.tag > tag::LAST_DEFINED {
        return Some(item.tag);
    }
    item.children().iter().find_map(walk_unknown)
}

/// Answers one request message (its bytes, framing already checked) for
/// the connection's caller. Blocking: it calls the core.
pub fn handle(
    broker: &Broker,
    caller: Result<Arc<Caller>, IdentityError>,
    bytes: &[u8],
    limits: &Limits,
) -> Vec<u8> {
    let now = broker.now_unix();
    let one_failure = |version: Version, f: Failure| {
        message::response(
            version,
            now,
            vec![ResponseItem {
                operation: None,
                id: None,
                result: Err(f),
            }],
        )
        .encode()
    };
    let msg = match ttlv::decode(bytes, limits) {
        Ok(m) => m,
        Err(e) => {
            return one_failure(
                Version::V1_0,
                Failure::new(reason::INVALID_MESSAGE, e.to_string()),
            )
        }
    };
    if let Some(t) = walk_unknown(&msg) {
        return one_failure(
            Version::V1_0,
            Failure::new(
                reason::INVALID_MESSAGE,
                format!("the message holds an unknown tag {t:06X}"),
            ),
        );
    }
    let req = match message::parse_request(msg) {
        Ok(r) => r,
        Err((v, f)) => return one_failure(v, f),
    };
    let request_id = crate::broker::new_request_id();
    let mut session = ops::Session {
        broker,
        version: req.version,
        placeholder: None,
    };
    let mut out = Vec::new();
    for (i, item) in req.items.into_iter().enumerate() {
        let name = tag::op::name(item.operation);
        let result = match &caller {
            Ok(c) => {
                let cx = CallCtx {
                    caller: Arc::clone(c),
                    request_id: format!("{request_id}-{i}"),
                    front: Front::Kmip(name),
                };
                session.run(&cx, item.operation, &item.payload)
            }
            Err(why) => {
                let refusal = Refusal::NoIdentity(why.clone());
                broker.audit_unauthenticated(
                    &request_id,
                    Operation::GetInfo,
                    &refusal,
                    Front::Kmip(name),
                );
                let mut m = refusal.to_string();
                if req.credential {
                    m.push_str("; a KMIP Credential is not an identity here: the caller is the SPIFFE id of its client certificate");
                }
                Err(Failure::new(reason::AUTHENTICATION_NOT_SUCCESSFUL, m))
            }
        };
        let failed = result.is_err();
        out.push(ResponseItem {
            operation: Some(item.operation),
            id: item.id,
            result,
        });
        if failed && !req.continue_on_error {
            break;
        }
    }
    let encoded = message::response(req.version, now, out).encode();
    match req.max_response_size {
        Some(max) if encoded.len() > max => one_failure(
            req.version,
            Failure::new(
                reason::RESPONSE_TOO_LARGE,
                format!("the response is {} bytes, more than the Maximum Response Size of {max} the request allows", encoded.len()),
            ),
        ),
        _ => encoded,
    }
}
