//! The cryptographic operations: Encrypt, Decrypt, GenerateDataKey (with
//! and without plaintext) and ReEncrypt. Each has a blocking form (public)
//! and a form that refuses to wait (`*_with`, for front ends on an async
//! runtime: steady-state requests on hot keys never block).

use super::audited::settle;
use super::gate::On;
use super::{rng_err, AfterAudit, Broker, CallCtx};
use crate::envelope::{self, EncryptionContext, Envelope};
use crate::error::{Error, Fault, Invalid, Limit, Precondition, Result};
use crate::keys::{Halt, KeyId, KeyRecord, KeyState, Wait};
use crate::policy::Operation;
use crate::secret::{KeyMaterial, Plaintext, KEY_LEN};
use ring::rand::SecureRandom;
use std::sync::Arc;

/// A step of the hot path: a core error, or "would block".
type Step<T> = std::result::Result<T, Halt<Error>>;

/// Result of Encrypt.
pub struct Sealed {
    /// The envelope.
    pub ciphertext: Vec<u8>,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of Decrypt.
pub struct Opened {
    /// The plaintext.
    pub plaintext: Plaintext,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of GenerateDataKey.
pub struct DataKey {
    /// The data key in the clear (absent for the without-plaintext variant).
    pub plaintext: Option<KeyMaterial>,
    /// The data key as an envelope under the key.
    pub wrapped: Vec<u8>,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of ReEncrypt.
pub struct ReEncrypted {
    /// New envelope.
    pub ciphertext: Vec<u8>,
    /// Key and version that opened the source.
    pub source: (KeyId, u32),
    /// Key and version that sealed the result.
    pub destination: (KeyId, u32),
}

pub(super) fn seal_err(e: envelope::SealError) -> Error {
    match e {
        envelope::SealError::Random => rng_err(),
        envelope::SealError::TooLarge => Limit::Envelope.into(),
        envelope::SealError::Derive => Fault::Derive.into(),
    }
}

/// Envelope operations take the broker's envelope keys only: a managed
/// object's material is its owner's, used as the client asks.
fn envelope_key(rec: &KeyRecord) -> Result<()> {
    if rec.kind == crate::keys::ObjectKind::Envelope {
        Ok(())
    } else {
        Err(Precondition::ManagedObject(rec.id.clone()).into())
    }
}

impl Broker {
    /// A key for a crypto request, from the keyring or the store;
    /// completes its destruction if the window has passed.
    pub(super) fn load_shared(&self, id: &KeyId, wait: Wait) -> Step<Arc<KeyRecord>> {
        let rec = self.keyring.record(id, wait, || self.get_record(id))?;
        match rec.destroy_after {
            Some(t) if rec.state != KeyState::Destroyed && self.clock.now_unix() >= t => {
                if wait == Wait::Refused {
                    return Err(Halt::WouldBlock);
                }
                Ok(Arc::new(self.finish_destroy(id)?))
            }
            _ => Ok(rec),
        }
    }

    /// The unwrapped material of one version, from the keyring or the root.
    pub(super) fn kek(
        &self,
        rec: &KeyRecord,
        version: u32,
        wait: Wait,
    ) -> Step<Arc<envelope::Kek>> {
        let wrapped = rec
            .version(version)
            .and_then(|v| v.wrapped.as_ref())
            .ok_or_else(|| Precondition::VersionDestroyed {
                key: rec.id.clone(),
                version,
            })
            .map_err(Error::from)?;
        let sealed = rec
            .version(version)
            .and_then(|v| v.sealed_object.as_deref());
        self.keyring.kek(&rec.id, version, wait, || {
            let material = self.with_root(|r| r.unwrap(wrapped))?;
            let kek = envelope::Kek::new(material).map_err(seal_err)?;
            match sealed {
                None => Ok(kek),
                Some(s) => {
                    let bytes = super::objects::unseal(&kek, s)?;
                    Ok(kek.with_object(bytes))
                }
            }
        })
    }

    fn parse_ciphertext<'a>(&self, bytes: &'a [u8]) -> Result<Envelope<'a>> {
        if bytes.is_empty() {
            return Err(Invalid::EmptyCiphertext.into());
        }
        let env = Envelope::parse(bytes).map_err(Invalid::from)?;
        if env.header.region != self.settings.region {
            return Err(Precondition::ForeignCiphertext {
                data: env.header.region.clone(),
                broker: self.settings.region.clone(),
            }
            .into());
        }
        Ok(env)
    }

    fn seal(
        &self,
        rec: &KeyRecord,
        ctx: &EncryptionContext,
        pt: &Plaintext,
        wait: Wait,
    ) -> Step<Sealed> {
        envelope_key(rec)?;
        let version = rec.primary_version;
        let kek = self.kek(rec, version, wait)?;
        let ciphertext = envelope::seal(
            &crate::envelope::BatchedRandom,
            &kek,
            &self.settings.region,
            &rec.id,
            version,
            ctx,
            pt,
        )
        .map_err(seal_err)?;
        Ok(Sealed {
            ciphertext,
            key_id: rec.id.clone(),
            key_version: version,
        })
    }

    /// Opens an envelope whose region, key grant and state were checked.
    fn open_checked(
        &self,
        rec: &KeyRecord,
        env: Envelope<'_>,
        ctx: &EncryptionContext,
        wait: Wait,
    ) -> Step<Plaintext> {
        envelope_key(rec)?;
        let v = env.header.key_version;
        if rec.version(v).is_none() {
            return Err(Error::from(Invalid::NoSuchVersion {
                key: rec.id.clone(),
                version: v,
            })
            .into());
        }
        let kek = self.kek(rec, v, wait)?;
        Ok(envelope::open(&kek, &env, ctx)
            .map_err(Invalid::from)
            .map_err(Error::from)?)
    }

    /// Encrypt: any region's service, where the key's grants name it.
    pub fn encrypt(
        &self,
        cx: &CallCtx,
        key_id: &KeyId,
        plaintext: &Plaintext,
        ctx: &EncryptionContext,
    ) -> Result<Sealed> {
        settle(self.encrypt_with(Wait::Allowed, cx, key_id, plaintext, ctx))
    }

    /// [`encrypt`](Self::encrypt), refusing to wait unless `wait` allows.
    pub(crate) fn encrypt_with(
        &self,
        wait: Wait,
        cx: &CallCtx,
        key_id: &KeyId,
        plaintext: &Plaintext,
        ctx: &EncryptionContext,
    ) -> Step<Sealed> {
        let op = Operation::Encrypt;
        let r = self.audited_release(cx, op, Some(ctx), |note| {
            note.key(key_id, 0);
            self.gate(cx, op, None, note)?;
            let max = self.settings.max_plaintext_bytes;
            if plaintext.len() > max {
                return Err(Error::from(Limit::Plaintext {
                    len: plaintext.len(),
                    max,
                })
                .into());
            }
            let rec = self.load_shared(key_id, wait)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            note.key(key_id, rec.primary_version);
            self.seal(&rec, ctx, plaintext, wait)
        })?;
        // Encrypt releases nothing: there is no record to wait for.
        Ok(r.released_blocking()?)
    }

    /// Decrypt: in-region services with a grant only. The plaintext is
    /// released only once the request's audit record is durable.
    pub fn decrypt(
        &self,
        cx: &CallCtx,
        ciphertext: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<AfterAudit<Opened>> {
        settle(self.decrypt_with(Wait::Allowed, cx, ciphertext, ctx))
    }

    /// [`decrypt`](Self::decrypt), refusing to wait unless `wait` allows.
    pub(crate) fn decrypt_with(
        &self,
        wait: Wait,
        cx: &CallCtx,
        ciphertext: &[u8],
        ctx: &EncryptionContext,
    ) -> Step<AfterAudit<Opened>> {
        let op = Operation::Decrypt;
        self.audited_release(cx, op, Some(ctx), |note| {
            // The residency rule comes before the ciphertext is even parsed.
            self.gate(cx, op, None, note)?;
            let env = self.parse_ciphertext(ciphertext)?;
            note.key(&env.header.key_id, env.header.key_version);
            let rec = self.load_shared(&env.header.key_id, wait)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            let key_version = env.header.key_version;
            let plaintext = self.open_checked(&rec, env, ctx, wait)?;
            Ok(Opened {
                plaintext,
                key_id: rec.id.clone(),
                key_version,
            })
        })
    }

    /// GenerateDataKey: with plaintext, in-region only (released once
    /// audited durably); without, like Encrypt.
    pub fn generate_data_key(
        &self,
        cx: &CallCtx,
        key_id: &KeyId,
        ctx: &EncryptionContext,
        with_plaintext: bool,
    ) -> Result<AfterAudit<DataKey>> {
        settle(self.generate_data_key_with(Wait::Allowed, cx, key_id, ctx, with_plaintext))
    }

    /// [`generate_data_key`](Self::generate_data_key), refusing to wait
    /// unless `wait` allows.
    pub(crate) fn generate_data_key_with(
        &self,
        wait: Wait,
        cx: &CallCtx,
        key_id: &KeyId,
        ctx: &EncryptionContext,
        with_plaintext: bool,
    ) -> Step<AfterAudit<DataKey>> {
        let op = if with_plaintext {
            Operation::GenerateDataKey
        } else {
            Operation::GenerateDataKeyWithoutPlaintext
        };
        self.audited_release(cx, op, Some(ctx), |note| {
            note.key(key_id, 0);
            self.gate(cx, op, None, note)?;
            let rec = self.load_shared(key_id, wait)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            note.key(key_id, rec.primary_version);
            // Data keys come straight from the kernel, never from the batched
            // buffer that holds future salts and nonces.
            let mut raw = [0u8; KEY_LEN];
            self.rng.fill(&mut raw).map_err(|_| rng_err())?;
            let dk = KeyMaterial::from_array(&mut raw);
            let sealed = self.seal(
                &rec,
                ctx,
                &Plaintext::new(dk.expose_secret().to_vec()),
                wait,
            )?;
            Ok(DataKey {
                plaintext: with_plaintext.then_some(dk),
                wrapped: sealed.ciphertext,
                key_id: sealed.key_id,
                key_version: sealed.key_version,
            })
        })
    }

    /// ReEncrypt: in-region only; the plaintext never leaves the broker.
    pub fn re_encrypt(
        &self,
        cx: &CallCtx,
        ciphertext: &[u8],
        source_ctx: &EncryptionContext,
        destination: Option<&KeyId>,
        destination_ctx: &EncryptionContext,
    ) -> Result<AfterAudit<ReEncrypted>> {
        settle(self.re_encrypt_with(
            Wait::Allowed,
            cx,
            ciphertext,
            source_ctx,
            destination,
            destination_ctx,
        ))
    }

    /// [`re_encrypt`](Self::re_encrypt), refusing to wait unless `wait` allows.
    pub(crate) fn re_encrypt_with(
        &self,
        wait: Wait,
        cx: &CallCtx,
        ciphertext: &[u8],
        source_ctx: &EncryptionContext,
        destination: Option<&KeyId>,
        destination_ctx: &EncryptionContext,
    ) -> Step<AfterAudit<ReEncrypted>> {
        let op = Operation::ReEncrypt;
        self.audited_release(cx, op, Some(source_ctx), |note| {
            self.gate(cx, op, None, note)?;
            let env = self.parse_ciphertext(ciphertext)?;
            note.key(&env.header.key_id, env.header.key_version);
            let src = self.load_shared(&env.header.key_id, wait)?;
            self.gate(cx, op, Some(On::Key(&src)), note)?;
            let dst = match destination {
                Some(d) if *d != src.id => self.load_shared(d, wait)?,
                _ => Arc::clone(&src),
            };
            self.gate(cx, op, Some(On::Destination(&dst)), note)?;
            let src_version = env.header.key_version;
            let plaintext = self.open_checked(&src, env, source_ctx, wait)?;
            let sealed = self.seal(&dst, destination_ctx, &plaintext, wait)?;
            // The record names the source (key fields) and the destination.
            let dest = format!(
                "re-encrypted under key {} version {} with destination context sha256 {}",
                sealed.key_id,
                sealed.key_version,
                destination_ctx.digest_hex()
            );
            note.via = if note.via.is_empty() {
                dest
            } else {
                format!("{dest}; {}", note.via)
            };
            Ok(ReEncrypted {
                ciphertext: sealed.ciphertext,
                source: (src.id.clone(), src_version),
                destination: (sealed.key_id, sealed.key_version),
            })
        })
    }
}
