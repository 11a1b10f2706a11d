//! Managed objects: keys and secrets that KMIP clients create or register
//! and may fetch back (PostgreSQL TDE, backup systems, storage arrays).
//!
//! Each object is a key record whose version material (wrapped by the root
//! of trust, as for every key) seals the object's own bytes; the store
//! holds only that sealed form. Fetching the bytes (`export`) and
//! decrypting with them release plaintext: the residency rule, an `export`
//! or `decrypt` grant, and a durable audit record come first, as for the
//! envelope operations. Services named in `[kmip] key_creators` create
//! objects they own (granted to them, `manage` included); operators create
//! objects for others and grant them as for any key.

use super::audited::settle;
use super::gate::On;
use super::{rng_err, store_err, AfterAudit, Broker, CallCtx};
use crate::envelope::{self, EncryptionContext};
pub use crate::error::CipherError;
use crate::error::{Error, Invalid, Precondition, Result};
use crate::keys::{
    CustomAttribute, Halt, KeyId, KeyRecord, KeyState, LinkKind, ObjectKind, ObjectLink, Wait,
};
use crate::policy::{CryptoOp, Grant, Operation, Principal};
use crate::region::Role;
use crate::secret::Plaintext;
use std::sync::Arc;

/// Largest secret data object.
pub const MAX_SECRET_BYTES: usize = 4096;
/// Most custom attributes on one object, and the largest encoded value.
const MAX_CUSTOM_ATTRIBUTES: usize = 64;
const MAX_CUSTOM_VALUE: usize = 4096;

/// A new managed object.
pub struct NewObject {
    /// What it is.
    pub kind: ObjectKind,
    /// The bytes to register; `None` to generate them (AES keys only).
    pub material: Option<Plaintext>,
    /// Its name (unique among live objects; may be empty).
    pub name: String,
    /// May its material be exported?
    pub exportable: bool,
    /// Active at once instead of pre-active.
    pub activate: bool,
    /// Client-defined attributes.
    pub custom_attributes: Vec<CustomAttribute>,
}

/// The descriptive attributes an owner or operator may change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Described {
    /// Name.
    pub name: String,
    /// Client-defined attributes.
    pub custom_attributes: Vec<CustomAttribute>,
}

/// Block cipher parameters of Encrypt/Decrypt with an AES object.
#[derive(Clone, Debug)]
pub enum Cipher {
    /// AES-GCM: 12-byte IV (generated when absent, on encrypt), additional
    /// data, 16-byte tag.
    Gcm {
        /// The IV.
        iv: Option<Vec<u8>>,
        /// Additional authenticated data.
        aad: Vec<u8>,
        /// Tag length in bytes (16).
        tag_len: usize,
    },
    /// AES-CBC: 16-byte IV (generated when absent, on encrypt), with
    /// PKCS#5 padding or none (whole blocks).
    Cbc {
        /// The IV.
        iv: Option<Vec<u8>>,
        /// PKCS#5 padding.
        pkcs5: bool,
    },
}

/// The result of Encrypt with an AES object.
pub struct Enciphered {
    /// Ciphertext (without the tag).
    pub data: Vec<u8>,
    /// The IV used (the caller's or a generated one).
    pub iv: Vec<u8>,
    /// The GCM tag (empty for CBC).
    pub tag: Vec<u8>,
    /// Key used.
    pub key_id: KeyId,
}

fn object_context() -> EncryptionContext {
    // Domain separation: these envelopes seal object bytes in the store
    // and are never handed to callers.
    EncryptionContext::new([("sovkms.object".to_owned(), "v1".to_owned())])
        .unwrap_or_else(|_| unreachable_context())
}

#[allow(clippy::panic)] // A one-pair constant context is always valid.
fn unreachable_context() -> EncryptionContext {
    panic!("constant object context rejected")
}

/// Services create keys of their own; operators create keys for others.
fn creation(caller: &crate::region::Caller) -> Operation {
    if caller.role == Role::Service {
        Operation::CreateOwnKey
    } else {
        Operation::CreateKey
    }
}

/// Opens a version's sealed object bytes with its material.
pub(super) fn unseal(kek: &envelope::Kek, sealed: &[u8]) -> Result<Plaintext> {
    let env = envelope::Envelope::parse(sealed)
        .map_err(|e| Error::from(crate::error::Fault::Object(e.to_string())))?;
    envelope::open(kek, &env, &object_context())
        .map_err(|_| crate::error::Fault::Object("sealed object failed to open".into()).into())
}

fn check_custom(attrs: &[CustomAttribute]) -> Result<()> {
    if attrs.len() > MAX_CUSTOM_ATTRIBUTES {
        return Err(Invalid::TooLong {
            field: "custom attributes",
            max: MAX_CUSTOM_ATTRIBUTES,
        }
        .into());
    }
    for a in attrs {
        super::lifecycle::check_text("attribute name", &a.name, 128, true)?;
        if a.value.len() > MAX_CUSTOM_VALUE {
            return Err(Invalid::TooLong {
                field: "attribute value",
                max: MAX_CUSTOM_VALUE,
            }
            .into());
        }
    }
    Ok(())
}

impl Broker {
    /// Creates (generates) or registers a managed object.
    pub fn create_object(&self, cx: &CallCtx, new: NewObject) -> Result<KeyRecord> {
        let caller = &cx.caller;
        let op = creation(caller);
        self.audit_first(
            Some(cx),
            op,
            |note| {
                self.gate(cx, op, None, note)?;
                super::lifecycle::check_text("name", &new.name, 128, false)?;
                check_custom(&new.custom_attributes)?;
                let bytes = self.object_bytes(&new)?;
                let g = self.lock_lifecycle()?;
                self.check_name_free(&new.name, None)?;
                let id = KeyId::generate(&self.rng).map_err(|_| rng_err())?;
                note.key(&id, 1);
                let version = self.sealed_version(&id, &bytes)?;
                let now = self.clock.now_unix();
                let rec = self.object_record(cx, id, version, new.kind, new, None, now)?;
                Ok((g, rec))
            },
            |(g, mut rec), seq| {
                self.attach_provenance(&mut rec, &caller.spiffe_id(), seq)?;
                self.store.insert(&rec).map_err(store_err)?;
                drop(g);
                tracing::info!(key = %rec.id, caller = %caller, "managed object created");
                Ok(rec)
            },
        )
    }

    /// The record of a new object created by `cx`'s caller: owned by it
    /// (granted to it alone) when it is a service, ungranted when an
    /// operator made it. `exportable` overrides the request's.
    #[allow(clippy::too_many_arguments)]
    fn object_record(
        &self,
        cx: &CallCtx,
        id: KeyId,
        version: crate::keys::VersionRecord,
        kind: ObjectKind,
        new: NewObject,
        exportable: Option<bool>,
        now: i64,
    ) -> Result<KeyRecord> {
        let caller = &cx.caller;
        let grants = if caller.role == Role::Service {
            // Whether the material may leave at all is the key's
            // `exportable`; the grant says who, should it.
            let mut ops = vec![CryptoOp::Export, CryptoOp::Manage];
            if matches!(kind, ObjectKind::SymmetricKey { .. }) {
                ops.extend([CryptoOp::Encrypt, CryptoOp::Decrypt]);
            }
            vec![Grant::new(
                Principal::exact(caller),
                ops,
                &self.settings.region,
            )?]
        } else {
            Vec::new()
        };
        Ok(KeyRecord {
            name: new.name,
            grants,
            kind,
            exportable: exportable.unwrap_or(new.exportable),
            custom_attributes: new.custom_attributes,
            ..KeyRecord::new(
                id,
                self.settings.region.clone(),
                version,
                new.activate,
                now,
                caller.spiffe_id(),
            )
        })
    }

    /// Version 1 of a new object: fresh material from the root of trust,
    /// wrapped by it, sealing the object's bytes.
    fn sealed_version(&self, id: &KeyId, bytes: &Plaintext) -> Result<crate::keys::VersionRecord> {
        let (mut version, material) = self.new_version_and_material(1)?;
        let kek = envelope::Kek::new(material).map_err(super::crypto::seal_err)?;
        version.sealed_object = Some(
            envelope::seal(
                &envelope::BatchedRandom,
                &kek,
                &self.settings.region,
                id,
                1,
                &object_context(),
                bytes,
            )
            .map_err(super::crypto::seal_err)?,
        );
        Ok(version)
    }

    /// KMIP ReKey of an AES object: a new object with fresh material and
    /// the old one's kind, grants, exportability and custom attributes; the
    /// name moves to it (Locate by name then finds only the new key). The
    /// old object keeps its state and material, without its name. Both
    /// records are written in one atomic store write.
    pub fn rekey_object(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        let caller = &cx.caller;
        let op = Operation::Rekey;
        self.audit_first(
            Some(cx),
            op,
            |note| {
                note.key(id, 0);
                self.gate(cx, op, None, note)?;
                let g = self.lock_lifecycle()?;
                let old = self.load(id)?;
                self.gate(cx, op, Some(On::Key(&old)), note)?;
                let bits = match old.kind {
                    ObjectKind::SymmetricKey { bits } => bits,
                    ObjectKind::SecretData { .. }
                    | ObjectKind::PrivateKey { .. }
                    | ObjectKind::PublicKey { .. } => {
                        return Err(Precondition::NotAKey(old.id.clone()).into())
                    }
                    ObjectKind::Envelope => {
                        return Err(Invalid::Unsupported(format!(
                            "ReKey of broker envelope key {} over KMIP (operators rekey it with `sovkms key rekey`)",
                            old.id
                        ))
                        .into())
                    }
                };
                if old.destroy_after.is_some() {
                    return Err(Precondition::RekeyScheduled(old.id.clone()).into());
                }
                let new_id = KeyId::generate(&self.rng).map_err(|_| rng_err())?;
                let bytes = self.object_bytes(&NewObject {
                    kind: ObjectKind::SymmetricKey { bits },
                    material: None,
                    name: String::new(),
                    exportable: false,
                    activate: false,
                    custom_attributes: Vec::new(),
                })?;
                let version = self.sealed_version(&new_id, &bytes)?;
                let now = self.clock.now_unix();
                let active = old.state == KeyState::Active;
                let new = KeyRecord {
                    id: new_id.clone(),
                    state: if active {
                        KeyState::Active
                    } else {
                        KeyState::PreActive
                    },
                    revocation_reason: None,
                    revocation_message: String::new(),
                    created_at: now,
                    updated_at: now,
                    destroy_after: None,
                    primary_version: 1,
                    versions: vec![version],
                    created_by: caller.spiffe_id(),
                    activated_at: active.then_some(now),
                    deactivated_at: None,
                    revision: 0,
                    mac: String::new(),
                    ..old.clone()
                };
                let mut new = new;
                new.links = vec![ObjectLink {
                    kind: LinkKind::Replaced,
                    id: old.id.clone(),
                }];
                let mut replaced = old;
                replaced.name.clear();
                replaced.links.push(ObjectLink {
                    kind: LinkKind::Replacement,
                    id: new_id.clone(),
                });
                replaced.updated_at = now;
                note.key(id, replaced.primary_version);
                note.via = format!("replaced by {new_id}");
                Ok((g, new, replaced))
            },
            |(g, mut new, replaced), seq| {
                self.attach_provenance(&mut new, &caller.spiffe_id(), seq)?;
                self.store
                    .write_batch(&[&new], &[&replaced])
                    .map_err(store_err)?;
                self.keyring.forget(id);
                drop(g);
                tracing::info!(key = %id, new = %new.id, caller = %caller, "managed object rekeyed");
                Ok(new)
            },
        )
    }

    /// The bytes of a new object: the registered ones, checked against
    /// the kind, or fresh ones from the root of trust.
    fn object_bytes(&self, new: &NewObject) -> Result<Plaintext> {
        match (&new.kind, &new.material) {
            (ObjectKind::SymmetricKey { bits }, m) => {
                if !matches!(bits, 128 | 192 | 256) {
                    return Err(Invalid::AesLength(u32::from(*bits)).into());
                }
                let len = usize::from(*bits / 8);
                match m {
                    Some(m) if m.len() != len => Err(Invalid::MaterialLength {
                        got: m.len(),
                        bits: *bits,
                    }
                    .into()),
                    Some(m) => Ok(Plaintext::new(m.expose_secret().to_vec())),
                    None => {
                        let fresh = self.with_root(|r| r.generate_material())?;
                        Ok(Plaintext::new(fresh.expose_secret()[..len].to_vec()))
                    }
                }
            }
            (ObjectKind::SecretData { .. }, Some(m))
                if (1..=MAX_SECRET_BYTES).contains(&m.len()) =>
            {
                Ok(Plaintext::new(m.expose_secret().to_vec()))
            }
            (ObjectKind::SecretData { .. }, m) => Err(Invalid::SecretLength {
                got: m.as_ref().map_or(0, Plaintext::len),
                max: MAX_SECRET_BYTES,
            }
            .into()),
            (ObjectKind::PrivateKey { .. } | ObjectKind::PublicKey { .. }, _) => {
                Err(Invalid::Unsupported("registering RSA keys".into()).into())
            }
            (ObjectKind::Envelope, _) => Err(Invalid::Empty {
                field: "object type",
            }
            .into()),
        }
    }

    /// Refuses a name another live object has (KMIP clients find their
    /// key by name and expect exactly one). Call under the lifecycle lock.
    fn check_name_free(&self, name: &str, except: Option<&KeyId>) -> Result<()> {
        if name.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_unix();
        let taken = |r: &KeyRecord| {
            r.kind != ObjectKind::Envelope
                && r.name == name
                && Some(&r.id) != except
                && super::effective_state(r, now) != KeyState::Destroyed
        };
        let (hit, _) = self.store.scan(None, 1, &taken).map_err(store_err)?;
        if hit.is_empty() {
            Ok(())
        } else {
            Err(Precondition::NameInUse(name.to_owned()).into())
        }
    }

    /// The object `id` if `cx` may take its material out: the gate for
    /// ExportKey (region, grant, state), a managed object, exportable.
    fn exportable_object(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        note: &mut super::Note,
    ) -> Result<Arc<KeyRecord>, Halt<Error>> {
        let op = Operation::ExportKey;
        note.key(id, 0);
        self.gate(cx, op, None, note)?;
        let rec = self.load_shared(id, Wait::Allowed)?;
        self.gate(cx, op, Some(On::Key(&rec)), note)?;
        if rec.kind == ObjectKind::Envelope {
            return Err(Error::from(Precondition::EnvelopeKey(rec.id.clone())).into());
        }
        if !rec.exportable {
            return Err(Error::from(Precondition::NotExportable(rec.id.clone())).into());
        }
        Ok(rec)
    }

    /// An object's bytes, for a caller of its region with an `export`
    /// grant; released once the audit record is durable.
    pub fn export(
        &self,
        cx: &CallCtx,
        id: &KeyId,
    ) -> Result<AfterAudit<(Arc<KeyRecord>, Plaintext)>> {
        let op = Operation::ExportKey;
        settle(self.audited_release(cx, op, None, |note| {
            let rec = self.exportable_object(cx, id, note)?;
            note.key(id, rec.primary_version);
            let bytes = self.object_plaintext(&rec, Wait::Allowed)?;
            Ok((rec, bytes))
        }))
    }

    /// An object's bytes wrapped (AES key wrap, RFC 3394 or with padding RFC
    /// 5649) by another AES object: the same rules as [`export`](Self::export)
    /// for the object, and an `encrypt` grant on the active wrapping key.
    pub fn export_wrapped(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        wrapping: &KeyId,
        padded: bool,
    ) -> Result<AfterAudit<(Arc<KeyRecord>, Vec<u8>)>> {
        let op = Operation::ExportKey;
        settle(self.audited_release(cx, op, None, |note| {
            let rec = self.exportable_object(cx, id, note)?;
            let w = self.load_shared(wrapping, Wait::Allowed)?;
            self.gate(cx, Operation::Encrypt, Some(On::Key(&w)), note)?;
            note.key(id, rec.primary_version);
            note.via = format!("wrapped by key {wrapping}");
            let kek = self.aes_key(&w)?;
            let bytes = self.object_plaintext(&rec, Wait::Allowed)?;
            let wrapped = super::cipher::key_wrap(&kek, bytes.expose_secret(), padded)
                .map_err(Error::from)?;
            Ok((rec, wrapped))
        }))
    }

    /// The object's bytes (primary version), from the keyring's entry for
    /// the version (unsealed once when the entry is filled).
    fn object_plaintext(&self, rec: &KeyRecord, wait: Wait) -> Result<Plaintext, Halt<Error>> {
        let v = rec.primary_version;
        if rec
            .version(v)
            .and_then(|x| x.sealed_object.as_ref())
            .is_none()
        {
            return Err(Error::from(Precondition::VersionDestroyed {
                key: rec.id.clone(),
                version: v,
            })
            .into());
        }
        let kek = self.kek(rec, v, wait)?;
        kek.object()
            .map(|b| Plaintext::new(b.expose_secret().to_vec()))
            .ok_or_else(|| {
                Error::from(crate::error::Fault::Object("no unsealed bytes".into())).into()
            })
    }

    /// Encrypt with an AES object and caller parameters.
    pub fn encrypt_with_object(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        cipher: &Cipher,
        data: &Plaintext,
    ) -> Result<Enciphered> {
        let op = Operation::Encrypt;
        settle(self.audited_release(cx, op, None, |note| {
            note.key(id, 0);
            self.gate(cx, op, None, note)?;
            let max = self.settings.max_plaintext_bytes;
            if data.len() > max {
                return Err(Error::from(crate::error::Limit::Plaintext {
                    len: data.len(),
                    max,
                })
                .into());
            }
            let rec = self.load_shared(id, Wait::Allowed)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            note.key(id, rec.primary_version);
            let key = self.aes_key(&rec)?;
            let out =
                super::cipher::encrypt(&key, cipher, data.expose_secret()).map_err(Error::from)?;
            Ok(Enciphered {
                data: out.0,
                iv: out.1,
                tag: out.2,
                key_id: rec.id.clone(),
            })
        }))?
        .released_blocking()
    }

    /// Decrypt with an AES object and caller parameters: in-region only,
    /// released once audited durably.
    pub fn decrypt_with_object(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        cipher: &Cipher,
        data: &[u8],
        tag: &[u8],
    ) -> Result<AfterAudit<Plaintext>> {
        let op = Operation::Decrypt;
        settle(self.audited_release(cx, op, None, |note| {
            note.key(id, 0);
            self.gate(cx, op, None, note)?;
            let rec = self.load_shared(id, Wait::Allowed)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            note.key(id, rec.primary_version);
            let key = self.aes_key(&rec)?;
            Ok(super::cipher::decrypt(&key, cipher, data, tag).map_err(Error::from)?)
        }))
    }

    fn aes_key(&self, rec: &KeyRecord) -> Result<Plaintext, Halt<Error>> {
        match rec.kind {
            ObjectKind::SymmetricKey { .. } => self.object_plaintext(rec, Wait::Allowed),
            ObjectKind::Envelope => {
                Err(Error::from(Precondition::EnvelopeKey(rec.id.clone())).into())
            }
            ObjectKind::SecretData { .. }
            | ObjectKind::PrivateKey { .. }
            | ObjectKind::PublicKey { .. } => {
                Err(Error::from(Precondition::NotAKey(rec.id.clone())).into())
            }
        }
    }

    /// Creates an RSA key pair (2048, 3072 or 4096 bits) as two linked
    /// objects: the private key (PKCS#8, exportable as `private.exportable`
    /// says) and the public key (PKCS#1, always exportable). One audit
    /// record, one atomic store write.
    pub fn create_key_pair(
        &self,
        cx: &CallCtx,
        bits: u16,
        private: NewObject,
        public: NewObject,
    ) -> Result<(KeyRecord, KeyRecord)> {
        use aws_lc_rs::encoding::AsDer;
        use aws_lc_rs::signature::KeyPair as _;
        let caller = &cx.caller;
        let op = creation(caller);
        self.audit_first(
            Some(cx),
            op,
            |note| {
                self.gate(cx, op, None, note)?;
                let size = match bits {
                    2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                    3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                    4096 => aws_lc_rs::rsa::KeySize::Rsa4096,
                    other => return Err(Invalid::RsaLength(u32::from(other)).into()),
                };
                for o in [&private, &public] {
                    super::lifecycle::check_text("name", &o.name, 128, false)?;
                    check_custom(&o.custom_attributes)?;
                }
                // Generated in the broker (aws-lc), sealed at once under
                // material from the root of trust; the pair never exists
                // unsealed outside this call and the cache.
                let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| rng_err())?;
                let pkcs8 = Plaintext::new(
                    pair.as_der().map_err(|_| rng_err())?.as_ref().to_vec(),
                );
                let pkcs1 = Plaintext::new(pair.public_key().as_ref().to_vec());
                let g = self.lock_lifecycle()?;
                self.check_name_free(&private.name, None)?;
                self.check_name_free(&public.name, None)?;
                if !private.name.is_empty() && private.name == public.name {
                    return Err(Precondition::NameInUse(public.name.clone()).into());
                }
                let now = self.clock.now_unix();
                let mut recs = Vec::new();
                for (new, kind, bytes, exportable) in [
                    // The front end's `kind` is ignored: each half is what it is.
                    (private, ObjectKind::PrivateKey { bits }, pkcs8, None),
                    (public, ObjectKind::PublicKey { bits }, pkcs1, Some(true)),
                ] {
                    let id = KeyId::generate(&self.rng).map_err(|_| rng_err())?;
                    let version = self.sealed_version(&id, &bytes)?;
                    recs.push(self.object_record(cx, id, version, kind, new, exportable, now)?);
                }
                let (mut privk, mut pubk) = match (recs.pop(), recs.pop()) {
                    (Some(p), Some(k)) => (k, p),
                    _ => return Err(crate::error::Fault::Task("key pair records".into()).into()),
                };
                privk.links.push(ObjectLink {
                    kind: LinkKind::PublicKey,
                    id: pubk.id.clone(),
                });
                pubk.links.push(ObjectLink {
                    kind: LinkKind::PrivateKey,
                    id: privk.id.clone(),
                });
                note.key(&privk.id, 1);
                note.via = format!("key pair: public key {}", pubk.id);
                Ok((g, privk, pubk))
            },
            |(g, mut privk, mut pubk), seq| {
                self.attach_provenance(&mut privk, &caller.spiffe_id(), seq)?;
                self.attach_provenance(&mut pubk, &caller.spiffe_id(), seq)?;
                self.store
                    .write_batch(&[&privk, &pubk], &[])
                    .map_err(store_err)?;
                drop(g);
                tracing::info!(private = %privk.id, public = %pubk.id, caller = %caller, "key pair created");
                Ok((privk, pubk))
            },
        )
    }

    /// Changes an object's name and custom attributes (operators, or the
    /// owning service): `f` sees and edits only those.
    pub fn set_attributes(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        f: impl FnOnce(&mut Described) -> Result<()>,
    ) -> Result<KeyRecord> {
        self.change(cx, Operation::SetAttributes, id, |rec| {
            let mut d = Described {
                name: rec.name.clone(),
                custom_attributes: rec.custom_attributes.clone(),
            };
            f(&mut d)?;
            super::lifecycle::check_text("name", &d.name, 128, rec.kind == ObjectKind::Envelope)?;
            check_custom(&d.custom_attributes)?;
            if d.name != rec.name && rec.kind != ObjectKind::Envelope {
                self.check_name_free(&d.name, Some(&rec.id))?;
            }
            rec.name = d.name;
            rec.custom_attributes = d.custom_attributes;
            Ok(())
        })
    }
}
