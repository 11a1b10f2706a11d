//! The core's error: a kind that maps to one gRPC code, and a message that
//! is safe to show the caller (never a secret, never an internal detail).

use crate::region::Refusal;

/// Result alias of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, from the caller's point of view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (bad id, bad ciphertext, limits of shape).
    #[error("{0}")]
    InvalidArgument(String),
    /// The named key does not exist in this broker.
    #[error("{0}")]
    NotFound(String),
    /// The key or ciphertext is in a state that does not allow this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Identity, role, grant or region rule refused the call.
    #[error("{0}")]
    PermissionDenied(Refusal),
    /// The root of trust or the store is unavailable; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// A size or count limit was exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A bug or corrupt state; details are in the broker's log only.
    #[error("internal error")]
    Internal(String),
    /// Internal: the fast path would have blocked; retried off the runtime,
    /// never shown to a caller.
    #[error("internal error")]
    WouldBlock,
}

impl Error {
    /// Shorthand for `InvalidArgument`.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }

    /// Shorthand for `FailedPrecondition`.
    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        Self::PermissionDenied(r)
    }
}

impl Error {
    /// The gRPC status code name this error maps to.
    pub fn code_name(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::NotFound(_) => "NOT_FOUND",
            Self::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Self::Internal(_) | Self::WouldBlock => "INTERNAL",
        }
    }

    /// Refused (the rules or the input) or failed (the system).
    pub fn outcome(&self) -> crate::audit::Outcome {
        match self {
            Self::Unavailable(_) | Self::Internal(_) | Self::WouldBlock => {
                crate::audit::Outcome::Failed
            }
            _ => crate::audit::Outcome::Refused,
        }
    }
}
