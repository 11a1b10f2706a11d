//! Attributes in both of KMIP's shapes: 1.x names them (`Attribute { Name,
//! Index, Value }`, in a Template-Attribute), 2.x tags them (inside one
//! `Attributes` structure). Requests may use either whatever their
//! version (clients mix); responses use the request version's shape and
//! return only attributes that version defines.

use super::message::{Fields, Version};
use super::tag::{self, reason};
use super::ttlv::{Item, Value};
use super::Failure;
use crate::keys::{CustomAttribute, KeyRecord, KeyState, LinkKind, ObjectKind};

/// One attribute: its 1.x name and its value (structures keep their
/// children's real tags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The 1.x name (`Cryptographic Length`, `x-owner`).
    pub name: String,
    /// The value.
    pub value: Value,
}

/// How the server treats an attribute a client supplies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Computed from the key record; a client's value is read or ignored.
    Derived,
    /// Stored as given and returned unchanged.
    Kept,
}

/// One known attribute: 1.x name, 2.x tag, first version that defines
/// it, last version (None: still defined), role.
struct Row(&'static str, u32, (i32, i32), Option<(i32, i32)>, Role);

const TABLE: &[Row] = &[
    Row(
        "Unique Identifier",
        tag::UNIQUE_IDENTIFIER,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row("Name", tag::NAME, (1, 0), None, Role::Derived),
    Row("Object Type", tag::OBJECT_TYPE, (1, 0), None, Role::Derived),
    Row(
        "Cryptographic Algorithm",
        tag::CRYPTOGRAPHIC_ALGORITHM,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Cryptographic Length",
        tag::CRYPTOGRAPHIC_LENGTH,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Cryptographic Usage Mask",
        tag::CRYPTOGRAPHIC_USAGE_MASK,
        (1, 0),
        None,
        Role::Kept,
    ),
    Row(
        "Cryptographic Parameters",
        tag::CRYPTOGRAPHIC_PARAMETERS,
        (1, 0),
        None,
        Role::Kept,
    ),
    Row("State", tag::STATE, (1, 0), None, Role::Derived),
    Row(
        "Initial Date",
        tag::INITIAL_DATE,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Activation Date",
        tag::ACTIVATION_DATE,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Deactivation Date",
        tag::DEACTIVATION_DATE,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Destroy Date",
        tag::DESTROY_DATE,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Last Change Date",
        tag::LAST_CHANGE_DATE,
        (1, 0),
        None,
        Role::Derived,
    ),
    Row(
        "Original Creation Date",
        tag::ORIGINAL_CREATION_DATE,
        (1, 2),
        None,
        Role::Derived,
    ),
    Row(
        "Operation Policy Name",
        tag::OPERATION_POLICY_NAME,
        (1, 0),
        Some((1, 4)),
        Role::Kept,
    ),
    Row("Object Group", tag::OBJECT_GROUP, (1, 0), None, Role::Kept),
    Row("Contact Information", 0x420022, (1, 0), None, Role::Kept),
    Row(
        "Application Specific Information",
        tag::APPLICATION_SPECIFIC_INFORMATION,
        (1, 0),
        None,
        Role::Kept,
    ),
    Row("Description", tag::DESCRIPTION, (2, 0), None, Role::Kept),
    Row("Comment", tag::COMMENT, (2, 0), None, Role::Kept),
    Row("Link", tag::LINK, (1, 0), None, Role::Derived),
    Row("Sensitive", tag::SENSITIVE, (2, 0), None, Role::Derived),
    Row("Extractable", tag::EXTRACTABLE, (2, 0), None, Role::Derived),
];

fn by_name(name: &str) -> Option<&'static Row> {
    TABLE.iter().find(|r| r.0 == name)
}

fn by_tag(t: u32) -> Option<&'static Row> {
    TABLE.iter().find(|r| r.1 == t)
}

fn is_custom(name: &str) -> bool {
    name.starts_with("x-") || name.starts_with("y-")
}

/// True when `version` defines the attribute named `name`.
pub fn defined_in(name: &str, version: Version) -> bool {
    if is_custom(name) {
        return true;
    }
    by_name(name).is_some_and(|r| {
        let v = (version.major, version.minor);
        v >= r.2 && r.3.is_none_or(|last| v <= last)
    })
}

/// Reads one 1.x `Attribute` structure.
fn parse_v1(item: &Item) -> Result<Attr, Failure> {
    let f = Fields::new(item, "Attribute")?;
    let name = f.req_text(tag::ATTRIBUTE_NAME)?.to_owned();
    let value = f
        .get(tag::ATTRIBUTE_VALUE)
        .map(|i| i.value.clone())
        .ok_or_else(|| {
            Failure::new(
                reason::INVALID_FIELD,
                format!("attribute {name:?} has no Attribute Value"),
            )
        })?;
    known(Attr { name, value })
}

/// Reads the children of a 2.x `Attributes` structure.
fn parse_v2(item: &Item) -> Result<Vec<Attr>, Failure> {
    let f = Fields::new(item, "Attributes")?;
    let mut out = Vec::new();
    for a in f.all_items() {
        if a.tag == tag::ATTRIBUTE {
            // Vendor Attribute (2.x): Vendor Identification "x"/"y" carry
            // 1.x custom attributes.
            let v = Fields::new(a, "Vendor Attribute")?;
            let vendor = v.req_text(tag::VENDOR_IDENTIFICATION)?;
            let name = v.req_text(tag::ATTRIBUTE_NAME)?;
            let value = v
                .get(tag::ATTRIBUTE_VALUE)
                .map(|i| i.value.clone())
                .ok_or_else(|| {
                    Failure::new(
                        reason::INVALID_FIELD,
                        format!("vendor attribute {name:?} has no Attribute Value"),
                    )
                })?;
            out.push(known(Attr {
                name: format!("{vendor}-{name}"),
                value,
            })?);
            continue;
        }
        let row = by_tag(a.tag).ok_or_else(|| {
            Failure::new(
                reason::INVALID_FIELD,
                format!("the attribute {} is not supported here", tag::name(a.tag)),
            )
        })?;
        out.push(Attr {
            name: row.0.to_owned(),
            value: a.value.clone(),
        });
    }
    Ok(out)
}

fn known(a: Attr) -> Result<Attr, Failure> {
    if is_custom(&a.name) || by_name(&a.name).is_some() {
        Ok(a)
    } else {
        Err(Failure::new(
            reason::INVALID_FIELD,
            format!("the attribute {:?} is not supported here", a.name),
        ))
    }
}

/// Every attribute a request payload supplies, in either shape:
/// Template-Attribute / Common Template-Attribute (1.x Create, Register),
/// bare Attribute fields (1.x Locate, Add/Modify), Attributes (2.x).
pub fn supplied(f: &Fields<'_>) -> Result<Vec<Attr>, Failure> {
    let mut out = Vec::new();
    for t in [tag::TEMPLATE_ATTRIBUTE, tag::COMMON_TEMPLATE_ATTRIBUTE] {
        for ta in f.all(t) {
            let inner = Fields::new(ta, "Template-Attribute")?;
            for a in inner.all(tag::ATTRIBUTE) {
                out.push(parse_v1(a)?);
            }
        }
    }
    for a in f.all(tag::ATTRIBUTE) {
        out.push(parse_v1(a)?);
    }
    for a in f.all(tag::ATTRIBUTES) {
        out.extend(parse_v2(a)?);
    }
    Ok(out)
}

/// The attributes inside one template or attributes structure, either
/// shape (Common/Private/Public Key Template-Attribute in 1.x, Common/
/// Private/Public Key Attributes in 2.x).
pub fn in_structure(item: &Item) -> Result<Vec<Attr>, Failure> {
    let f = Fields::new(item, "an attribute template")?;
    if f.all_items().iter().any(|i| {
        i.tag == tag::ATTRIBUTE
            && Fields::of(i.children()).get(tag::ATTRIBUTE_NAME).is_some()
            && Fields::of(i.children())
                .get(tag::VENDOR_IDENTIFICATION)
                .is_none()
    }) {
        f.all(tag::ATTRIBUTE).map(parse_v1).collect()
    } else {
        parse_v2(item)
    }
}

/// The typed reading of supplied attributes.
#[derive(Default, Debug)]
pub struct Wanted {
    /// Name Value.
    pub name: Option<String>,
    /// Object Type.
    pub object_type: Option<u32>,
    /// Cryptographic Algorithm.
    pub algorithm: Option<u32>,
    /// Cryptographic Length.
    pub length: Option<i32>,
    /// State (Locate).
    pub state: Option<u32>,
    /// Activation Date.
    pub activation_date: Option<i64>,
    /// Extractable (2.x).
    pub extractable: Option<bool>,
    /// Cryptographic Usage Mask.
    pub usage_mask: Option<i32>,
    /// Attributes stored as given.
    pub kept: Vec<CustomAttribute>,
}

fn want_enum(a: &Attr) -> Result<u32, Failure> {
    match a.value {
        Value::Enumeration(v) => Ok(v),
        ref v => Err(type_error(a, "Enumeration", v)),
    }
}

fn want_int(a: &Attr) -> Result<i32, Failure> {
    match a.value {
        Value::Integer(v) => Ok(v),
        ref v => Err(type_error(a, "Integer", v)),
    }
}

fn type_error(a: &Attr, want: &str, got: &Value) -> Failure {
    Failure::new(
        reason::INVALID_FIELD,
        format!(
            "attribute {:?} must be a {want}; it is a {}",
            a.name,
            got.type_name()
        ),
    )
}

/// The Name Value of a Name attribute's value.
pub fn name_value(a: &Attr) -> Result<String, Failure> {
    match &a.value {
        Value::Structure(items) => Ok(Fields::of(items).req_text(tag::NAME_VALUE)?.to_owned()),
        // Some clients send the name as bare text.
        Value::Text(s) => Ok(s.clone()),
        v => Err(type_error(a, "Structure", v)),
    }
}

/// An attribute kept as given, encoded for the store.
pub fn keep(a: &Attr) -> CustomAttribute {
    CustomAttribute {
        name: a.name.clone(),
        value: Item::new(tag::ATTRIBUTE_VALUE, a.value.clone()).encode(),
    }
}

/// A stored attribute back as an attribute (None if the store holds
/// something that does not decode: it is then left out).
fn kept_attr(c: &CustomAttribute) -> Option<Attr> {
    let item = super::ttlv::decode(&c.value, &super::ttlv::Limits::default()).ok()?;
    Some(Attr {
        name: c.name.clone(),
        value: item.value,
    })
}

/// Reads what a Create, Register or Locate request asks for.
pub fn wanted(attrs: &[Attr]) -> Result<Wanted, Failure> {
    let mut w = Wanted::default();
    for a in attrs {
        match a.name.as_str() {
            "Name" => w.name = Some(name_value(a)?),
            "Object Type" => w.object_type = Some(want_enum(a)?),
            "Cryptographic Algorithm" => w.algorithm = Some(want_enum(a)?),
            "Cryptographic Length" => w.length = Some(want_int(a)?),
            "State" => w.state = Some(want_enum(a)?),
            "Activation Date" => {
                w.activation_date = Some(match a.value {
                    Value::DateTime(t) => t,
                    Value::DateTimeExtended(t) => t / 1_000_000,
                    ref v => return Err(type_error(a, "Date-Time", v)),
                })
            }
            "Extractable" => {
                w.extractable = Some(match a.value {
                    Value::Boolean(b) => b,
                    ref v => return Err(type_error(a, "Boolean", v)),
                })
            }
            "Cryptographic Usage Mask" => {
                w.usage_mask = Some(want_int(a)?);
                w.kept.push(keep(a));
            }
            n if is_custom(n) || by_name(n).is_some_and(|r| r.4 == Role::Kept) => {
                w.kept.push(keep(a))
            }
            // Derived attributes a client names at creation are computed
            // here instead (Unique Identifier, dates, …).
            _ => {}
        }
    }
    Ok(w)
}

/// The KMIP state of a record.
pub fn state_value(s: KeyState) -> u32 {
    match s {
        KeyState::PreActive => tag::state::PRE_ACTIVE,
        KeyState::Active => tag::state::ACTIVE,
        KeyState::Deactivated => tag::state::DEACTIVATED,
        KeyState::Compromised => tag::state::COMPROMISED,
        KeyState::Destroyed => tag::state::DESTROYED,
    }
}

/// Object Type of a record (envelope keys are AES-256 symmetric keys).
pub fn object_type(kind: ObjectKind) -> u32 {
    match kind {
        ObjectKind::SecretData { .. } => tag::object_type::SECRET_DATA,
        ObjectKind::PrivateKey { .. } => tag::object_type::PRIVATE_KEY,
        ObjectKind::PublicKey { .. } => tag::object_type::PUBLIC_KEY,
        ObjectKind::SymmetricKey { .. } | ObjectKind::Envelope => tag::object_type::SYMMETRIC_KEY,
    }
}

/// Every attribute of a record, as of `now`, for `version`.
pub fn of_record(rec: &KeyRecord, now: i64, version: Version) -> Vec<Attr> {
    let mut out = vec![Attr {
        name: "Unique Identifier".into(),
        value: Value::Text(rec.id.to_string()),
    }];
    if !rec.name.is_empty() {
        out.push(Attr {
            name: "Name".into(),
            value: name_struct(&rec.name),
        });
    }
    out.push(Attr {
        name: "Object Type".into(),
        value: Value::Enumeration(object_type(rec.kind)),
    });
    let alg = match rec.kind {
        ObjectKind::SymmetricKey { bits } => Some((tag::alg::AES, i32::from(bits))),
        ObjectKind::Envelope => Some((tag::alg::AES, 256)),
        ObjectKind::PrivateKey { bits } | ObjectKind::PublicKey { bits } => {
            Some((tag::alg::RSA, i32::from(bits)))
        }
        ObjectKind::SecretData { .. } => None,
    };
    if let Some((alg, bits)) = alg {
        out.push(Attr {
            name: "Cryptographic Algorithm".into(),
            value: Value::Enumeration(alg),
        });
        out.push(Attr {
            name: "Cryptographic Length".into(),
            value: Value::Integer(bits),
        });
    }
    let state = crate::broker::effective_state(rec, now);
    out.push(Attr {
        name: "State".into(),
        value: Value::Enumeration(state_value(state)),
    });
    let dates = [
        ("Initial Date", Some(rec.created_at)),
        ("Original Creation Date", Some(rec.created_at)),
        ("Activation Date", rec.activated_at),
        ("Deactivation Date", rec.deactivated_at),
        ("Destroy Date", rec.destroy_after),
        ("Last Change Date", Some(rec.updated_at)),
    ];
    for (name, at) in dates {
        if let Some(t) = at {
            out.push(Attr {
                name: name.into(),
                value: Value::DateTime(t),
            });
        }
    }
    out.push(Attr {
        name: "Extractable".into(),
        value: Value::Boolean(rec.exportable),
    });
    out.push(Attr {
        name: "Sensitive".into(),
        value: Value::Boolean(!rec.exportable),
    });
    let has_mask = rec
        .custom_attributes
        .iter()
        .any(|c| c.name == "Cryptographic Usage Mask");
    if !has_mask && !matches!(rec.kind, ObjectKind::SecretData { .. }) {
        let mut mask = match rec.kind {
            ObjectKind::PrivateKey { .. } => tag::usage::SIGN | tag::usage::DECRYPT,
            ObjectKind::PublicKey { .. } => tag::usage::VERIFY | tag::usage::ENCRYPT,
            _ => tag::usage::ENCRYPT | tag::usage::DECRYPT,
        };
        if rec.exportable {
            mask |= tag::usage::EXPORT;
        }
        out.push(Attr {
            name: "Cryptographic Usage Mask".into(),
            value: Value::Integer(mask),
        });
    }
    for l in &rec.links {
        let link_type = match l.kind {
            LinkKind::PublicKey => 0x102,
            LinkKind::PrivateKey => 0x103,
            LinkKind::Replacement => 0x106,
            LinkKind::Replaced => 0x107,
        };
        out.push(Attr {
            name: "Link".into(),
            value: Value::Structure(vec![
                Item::enumeration(tag::LINK_TYPE, link_type),
                Item::text(tag::LINKED_OBJECT_IDENTIFIER, l.id.to_string()),
            ]),
        });
    }
    out.extend(rec.custom_attributes.iter().filter_map(kept_attr));
    out.retain(|a| defined_in(&a.name, version));
    out
}

/// A Name attribute's value.
pub fn name_struct(name: &str) -> Value {
    Value::Structure(vec![
        Item::text(tag::NAME_VALUE, name),
        Item::enumeration(tag::NAME_TYPE, tag::name_type::UNINTERPRETED_TEXT_STRING),
    ])
}

/// Attributes in the shape of `version`: 1.x `Attribute` items, or 2.x
/// items inside one `Attributes` structure.
pub fn encode(attrs: Vec<Attr>, version: Version) -> Vec<Item> {
    if version.is_2x() {
        let items = attrs.into_iter().map(v2_item).collect();
        vec![Item::structure(tag::ATTRIBUTES, items)]
    } else {
        attrs
            .into_iter()
            .map(|a| {
                Item::structure(
                    tag::ATTRIBUTE,
                    vec![
                        Item::text(tag::ATTRIBUTE_NAME, a.name),
                        Item::new(tag::ATTRIBUTE_VALUE, a.value),
                    ],
                )
            })
            .collect()
    }
}

fn v2_item(a: Attr) -> Item {
    match by_name(&a.name) {
        Some(row) => Item::new(row.1, a.value),
        None => {
            let (vendor, name) = a.name.split_at(1);
            Item::structure(
                tag::ATTRIBUTE,
                vec![
                    Item::text(tag::VENDOR_IDENTIFICATION, vendor),
                    Item::text(tag::ATTRIBUTE_NAME, name.trim_start_matches('-')),
                    Item::new(tag::ATTRIBUTE_VALUE, a.value),
                ],
            )
        }
    }
}

/// The names asked for by Get Attributes (1.x names or 2.x references).
pub fn requested_names(f: &Fields<'_>) -> Result<Vec<String>, Failure> {
    let mut out = Vec::new();
    for i in f.all(tag::ATTRIBUTE_NAME) {
        match &i.value {
            Value::Text(s) => out.push(s.clone()),
            v => {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    format!(
                        "Attribute Name must be a Text String; it is a {}",
                        v.type_name()
                    ),
                ))
            }
        }
    }
    for i in f.all(tag::ATTRIBUTE_REFERENCE) {
        match &i.value {
            Value::Enumeration(t) => out.push(
                by_tag(*t)
                    .map(|r| r.0.to_owned())
                    .unwrap_or_else(|| format!("tag {t:06X}")),
            ),
            Value::Structure(items) => {
                let v = Fields::of(items);
                out.push(format!(
                    "{}-{}",
                    v.req_text(tag::VENDOR_IDENTIFICATION)?,
                    v.req_text(tag::ATTRIBUTE_NAME)?
                ));
            }
            v => {
                return Err(Failure::new(
                    reason::INVALID_FIELD,
                    format!(
                        "Attribute Reference must be an Enumeration or Structure; it is a {}",
                        v.type_name()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Get Attribute List's answer: names (1.x) or references (2.x).
pub fn names_list(attrs: &[Attr], version: Version) -> Vec<Item> {
    attrs
        .iter()
        .map(|a| {
            if !version.is_2x() {
                return Item::text(tag::ATTRIBUTE_NAME, a.name.clone());
            }
            match by_name(&a.name) {
                Some(row) => Item::enumeration(tag::ATTRIBUTE_REFERENCE, row.1),
                None => {
                    let (vendor, name) = a.name.split_at(1);
                    Item::structure(
                        tag::ATTRIBUTE_REFERENCE,
                        vec![
                            Item::text(tag::VENDOR_IDENTIFICATION, vendor),
                            Item::text(tag::ATTRIBUTE_NAME, name.trim_start_matches('-')),
                        ],
                    )
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_get_only_their_attributes() {
        let mut rec = KeyRecord::example("k1", "eu-central", KeyState::Active);
        rec.kind = ObjectKind::SymmetricKey { bits: 128 };
        rec.custom_attributes.push(CustomAttribute {
            name: "Operation Policy Name".into(),
            value: Item::new(tag::ATTRIBUTE_VALUE, Value::Text("default".into())).encode(),
        });
        rec.custom_attributes.push(CustomAttribute {
            name: "x-owner".into(),
            value: Item::new(tag::ATTRIBUTE_VALUE, Value::Text("db".into())).encode(),
        });
        let names =
            |v| -> Vec<String> { of_record(&rec, 0, v).into_iter().map(|a| a.name).collect() };
        let v10 = names(Version::V1_0);
        assert!(!v10
            .iter()
            .any(|n| n == "Original Creation Date" || n == "Extractable"));
        assert!(v10.iter().any(|n| n == "Operation Policy Name"));
        assert!(v10.iter().any(|n| n == "x-owner"));
        let v12 = names(Version { major: 1, minor: 2 });
        assert!(v12.iter().any(|n| n == "Original Creation Date"));
        let v20 = names(Version { major: 2, minor: 0 });
        assert!(v20.iter().any(|n| n == "Extractable"));
        assert!(!v20.iter().any(|n| n == "Operation Policy Name"));
        // 2.x shape: one Attributes structure, custom as a vendor attribute.
        let enc = encode(
            of_record(&rec, 0, Version { major: 2, minor: 0 }),
            Version { major: 2, minor: 0 },
        );
        assert_eq!(enc.len(), 1);
        assert_eq!(enc[0].tag, tag::ATTRIBUTES);
        let back = parse_v2(&enc[0]).unwrap();
        assert!(back.iter().any(|a| a.name == "x-owner"));
    }
}
