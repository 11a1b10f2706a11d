//! The TPM-bound root of trust: the unsealed secret wraps in software.

use super::*;

pub(super) fn derive(
    secret: &[u8],
    label: &'static [u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, RootError> {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"sovkms/v1/tpm-root").extract(secret);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    prk.expand(&[label], Len)
        .and_then(|okm| okm.fill(&mut out[..]))
        .map_err(|_| RootError::new(RootErrorKind::Config, "key derivation failed"))?;
    Ok(out)
}

pub(super) const WRAP_LABEL: &[u8] = b"wrap";
const SIGNING_LABEL: &[u8] = b"signing-key";
pub(super) const SIGNING_AAD: &[u8] = b"sovkms/v1/tpm-root/signing-key";

pub(super) fn signing_aead(secret: &[u8]) -> Result<aead::LessSafeKey, RootError> {
    let k = derive(secret, SIGNING_LABEL)?;
    aead::UnboundKey::new(&aead::AES_256_GCM, &k[..])
        .map(aead::LessSafeKey::new)
        .map_err(|_| RootError::new(RootErrorKind::Config, "bad derived key"))
}

/// The TPM-bound root of trust.
pub struct TpmRoot {
    /// AES-256 key wrap under the key derived from the unsealed secret; its
    /// key schedule zeroizes on drop (`aes` with its `zeroize` feature).
    kek: aes_kw::KekAes256,
    key_id: String,
    signer: EcdsaKeyPair,
    rng: SystemRandom,
    description: String,
}

impl TpmRoot {
    /// Unseals the root secret from `sealed` (fails closed: any TPM, policy
    /// or blob problem is an error and the broker does not start).
    pub fn open(settings: &TpmSettings, sealed: &Path) -> Result<Self, RootError> {
        let t = Instant::now();
        let mut tpm = Tpm::connect(&settings.tcti)?;
        let (secret, file, used) = unseal_configured(&mut tpm, settings, sealed, Purpose::Root)?;
        let unseal_ms = t.elapsed().as_secs_f64() * 1e3;
        let policy = file.policy()?;
        if policy != settings.policy {
            tracing::warn!(
                sealed_to = %policy.spec(),
                configured = %settings.policy.spec(),
                "the root is sealed to other PCRs than the config names; \
                 run `sovkms tpm reseal` to bind it to the configured ones"
            );
        }
        let enc = file
            .signing_key
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .filter(|b| b.len() > 12 + 16)
            .ok_or_else(|| {
                RootError::new(
                    RootErrorKind::Integrity,
                    format!(
                        "{}: the signing key is missing or malformed",
                        used.display()
                    ),
                )
            })?;
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&enc[..12]);
        let mut buf = Zeroizing::new(enc[12..].to_vec());
        let pkcs8 = signing_aead(&secret)?
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(SIGNING_AAD),
                &mut buf,
            )
            .map_err(|_| {
                RootError::new(
                    RootErrorKind::Integrity,
                    format!(
                        "{}: the signing key does not belong to this root secret",
                        used.display()
                    ),
                )
            })?;
        let rng = SystemRandom::new();
        let signer = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
            .map_err(|_| RootError::new(RootErrorKind::Integrity, "signing key is corrupt"))?;
        // Built from a reference: no stray copy of the key on the stack.
        let wk = derive(&secret, WRAP_LABEL)?;
        let kek = aes_kw::KekAes256::new(aes::cipher::generic_array::GenericArray::from_slice(
            &wk[..],
        ));
        let key_id = root_key_id(&secret)?;
        let facts = tpm
            .facts()
            .map(|f| format!("{} {} firmware {}", f.manufacturer, f.vendor, f.firmware))
            .unwrap_or_else(|_| "TPM 2.0".into());
        tracing::info!(unseal_ms, blob = %used.display(), policy = %policy.spec(), "TPM root unsealed");
        Ok(Self {
            kek,
            key_id,
            signer,
            rng,
            description: format!(
                "TPM 2.0 ({facts}) via {}; root sealed to PCR {}",
                settings.tcti,
                policy.spec()
            ),
        })
    }
}

impl RootOfTrust for TpmRoot {
    fn info(&self) -> RootInfo {
        RootInfo {
            kind: "tpm",
            description: self.description.clone(),
            root_key_id: self.key_id.clone(),
            development_only: false,
            mechanism: "system RNG; AES-256 key wrap (RFC 3394) under a key derived (HKDF-SHA256) \
                        from a TPM-generated root secret sealed to the TPM's PCR policy"
                .into(),
        }
    }

    fn health(&self) -> Result<(), RootError> {
        // The secret was unsealed at start; requests do not need the TPM.
        Ok(())
    }

    fn generate_material(&self) -> Result<KeyMaterial, RootError> {
        crate::root::system_material(&self.rng)
    }

    fn wrap(&self, material: &KeyMaterial) -> Result<WrappedKey, RootError> {
        let mut out = vec![0u8; KEY_LEN + 8];
        self.kek
            .wrap(material.expose_secret(), &mut out)
            .map_err(|_| cfg("AES key wrap failed"))?;
        Ok(WrappedKey {
            root_key_id: self.key_id.clone(),
            blob: out,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<KeyMaterial, RootError> {
        wrapped.check_root(&self.key_id)?;
        let integrity = crate::root::integrity_error;
        if wrapped.blob.len() != KEY_LEN + 8 {
            return Err(integrity());
        }
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        self.kek
            .unwrap(&wrapped.blob, &mut out[..])
            .map_err(|_| integrity())?;
        Ok(KeyMaterial::from_array(&mut out))
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, RootError> {
        self.signer
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| unavailable("signing failed".into()))
    }

    fn signing_public_key(&self) -> Result<Vec<u8>, RootError> {
        Ok(self.signer.public_key().as_ref().to_vec())
    }
}
