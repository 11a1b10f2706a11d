//! The operations: each reads its payload, calls the core once (one gate,
//! one audit record) and builds its response payload. Nothing here decides
//! who may do what: the core's table does.

use super::attrs::{self, Attr};
use super::message::{Fields, Version, SUPPORTED};
use super::tag::{self, op, reason};
use super::ttlv::{Item, Value};
use super::{failure, Failure};
use crate::broker::{Broker, CallCtx, Cipher, Described, NewObject};
use crate::keys::{KeyId, KeyRecord, ObjectKind, RevocationReason};
use crate::secret::Plaintext;

/// What one request message's items share: the version, the caller, and
/// the ID Placeholder (the id the previous item created or located).
pub struct Session<'a> {
    /// The core.
    pub broker: &'a Broker,
    /// The request's version.
    pub version: Version,
    /// The ID Placeholder.
    pub placeholder: Option<KeyId>,
}

type Out = Result<Vec<Item>, Failure>;

fn uid(id: &KeyId) -> Item {
    Item::text(tag::UNIQUE_IDENTIFIER, id.to_string())
}

fn not_supported(what: String) -> Failure {
    Failure::new(reason::FEATURE_NOT_SUPPORTED, what)
}

/// The operations this server carries out (Query's answer).
pub const OPERATIONS: [u32; 20] = [
    op::CREATE,
    op::CREATE_KEY_PAIR,
    op::REKEY,
    op::REGISTER,
    op::LOCATE,
    op::CHECK,
    op::GET,
    op::GET_ATTRIBUTES,
    op::GET_ATTRIBUTE_LIST,
    op::ADD_ATTRIBUTE,
    op::MODIFY_ATTRIBUTE,
    op::DELETE_ATTRIBUTE,
    op::SET_ATTRIBUTE,
    op::ACTIVATE,
    op::REVOKE,
    op::DESTROY,
    op::QUERY,
    op::DISCOVER_VERSIONS,
    op::ENCRYPT,
    op::DECRYPT,
];

impl Session<'_> {
    /// Carries out one batch item.
    pub fn run(&mut self, cx: &CallCtx, operation: u32, payload: &Item) -> Out {
        let f = Fields::new(payload, "the Request Payload")?;
        match operation {
            op::DISCOVER_VERSIONS => self.discover_versions(cx, &f),
            op::QUERY => self.query(cx, &f),
            op::CREATE => self.create(cx, &f),
            op::CREATE_KEY_PAIR => self.create_key_pair(cx, &f),
            op::REGISTER => self.register(cx, &f),
            op::GET => self.get(cx, &f),
            op::CHECK => self.check(cx, &f),
            op::GET_ATTRIBUTES => self.get_attributes(cx, &f, false),
            op::GET_ATTRIBUTE_LIST => self.get_attributes(cx, &f, true),
            op::ADD_ATTRIBUTE | op::MODIFY_ATTRIBUTE | op::SET_ATTRIBUTE => {
                self.set_attribute(cx, &f, operation)
            }
            op::DELETE_ATTRIBUTE => self.delete_attribute(cx, &f),
            op::LOCATE => self.locate(cx, &f),
            op::ACTIVATE => self.activate(cx, &f),
            op::REKEY => self.rekey(cx, &f),
            op::REVOKE => self.revoke(cx, &f),
            op::DESTROY => self.destroy(cx, &f),
            op::ENCRYPT => self.encrypt(cx, &f),
            op::DECRYPT => self.decrypt(cx, &f),
            other => {
                let what = format!("the KMIP operation with code {other:#x}");
                let mut f = failure(&self.broker.audit_unsupported(cx, &what));
                f.reason = reason::OPERATION_NOT_SUPPORTED;
                Err(f)
            }
        }
    }

    /// The Unique Identifier a request names, or the ID Placeholder.
    fn target(&self, f: &Fields<'_>) -> Result<KeyId, Failure> {
        match f.text(tag::UNIQUE_IDENTIFIER)? {
            Some(s) => KeyId::parse(s).map_err(|e| {
                Failure::new(reason::ITEM_NOT_FOUND, format!("no object has the Unique Identifier given: {e}"))
            }),
            None => self.placeholder.clone().ok_or_else(|| {
                Failure::new(
                    reason::MISSING_DATA,
                    "the request names no Unique Identifier and no earlier batch item left an ID Placeholder",
                )
            }),
        }
    }

    fn discover_versions(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Discover Versions", &[tag::PROTOCOL_VERSION])?;
        let theirs = f
            .all(tag::PROTOCOL_VERSION)
            .map(Version::parse)
            .collect::<Result<Vec<_>, _>>()?;
        self.broker.inform(cx).map_err(|e| failure(&e))?;
        Ok(SUPPORTED
            .iter()
            .filter(|v| theirs.is_empty() || theirs.contains(v))
            .map(|v| v.item())
            .collect())
    }

    fn query(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Query", &[tag::QUERY_FUNCTION])?;
        let mut functions = Vec::new();
        for q in f.all(tag::QUERY_FUNCTION) {
            match q.value {
                Value::Enumeration(v) => functions.push(v),
                ref v => {
                    return Err(Failure::new(
                        reason::INVALID_FIELD,
                        format!(
                            "Query Function must be an Enumeration; it is a {}",
                            v.type_name()
                        ),
                    ))
                }
            }
        }
        self.broker.inform(cx).map_err(|e| failure(&e))?;
        let mut out = Vec::new();
        if functions.contains(&tag::query::OPERATIONS) {
            for o in OPERATIONS {
                if o == op::SET_ATTRIBUTE && !self.version.is_2x() {
                    continue;
                }
                out.push(Item::enumeration(tag::OPERATION, o));
            }
        }
        if functions.contains(&tag::query::OBJECTS) {
            out.push(Item::enumeration(
                tag::OBJECT_TYPE,
                tag::object_type::SYMMETRIC_KEY,
            ));
            out.push(Item::enumeration(
                tag::OBJECT_TYPE,
                tag::object_type::SECRET_DATA,
            ));
        }
        if functions.contains(&tag::query::SERVER_INFORMATION) {
            out.push(Item::text(
                tag::VENDOR_IDENTIFICATION,
                format!(
                    "sovkms {} (region {})",
                    env!("CARGO_PKG_VERSION"),
                    self.broker.region()
                ),
            ));
        }
        Ok(out)
    }

    fn create(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "Create",
            &[
                tag::OBJECT_TYPE,
                tag::TEMPLATE_ATTRIBUTE,
                tag::ATTRIBUTES,
                PROTECTION_STORAGE_MASKS,
            ],
        )?;
        let w = attrs::wanted(&attrs::supplied(f)?)?;
        let object_type = f.req_enumeration(tag::OBJECT_TYPE)?;
        if object_type != tag::object_type::SYMMETRIC_KEY {
            return Err(not_supported(
                "Create makes symmetric keys here; register secret data with Register".into(),
            ));
        }
        let bits = aes_bits(w.algorithm, w.length)?;
        let now = self.broker.now_unix();
        // Exportable when the request asks (2.x Extractable, or the Export
        // usage bit), or when the operator listed the creator as a client
        // that fetches what it creates; never when it says Extractable false.
        let exportable = match w.extractable {
            Some(e) => e,
            None => {
                w.usage_mask.is_some_and(|m| m & tag::usage::EXPORT != 0)
                    || self.broker.creates_exportable(&cx.caller)
            }
        };
        let rec = self
            .broker
            .create_object(
                cx,
                NewObject {
                    kind: ObjectKind::SymmetricKey { bits },
                    material: None,
                    name: w.name.unwrap_or_default(),
                    exportable,
                    activate: w.activation_date.is_some_and(|t| t <= now),
                    custom_attributes: w.kept,
                },
            )
            .map_err(|e| failure(&e))?;
        self.placeholder = Some(rec.id.clone());
        Ok(vec![
            Item::enumeration(tag::OBJECT_TYPE, object_type),
            uid(&rec.id),
        ])
    }

    fn create_key_pair(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        let (common, private, public) = (
            [tag::COMMON_TEMPLATE_ATTRIBUTE, tag::COMMON_ATTRIBUTES],
            [
                tag::PRIVATE_KEY_TEMPLATE_ATTRIBUTE,
                tag::PRIVATE_KEY_ATTRIBUTES,
            ],
            [
                tag::PUBLIC_KEY_TEMPLATE_ATTRIBUTE,
                tag::PUBLIC_KEY_ATTRIBUTES,
            ],
        );
        let mut allowed = vec![PROTECTION_STORAGE_MASKS, 0x420160, 0x420161, 0x420162];
        allowed.extend(common.iter().chain(&private).chain(&public));
        f.only("Create Key Pair", &allowed)?;
        let read = |tags: [u32; 2]| -> Result<Vec<attrs::Attr>, Failure> {
            let mut out = Vec::new();
            for t in tags {
                if let Some(s) = f.structure(t)? {
                    out.extend(attrs::in_structure(s)?);
                }
            }
            Ok(out)
        };
        let common = read(common)?;
        let mut priv_attrs = common.clone();
        priv_attrs.extend(read(private)?);
        let mut pub_attrs: Vec<attrs::Attr> =
            common.into_iter().filter(|a| a.name != "Name").collect();
        pub_attrs.extend(read(public)?);
        let (wp, wq) = (attrs::wanted(&priv_attrs)?, attrs::wanted(&pub_attrs)?);
        match wp.algorithm.or(wq.algorithm) {
            Some(tag::alg::RSA) => {}
            Some(other) => {
                return Err(not_supported(format!(
                    "Create Key Pair makes RSA keys here, not algorithm {other:#x}"
                )))
            }
            None => {
                return Err(Failure::new(
                    reason::MISSING_DATA,
                    "the request names no Cryptographic Algorithm; key pairs here are RSA",
                ))
            }
        }
        let bits = wp.length.or(wq.length).ok_or_else(|| {
            Failure::new(
                reason::MISSING_DATA,
                "the request names no Cryptographic Length",
            )
        })?;
        let bits = u16::try_from(bits).map_err(|_| {
            Failure::new(
                reason::INVALID_FIELD,
                format!("an RSA key of {bits} bits is not supported; use 2048, 3072 or 4096"),
            )
        })?;
        let now = self.broker.now_unix();
        let exportable = match wp.extractable {
            Some(e) => e,
            None => {
                wp.usage_mask.is_some_and(|m| m & tag::usage::EXPORT != 0)
                    || self.broker.creates_exportable(&cx.caller)
            }
        };
        let object = |w: attrs::Wanted, exportable: bool| NewObject {
            kind: ObjectKind::Envelope, // set by the core per half
            material: None,
            name: w.name.unwrap_or_default(),
            exportable,
            activate: w.activation_date.is_some_and(|t| t <= now),
            custom_attributes: w.kept,
        };
        let (privk, pubk) = self
            .broker
            .create_key_pair(cx, bits, object(wp, exportable), object(wq, true))
            .map_err(|e| failure(&e))?;
        self.placeholder = Some(privk.id.clone());
        Ok(vec![
            Item::text(tag::PRIVATE_KEY_UNIQUE_IDENTIFIER, privk.id.to_string()),
            Item::text(tag::PUBLIC_KEY_UNIQUE_IDENTIFIER, pubk.id.to_string()),
        ])
    }

    fn register(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "Register",
            &[
                tag::OBJECT_TYPE,
                tag::TEMPLATE_ATTRIBUTE,
                tag::ATTRIBUTES,
                tag::SYMMETRIC_KEY,
                tag::SECRET_DATA,
                PROTECTION_STORAGE_MASKS,
            ],
        )?;
        let w = attrs::wanted(&attrs::supplied(f)?)?;
        let object_type = f.req_enumeration(tag::OBJECT_TYPE)?;
        let (kind, material) = match object_type {
            tag::object_type::SYMMETRIC_KEY => {
                let block = key_block(f.req_structure(tag::SYMMETRIC_KEY)?)?;
                let bits = aes_bits(block.algorithm.or(w.algorithm), block.length.or(w.length).or_else(|| {
                    i32::try_from(block.material.len() * 8).ok()
                }))?;
                (ObjectKind::SymmetricKey { bits }, block.material)
            }
            tag::object_type::SECRET_DATA => {
                let sd = Fields::new(f.req_structure(tag::SECRET_DATA)?, "Secret Data")?;
                sd.only("Secret Data", &[tag::SECRET_DATA_TYPE, tag::KEY_BLOCK])?;
                let data_type = sd.req_enumeration(tag::SECRET_DATA_TYPE)?;
                let block = key_block_fields(&Fields::new(sd.req_structure(tag::KEY_BLOCK)?, "Key Block")?)?;
                (ObjectKind::SecretData { data_type }, block.material)
            }
            other => {
                return Err(not_supported(format!(
                    "Register takes symmetric keys and secret data here, not objects of type {other:#x}"
                )))
            }
        };
        let now = self.broker.now_unix();
        let rec = self
            .broker
            .create_object(
                cx,
                NewObject {
                    kind,
                    material: Some(material),
                    name: w.name.unwrap_or_default(),
                    // Registered bytes were the client's to begin with.
                    exportable: true,
                    activate: w.activation_date.is_some_and(|t| t <= now),
                    custom_attributes: w.kept,
                },
            )
            .map_err(|e| failure(&e))?;
        self.placeholder = Some(rec.id.clone());
        Ok(vec![uid(&rec.id)])
    }

    fn get(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "Get",
            &[
                tag::UNIQUE_IDENTIFIER,
                tag::KEY_FORMAT_TYPE,
                tag::KEY_COMPRESSION_TYPE,
                tag::KEY_WRAPPING_SPECIFICATION,
                KEY_WRAP_TYPE,
            ],
        )?;
        if let Some(spec) = f.structure(tag::KEY_WRAPPING_SPECIFICATION)? {
            return self.get_wrapped(cx, f, spec);
        }
        if f.get(tag::KEY_COMPRESSION_TYPE).is_some() {
            return Err(not_supported(
                "key compression applies to EC keys, which this server does not hold".into(),
            ));
        }
        let id = self.target(f)?;
        let format = f.enumeration(tag::KEY_FORMAT_TYPE)?;
        let (rec, bytes) = self
            .broker
            .export(cx, &id)
            .and_then(|r| r.released_blocking())
            .map_err(|e| failure(&e))?;
        let object = object_item(&rec, bytes, format)?;
        Ok(vec![
            Item::enumeration(tag::OBJECT_TYPE, attrs::object_type(rec.kind)),
            uid(&rec.id),
            object,
        ])
    }

    /// Get with a Key Wrapping Specification: the key material wrapped by
    /// another AES key with AES key wrap (RFC 3394, or RFC 5649 with
    /// padding), No Encoding (the wrapped bytes are the Key Material).
    fn get_wrapped(&mut self, cx: &CallCtx, f: &Fields<'_>, spec: &Item) -> Out {
        let s = Fields::new(spec, "Key Wrapping Specification")?;
        s.only(
            "Key Wrapping Specification",
            &[
                WRAPPING_METHOD,
                tag::ENCRYPTION_KEY_INFORMATION,
                MAC_SIGNATURE_KEY_INFORMATION,
                tag::ATTRIBUTE_NAME,
                ENCODING_OPTION,
            ],
        )?;
        if s.req_enumeration(WRAPPING_METHOD)? != 1 {
            return Err(not_supported(
                "only the Encrypt wrapping method is supported".into(),
            ));
        }
        if s.get(MAC_SIGNATURE_KEY_INFORMATION).is_some() || s.get(tag::ATTRIBUTE_NAME).is_some() {
            return Err(not_supported(
                "wrapping with a MAC/signature key or with attributes is not supported".into(),
            ));
        }
        if s.enumeration(ENCODING_OPTION)?
            .is_some_and(|e| e != NO_ENCODING)
        {
            return Err(not_supported(
                "only the No Encoding option is supported: the wrapped bytes are the key material"
                    .into(),
            ));
        }
        let info = Fields::new(
            s.req_structure(tag::ENCRYPTION_KEY_INFORMATION)?,
            "Encryption Key Information",
        )?;
        let wrapping = KeyId::parse(info.req_text(tag::UNIQUE_IDENTIFIER)?).map_err(|e| {
            Failure::new(
                reason::ITEM_NOT_FOUND,
                format!("no wrapping key has that Unique Identifier: {e}"),
            )
        })?;
        let mode = match info.structure(tag::CRYPTOGRAPHIC_PARAMETERS)? {
            Some(p) => {
                Fields::new(p, "Cryptographic Parameters")?.enumeration(tag::BLOCK_CIPHER_MODE)?
            }
            None => None,
        };
        let padded = match mode {
            None | Some(NIST_KEY_WRAP) => false,
            Some(AES_KEY_WRAP_PADDING) => true,
            Some(other) => {
                return Err(not_supported(format!(
                    "Block Cipher Mode {other:#x} is not a key wrap mode here; use NIST Key Wrap (RFC 3394) or AES Key Wrap with Padding (RFC 5649)"
                )))
            }
        };
        let id = self.target(f)?;
        let (rec, wrapped) = self
            .broker
            .export_wrapped(cx, &id, &wrapping, padded)
            .and_then(|r| r.released_blocking())
            .map_err(|e| failure(&e))?;
        let format = f.enumeration(tag::KEY_FORMAT_TYPE)?;
        let mut object = object_item(&rec, Plaintext::new(wrapped), format)?;
        // The Key Wrapping Data goes into the Key Block.
        let wrapping_data = Item::structure(
            tag::KEY_WRAPPING_DATA,
            vec![
                Item::enumeration(WRAPPING_METHOD, 1),
                Item::structure(
                    tag::ENCRYPTION_KEY_INFORMATION,
                    vec![
                        uid(&wrapping),
                        Item::structure(
                            tag::CRYPTOGRAPHIC_PARAMETERS,
                            vec![Item::enumeration(
                                tag::BLOCK_CIPHER_MODE,
                                if padded {
                                    AES_KEY_WRAP_PADDING
                                } else {
                                    NIST_KEY_WRAP
                                },
                            )],
                        ),
                    ],
                ),
                Item::enumeration(ENCODING_OPTION, NO_ENCODING),
            ],
        );
        if let Value::Structure(items) = &mut object.value {
            if let Some(Value::Structure(block)) = items
                .iter_mut()
                .find(|i| i.tag == tag::KEY_BLOCK)
                .map(|b| &mut b.value)
            {
                block.push(wrapping_data);
            }
        }
        Ok(vec![
            Item::enumeration(tag::OBJECT_TYPE, attrs::object_type(rec.kind)),
            uid(&rec.id),
            object,
        ])
    }

    fn check(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        let id = self.target(f)?;
        let rec = self
            .broker
            .get_attributes(cx, &id)
            .map_err(|e| failure(&e))?;
        Ok(vec![uid(&rec.id)])
    }

    fn get_attributes(&mut self, cx: &CallCtx, f: &Fields<'_>, list: bool) -> Out {
        f.only(
            if list {
                "Get Attribute List"
            } else {
                "Get Attributes"
            },
            &[
                tag::UNIQUE_IDENTIFIER,
                tag::ATTRIBUTE_NAME,
                tag::ATTRIBUTE_REFERENCE,
            ],
        )?;
        let id = self.target(f)?;
        let names = attrs::requested_names(f)?;
        let rec = self
            .broker
            .get_attributes(cx, &id)
            .map_err(|e| failure(&e))?;
        let mut all = attrs::of_record(&rec, self.broker.now_unix(), self.version);
        let mut out = vec![uid(&rec.id)];
        if list {
            out.extend(attrs::names_list(&all, self.version));
            return Ok(out);
        }
        if !names.is_empty() {
            all.retain(|a| names.contains(&a.name));
        }
        if self.version.is_2x() || !all.is_empty() {
            out.extend(attrs::encode(all, self.version));
        }
        Ok(out)
    }

    fn set_attribute(&mut self, cx: &CallCtx, f: &Fields<'_>, operation: u32) -> Out {
        let id = self.target(f)?;
        // 1.x: one Attribute; 2.x: New Attribute holding one tagged item.
        let new: Attr = if let Some(a) = f.structure(tag::ATTRIBUTE)? {
            attrs::supplied(&Fields::of(std::slice::from_ref(a)))?
                .pop()
                .ok_or_else(|| {
                    Failure::new(reason::MISSING_DATA, "the request names no attribute")
                })?
        } else {
            let n = f.req_structure(tag::NEW_ATTRIBUTE)?;
            let wrapped = Item::structure(tag::ATTRIBUTES, n.children().to_vec());
            let mut v = attrs::supplied(&Fields::of(std::slice::from_ref(&wrapped)))?;
            if v.len() != 1 {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    "New Attribute must hold exactly one attribute",
                ));
            }
            v.remove(0)
        };
        let adding = operation == op::ADD_ATTRIBUTE;
        let name_change = if new.name == "Name" {
            Some(attrs::name_value(&new)?)
        } else {
            None
        };
        let kept = name_change.is_none();
        if kept && attrs::wanted(std::slice::from_ref(&new))?.kept.is_empty() {
            return Err(Failure::new(
                reason::INVALID_FIELD,
                format!(
                    "the attribute {:?} is set by the server and cannot be changed",
                    new.name
                ),
            ));
        }
        let stored = attrs::keep(&new);
        let name = new.name.clone();
        self.broker
            .set_attributes(cx, &id, |d: &mut Described| {
                if let Some(n) = name_change {
                    if adding && !d.name.is_empty() {
                        return Err(crate::error::Invalid::Unsupported(
                            "a second Name (this server keeps one Name per object; use Modify Attribute)".into(),
                        )
                        .into());
                    }
                    d.name = n;
                } else {
                    d.custom_attributes.retain(|c| c.name != name);
                    d.custom_attributes.push(stored);
                }
                Ok(())
            })
            .map_err(|e| failure(&e))?;
        let mut out = vec![uid(&id)];
        if !self.version.is_2x() {
            out.extend(attrs::encode(vec![new], self.version));
        }
        Ok(out)
    }

    fn delete_attribute(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        let id = self.target(f)?;
        let name = match f.text(tag::ATTRIBUTE_NAME)? {
            Some(n) => n.to_owned(),
            None => {
                let mut names = attrs::requested_names(f)?;
                if let Some(c) = f.structure(tag::CURRENT_ATTRIBUTE)? {
                    let wrapped = Item::structure(tag::ATTRIBUTES, c.children().to_vec());
                    names.extend(
                        attrs::supplied(&Fields::of(std::slice::from_ref(&wrapped)))?
                            .into_iter()
                            .map(|a| a.name),
                    );
                }
                names.pop().ok_or_else(|| {
                    Failure::new(
                        reason::MISSING_DATA,
                        "the request names no attribute to delete",
                    )
                })?
            }
        };
        let mut found = false;
        self.broker
            .set_attributes(cx, &id, |d: &mut Described| {
                if name == "Name" {
                    found = !d.name.is_empty();
                    d.name.clear();
                } else {
                    let before = d.custom_attributes.len();
                    d.custom_attributes.retain(|c| c.name != name);
                    found = before != d.custom_attributes.len();
                }
                Ok(())
            })
            .map_err(|e| failure(&e))?;
        if !found {
            return Err(Failure::new(
                reason::ITEM_NOT_FOUND,
                format!("object {id} has no attribute {name:?} that a client may delete"),
            ));
        }
        Ok(vec![uid(&id)])
    }

    fn locate(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "Locate",
            &[
                tag::MAXIMUM_ITEMS,
                tag::OFFSET_ITEMS,
                STORAGE_STATUS_MASK,
                OBJECT_GROUP_MEMBER,
                tag::ATTRIBUTE,
                tag::ATTRIBUTES,
            ],
        )?;
        let w = attrs::wanted(&attrs::supplied(f)?)?;
        let max = match f.integer(tag::MAXIMUM_ITEMS)? {
            Some(n) if n < 0 => {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    "Maximum Items must not be negative",
                ))
            }
            Some(n) => usize::try_from(n).unwrap_or(0).min(MAX_LOCATE),
            None => MAX_LOCATE,
        };
        let offset =
            usize::try_from(f.integer(tag::OFFSET_ITEMS)?.unwrap_or(0).max(0)).unwrap_or(0);
        let state = match w.state {
            None => None,
            Some(s) => Some(key_state(s)?),
        };
        let filter = crate::broker::LocateFilter {
            name: w.name.clone(),
            state,
            tenant: None,
        };
        let matches = |r: &KeyRecord| {
            r.kind != ObjectKind::Envelope
                && w.object_type
                    .is_none_or(|t| t == attrs::object_type(r.kind))
                && w.algorithm.is_none_or(|a| match r.kind {
                    ObjectKind::SymmetricKey { .. } => a == tag::alg::AES,
                    ObjectKind::PrivateKey { .. } | ObjectKind::PublicKey { .. } => {
                        a == tag::alg::RSA
                    }
                    _ => false,
                })
                && w.length.is_none_or(|l| match r.kind {
                    ObjectKind::SymmetricKey { bits }
                    | ObjectKind::PrivateKey { bits }
                    | ObjectKind::PublicKey { bits } => i32::from(bits) == l,
                    _ => false,
                })
        };
        let mut found = Vec::new();
        let mut total = 0usize;
        let mut token: Option<KeyId> = None;
        // Pages of the core's Locate (each audited) until the store is
        // exhausted or enough ids are found.
        loop {
            let (page, next) = self
                .broker
                .locate(cx, &filter, 1000, token.as_ref())
                .map_err(|e| failure(&e))?;
            for r in page.iter().filter(|r| matches(r)) {
                if total >= offset && found.len() < max {
                    found.push(r.id.clone());
                }
                total += 1;
            }
            match next {
                Some(t) if found.len() < max || total < offset + max + 1 => token = Some(t),
                _ => break,
            }
            if total > LOCATE_SCAN_CAP {
                break;
            }
        }
        self.placeholder = found.first().cloned();
        let mut out = Vec::new();
        if self.version >= (Version { major: 1, minor: 3 }) {
            out.push(Item::integer(
                tag::LOCATED_ITEMS,
                i32::try_from(total).unwrap_or(i32::MAX),
            ));
        }
        out.extend(found.iter().map(uid));
        Ok(out)
    }

    fn rekey(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "ReKey",
            &[
                tag::UNIQUE_IDENTIFIER,
                OFFSET,
                tag::TEMPLATE_ATTRIBUTE,
                tag::ATTRIBUTES,
            ],
        )?;
        if f.get(OFFSET).is_some() {
            return Err(not_supported(
                "ReKey with an Offset is not supported; the new key takes effect at once".into(),
            ));
        }
        let id = self.target(f)?;
        let new = self.broker.rekey_object(cx, &id).map_err(|e| failure(&e))?;
        self.placeholder = Some(new.id.clone());
        Ok(vec![uid(&new.id)])
    }

    fn activate(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Activate", &[tag::UNIQUE_IDENTIFIER])?;
        let id = self.target(f)?;
        self.broker.activate(cx, &id).map_err(|e| failure(&e))?;
        Ok(vec![uid(&id)])
    }

    fn revoke(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only(
            "Revoke",
            &[
                tag::UNIQUE_IDENTIFIER,
                tag::REVOCATION_REASON,
                tag::COMPROMISE_OCCURRENCE_DATE,
            ],
        )?;
        let id = self.target(f)?;
        let rr = Fields::new(
            f.req_structure(tag::REVOCATION_REASON)?,
            "Revocation Reason",
        )?;
        let code = rr.req_enumeration(tag::REVOCATION_REASON_CODE)?;
        let message = rr
            .text(tag::REVOCATION_MESSAGE)?
            .unwrap_or_default()
            .to_owned();
        use tag::revocation as r;
        let reason = match code {
            r::KEY_COMPROMISE | r::CA_COMPROMISE => RevocationReason::KeyCompromise,
            r::SUPERSEDED => RevocationReason::Superseded,
            r::CESSATION_OF_OPERATION => RevocationReason::CessationOfOperation,
            r::AFFILIATION_CHANGED => RevocationReason::AffiliationChanged,
            r::UNSPECIFIED | r::PRIVILEGE_WITHDRAWN => RevocationReason::Unspecified,
            other => {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    format!("Revocation Reason Code {other:#x} is not a defined value"),
                ))
            }
        };
        self.broker
            .revoke(cx, &id, reason, message)
            .map_err(|e| failure(&e))?;
        Ok(vec![uid(&id)])
    }

    fn destroy(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Destroy", &[tag::UNIQUE_IDENTIFIER])?;
        let id = self.target(f)?;
        // Our destroy rules: scheduled after the pending window, then
        // erased; meanwhile unusable, and Get Attributes shows the
        // Destroy Date it will happen at.
        self.broker
            .schedule_destroy(cx, &id, None)
            .map_err(|e| failure(&e))?;
        Ok(vec![uid(&id)])
    }

    fn encrypt(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Encrypt", CRYPT_FIELDS)?;
        let id = self.target(f)?;
        let cipher = cipher(f, true)?;
        let data = Plaintext::new(f.bytes(tag::DATA)?.unwrap_or_default().to_vec());
        let out = self
            .broker
            .encrypt_with_object(cx, &id, &cipher, &data)
            .map_err(|e| failure(&e))?;
        let mut items = vec![uid(&out.key_id), Item::bytes(tag::DATA, out.data)];
        if f.get(tag::IV_COUNTER_NONCE).is_none() {
            items.push(Item::bytes(tag::IV_COUNTER_NONCE, out.iv));
        }
        if !out.tag.is_empty() {
            items.push(Item::bytes(tag::AUTHENTICATED_ENCRYPTION_TAG, out.tag));
        }
        Ok(items)
    }

    fn decrypt(&mut self, cx: &CallCtx, f: &Fields<'_>) -> Out {
        f.only("Decrypt", CRYPT_FIELDS)?;
        let id = self.target(f)?;
        let cipher = cipher(f, false)?;
        let data = f.bytes(tag::DATA)?.unwrap_or_default();
        let tag_bytes = f
            .bytes(tag::AUTHENTICATED_ENCRYPTION_TAG)?
            .unwrap_or_default();
        let pt = self
            .broker
            .decrypt_with_object(cx, &id, &cipher, data, tag_bytes)
            .and_then(|r| r.released_blocking())
            .map_err(|e| failure(&e))?;
        Ok(vec![uid(&id), Item::bytes(tag::DATA, pt.into_exposed())])
    }
}

const PROTECTION_STORAGE_MASKS: u32 = 0x42015F;
const OFFSET: u32 = 0x420058;
const WRAPPING_METHOD: u32 = 0x42009E;
const MAC_SIGNATURE_KEY_INFORMATION: u32 = 0x42004E;
const ENCODING_OPTION: u32 = 0x4200A3;
const NO_ENCODING: u32 = 1;
const NIST_KEY_WRAP: u32 = 0x0D;
const AES_KEY_WRAP_PADDING: u32 = 0x0C;
const STORAGE_STATUS_MASK: u32 = 0x42008E;
const OBJECT_GROUP_MEMBER: u32 = 0x4200AC;
const KEY_WRAP_TYPE: u32 = 0x4200F8;
const CORRELATION_VALUE: u32 = 0x4200D6;
const INIT_INDICATOR: u32 = 0x4200D7;
const FINAL_INDICATOR: u32 = 0x4200D8;
/// Most ids one Locate returns, and most records it looks through.
const MAX_LOCATE: usize = 1000;
const LOCATE_SCAN_CAP: usize = 100_000;

const CRYPT_FIELDS: &[u32] = &[
    tag::UNIQUE_IDENTIFIER,
    tag::CRYPTOGRAPHIC_PARAMETERS,
    tag::DATA,
    tag::IV_COUNTER_NONCE,
    tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA,
    tag::AUTHENTICATED_ENCRYPTION_TAG,
    CORRELATION_VALUE,
    INIT_INDICATOR,
    FINAL_INDICATOR,
];

fn key_state(v: u32) -> Result<crate::keys::KeyState, Failure> {
    use crate::keys::KeyState as S;
    Ok(match v {
        tag::state::PRE_ACTIVE => S::PreActive,
        tag::state::ACTIVE => S::Active,
        tag::state::DEACTIVATED => S::Deactivated,
        tag::state::COMPROMISED => S::Compromised,
        tag::state::DESTROYED | 6 => S::Destroyed,
        other => {
            return Err(Failure::new(
                reason::INVALID_FIELD,
                format!("State {other:#x} is not a defined value"),
            ))
        }
    })
}

/// AES and a supported length, or why not.
fn aes_bits(algorithm: Option<u32>, length: Option<i32>) -> Result<u16, Failure> {
    match algorithm {
        Some(tag::alg::AES) => {}
        Some(other) => {
            return Err(not_supported(format!(
            "Cryptographic Algorithm {other:#x} is not supported for symmetric keys here; use AES"
        )))
        }
        None => {
            return Err(Failure::new(
                reason::MISSING_DATA,
                "the request names no Cryptographic Algorithm; symmetric keys here are AES",
            ))
        }
    }
    match length {
        Some(l @ (128 | 192 | 256)) => Ok(u16::try_from(l).unwrap_or(256)),
        Some(l) => Err(Failure::new(
            reason::INVALID_FIELD,
            format!("an AES key of {l} bits is not supported; use 128, 192 or 256"),
        )),
        None => Err(Failure::new(
            reason::MISSING_DATA,
            "the request names no Cryptographic Length",
        )),
    }
}

struct Block {
    material: Plaintext,
    algorithm: Option<u32>,
    length: Option<i32>,
}

fn key_block(object: &Item) -> Result<Block, Failure> {
    let o = Fields::new(object, "Symmetric Key")?;
    o.only("Symmetric Key", &[tag::KEY_BLOCK])?;
    key_block_fields(&Fields::new(o.req_structure(tag::KEY_BLOCK)?, "Key Block")?)
}

fn key_block_fields(b: &Fields<'_>) -> Result<Block, Failure> {
    if b.get(tag::KEY_WRAPPING_DATA).is_some() {
        return Err(not_supported(
            "registering a wrapped key is not supported yet; register the key in the clear over this mutual-TLS connection".into(),
        ));
    }
    if b.get(tag::KEY_COMPRESSION_TYPE).is_some() {
        return Err(not_supported(
            "key compression applies to EC keys, which this server does not hold".into(),
        ));
    }
    let format = b.req_enumeration(tag::KEY_FORMAT_TYPE)?;
    let value = b
        .get(tag::KEY_VALUE)
        .ok_or_else(|| Failure::new(reason::MISSING_DATA, "the Key Block has no Key Value"))?;
    let v = Fields::new(value, "Key Value")?;
    let material = v
        .get(tag::KEY_MATERIAL)
        .ok_or_else(|| Failure::new(reason::MISSING_DATA, "the Key Value has no Key Material"))?;
    let bytes = match (format, &material.value) {
        (tag::format::RAW | tag::format::OPAQUE, Value::Bytes(b)) => b.to_vec(),
        (tag::format::TRANSPARENT_SYMMETRIC_KEY, Value::Structure(items)) => Fields::of(items)
            .bytes(tag::KEY)?
            .ok_or_else(|| Failure::new(reason::MISSING_DATA, "the Transparent Symmetric Key has no Key"))?
            .to_vec(),
        (tag::format::RAW | tag::format::OPAQUE | tag::format::TRANSPARENT_SYMMETRIC_KEY, _) => {
            return Err(Failure::new(
                reason::INVALID_FIELD,
                "the Key Material does not match its Key Format Type",
            ))
        }
        (other, _) => {
            return Err(Failure::new(
                reason::KEY_FORMAT_TYPE_NOT_SUPPORTED,
                format!("Key Format Type {other:#x} is not supported; use Raw, Opaque or Transparent Symmetric Key"),
            ))
        }
    };
    Ok(Block {
        material: Plaintext::new(bytes),
        algorithm: b.enumeration(tag::CRYPTOGRAPHIC_ALGORITHM)?,
        length: b.integer(tag::CRYPTOGRAPHIC_LENGTH)?,
    })
}

/// The object structure Get returns, in the asked format.
fn object_item(rec: &KeyRecord, bytes: Plaintext, format: Option<u32>) -> Result<Item, Failure> {
    let block = |format: u32, material: Item, bits: Option<u16>| {
        let mut b = vec![
            Item::enumeration(tag::KEY_FORMAT_TYPE, format),
            Item::structure(tag::KEY_VALUE, vec![material]),
        ];
        if let Some(bits) = bits {
            b.push(Item::enumeration(
                tag::CRYPTOGRAPHIC_ALGORITHM,
                tag::alg::AES,
            ));
            b.push(Item::integer(tag::CRYPTOGRAPHIC_LENGTH, i32::from(bits)));
        }
        Item::structure(tag::KEY_BLOCK, b)
    };
    match rec.kind {
        ObjectKind::SymmetricKey { bits } => {
            let format = format.unwrap_or(tag::format::RAW);
            let material = match format {
                tag::format::RAW => Item::bytes(tag::KEY_MATERIAL, bytes.into_exposed()),
                tag::format::TRANSPARENT_SYMMETRIC_KEY => Item::structure(
                    tag::KEY_MATERIAL,
                    vec![Item::bytes(tag::KEY, bytes.into_exposed())],
                ),
                other => return Err(format_refused(other, "Raw or Transparent Symmetric Key")),
            };
            Ok(Item::structure(
                tag::SYMMETRIC_KEY,
                vec![block(format, material, Some(bits))],
            ))
        }
        ObjectKind::SecretData { data_type } => {
            let format = match format {
                None | Some(tag::format::OPAQUE) => tag::format::OPAQUE,
                Some(tag::format::RAW) => tag::format::RAW,
                Some(other) => return Err(format_refused(other, "Opaque")),
            };
            let material = Item::bytes(tag::KEY_MATERIAL, bytes.into_exposed());
            Ok(Item::structure(
                tag::SECRET_DATA,
                vec![
                    Item::enumeration(tag::SECRET_DATA_TYPE, data_type),
                    block(format, material, None),
                ],
            ))
        }
        ObjectKind::PrivateKey { bits } => {
            let format = match format {
                None | Some(tag::format::PKCS_8) => tag::format::PKCS_8,
                Some(other) => return Err(format_refused(other, "PKCS#8")),
            };
            let material = Item::bytes(tag::KEY_MATERIAL, bytes.into_exposed());
            Ok(Item::structure(
                tag::PRIVATE_KEY,
                vec![rsa_block(format, material, bits)],
            ))
        }
        ObjectKind::PublicKey { bits } => {
            let (format, der) = match format {
                None | Some(tag::format::PKCS_1) => (tag::format::PKCS_1, bytes.into_exposed()),
                Some(tag::format::X_509) => (tag::format::X_509, spki(bytes.expose_secret())),
                Some(other) => return Err(format_refused(other, "PKCS#1 or X.509")),
            };
            let material = Item::bytes(tag::KEY_MATERIAL, der);
            Ok(Item::structure(
                tag::PUBLIC_KEY,
                vec![rsa_block(format, material, bits)],
            ))
        }
        ObjectKind::Envelope => Err(Failure::new(
            reason::PERMISSION_DENIED,
            "envelope keys never leave the broker",
        )),
    }
}

fn rsa_block(format: u32, material: Item, bits: u16) -> Item {
    Item::structure(
        tag::KEY_BLOCK,
        vec![
            Item::enumeration(tag::KEY_FORMAT_TYPE, format),
            Item::structure(tag::KEY_VALUE, vec![material]),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, tag::alg::RSA),
            Item::integer(tag::CRYPTOGRAPHIC_LENGTH, i32::from(bits)),
        ],
    )
}

/// A PKCS#1 RSAPublicKey as a SubjectPublicKeyInfo (rsaEncryption, NULL
/// parameters), DER.
fn spki(pkcs1: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = body.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let len = n.to_be_bytes();
            let skip = len.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (len.len() - skip) as u8);
            out.extend_from_slice(&len[skip..]);
        }
        out.extend_from_slice(body);
        out
    }
    // AlgorithmIdentifier { rsaEncryption (1.2.840.113549.1.1.1), NULL }
    let alg = tlv(
        0x30,
        &[
            0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01, 0x05, 0x00,
        ],
    );
    let mut bits = vec![0u8];
    bits.extend_from_slice(pkcs1);
    let mut body = alg;
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

fn format_refused(format: u32, use_: &str) -> Failure {
    Failure::new(
        reason::KEY_FORMAT_TYPE_NOT_SUPPORTED,
        format!("Key Format Type {format:#x} is not available for this object; ask for {use_}"),
    )
}

/// The cipher of an Encrypt/Decrypt request (AES-GCM unless the request's
/// Cryptographic Parameters say AES-CBC).
fn cipher(f: &Fields<'_>, encrypting: bool) -> Result<Cipher, Failure> {
    if f.get(CORRELATION_VALUE).is_some()
        || f.get(INIT_INDICATOR).is_some()
        || f.get(FINAL_INDICATOR).is_some()
    {
        return Err(not_supported("streaming Encrypt/Decrypt (Init/Final Indicator, Correlation Value) is not supported; send the whole data in one request".into()));
    }
    let iv = f.bytes(tag::IV_COUNTER_NONCE)?.map(<[u8]>::to_vec);
    let params = match f.structure(tag::CRYPTOGRAPHIC_PARAMETERS)? {
        Some(p) => Some(Fields::new(p, "Cryptographic Parameters")?),
        None => None,
    };
    let get = |t| params.as_ref().map_or(Ok(None), |p| p.enumeration(t));
    let mode = get(tag::BLOCK_CIPHER_MODE)?.unwrap_or(tag::mode::GCM);
    let padding = get(tag::PADDING_METHOD)?;
    if let Some(a) = get(tag::CRYPTOGRAPHIC_ALGORITHM)? {
        if a != tag::alg::AES {
            return Err(not_supported(format!(
                "Cryptographic Algorithm {a:#x} is not supported for Encrypt/Decrypt; use AES"
            )));
        }
    }
    let random_iv = params
        .as_ref()
        .map_or(Ok(None), |p| p.boolean(tag::RANDOM_IV))?;
    if random_iv == Some(true) && iv.is_some() {
        return Err(Failure::new(
            reason::INVALID_FIELD,
            "the request asks for a random IV and gives one",
        ));
    }
    if encrypting && random_iv == Some(false) && iv.is_none() {
        return Err(Failure::new(
            reason::MISSING_DATA,
            "Random IV is false but the request gives no IV/Counter/Nonce",
        ));
    }
    match mode {
        tag::mode::GCM => {
            if padding.is_some_and(|p| p != tag::padding::NONE) {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    "AES-GCM takes no padding",
                ));
            }
            let tag_len = params
                .as_ref()
                .map_or(Ok(None), |p| p.integer(tag::TAG_LENGTH))?
                .unwrap_or(16);
            Ok(Cipher::Gcm {
                iv,
                aad: f
                    .bytes(tag::AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)?
                    .unwrap_or_default()
                    .to_vec(),
                tag_len: usize::try_from(tag_len).unwrap_or(0),
            })
        }
        tag::mode::CBC => {
            let pkcs5 = match padding {
                None | Some(tag::padding::PKCS5) => true,
                Some(tag::padding::NONE) => false,
                Some(other) => {
                    return Err(not_supported(format!(
                        "Padding Method {other:#x} is not supported with AES-CBC; use PKCS5 or None"
                    )))
                }
            };
            Ok(Cipher::Cbc { iv, pkcs5 })
        }
        other => Err(not_supported(format!(
            "Block Cipher Mode {other:#x} is not supported; use GCM or CBC"
        ))),
    }
}
