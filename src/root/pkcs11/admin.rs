//! Operator-side PKCS#11 work: list slots, provision a token, report the
//! objects' attributes. Used by `sovkms hsm …`.

use super::error::map;
use super::{
    find_roots, find_signing, find_slot, generate_root, generate_signing, open_session, Module,
    Pkcs11Settings,
};
use crate::root::{p256_spki_pem, RootError, RootErrorKind};
use crate::secret::Pin;
use cryptoki::object::{Attribute, AttributeType, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::Path;

/// One slot with a token.
#[derive(Debug, serde::Serialize)]
pub struct SlotReport {
    /// Slot id (not stable across runs; find tokens by label).
    pub slot_id: u64,
    /// Token label.
    pub label: String,
    /// Manufacturer.
    pub manufacturer: String,
    /// Model.
    pub model: String,
    /// Serial.
    pub serial: String,
    /// Initialized?
    pub initialized: bool,
    /// Mechanism names.
    pub mechanisms: Vec<String>,
}

/// Slots and tokens of a module.
pub fn list(module_path: &Path) -> Result<Vec<SlotReport>, RootError> {
    let m = Module::get(module_path)?;
    let _g = m.enter();
    let slots = m
        .ctx
        .get_slots_with_token()
        .map_err(|e| map(&e, "listing slots", "-"))?;
    let mut out = Vec::new();
    for slot in slots {
        let Ok(info) = m.ctx.get_token_info(slot) else {
            continue;
        };
        let mechanisms = m
            .ctx
            .get_mechanism_list(slot)
            .map(|v| v.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default();
        out.push(SlotReport {
            slot_id: slot.id(),
            label: info.label().trim_end().to_owned(),
            manufacturer: info.manufacturer_id().trim_end().to_owned(),
            model: info.model().trim_end().to_owned(),
            serial: info.serial_number().trim_end().to_owned(),
            initialized: info.token_initialized(),
            mechanisms,
        });
    }
    Ok(out)
}

/// A SoftHSM2 config keeping its tokens in `tokens` (file backend, errors
/// only): what development brokers and the tests point SOFTHSM2_CONF at.
pub fn softhsm_dev_conf(tokens: &std::path::Path) -> String {
    format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
        tokens.display()
    )
}

/// Initializes a fresh token in the first uninitialized slot and sets its
/// user PIN. For development tokens (SoftHSM2) and tests; real HSMs are
/// initialized with their vendor's tools.
pub fn init_dev_token(
    module_path: &Path,
    label: &str,
    so_pin: &Pin,
    user_pin: &Pin,
) -> Result<(), RootError> {
    // Two threads must not pick the same free slot.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let m = Module::get(module_path)?;
    let _g = m.enter();
    let slots = m
        .ctx
        .get_all_slots()
        .map_err(|e| map(&e, "listing slots", label))?;
    let free = slots
        .into_iter()
        .find(|s| {
            m.ctx
                .get_token_info(*s)
                .is_ok_and(|t| !t.token_initialized())
        })
        .ok_or_else(|| {
            RootError::new(
                RootErrorKind::Config,
                "no uninitialized slot to create a token in",
            )
        })?;
    let so = AuthPin::from(so_pin.expose_secret().to_owned());
    m.ctx
        .init_token(free, &so, label)
        .map_err(|e| map(&e, "initializing the token", label))?;
    let (slot, _) = find_slot(&m, label)?;
    let s = m
        .ctx
        .open_rw_session(slot)
        .map_err(|e| map(&e, "opening a session", label))?;
    s.login(UserType::So, Some(&so))
        .map_err(|e| map(&e, "SO login", label))?;
    s.init_pin(&AuthPin::from(user_pin.expose_secret().to_owned()))
        .map_err(|e| map(&e, "setting the user PIN", label))?;
    s.logout().map_err(|e| map(&e, "logout", label))?;
    Ok(())
}

/// Result of `hsm init`.
#[derive(Debug, serde::Serialize)]
pub struct Provisioned {
    /// False when the token already held a root key (nothing was changed).
    pub created: bool,
    /// Current root key id (`p11:<hex>`).
    pub root_key_id: String,
    /// Its check value.
    pub check_value: String,
    /// Signing public key, uncompressed SEC1, hex.
    pub signing_public_key_hex: String,
    /// Signing public key as SubjectPublicKeyInfo PEM, for auditors.
    pub signing_public_key_pem: String,
}

fn logged_in(settings: &Pkcs11Settings) -> Result<(std::sync::Arc<Module>, Session), RootError> {
    let pin = settings.pin.read()?;
    let m = Module::get(&settings.module)?;
    let s = {
        let _g = m.enter();
        let (slot, _) = find_slot(&m, &settings.token_label)?;
        super::check_mechanisms(&m, slot, &settings.profile, &settings.token_label)?;
        open_session(&m, slot, &settings.token_label, &pin)?
    };
    Ok((m, s))
}

/// Provisions the root key and the signing key pair. Idempotent: if a root
/// key exists nothing is overwritten and the existing keys are reported.
pub fn provision(settings: &Pkcs11Settings) -> Result<Provisioned, RootError> {
    let (m, s) = logged_in(settings)?;
    let _g = m.enter();
    let token = settings.token_label.as_str();
    let mut created = false;
    let mut roots = find_roots(&s, &settings.root_label, token)?;
    if roots.is_empty() {
        generate_root(&s, &settings.profile, &settings.root_label, 1, token)?;
        roots = find_roots(&s, &settings.root_label, token)?;
        created = true;
    }
    let mut signing = find_signing(&s, &settings.signing_label, token)?;
    if signing.is_none() {
        generate_signing(&s, &settings.signing_label, token)?;
        signing = find_signing(&s, &settings.signing_label, token)?;
        created = true;
    }
    let root = roots
        .last()
        .ok_or_else(|| RootError::new(RootErrorKind::Config, "root key generation left no key"))?;
    let (_, point) = signing.ok_or_else(|| {
        RootError::new(RootErrorKind::Config, "signing key generation left no key")
    })?;
    Ok(Provisioned {
        created,
        root_key_id: root.id_str.clone(),
        check_value: root.check_value.clone(),
        signing_public_key_hex: hex::encode(&point),
        signing_public_key_pem: p256_spki_pem(&point),
    })
}

/// One object's security-relevant attributes.
#[derive(Debug, serde::Serialize)]
pub struct ObjectReport {
    /// What it is for.
    pub role: String,
    /// `CKA_LABEL`.
    pub label: String,
    /// `CKA_ID`, hex.
    pub id: String,
    /// Boolean attributes by PKCS#11 name (absent when the token does not report one).
    pub flags: Vec<(String, bool)>,
    /// `CKA_CHECK_VALUE`, hex.
    pub check_value: String,
}

/// Token and objects, for `hsm status`.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    /// Token label.
    pub token: String,
    /// Manufacturer, model, serial.
    pub device: String,
    /// Profile name.
    pub profile: String,
    /// Objects.
    pub objects: Vec<ObjectReport>,
}

const FLAGS: [(AttributeType, &str); 15] = [
    (AttributeType::Token, "CKA_TOKEN"),
    (AttributeType::Private, "CKA_PRIVATE"),
    (AttributeType::Sensitive, "CKA_SENSITIVE"),
    (AttributeType::AlwaysSensitive, "CKA_ALWAYS_SENSITIVE"),
    (AttributeType::Extractable, "CKA_EXTRACTABLE"),
    (AttributeType::NeverExtractable, "CKA_NEVER_EXTRACTABLE"),
    (AttributeType::Local, "CKA_LOCAL"),
    (AttributeType::Modifiable, "CKA_MODIFIABLE"),
    (AttributeType::Wrap, "CKA_WRAP"),
    (AttributeType::Unwrap, "CKA_UNWRAP"),
    (AttributeType::Encrypt, "CKA_ENCRYPT"),
    (AttributeType::Decrypt, "CKA_DECRYPT"),
    (AttributeType::Sign, "CKA_SIGN"),
    (AttributeType::Verify, "CKA_VERIFY"),
    (AttributeType::Derive, "CKA_DERIVE"),
];

fn report(
    s: &Session,
    h: ObjectHandle,
    role: &str,
    token: &str,
) -> Result<ObjectReport, RootError> {
    let mut r = ObjectReport {
        role: role.to_owned(),
        label: String::new(),
        id: String::new(),
        flags: Vec::new(),
        check_value: String::new(),
    };
    let basic = s
        .get_attributes(
            h,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::CheckValue,
            ],
        )
        .map_err(|e| map(&e, "reading attributes", token))?;
    for a in basic {
        match a {
            Attribute::Label(v) => r.label = String::from_utf8_lossy(&v).into_owned(),
            Attribute::Id(v) => r.id = hex::encode(v),
            Attribute::CheckValue(v) => r.check_value = hex::encode(v),
            _ => {}
        }
    }
    // Ask one attribute at a time: a token may refuse some for some classes.
    for (t, name) in FLAGS {
        if let Ok(v) = s.get_attributes(h, &[t]) {
            if let Some(b) = v.iter().find_map(bool_of) {
                r.flags.push((name.to_owned(), b));
            }
        }
    }
    Ok(r)
}

fn bool_of(a: &Attribute) -> Option<bool> {
    use Attribute::*;
    match a {
        Token(b) | Private(b) | Sensitive(b) | AlwaysSensitive(b) | Extractable(b)
        | NeverExtractable(b) | Local(b) | Modifiable(b) | Wrap(b) | Unwrap(b) | Encrypt(b)
        | Decrypt(b) | Sign(b) | Verify(b) | Derive(b) => Some(*b),
        _ => None,
    }
}

/// Token, root keys and signing key with their attributes.
pub fn status(settings: &Pkcs11Settings) -> Result<Status, RootError> {
    let (m, s) = logged_in(settings)?;
    let _g = m.enter();
    let token = settings.token_label.as_str();
    let (_, desc) = find_slot(&m, token)?;
    let mut objects = Vec::new();
    let roots = find_roots(&s, &settings.root_label, token)?;
    let n = roots.len();
    for (i, r) in roots.iter().enumerate() {
        let role = if i + 1 == n {
            "root key (current)"
        } else {
            "root key (retained)"
        };
        objects.push(report(
            &s,
            r.handle,
            &format!("{role}, generation {}", r.generation),
            token,
        )?);
    }
    let label = settings.signing_label.as_bytes().to_vec();
    for (class, role) in [
        (
            cryptoki::object::ObjectClass::PRIVATE_KEY,
            "signing private key",
        ),
        (
            cryptoki::object::ObjectClass::PUBLIC_KEY,
            "signing public key",
        ),
    ] {
        let hs = s
            .find_objects(&[Attribute::Class(class), Attribute::Label(label.clone())])
            .map_err(|e| map(&e, "finding the signing key", token))?;
        for h in hs {
            objects.push(report(&s, h, role, token)?);
        }
    }
    Ok(Status {
        token: desc.label,
        device: format!(
            "{} {}, serial {}",
            desc.manufacturer, desc.model, desc.serial
        ),
        profile: settings.profile.name.clone(),
        objects,
    })
}
