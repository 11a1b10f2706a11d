//! Where an HSM PIN comes from: a file, a variable, or sealed to the TPM.
//! Above both backends, so that neither imports the other.

use super::{RootError, RootErrorKind};
use crate::secret::Pin;
use std::path::PathBuf;

/// Where the HSM user PIN comes from. Never the command line. Holds only
/// the PIN's location (a path or a variable name), so its derived `Debug`
/// cannot print the PIN; the PIN itself is read into a zeroizing `Pin`.
#[derive(Clone, Debug)]
pub enum PinSource {
    /// A file (mode 0600), first line.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// Sealed to this host's TPM (`sovkms tpm seal-pin`): only this host,
    /// in the boot state it was sealed to, can log in to the HSM.
    Tpm {
        /// The sealed blob.
        sealed: PathBuf,
        /// How to reach the TPM.
        tpm: Box<super::tpm::TpmSettings>,
    },
}

impl PinSource {
    /// Reads (or unseals) the PIN.
    pub fn read(&self) -> Result<Pin, RootError> {
        let cfg = |m: String| RootError::new(RootErrorKind::Config, m);
        match self {
            Self::File(p) => std::fs::read_to_string(p)
                .map(Pin::new)
                .map_err(|e| cfg(format!("cannot read HSM PIN file {}: {e}", p.display()))),
            Self::Env(v) => std::env::var(v)
                .map(Pin::new)
                .map_err(|_| cfg(format!("environment variable {v} (HSM PIN) is not set"))),
            Self::Tpm { sealed, tpm } => super::tpm::unseal_pin(tpm, sealed).map_err(|e| {
                RootError::new(e.kind, format!("HSM PIN sealed to the TPM: {}", e.message))
            }),
        }
    }
}
