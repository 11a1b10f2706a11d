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

/// PINs taken out of the environment, held for later reads in this process.
static HELD: std::sync::Mutex<Vec<(String, zeroize::Zeroizing<String>)>> =
    std::sync::Mutex::new(Vec::new());

/// Reads the variable `name` once and removes it from the process's
/// environment, so no child process inherits it and no later reader of
/// the environment finds it; later reads in this process get the held
/// copy. (The kernel's copy of the initial environment block stays in
/// /proc/<pid>/environ, readable by root only: `serve` makes the process
/// non-dumpable. Prefer pin_file or pin_tpm_sealed.)
fn take_env(name: &str) -> Option<Pin> {
    // The list holds copies only: a poisoned lock leaves it usable.
    let mut held = HELD.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, pin)) = held.iter().find(|(n, _)| n == name) {
        return Some(Pin::new(pin.to_string()));
    }
    let value = zeroize::Zeroizing::new(std::env::var(name).ok()?);
    std::env::remove_var(name);
    let pin = Pin::new(value.to_string());
    held.push((name.to_owned(), value));
    Some(pin)
}

impl PinSource {
    /// Reads (or unseals) the PIN.
    pub fn read(&self) -> Result<Pin, RootError> {
        let cfg = |m: String| RootError::new(RootErrorKind::Config, m);
        match self {
            Self::File(p) => std::fs::read_to_string(p)
                .map(Pin::new)
                .map_err(|e| cfg(format!("cannot read HSM PIN file {}: {e}", p.display()))),
            Self::Env(v) => take_env(v)
                .ok_or_else(|| cfg(format!("environment variable {v} (HSM PIN) is not set"))),
            Self::Tpm { sealed, tpm } => super::tpm::unseal_pin(tpm, sealed).map_err(|e| {
                RootError::new(e.kind, format!("HSM PIN sealed to the TPM: {}", e.message))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs in its own process (this test binary, re-executed) so that
    /// changing the environment cannot race other tests.
    #[test]
    fn an_env_pin_leaves_the_environment_and_stays_readable() {
        const VAR: &str = "SOVKMS_TEST_PIN_TAKEN";
        if std::env::var("SOVKMS_PIN_CHILD").is_err() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "root::pin::tests::an_env_pin_leaves_the_environment_and_stays_readable",
                ])
                .env("SOVKMS_PIN_CHILD", "1")
                .env(VAR, "4321\n")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            return;
        }
        let src = PinSource::Env(VAR.into());
        assert_eq!(src.read().unwrap().expose_secret(), "4321");
        assert!(
            std::env::var(VAR).is_err(),
            "the PIN is gone from the environment"
        );
        let child = std::process::Command::new("sh")
            .args(["-c", &format!("printf '%s' \"${VAR}\"")])
            .output()
            .unwrap();
        assert!(child.stdout.is_empty(), "a child process inherits no PIN");
        assert_eq!(
            src.read().unwrap().expose_secret(),
            "4321",
            "held for later reads"
        );
    }
}
