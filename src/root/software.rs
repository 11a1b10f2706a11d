//! A root of trust in a plain file. For development and tests only: the root
//! key sits on disk unprotected, so a copy of the data directory is a copy
//! of every key. The broker refuses it unless the config says
//! `danger_development_only = true`, logs a warning at start, and reports it
//! in `GetInfo`.

use super::{RootError, RootErrorKind, RootInfo, RootOfTrust, WrappedKey};
use crate::secret::{KeyMaterial, KEY_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use ring::{aead, digest};
use std::path::Path;
use zeroize::Zeroizing;

const FILE_MAGIC: &[u8; 8] = b"SOVKMSR1";
const WRAP_AAD: &[u8] = b"sovkms/v1/software-root-wrap";

/// The development root of trust.
pub struct SoftwareRoot {
    root_key: KeyMaterial,
    key_id: String,
    signer: EcdsaKeyPair,
    rng: SystemRandom,
}

fn cfg(msg: String) -> RootError {
    RootError::new(RootErrorKind::Config, msg)
}

impl SoftwareRoot {
    /// Opens the root file at `path`, creating it (mode 0600) if absent.
    pub fn open_or_create(path: &Path) -> Result<Self, RootError> {
        let rng = SystemRandom::new();
        let bytes = match std::fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let b = Self::create_file(path, &rng)?;
                Zeroizing::new(b)
            }
            Err(e) => {
                return Err(cfg(format!(
                    "cannot read software root {}: {e}",
                    path.display()
                )))
            }
        };
        if bytes.len() < FILE_MAGIC.len() + KEY_LEN || &bytes[..8] != FILE_MAGIC {
            return Err(cfg(format!(
                "{} is not a sovkms software root file",
                path.display()
            )));
        }
        let root_key = KeyMaterial::from_slice(&bytes[8..8 + KEY_LEN])
            .ok_or_else(|| cfg("software root file is truncated".into()))?;
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &bytes[8 + KEY_LEN..],
            &rng,
        )
        .map_err(|_| cfg(format!("{}: signing key is corrupt", path.display())))?;
        let key_id = format!("software:{}", check_value(&root_key));
        Ok(Self {
            root_key,
            key_id,
            signer,
            rng,
        })
    }

    fn create_file(path: &Path, rng: &SystemRandom) -> Result<Vec<u8>, RootError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut key[..])
            .map_err(|_| cfg("random generator failed".into()))?;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng)
            .map_err(|_| cfg("cannot generate signing key".into()))?;
        let mut out = Vec::with_capacity(8 + KEY_LEN + pkcs8.as_ref().len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&key[..]);
        out.extend_from_slice(pkcs8.as_ref());
        crate::files::write_file_durably(path, &out, 0o600).map_err(|e| {
            cfg(format!(
                "cannot write software root {}: {e}",
                path.display()
            ))
        })?;
        Ok(out)
    }
}

/// First 8 bytes (hex) of SHA-256 over a label and the key: identifies a
/// root key without revealing it.
fn check_value(key: &KeyMaterial) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"sovkms/v1/root-key-check-value");
    ctx.update(key.expose_secret());
    hex::encode(&ctx.finish().as_ref()[..8])
}

impl RootOfTrust for SoftwareRoot {
    fn info(&self) -> RootInfo {
        RootInfo {
            kind: "software",
            description: "software root in a plain file (DEVELOPMENT ONLY: no hardware protection)"
                .into(),
            root_key_id: self.key_id.clone(),
            development_only: true,
            mechanism: "system RNG; AES-256-GCM wrap under a software key (development only)"
                .into(),
        }
    }

    fn health(&self) -> Result<(), RootError> {
        Ok(())
    }

    fn generate_material(&self) -> Result<KeyMaterial, RootError> {
        super::system_material(&self.rng)
    }

    fn wrap(&self, material: &KeyMaterial) -> Result<WrappedKey, RootError> {
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, self.root_key.expose_secret())
                .map_err(|_| cfg("bad root key".into()))?,
        );
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| RootError::new(RootErrorKind::Unavailable, "random generator failed"))?;
        let mut buf = Zeroizing::new(material.expose_secret().to_vec());
        let tag = key
            .seal_in_place_separate_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(WRAP_AAD),
                &mut buf,
            )
            .map_err(|_| cfg("wrap failed".into()))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedKey {
            root_key_id: self.key_id.clone(),
            blob,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<KeyMaterial, RootError> {
        wrapped.check_root(&self.key_id)?;
        let integrity = super::integrity_error;
        if wrapped.blob.len() != 12 + KEY_LEN + 16 {
            return Err(integrity());
        }
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, self.root_key.expose_secret())
                .map_err(|_| cfg("bad root key".into()))?,
        );
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&wrapped.blob[..12]);
        let mut buf = Zeroizing::new(wrapped.blob[12..].to_vec());
        let pt = key
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(WRAP_AAD),
                &mut buf,
            )
            .map_err(|_| integrity())?;
        KeyMaterial::from_slice(pt).ok_or_else(integrity)
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, RootError> {
        self.signer
            .sign(&self.rng, message)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| RootError::new(RootErrorKind::Unavailable, "signing failed"))
    }

    fn signing_public_key(&self) -> Result<Vec<u8>, RootError> {
        Ok(self.signer.public_key().as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root");
        let root = SoftwareRoot::open_or_create(&path).unwrap();
        crate::root::conformance::run(&root);
        // Survives a restart: the same file unwraps what was wrapped before.
        let m = root.generate_material().unwrap();
        let w = root.wrap(&m).unwrap();
        drop(root);
        let again = SoftwareRoot::open_or_create(&path).unwrap();
        assert_eq!(again.unwrap(&w).unwrap().expose_secret(), m.expose_secret());
        // A different root cannot unwrap it.
        let other = SoftwareRoot::open_or_create(&dir.path().join("other")).unwrap();
        assert_eq!(
            other.unwrap(&w).unwrap_err().kind,
            RootErrorKind::UnknownRootKey
        );
    }

    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root");
        SoftwareRoot::open_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
