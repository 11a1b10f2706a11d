//! Root of trust in a PKCS#11 HSM (cryptoki), one generic backend driven by
//! an HSM profile.
//!
//! * Root key: AES-256, generated in the token, `CKA_TOKEN`, `CKA_PRIVATE`,
//!   `CKA_SENSITIVE`, not extractable, usable only to wrap and unwrap. Found
//!   again by label on every start. Its `CKA_ID` is a 4-byte generation
//!   followed by 8 random bytes; the highest generation wraps new material,
//!   older ones (kept until retired) still unwrap.
//! * Signing key: ECDSA P-256 pair, private half non-extractable.
//! * Version material comes from the token's RNG and is wrapped and
//!   unwrapped by the token (`CKM_AES_KEY_WRAP_PAD` or as the profile says),
//!   through short-lived session objects destroyed right after use.
//! * A pool of logged-in sessions; on a device error the connection is
//!   dropped, calls fail with `Unavailable`, and the next call or health
//!   check reconnects (rate-limited).

pub mod admin;
mod error;
mod module;
pub mod profile;

use super::{RootError, RootErrorKind, RootInfo, RootOfTrust, WrappedKey};
use crate::root::pin::PinSource;
use crate::secret::{KeyMaterial, Pin, KEY_LEN};
use cryptoki::error::Error as CkError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use error::{classify, map, Class};
pub use module::Module;
use profile::HsmProfile;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use zeroize::{Zeroize, Zeroizing};

/// DER of the P-256 curve OID (1.2.840.10045.3.1.7), for `CKA_EC_PARAMS`.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);
const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of a PKCS#11 root. Paths, labels and the PIN's *source*
/// only (see [`PinSource`]), so the derived `Debug` prints no secret.
#[derive(Clone, Debug)]
pub struct Pkcs11Settings {
    /// The HSM profile.
    pub profile: HsmProfile,
    /// Module path (profile default unless the config overrides it).
    pub module: PathBuf,
    /// Token label to find the slot by.
    pub token_label: String,
    /// PIN source.
    pub pin: PinSource,
    /// Label of the root key(s).
    pub root_label: String,
    /// Label of the signing key pair.
    pub signing_label: String,
}

/// Token facts for descriptions and provenance.
#[derive(Clone, Debug, Default)]
pub struct TokenDesc {
    /// Token label.
    pub label: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial number.
    pub serial: String,
}

/// One root key on the token.
#[derive(Clone, Debug)]
pub struct RootKey {
    /// `CKA_ID`.
    pub id: Vec<u8>,
    /// `p11:<hex id>`, stored in every `WrappedKey` it makes.
    pub id_str: String,
    /// Rotation generation (first 4 bytes of the id).
    pub generation: u32,
    /// Handle in the current connection.
    pub handle: ObjectHandle,
    /// `CKA_CHECK_VALUE` in hex (empty if the token gives none).
    pub check_value: String,
}

struct Conn {
    generation: u64,
    slot: Slot,
    token: TokenDesc,
    roots: Vec<RootKey>,
    signing: Option<(ObjectHandle, Vec<u8>)>,
    pool: Mutex<Vec<Session>>,
    returned: Condvar,
}

impl Conn {
    fn current(&self) -> &RootKey {
        // Invariant: a Conn is only built with at least one root key.
        &self.roots[self.roots.len() - 1]
    }

    fn checkout(&self) -> Result<Session, RootError> {
        let deadline = Instant::now() + CHECKOUT_TIMEOUT;
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(s) = pool.pop() {
                return Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RootError::new(
                    RootErrorKind::Unavailable,
                    format!(
                        "all sessions to HSM token '{}' are busy; retry",
                        self.token.label
                    ),
                ));
            }
            pool = self
                .returned
                .wait_timeout(pool, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn checkin(&self, s: Session) {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        self.returned.notify_one();
    }
}

/// The PKCS#11 root of trust.
pub struct Pkcs11Root {
    settings: Pkcs11Settings,
    module: Arc<Module>,
    pin: Pin,
    conn: RwLock<Option<Arc<Conn>>>,
    connecting: Mutex<Option<Instant>>,
    auth_failed: AtomicBool,
    last_info: RwLock<RootInfo>,
}

fn secret_key_template(label: Option<&[u8]>) -> Vec<Attribute> {
    let mut t = vec![Attribute::Class(ObjectClass::SECRET_KEY)];
    if let Some(l) = label {
        t.push(Attribute::Label(l.to_vec()));
    }
    t
}

/// Finds the slot whose token has `label`.
pub(crate) fn find_slot(module: &Module, label: &str) -> Result<(Slot, TokenDesc), RootError> {
    let slots = module
        .ctx
        .get_slots_with_token()
        .map_err(|e| map(&e, "listing slots", label))?;
    for slot in slots {
        let Ok(info) = module.ctx.get_token_info(slot) else {
            continue; // a lost or broken token; not ours or not usable
        };
        if info.label().trim_end() == label {
            return Ok((
                slot,
                TokenDesc {
                    label: label.to_owned(),
                    manufacturer: info.manufacturer_id().trim_end().to_owned(),
                    model: info.model().trim_end().to_owned(),
                    serial: info.serial_number().trim_end().to_owned(),
                },
            ));
        }
    }
    Err(RootError::new(
        RootErrorKind::Unavailable,
        format!("no token labelled '{label}' is present"),
    ))
}

/// Opens a read-write session and logs the user in (already logged in is fine).
pub(crate) fn open_session(
    module: &Module,
    slot: Slot,
    label: &str,
    pin: &Pin,
) -> Result<Session, RootError> {
    let s = module
        .ctx
        .open_rw_session(slot)
        .map_err(|e| map(&e, "opening a session", label))?;
    let auth = AuthPin::from(pin.expose_secret().to_owned());
    match s.login(UserType::User, Some(&auth)) {
        Ok(()) => Ok(s),
        Err(CkError::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => Ok(s),
        Err(e) => Err(map(&e, "login", label)),
    }
}

/// The root keys labelled `root_label`, oldest generation first.
pub(crate) fn find_roots(
    s: &Session,
    root_label: &str,
    token: &str,
) -> Result<Vec<RootKey>, RootError> {
    let handles = s
        .find_objects(&secret_key_template(Some(root_label.as_bytes())))
        .map_err(|e| map(&e, "finding root keys", token))?;
    let mut roots = Vec::new();
    for h in handles {
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Id,
                    AttributeType::CheckValue,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::NeverExtractable,
                    AttributeType::Local,
                ],
            )
            .map_err(|e| map(&e, "reading root key attributes", token))?;
        let mut id = Vec::new();
        let mut kcv = String::new();
        // (sensitive, extractable, never extractable, local), unknown = unsafe
        let mut born_here = (false, true, false, false);
        for a in attrs {
            match a {
                Attribute::Id(v) => id = v,
                Attribute::CheckValue(v) => kcv = hex::encode(v),
                Attribute::Sensitive(v) => born_here.0 = v,
                Attribute::Extractable(v) => born_here.1 = v,
                Attribute::NeverExtractable(v) => born_here.2 = v,
                Attribute::Local(v) => born_here.3 = v,
                _ => {}
            }
        }
        // Someone with the user PIN could import a key they know under the
        // root's label: only a key the token generated and never let out is
        // a root.
        if born_here != (true, false, true, true) {
            return Err(RootError::new(
                RootErrorKind::Integrity,
                format!(
                    "a key labelled {root_label} (id {}) on token {token} was not generated in the token and kept there (SENSITIVE, not EXTRACTABLE, NEVER_EXTRACTABLE and LOCAL are required): it may have been planted; remove it before the broker starts",
                    hex::encode(&id)
                ),
            ));
        }
        let Some(gen_bytes) = id.get(..4) else {
            tracing::warn!(
                token,
                "ignoring a key labelled as a root key without a sovkms CKA_ID"
            );
            continue;
        };
        let generation =
            u32::from_be_bytes([gen_bytes[0], gen_bytes[1], gen_bytes[2], gen_bytes[3]]);
        roots.push(RootKey {
            id_str: format!("p11:{}", hex::encode(&id)),
            id,
            generation,
            handle: h,
            check_value: kcv,
        });
    }
    roots.sort_by_key(|r| r.generation);
    Ok(roots)
}

/// The signing key pair: private handle and uncompressed public point.
pub(crate) fn find_signing(
    s: &Session,
    label: &str,
    token: &str,
) -> Result<Option<(ObjectHandle, Vec<u8>)>, RootError> {
    let private = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| map(&e, "finding the signing key", token))?;
    let public = s
        .find_objects(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| map(&e, "finding the signing public key", token))?;
    if private.len() > 1 || public.len() > 1 {
        return Err(RootError::new(
            RootErrorKind::Integrity,
            format!("token {token} holds more than one signing key labelled {label}: one may have been planted; remove the extra one"),
        ));
    }
    let (Some(&private), Some(&public)) = (private.first(), public.first()) else {
        return Ok(None);
    };
    let attrs = s
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(|e| map(&e, "reading the signing public key", token))?;
    let point = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or_else(|| {
            RootError::new(
                RootErrorKind::Config,
                "signing public key has no CKA_EC_POINT",
            )
        })?;
    Ok(Some((private, uncompressed_point(&point))))
}

/// `CKA_EC_POINT` is a DER OCTET STRING on most tokens, the raw point on some.
fn uncompressed_point(p: &[u8]) -> Vec<u8> {
    match p {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
        _ => p.to_vec(),
    }
}

/// Generates root key generation `generation` on the token.
pub(crate) fn generate_root(
    s: &Session,
    profile: &HsmProfile,
    label: &str,
    generation: u32,
    token: &str,
) -> Result<ObjectHandle, RootError> {
    let mut id = generation.to_be_bytes().to_vec();
    let mut rnd = [0u8; 8];
    s.generate_random_slice(&mut rnd)
        .map_err(|e| map(&e, "drawing random bytes", token))?;
    id.extend_from_slice(&rnd);
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen((KEY_LEN as u64).into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        // SoftHSM2 and others default some of these to true: say no explicitly.
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
    ];
    if profile.root_key_unmodifiable {
        t.push(Attribute::Modifiable(false));
    }
    s.generate_key(&Mechanism::AesKeyGen, &t)
        .map_err(|e| map(&e, "generating the root key", token))
}

/// Generates the ECDSA P-256 signing pair.
pub(crate) fn generate_signing(s: &Session, label: &str, token: &str) -> Result<(), RootError> {
    let id = label.as_bytes().to_vec();
    let public = [
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::EcParams(P256_PARAMS.to_vec()),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    let private = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Id(id),
    ];
    s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
        .map(|_| ())
        .map_err(|e| map(&e, "generating the signing key pair", token))
}

pub(crate) fn check_mechanisms(
    module: &Module,
    slot: Slot,
    profile: &HsmProfile,
    token: &str,
) -> Result<(), RootError> {
    let have = module
        .ctx
        .get_mechanism_list(slot)
        .map_err(|e| map(&e, "listing mechanisms", token))?;
    let wanted = std::iter::once((profile.wrap.mechanism_type(), profile.wrap.name()))
        .chain(profile::REQUIRED);
    let missing = |name: &str| {
        RootError::new(
            RootErrorKind::Config,
            format!(
                "HSM profile '{}' asks for {name}, which token '{token}' does not offer",
                profile.name
            ),
        )
    };
    for (m, name) in wanted {
        if !have.contains(&m) {
            return Err(missing(name));
        }
    }
    let names: Vec<String> = have.iter().map(|m| m.to_string()).collect();
    for name in &profile.extra_required {
        if !names.contains(name) {
            return Err(missing(name));
        }
    }
    Ok(())
}

impl Pkcs11Root {
    /// Connects to the token, logs in, finds the provisioned keys. Fails if
    /// the token is missing, the PIN is wrong, a mechanism is missing, or the
    /// token was never provisioned (`sovkms hsm init`).
    pub fn open(settings: Pkcs11Settings) -> Result<Self, RootError> {
        let pin = settings.pin.read()?;
        let module = Module::get(&settings.module)?;
        let root = Self {
            last_info: RwLock::new(RootInfo {
                kind: "pkcs11",
                description: String::new(),
                root_key_id: String::new(),
                development_only: false,
                mechanism: String::new(),
            }),
            settings,
            module,
            pin,
            conn: RwLock::new(None),
            connecting: Mutex::new(None),
            auth_failed: AtomicBool::new(false),
        };
        let conn = root.connect()?;
        root.install(conn);
        Ok(root)
    }

    fn token(&self) -> &str {
        &self.settings.token_label
    }

    fn connect(&self) -> Result<Arc<Conn>, RootError> {
        let label = self.token();
        let (generation, slot, token) = {
            let g = self.module.enter();
            match find_slot(&self.module, label) {
                Ok((slot, token)) => (*g, slot, token),
                Err(e) if self.settings.profile.reinitialize_to_recover => {
                    let seen = *g;
                    drop(g);
                    self.module.reinitialize(seen)?;
                    let g = self.module.enter();
                    let (slot, token) = find_slot(&self.module, label).map_err(|_| e)?;
                    (*g, slot, token)
                }
                Err(e) => return Err(e),
            }
        };
        let _g = self.module.enter();
        check_mechanisms(&self.module, slot, &self.settings.profile, label)?;
        let first = open_session(&self.module, slot, label, &self.pin)?;
        let roots = find_roots(&first, &self.settings.root_label, label)?;
        if roots.is_empty() {
            return Err(RootError::new(
                RootErrorKind::Config,
                format!(
                    "token '{label}' has no root key labelled '{}'; provision it with `sovkms hsm init`",
                    self.settings.root_label
                ),
            ));
        }
        let signing = find_signing(&first, &self.settings.signing_label, label)?;
        let mut pool = vec![first];
        for _ in 1..self.settings.profile.pool_size {
            pool.push(open_session(&self.module, slot, label, &self.pin)?);
        }
        Ok(Arc::new(Conn {
            generation,
            slot,
            token,
            roots,
            signing,
            pool: Mutex::new(pool),
            returned: Condvar::new(),
        }))
    }

    fn install(&self, conn: Arc<Conn>) {
        let cur = conn.current();
        *self.last_info.write().unwrap_or_else(|p| p.into_inner()) =
            RootInfo {
                kind: "pkcs11",
                description: format!(
                "PKCS#11 HSM ({} profile): token '{}', {} {}, serial {}; root key check value {}",
                self.settings.profile.name,
                conn.token.label,
                conn.token.manufacturer,
                conn.token.model,
                conn.token.serial,
                if cur.check_value.is_empty() { "n/a" } else { &cur.check_value }
            ) + &match &self.settings.pin {
                    PinSource::Tpm { tpm, .. } => format!(
                        "; user PIN sealed to the host's TPM (PCR {})",
                        tpm.policy.spec()
                    ),
                    _ => String::new(),
                },
                root_key_id: cur.id_str.clone(),
                development_only: false,
                mechanism: format!(
                    "C_GenerateRandom; {} under the HSM root key",
                    self.settings.profile.wrap.name()
                ),
            };
        *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(conn);
    }

    fn drop_conn(&self, conn: &Arc<Conn>) {
        let mut g = self.conn.write().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *g = None;
            tracing::error!(
                token = self.token(),
                "HSM connection lost; requests fail with UNAVAILABLE until it returns"
            );
        }
    }

    /// The live connection, reconnecting (rate-limited) when there is none.
    fn connection(&self) -> Result<Arc<Conn>, RootError> {
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        if self.auth_failed.load(Ordering::Relaxed) {
            return Err(RootError::new(
                RootErrorKind::Auth,
                format!("HSM login to token '{}' failed earlier; not retried to avoid locking the token: fix the PIN and restart", self.token()),
            ));
        }
        let mut last = self.connecting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(c);
        }
        let unavailable = || {
            RootError::new(
                RootErrorKind::Unavailable,
                format!("HSM token '{}' is unavailable; reconnecting", self.token()),
            )
        };
        if last.is_some_and(|t| t.elapsed() < RECONNECT_INTERVAL) {
            return Err(unavailable());
        }
        *last = Some(Instant::now());
        match self.connect() {
            Ok(c) => {
                self.install(Arc::clone(&c));
                tracing::info!(token = self.token(), "HSM connection established");
                Ok(c)
            }
            Err(e) => {
                if e.kind == RootErrorKind::Auth {
                    self.auth_failed.store(true, Ordering::Relaxed);
                }
                tracing::warn!(token = self.token(), error = %e, "HSM reconnect failed");
                Err(RootError::new(
                    e.kind,
                    format!("{}: {}", unavailable().message, e.message),
                ))
            }
        }
    }

    /// Is the token answering, with our root key in place?
    fn probe(&self, conn: &Conn, s: &Session) -> bool {
        self.module.ctx.get_token_info(conn.slot).is_ok()
            && s.get_attributes(conn.current().handle, &[AttributeType::Class])
                .is_ok()
    }

    /// Runs `f` on a pooled session; classifies failures in one place.
    fn run<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Conn, &Session) -> Result<T, CkError>,
    ) -> Result<T, RootError> {
        let conn = self.connection()?;
        let gate = self.module.enter();
        if *gate != conn.generation {
            drop(gate);
            self.drop_conn(&conn);
            return Err(RootError::new(
                RootErrorKind::Unavailable,
                format!(
                    "HSM token '{}' was re-initialized; reconnecting",
                    self.token()
                ),
            ));
        }
        let s = conn.checkout()?;
        match f(&conn, &s) {
            Ok(v) => {
                conn.checkin(s);
                Ok(v)
            }
            Err(e) => {
                let gone = match classify(&e) {
                    Class::Gone => true,
                    Class::Input => !self.probe(&conn, &s),
                    _ => false,
                };
                if gone {
                    drop(s);
                    drop(gate);
                    self.drop_conn(&conn);
                    let mut err = map(&e, what, self.token());
                    err.kind = RootErrorKind::Unavailable;
                    Err(err)
                } else {
                    conn.checkin(s);
                    Err(map(&e, what, self.token()))
                }
            }
        }
    }

    /// All root keys on the token (for status and rotation).
    pub fn root_keys(&self) -> Result<Vec<RootKey>, RootError> {
        Ok(self.connection()?.roots.clone())
    }

    /// Creates the next root key generation; it wraps new material from
    /// now on. Older ones stay until retired. Returns the new key.
    pub fn add_root_generation(&self) -> Result<RootKey, RootError> {
        let conn = self.connection()?;
        let next = conn.current().generation + 1;
        {
            let _g = self.module.enter();
            let s = conn.checkout()?;
            let r = generate_root(
                &s,
                &self.settings.profile,
                &self.settings.root_label,
                next,
                self.token(),
            );
            conn.checkin(s);
            r?;
        }
        // Reconnect so that every handle and the current generation are fresh.
        self.drop_conn(&conn);
        let conn = self.connection()?;
        Ok(conn.current().clone())
    }

    /// Destroys a root key that nothing references any more (checked by the caller).
    pub fn destroy_root(&self, id_str: &str) -> Result<(), RootError> {
        let conn = self.connection()?;
        if conn.current().id_str == id_str {
            return Err(RootError::new(
                RootErrorKind::Config,
                "the current root key cannot be retired",
            ));
        }
        let key = conn
            .roots
            .iter()
            .find(|r| r.id_str == id_str)
            .ok_or_else(|| {
                RootError::new(
                    RootErrorKind::UnknownRootKey,
                    format!("no root key {id_str} on the token"),
                )
            })?
            .handle;
        self.run("destroying a root key", |_, s| s.destroy_object(key))?;
        self.drop_conn(&conn);
        Ok(())
    }
}

fn material_object(value: &KeyMaterial) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Value(value.expose_secret().to_vec()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

fn unwrap_template() -> [Attribute; 6] {
    [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ]
}

fn zeroize_values(t: &mut [Attribute]) {
    for a in t {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

impl RootOfTrust for Pkcs11Root {
    fn info(&self) -> RootInfo {
        self.last_info
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn health(&self) -> Result<(), RootError> {
        self.run("health check", |conn, s| {
            s.get_attributes(conn.current().handle, &[AttributeType::Class])
                .map(|_| ())
        })
    }

    fn generate_material(&self) -> Result<KeyMaterial, RootError> {
        let mut buf = [0u8; KEY_LEN];
        self.run("drawing key material", |_, s| {
            s.generate_random_slice(&mut buf)
        })?;
        Ok(KeyMaterial::from_array(&mut buf))
    }

    fn wrap(&self, material: &KeyMaterial) -> Result<WrappedKey, RootError> {
        let mech = self.settings.profile.wrap.mechanism();
        let (blob, root_id) = self.run("wrapping key material", |conn, s| {
            let mut t = material_object(material);
            let obj = s.create_object(&t);
            zeroize_values(&mut t);
            let obj = obj?;
            let root = conn.current();
            let wrapped = s.wrap_key(&mech, root.handle, obj);
            let destroyed = s.destroy_object(obj);
            let wrapped = wrapped?;
            destroyed?;
            Ok((wrapped, root.id_str.clone()))
        })?;
        Ok(WrappedKey {
            root_key_id: root_id,
            blob,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<KeyMaterial, RootError> {
        let mech = self.settings.profile.wrap.mechanism();
        let conn = self.connection()?;
        let root = conn
            .roots
            .iter()
            .find(|r| r.id_str == wrapped.root_key_id)
            .ok_or_else(|| {
                RootError::new(
                    RootErrorKind::UnknownRootKey,
                    format!(
                        "key material was wrapped by root key {}, which token '{}' does not hold",
                        wrapped.root_key_id,
                        self.token()
                    ),
                )
            })?
            .handle;
        drop(conn);
        let value = self.run("unwrapping key material", |_, s| {
            let obj = s.unwrap_key(&mech, root, &wrapped.blob, &unwrap_template())?;
            let attrs = s.get_attributes(obj, &[AttributeType::Value]);
            let destroyed = s.destroy_object(obj);
            let mut attrs = attrs?;
            destroyed?;
            let mut value = Zeroizing::new(Vec::new());
            for a in &mut attrs {
                if let Attribute::Value(v) = a {
                    value = Zeroizing::new(std::mem::take(v));
                }
            }
            Ok(value)
        })?;
        KeyMaterial::from_slice(&value).ok_or_else(|| {
            RootError::new(
                RootErrorKind::Integrity,
                "unwrapped key material has the wrong length",
            )
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, RootError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, message);
        let conn = self.connection()?;
        let (key, _) = conn.signing.clone().ok_or_else(|| {
            RootError::new(
                RootErrorKind::Config,
                format!(
                    "token '{}' has no signing key; run `sovkms hsm init`",
                    self.token()
                ),
            )
        })?;
        drop(conn);
        self.run("signing", |_, s| {
            s.sign(&Mechanism::Ecdsa, key, digest.as_ref())
        })
    }

    fn signing_public_key(&self) -> Result<Vec<u8>, RootError> {
        let conn = self.connection()?;
        conn.signing
            .as_ref()
            .map(|(_, p)| p.clone())
            .ok_or_else(|| {
                RootError::new(
                    RootErrorKind::Config,
                    format!(
                        "token '{}' has no signing key; run `sovkms hsm init`",
                        self.token()
                    ),
                )
            })
    }
}
