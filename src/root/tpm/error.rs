//! TPM response codes → sovkms errors, in one place.

use crate::root::{RootError, RootErrorKind};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind as K;
use tss_esapi::Error;

pub(super) fn unavailable(msg: String) -> RootError {
    RootError::new(RootErrorKind::Unavailable, msg)
}

/// Maps the failure of TPM command `what`. The messages name the command
/// and the TPM's reason; they never contain a secret (the TPM never echoes
/// sensitive data in a response code).
pub(super) fn tpm_err(what: &str, e: Error) -> RootError {
    let kind = match e {
        Error::Tss2Error(rc) => rc.kind(),
        Error::WrapperError(w) => {
            return RootError::new(
                RootErrorKind::Config,
                format!("{what}: refused by the TPM library: {w}"),
            )
        }
    };
    match kind {
        Some(K::PolicyFail) | Some(K::Policy) | Some(K::Pcr) | Some(K::PcrChanged) => {
            RootError::new(
                RootErrorKind::Auth,
                format!(
                    "{what}: the TPM's policy check failed (the PCR values or the auth \
                     value differ from those the secret was sealed to) [{e}]"
                ),
            )
        }
        Some(K::AuthFail) | Some(K::BadAuth) => RootError::new(
            RootErrorKind::Auth,
            format!("{what}: wrong TPM auth value [{e}]"),
        ),
        Some(K::Lockout) => RootError::new(
            RootErrorKind::Auth,
            format!(
                "{what}: the TPM is in dictionary-attack lockout; wait for it to recover \
                 or have the TPM owner reset it (tpm2_dictionarylockout -c) [{e}]"
            ),
        ),
        Some(K::Integrity) | Some(K::Binding) | Some(K::Key) | Some(K::Size) => RootError::new(
            RootErrorKind::Integrity,
            format!(
                "{what}: the TPM's integrity check failed: the blob was sealed by another \
                 TPM (or under another owner seed), or it was altered [{e}]"
            ),
        ),
        Some(K::ObjectMemory)
        | Some(K::SessionMemory)
        | Some(K::Memory)
        | Some(K::ObjectHandles)
        | Some(K::SessionHandles) => unavailable(format!(
            "{what}: the TPM is out of object/session slots (handles leaked by another \
             process? on a TPM without a resource manager, flush them with \
             tpm2_flushcontext -t -s) [{e}]"
        )),
        _ => unavailable(format!("{what}: {e}")),
    }
}
