//! The sealed-blob file: format, seal and unseal (with the pending reseal).

use super::*;

const FORMAT: &str = "sovkms-tpm-sealed/v1";

/// A sealed blob file (JSON). Everything in it is either public or
/// encrypted by the TPM (the private part) or under the sealed secret (the
/// signing key): a copy is useless without this TPM in this state.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedFile {
    format: String,
    /// What the blob holds.
    pub purpose: Purpose,
    /// The PCR bank of the policy.
    pub pcr_bank: String,
    /// The PCRs of the policy.
    pub pcrs: Vec<u8>,
    /// The PCR values the policy requires (hex), in `pcrs` order.
    pub pcr_values: Vec<String>,
    /// Whether an auth value is required besides the PCRs.
    pub auth_value: bool,
    /// When it was sealed (RFC 3339).
    pub sealed_at: String,
    #[serde(with = "hex::serde")]
    tpm_public: Vec<u8>,
    #[serde(with = "hex::serde")]
    tpm_private: Vec<u8>,
    /// Root only: the audit/provenance signing key (PKCS#8), AES-256-GCM
    /// under a key derived from the sealed root secret: nonce || ct || tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) signing_key: Option<String>,
}

impl SealedFile {
    /// The policy this blob was sealed to.
    pub fn policy(&self) -> Result<PcrPolicy, RootError> {
        PcrPolicy::new(&self.pcr_bank, &self.pcrs)
            .map_err(|m| RootError::new(RootErrorKind::Integrity, m.to_string()))
    }

    /// Reads and parses a sealed file.
    pub fn read(path: &Path) -> Result<Self, RootError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            RootError::new(
                RootErrorKind::Config,
                format!(
                    "cannot read sealed blob {}: {e} (provision it with `sovkms tpm seal-root` \
                     or `sovkms tpm seal-pin`)",
                    path.display()
                ),
            )
        })?;
        let f: Self = serde_json::from_str(&text).map_err(|e| {
            RootError::new(
                RootErrorKind::Integrity,
                format!("{} is not a sovkms sealed blob: {e}", path.display()),
            )
        })?;
        if f.format != FORMAT {
            return Err(RootError::new(
                RootErrorKind::Integrity,
                format!("{}: unknown format {:?}", path.display(), f.format),
            ));
        }
        Ok(f)
    }

    pub(super) fn write_new(&self, path: &Path) -> Result<(), RootError> {
        if path.exists() {
            return Err(RootError::new(
                RootErrorKind::Config,
                format!(
                    "{} already exists; sovkms never overwrites a sealed blob (it may be the \
                     only copy of a root). Move it away first if you really mean to replace it",
                    path.display()
                ),
            ));
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| RootError::new(RootErrorKind::Config, e.to_string()))?;
        crate::files::write_file_durably(path, text.as_bytes(), 0o600).map_err(|e| {
            RootError::new(
                RootErrorKind::Config,
                format!("cannot write {}: {e}", path.display()),
            )
        })
    }
}

/// The path a reseal writes to, next to the blob it replaces.
pub fn pending_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Seals `secret` to the configured policy as the current PCR values (or
/// `expected`, when resealing ahead of a planned change).
pub(super) fn seal_to(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    purpose: Purpose,
    secret: &[u8],
    expected: Option<Vec<Vec<u8>>>,
    signing_key: Option<String>,
) -> Result<SealedFile, RootError> {
    let policy = &settings.policy;
    let values = match expected {
        Some(v) => v,
        None => tpm.pcr_values(policy)?,
    };
    let auth = settings.auth()?;
    let parts = tpm.seal(policy, &values, auth.as_deref().map(|a| &a[..]), secret)?;
    Ok(SealedFile {
        format: FORMAT.into(),
        purpose,
        pcr_bank: policy.bank.clone(),
        pcrs: policy.pcrs.clone(),
        pcr_values: values.iter().map(hex::encode).collect(),
        auth_value: auth.is_some(),
        sealed_at: now_rfc3339(),
        tpm_public: parts.public,
        tpm_private: parts.private,
        signing_key,
    })
}

/// Unseals one file; on a policy failure the message names the file, the
/// policy, the values it requires and the TPM's current values.
pub(super) fn unseal_file(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    path: &Path,
    file: &SealedFile,
) -> Result<Zeroizing<Vec<u8>>, RootError> {
    let policy = file.policy()?;
    let auth = if file.auth_value {
        match settings.auth()? {
            Some(a) => Some(a),
            None => {
                return Err(RootError::new(
                    RootErrorKind::Config,
                    format!(
                        "{} was sealed with an auth value; set tpm.auth_file",
                        path.display()
                    ),
                ))
            }
        }
    } else {
        None
    };
    let parts = SealedParts {
        public: file.tpm_public.clone(),
        private: file.tpm_private.clone(),
    };
    tpm.unseal(&policy, &parts, auth.as_deref().map(|a| &a[..]))
        .map_err(|e| {
            if e.kind != RootErrorKind::Auth {
                return RootError::new(e.kind, format!("{}: {}", path.display(), e.message));
            }
            let now = tpm
                .pcr_values(&policy)
                .map(|v| v.iter().map(hex::encode).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|_| "unreadable".into());
            RootError::new(
                RootErrorKind::Auth,
                format!(
                    "the TPM refused to unseal {}: its policy requires PCR {} = {} (sealed {}){}; \
                     the TPM's current values are {now}. The host's boot state changed, or this \
                     is another host. If the change was planned, reseal from a state that still \
                     unseals (`sovkms tpm reseal --expect-pcr ...`) [{}]",
                    path.display(),
                    policy.spec(),
                    file.pcr_values.join(","),
                    file.sealed_at,
                    if file.auth_value {
                        " and an auth value"
                    } else {
                        ""
                    },
                    e.message
                ),
            )
        })
}

/// Unseals the configured blob through `tpm`, falling back to a pending
/// reseal (`.new`) when the current blob's policy no longer matches.
/// Returns the secret, the file it came from and that file's path.
pub fn unseal_configured(
    tpm: &mut Tpm,
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<(Zeroizing<Vec<u8>>, SealedFile, PathBuf), RootError> {
    let file = SealedFile::read(path)?;
    if file.purpose != purpose {
        return Err(RootError::new(
            RootErrorKind::Config,
            format!(
                "{} holds a sealed {:?}, not a {:?}",
                path.display(),
                file.purpose,
                purpose
            ),
        ));
    }
    match unseal_file(tpm, settings, path, &file) {
        Ok(s) => Ok((s, file, path.to_path_buf())),
        Err(e) if e.kind == RootErrorKind::Auth => {
            let pending = pending_path(path);
            let Ok(next) = SealedFile::read(&pending) else {
                return Err(e);
            };
            match unseal_file(tpm, settings, &pending, &next) {
                Ok(s) if next.purpose == purpose => {
                    tracing::warn!(
                        blob = %pending.display(),
                        "unsealed the pending reseal: the PCR change it was made for has \
                         happened; run `sovkms tpm reseal --confirm` to make it the blob"
                    );
                    Ok((s, next, pending))
                }
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}
