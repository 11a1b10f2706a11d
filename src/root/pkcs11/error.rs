//! The one place where PKCS#11 return codes become our error kinds, keeping
//! "device gone, reconnect", "login failed", "key gone" and "blob corrupt" apart.

use crate::root::{RootError, RootErrorKind};
use cryptoki::error::{Error as CkError, RvError};

/// What a native error means for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// The device, token or session is gone: drop the connection, reconnect later.
    Gone,
    /// Login failed (wrong, locked or expired PIN). Not retried automatically.
    Auth,
    /// The operation's input was refused (e.g. a wrapped blob that does not
    /// unwrap). Ambiguous on some tokens: callers probe the token to tell.
    Input,
    /// Misconfiguration: mechanism, template or key attribute problems.
    Config,
    /// Temporarily out of sessions or memory; retry.
    Busy,
}

pub(super) fn classify(e: &CkError) -> Class {
    let CkError::Pkcs11(rv, _) = e else {
        return match e {
            CkError::LibraryLoading(_)
            | CkError::MissingSymbol(_)
            | CkError::NullFunctionPointer => Class::Config,
            _ => Class::Gone,
        };
    };
    use RvError::*;
    match rv {
        DeviceRemoved
        | DeviceError
        | TokenNotPresent
        | TokenNotRecognized
        | SessionHandleInvalid
        | SessionClosed
        | SlotIdInvalid
        | CryptokiNotInitialized
        | UserNotLoggedIn
        | KeyHandleInvalid
        | ObjectHandleInvalid
        | WrappingKeyHandleInvalid
        | UnwrappingKeyHandleInvalid
        | FunctionFailed => Class::Gone,
        PinIncorrect
        | PinLocked
        | PinExpired
        | PinInvalid
        | PinLenRange
        | UserPinNotInitialized => Class::Auth,
        WrappedKeyInvalid
        | WrappedKeyLenRange
        | EncryptedDataInvalid
        | EncryptedDataLenRange
        | DataInvalid
        | DataLenRange
        | GeneralError => Class::Input,
        SessionCount | DeviceMemory | HostMemory => Class::Busy,
        _ => Class::Config,
    }
}

/// `CKR_PIN_INCORRECT`-style name of a native error.
pub(super) fn ckr_name(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, _) => {
            let mut out = String::from("CKR");
            for ch in format!("{rv:?}").chars() {
                if ch.is_ascii_uppercase() {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
        other => other.to_string(),
    }
}

/// Maps a native error to our error, naming the operation and the token.
pub(super) fn map(e: &CkError, what: &str, token: &str) -> RootError {
    let name = ckr_name(e);
    match classify(e) {
        Class::Gone => RootError::new(
            RootErrorKind::Unavailable,
            format!("HSM token '{token}' is unavailable ({what}: {name}); the broker reconnects when it returns"),
        ),
        Class::Auth => RootError::new(
            RootErrorKind::Auth,
            format!("HSM login to token '{token}' failed ({name}); check the PIN source in the config"),
        ),
        Class::Input => RootError::new(RootErrorKind::Integrity, format!("HSM refused the input of {what} ({name})")),
        Class::Config => RootError::new(RootErrorKind::Config, format!("HSM token '{token}' refused {what} ({name})")),
        Class::Busy => RootError::new(
            RootErrorKind::Unavailable,
            format!("HSM token '{token}' is busy ({what}: {name}); retry"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn names_and_classes() {
        let e = CkError::Pkcs11(RvError::PinIncorrect, Function::Login);
        assert_eq!(ckr_name(&e), "CKR_PIN_INCORRECT");
        assert_eq!(classify(&e), Class::Auth);
        let e = CkError::Pkcs11(RvError::DeviceRemoved, Function::WrapKey);
        assert_eq!(classify(&e), Class::Gone);
        assert_eq!(map(&e, "wrap", "t").kind, RootErrorKind::Unavailable);
        assert!(map(&e, "wrap", "t").message.contains("CKR_DEVICE_REMOVED"));
    }
}
