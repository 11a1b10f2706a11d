//! The operator's workflows: seal the root or the HSM PIN, check, reseal.

use super::*;

/// Result of provisioning or checking a blob, for the CLI.
#[derive(Debug, serde::Serialize)]
pub struct SealReport {
    /// File written or checked.
    pub path: String,
    /// `sha256:7`.
    pub policy: String,
    /// Values sealed to.
    pub pcr_values: Vec<String>,
    /// Root only: the root key id that wrapped keys will carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root_key_id: Option<String>,
    /// Milliseconds the TPM took to unseal (connect + load + policy + unseal).
    pub unseal_ms: f64,
}

/// `sovkms tpm seal-root`: a fresh root secret from the TPM's generator
/// and a fresh signing key, sealed to the current PCR values. Refuses to
/// overwrite. Unseals the result before returning, so a blob that would
/// not open at the next start is never left behind silently.
pub fn seal_root(settings: &TpmSettings, path: &Path) -> Result<SealReport, RootError> {
    if path.exists() {
        return Err(cfg(format!(
            "{} already exists; sovkms never overwrites a sealed root (use `sovkms tpm reseal` \
             to re-bind it to new PCR values)",
            path.display()
        )));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let secret = tpm.random(KEY_LEN)?;
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| cfg("cannot generate the signing key"))?;
    let mut nonce = [0u8; 12];
    rng.fill(&mut nonce)
        .map_err(|_| unavailable("random generator failed".into()))?;
    let mut buf = Zeroizing::new(pkcs8.as_ref().to_vec());
    let tag = signing_aead(&secret)?
        .seal_in_place_separate_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(SIGNING_AAD),
            &mut buf,
        )
        .map_err(|_| cfg("cannot encrypt the signing key"))?;
    let mut enc = nonce.to_vec();
    enc.extend_from_slice(&buf);
    enc.extend_from_slice(tag.as_ref());
    let file = seal_to(
        &mut tpm,
        settings,
        Purpose::Root,
        &secret,
        None,
        Some(hex::encode(enc)),
    )?;
    drop(tpm);
    file.write_new(path)?;
    check(settings, path, Purpose::Root)
}

/// `sovkms tpm seal-pin`: seals the HSM user PIN. Refuses to overwrite.
pub fn seal_pin(
    settings: &TpmSettings,
    path: &Path,
    pin: &crate::secret::Pin,
) -> Result<SealReport, RootError> {
    if pin.expose_secret().is_empty() || pin.expose_secret().len() > 128 {
        return Err(cfg("the HSM PIN must be 1 to 128 bytes"));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let file = seal_to(
        &mut tpm,
        settings,
        Purpose::HsmPin,
        pin.expose_secret().as_bytes(),
        None,
        None,
    )?;
    drop(tpm);
    file.write_new(path)?;
    check(settings, path, Purpose::HsmPin)
}

/// `sovkms tpm check`: unseals the blob now and reports how long it took.
pub fn check(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<SealReport, RootError> {
    let t = Instant::now();
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let (secret, file, used) = unseal_configured(&mut tpm, settings, path, purpose)?;
    let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
    let root_key_id = key_id_of(purpose, &secret)?;
    Ok(SealReport {
        path: used.display().to_string(),
        policy: file.policy()?.spec(),
        pcr_values: file.pcr_values.clone(),
        root_key_id,
        unseal_ms,
    })
}

/// `sovkms tpm reseal`: unseals the current blob (which must still open in
/// the current state) and seals the same secret to the configured PCRs at
/// `expected` values (default: current) into `<blob>.new`. The old blob
/// stays until [`confirm_reseal`].
pub fn reseal(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
    expected: Option<Vec<Vec<u8>>>,
) -> Result<SealReport, RootError> {
    let pending = pending_path(path);
    if pending.exists() {
        return Err(cfg(format!(
            "{} already holds a pending reseal; confirm it (`sovkms tpm reseal --confirm`) or \
             remove it first",
            pending.display()
        )));
    }
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let file = SealedFile::read(path)?;
    if file.purpose != purpose {
        return Err(cfg(format!(
            "{} holds a sealed {:?}",
            path.display(),
            file.purpose
        )));
    }
    let secret = unseal_file(&mut tpm, settings, path, &file)?;
    if let Some(v) = &expected {
        let want = settings.policy.pcrs.len();
        if v.len() != want {
            return Err(cfg(format!(
                "give an expected value for each of the {want} PCRs of {}",
                settings.policy.spec()
            )));
        }
    }
    let next = seal_to(
        &mut tpm,
        settings,
        purpose,
        &secret,
        expected,
        file.signing_key.clone(),
    )?;
    drop(tpm);
    next.write_new(&pending)?;
    Ok(SealReport {
        path: pending.display().to_string(),
        policy: next.policy()?.spec(),
        pcr_values: next.pcr_values.clone(),
        root_key_id: key_id_of(purpose, &secret)?,
        unseal_ms: 0.0,
    })
}

/// `sovkms tpm reseal --confirm`: the pending blob must unseal now; then it
/// replaces the old one (atomically, by rename).
pub fn confirm_reseal(
    settings: &TpmSettings,
    path: &Path,
    purpose: Purpose,
) -> Result<SealReport, RootError> {
    let pending = pending_path(path);
    let file = SealedFile::read(&pending)?;
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let t = Instant::now();
    let secret = unseal_file(&mut tpm, settings, &pending, &file)?;
    let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(tpm);
    std::fs::rename(&pending, path)
        .and_then(|_| std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all())
        .map_err(|e| cfg(format!("cannot replace {}: {e}", path.display())))?;
    Ok(SealReport {
        path: path.display().to_string(),
        policy: file.policy()?.spec(),
        pcr_values: file.pcr_values.clone(),
        root_key_id: key_id_of(purpose, &secret)?,
        unseal_ms,
    })
}

/// Unseals a sealed HSM PIN (the PKCS#11 root's `pin_tpm_sealed`).
pub fn unseal_pin(settings: &TpmSettings, path: &Path) -> Result<crate::secret::Pin, RootError> {
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let (secret, _, _) = unseal_configured(&mut tpm, settings, path, Purpose::HsmPin)?;
    let s = String::from_utf8(secret.to_vec())
        .map_err(|_| RootError::new(RootErrorKind::Integrity, "the sealed PIN is not UTF-8"))?;
    Ok(crate::secret::Pin::new(s))
}

/// The root key id a sealed root secret gives (none for a PIN).
fn key_id_of(purpose: Purpose, secret: &[u8]) -> Result<Option<String>, RootError> {
    match purpose {
        Purpose::Root => root_key_id(secret).map(Some),
        Purpose::HsmPin => Ok(None),
    }
}

pub(super) fn root_key_id(secret: &[u8]) -> Result<String, RootError> {
    let k = derive(secret, WRAP_LABEL)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"sovkms/v1/root-key-check-value");
    ctx.update(&k[..]);
    Ok(format!("tpm:{}", hex::encode(&ctx.finish().as_ref()[..8])))
}
