//! The core's error: typed facts, one sentence each, no protocol codes.
//!
//! Every variant's `Display` is what the caller is told (never a secret,
//! never an internal detail). Each front end maps the top-level variant to
//! its protocol once (gRPC: `api::convert::to_status`). [`Fault`] carries
//! the internal detail for the log only.

use crate::envelope::{FormatError, OpenError};
use crate::id::KeyId;
use crate::keys::KeyState;
use crate::policy::breakglass::BreakGlassInvalid;
use crate::policy::{GrantError, Operation, Refusal};
use crate::region::Region;

/// Result alias of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, from the caller's point of view.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Identity, role, region or grant rules said no.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The request or ciphertext is malformed.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The named thing does not exist here.
    #[error(transparent)]
    NotFound(#[from] NotFound),
    /// The key, grant or ciphertext is in a state that does not allow this.
    #[error(transparent)]
    Precondition(#[from] Precondition),
    /// A size or count limit.
    #[error(transparent)]
    Limit(#[from] Limit),
    /// A component the request needs is down; retry later.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// A bug or corrupt state; the detail goes to the log only.
    #[error("internal error; the broker's log has the details")]
    Internal(#[from] Fault),
}

/// Malformed input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Invalid {
    /// Zero bytes.
    #[error("ciphertext is empty")]
    EmptyCiphertext,
    /// Not a well-formed envelope.
    #[error(transparent)]
    Ciphertext(#[from] FormatError),
    /// Altered, or another context.
    #[error(transparent)]
    Authentication(#[from] OpenError),
    /// The header names a version the key never had.
    #[error("ciphertext names version {version} of key {key}, which does not exist")]
    NoSuchVersion {
        /// Key.
        key: KeyId,
        /// Version named.
        version: u32,
    },
    /// A required text field is empty.
    #[error("{field} must not be empty")]
    Empty {
        /// Field name.
        field: &'static str,
    },
    /// A text field over its limit.
    #[error("{field} is longer than {max} characters")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Limit.
        max: usize,
    },
    /// A text field with control characters.
    #[error("{field} must not contain control characters")]
    ControlCharacters {
        /// Field name.
        field: &'static str,
    },
    /// A grant that could never take effect.
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// Locate page size over 1000.
    #[error("page size {0} is over the maximum of 1000")]
    PageSize(usize),
    /// Destroy window outside 1..=3650 days.
    #[error("a pending window of {0} days is not allowed; it must be between 1 and 3650 days")]
    DestroyWindow(u32),
    /// A break-glass request the rules never allow.
    #[error(transparent)]
    BreakGlass(#[from] BreakGlassInvalid),
    /// An aggregate window that is not whole past UTC days.
    #[error("aggregates cover whole past UTC days: from and to must be UTC midnights, and to no later than the start of today")]
    AggregateWindow,
    /// TPM quote nonce length.
    #[error("a quote nonce must be 8 to 64 bytes long; this one is {0}")]
    NonceLength(usize),
    /// Cipher parameters of a managed object's Encrypt/Decrypt.
    #[error(transparent)]
    Cipher(#[from] CipherError),
    /// Registered key bytes that do not match the declared length.
    #[error("the key material is {got} bytes long; an AES key of {bits} bits is {} bytes", bits / 8)]
    MaterialLength {
        /// Bytes given.
        got: usize,
        /// Declared length in bits.
        bits: u16,
    },
    /// An AES key length other than 128, 192 or 256 bits.
    #[error("an AES key of {0} bits is not supported; use 128, 192 or 256")]
    AesLength(u32),
    /// A front end's operation the broker does not offer.
    #[error("{0} is not supported by this server")]
    Unsupported(String),
    /// An RSA modulus length other than 2048, 3072 or 4096 bits.
    #[error("an RSA key of {0} bits is not supported; use 2048, 3072 or 4096")]
    RsaLength(u32),
    /// Secret data of no bytes or too many.
    #[error("secret data must be 1 to {max} bytes long; this is {got}")]
    SecretLength {
        /// Bytes given.
        got: usize,
        /// Limit.
        max: usize,
    },
}

/// Parameters or data the cipher cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CipherError {
    /// IV of the wrong length.
    #[error("{mode} needs an IV of {want} bytes; this one is {got}")]
    IvLength {
        /// Mode name.
        mode: &'static str,
        /// Needed.
        want: usize,
        /// Given.
        got: usize,
    },
    /// Decrypt without an IV.
    #[error("decrypting with {0} needs the IV used to encrypt")]
    MissingIv(&'static str),
    /// Tag length other than 16.
    #[error("AES-GCM here uses 16-byte tags; {0} bytes were asked for")]
    TagLength(usize),
    /// Decrypt with AES-GCM without a tag of the right length.
    #[error("decrypting with AES-GCM needs the 16-byte authentication tag; {0} bytes were given")]
    MissingTag(usize),
    /// CBC without padding over a partial block.
    #[error("AES-CBC without padding takes whole 16-byte blocks; the data is {0} bytes")]
    PartialBlock(usize),
    /// AES key wrap without padding over bytes it cannot take.
    #[error("AES key wrap without padding (RFC 3394) takes 16 bytes or more in multiples of 8; this key is {0} bytes: use AES key wrap with padding (RFC 5649)")]
    WrapLength(usize),
    /// Authentication or padding failed on decrypt.
    #[error("decryption failed: the data, IV, tag, additional data or key do not match")]
    Failed,
}

/// Something named that does not exist here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NotFound {
    /// A key.
    #[error("key {key} not found in region {region}")]
    Key {
        /// Id.
        key: KeyId,
        /// This broker's region.
        region: Region,
    },
    /// A break-glass grant.
    #[error("break-glass grant {0} not found")]
    BreakGlass(String),
}

/// A state that does not allow the request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Precondition {
    /// The key's lifecycle state does not allow this cryptographic operation.
    #[error("{}", key_state_sentence(key, *state, *op))]
    KeyState {
        /// Key.
        key: KeyId,
        /// Its state.
        state: KeyState,
        /// What was asked.
        op: Operation,
    },
    /// Scheduled keys are unusable until the schedule is cancelled.
    #[error("key {key} is scheduled for destruction at {} and cannot be used; an operator can cancel the destruction", rfc3339(*at))]
    ScheduledForDestruction {
        /// Key.
        key: KeyId,
        /// Unix seconds.
        at: i64,
    },
    /// A destroyed key cannot change.
    #[error("key {0} is destroyed")]
    KeyDestroyed(KeyId),
    /// The version's material was erased.
    #[error("version {version} of key {key} is destroyed and has no key material")]
    VersionDestroyed {
        /// Key.
        key: KeyId,
        /// Version.
        version: u32,
    },
    /// Activate on a key that is not pre-active.
    #[error("key {key} is {}; only a pre-active key can be activated", state.as_str())]
    NotPreActive {
        /// Key.
        key: KeyId,
        /// Its state.
        state: KeyState,
    },
    /// Activate on a key scheduled for destruction.
    #[error("key {0} is scheduled for destruction and cannot be activated; cancel the destruction first")]
    ActivateScheduled(KeyId),
    /// Destroy twice.
    #[error("key {key} is already scheduled for destruction at {}", rfc3339(*at))]
    AlreadyScheduled {
        /// Key.
        key: KeyId,
        /// Unix seconds.
        at: i64,
    },
    /// Cancel without a schedule.
    #[error("key {0} is not scheduled for destruction")]
    NotScheduled(KeyId),
    /// Rekey of a key that is not active.
    #[error("key {key} is {}; only an active key can be rekeyed", state.as_str())]
    NotRekeyable {
        /// Key.
        key: KeyId,
        /// Its state.
        state: KeyState,
    },
    /// Rekey of a key scheduled for destruction.
    #[error("key {0} is scheduled for destruction and cannot be rekeyed; an operator can cancel the destruction first")]
    RekeyScheduled(KeyId),
    /// A ciphertext of another region.
    #[error("ciphertext belongs to region {data}; this broker serves region {broker} (send it to the {data} broker)")]
    ForeignCiphertext {
        /// The region in the header.
        data: Region,
        /// This broker's.
        broker: Region,
    },
    /// A break-glass grant in the wrong state.
    #[error("break-glass grant {id} is {state}")]
    BreakGlassState {
        /// Grant.
        id: String,
        /// Its state.
        state: &'static str,
    },
    /// The same operator approving twice.
    #[error("{principal} already approved break-glass grant {id}")]
    AlreadyApproved {
        /// Approver.
        principal: String,
        /// Grant.
        id: String,
    },
    /// Attest without `[tpm]`.
    #[error("this broker has no TPM configured ([tpm] in its config)")]
    NoTpm,
    /// Export of a key whose policy keeps it inside.
    #[error("key {0} was not created exportable; its material never leaves the broker")]
    NotExportable(KeyId),
    /// Export of, or caller-parameter cryptography with, a broker envelope key.
    #[error("key {0} is a broker envelope key: its material never leaves the broker and it encrypts only in the broker's envelope format")]
    EnvelopeKey(KeyId),
    /// Envelope operations with a managed object.
    #[error("key {0} is a key created or registered over KMIP; envelope operations need a broker envelope key")]
    ManagedObject(KeyId),
    /// Cryptography with an object that is not an AES key.
    #[error("object {0} is not an AES key (secret data or an RSA key); it can only be fetched")]
    NotAKey(KeyId),
    /// A second live object with the same name.
    #[error(
        "an object named {0:?} already exists in this region; names of KMIP objects are unique"
    )]
    NameInUse(String),
}

fn key_state_sentence(key: &KeyId, state: KeyState, op: Operation) -> String {
    let action = op.action();
    match state {
        KeyState::PreActive => format!(
            "key {key} is pre-active and cannot {action}; an operator must activate it first"
        ),
        KeyState::Compromised => format!(
            "key {key} is compromised and cannot {action}; use ReEncrypt to move data under another key"
        ),
        KeyState::Deactivated => {
            format!("key {key} is deactivated and cannot {action}; it can only decrypt")
        }
        KeyState::Destroyed => format!("key {key} is destroyed and cannot {action}"),
        KeyState::Active => format!("key {key} is active and cannot {action}"),
    }
}

/// Unix seconds as RFC 3339 UTC (the audit log's rendering).
fn rfc3339(unix: i64) -> String {
    crate::audit::rfc3339(u64::try_from(unix).unwrap_or(0).saturating_mul(1000))
}

/// A limit the request exceeds.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Limit {
    /// Encrypt's plaintext limit.
    #[error("plaintext is {len} bytes; this broker accepts at most {max} per request (use GenerateDataKey for larger data)")]
    Plaintext {
        /// Given.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// Grants per key.
    #[error("a key holds at most {max} grants; the request names {len}")]
    Grants {
        /// Given.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Versions per key.
    #[error("key {0} holds as many versions as a key can")]
    Versions(KeyId),
    /// One identity's request rate.
    #[error("{principal} exceeded its limit of {per_second} requests per second; retry later")]
    CallerRate {
        /// The caller's SPIFFE id.
        principal: String,
        /// The limit.
        per_second: u32,
    },
    /// All identities of one region together.
    #[error("callers of region {region} exceeded their shared limit of {per_second} requests per second at this broker; retry later")]
    RegionRate {
        /// The callers' region.
        region: Region,
        /// The limit.
        per_second: u32,
    },
    /// Larger than one envelope holds.
    #[error("plaintext is too large for one envelope")]
    Envelope,
}

/// A component that is down. The sentence names it and nothing more: the
/// device's own words go to the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Unavailable {
    /// The key store.
    #[error("the key store is unavailable; retry later")]
    Store,
    /// The HSM or TPM.
    #[error("the root of trust is unavailable; retry later")]
    RootOfTrust,
    /// The audit log cannot take the request's record.
    #[error(
        "the audit log cannot be written; the request was not carried out and nothing was released"
    )]
    AuditWrite,
    /// The audit log cannot be read.
    #[error("the audit log cannot be read; retry later")]
    AuditRead,
    /// The random number generator.
    #[error("the random number generator failed; retry later")]
    Random,
    /// The TPM refused or failed a quote.
    #[error("the TPM could not produce a quote; retry later")]
    Tpm,
    /// Another broker of the region changed the key at the same moment.
    #[error("key {0} was changed by another broker at the same time; nothing was changed, retry")]
    Conflict(KeyId),
}

/// An internal failure: logged with its source, told as "internal error".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Fault {
    /// The store returned something inconsistent.
    #[error("store: {0}")]
    Store(#[source] crate::store::StoreError),
    /// Wrapped material failed its check, or names an unknown root key.
    #[error("root of trust: {0}")]
    Root(#[source] crate::root::RootError),
    /// The crypto library refused a key derivation.
    #[error("key derivation failed")]
    Derive,
    /// An audit record that does not parse.
    #[error("audit log record does not parse: {0}")]
    AuditRecord(#[source] serde_json::Error),
    /// A handler task died.
    #[error("handler task failed: {0}")]
    Task(String),
    /// A managed object's sealed bytes do not open (altered store?).
    #[error("managed object: {0}")]
    Object(String),
}

impl Error {
    /// The gRPC status code name this error maps to (kept in audit records).
    pub fn code_name(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::Precondition(_) => "FAILED_PRECONDITION",
            Self::Refused(_) => "PERMISSION_DENIED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Limit(_) => "RESOURCE_EXHAUSTED",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// Why a refused request was refused, as a metric label; None for
    /// failures (the system, not the request).
    pub fn refusal_reason(&self) -> Option<&'static str> {
        use crate::policy::Refusal as R;
        Some(match self {
            Self::Refused(R::NoIdentity(_) | R::TrustDomain { .. }) => "identity",
            Self::Refused(R::Role { .. }) => "role",
            Self::Refused(R::OutsideRegion { .. } | R::Residency { .. }) => "region",
            Self::Refused(_) => "grant",
            Self::Precondition(_) => "state",
            Self::Invalid(_) => "invalid",
            Self::NotFound(_) => "not_found",
            Self::Limit(_) => "limit",
            Self::Unavailable(_) | Self::Internal(_) => return None,
        })
    }

    /// Why the request did not succeed, as a word a client can match on
    /// (the `x-sovkms-reason` of a gRPC error): a refusal's reason, else
    /// the failing component.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unavailable(Unavailable::Store) => "store_unavailable",
            Self::Unavailable(Unavailable::RootOfTrust) => "root_unavailable",
            Self::Unavailable(Unavailable::AuditWrite | Unavailable::AuditRead) => {
                "audit_unavailable"
            }
            Self::Unavailable(Unavailable::Conflict(_)) => "conflict",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
            other => other.refusal_reason().unwrap_or("internal"),
        }
    }

    /// Refused (the rules or the input) or failed (the system).
    pub fn outcome(&self) -> crate::audit::Outcome {
        match self {
            Self::Unavailable(_) | Self::Internal(_) => crate::audit::Outcome::Failed,
            _ => crate::audit::Outcome::Refused,
        }
    }
}

/// Input errors of lower layers become `Error::Invalid` in one step.
macro_rules! invalid_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self::Invalid(e.into())
            }
        }
    )*};
}
invalid_from!(
    FormatError,
    OpenError,
    GrantError,
    BreakGlassInvalid,
    CipherError
);
