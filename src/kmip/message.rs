//! Request and response messages: header, protocol version, batch items,
//! results. The response header carries exactly the fields every version
//! defines (Protocol Version, Time Stamp, Batch Count), in that order, with
//! the request's version; each batch item echoes the request's operation
//! and batch item id.

use super::tag::{self, continuation, reason, status};
use super::ttlv::{Item, Value};
use super::Failure;
use zeroize::Zeroizing;

/// A KMIP protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: i32,
    /// Minor.
    pub minor: i32,
}

impl Version {
    /// 1.0, the version of last resort for unparseable requests.
    pub const V1_0: Version = Version { major: 1, minor: 0 };

    /// True from 2.0 on (attributes in one Attributes structure).
    pub fn is_2x(self) -> bool {
        self.major >= 2
    }

    /// True when this server speaks it.
    pub fn supported(self) -> bool {
        SUPPORTED.contains(&self)
    }

    /// The Protocol Version structure.
    pub fn item(self) -> Item {
        Item::structure(
            tag::PROTOCOL_VERSION,
            vec![
                Item::integer(tag::PROTOCOL_VERSION_MAJOR, self.major),
                Item::integer(tag::PROTOCOL_VERSION_MINOR, self.minor),
            ],
        )
    }

    /// Parses a Protocol Version structure.
    pub fn parse(item: &Item) -> Result<Self, Failure> {
        let f = Fields::new(item, "Protocol Version")?;
        Ok(Self {
            major: f.req_integer(tag::PROTOCOL_VERSION_MAJOR)?,
            minor: f.req_integer(tag::PROTOCOL_VERSION_MINOR)?,
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What this server speaks, newest first (Discover Versions' order).
pub const SUPPORTED: [Version; 7] = [
    Version { major: 2, minor: 1 },
    Version { major: 2, minor: 0 },
    Version { major: 1, minor: 4 },
    Version { major: 1, minor: 3 },
    Version { major: 1, minor: 2 },
    Version { major: 1, minor: 1 },
    Version { major: 1, minor: 0 },
];

/// One batch item of a request.
#[derive(Debug)]
pub struct RequestItem {
    /// Operation code.
    pub operation: u32,
    /// Unique Batch Item ID, echoed in the response.
    pub id: Option<Zeroizing<Vec<u8>>>,
    /// The Request Payload's items.
    pub payload: Item,
}

/// A parsed request message.
#[derive(Debug)]
pub struct Request {
    /// The version the request carries (the response answers in it).
    pub version: Version,
    /// A Credential (Authentication) was present in the header.
    pub credential: bool,
    /// Continue after a failed item (Batch Error Continuation Option).
    pub continue_on_error: bool,
    /// The client's response size limit, if it gave one.
    pub max_response_size: Option<usize>,
    /// The batch.
    pub items: Vec<RequestItem>,
}

/// Parses a Request Message. On failure, the version (when it could be
/// read) to answer in, and why.
pub fn parse_request(msg: Item) -> Result<Request, (Version, Failure)> {
    let invalid = |v: Version, m: String| (v, Failure::new(reason::INVALID_MESSAGE, m));
    if msg.tag != tag::REQUEST_MESSAGE {
        return Err(invalid(
            Version::V1_0,
            format!(
                "the message is a {}, not a Request Message",
                tag::name(msg.tag)
            ),
        ));
    }
    let f = Fields::new(&msg, "Request Message").map_err(|e| (Version::V1_0, e))?;
    let header = f
        .req_structure(tag::REQUEST_HEADER)
        .map_err(|e| (Version::V1_0, e))?;
    let h = Fields::new(header, "Request Header").map_err(|e| (Version::V1_0, e))?;
    let version = Version::parse(h.get(tag::PROTOCOL_VERSION).ok_or_else(|| {
        invalid(
            Version::V1_0,
            "the Request Header has no Protocol Version".into(),
        )
    })?)
    .map_err(|e| (Version::V1_0, e))?;
    if !version.supported() {
        return Err((
            version,
            Failure::new(
                reason::INVALID_MESSAGE,
                format!("protocol version {version} is not supported; this server speaks KMIP 1.0 to 1.4, 2.0 and 2.1"),
            ),
        ));
    }
    let with_v = |e: Failure| (version, e);
    let credential = h.get(tag::AUTHENTICATION).is_some();
    let continue_on_error = match h
        .enumeration(tag::BATCH_ERROR_CONTINUATION_OPTION)
        .map_err(with_v)?
    {
        None | Some(continuation::STOP) | Some(continuation::UNDO) => false,
        Some(continuation::CONTINUE) => true,
        Some(other) => {
            return Err(invalid(
                version,
                format!("Batch Error Continuation Option {other} is not a defined value"),
            ))
        }
    };
    let max_response_size = h
        .integer(tag::MAXIMUM_RESPONSE_SIZE)
        .map_err(with_v)?
        .map(|n| usize::try_from(n).unwrap_or(0));
    let count = h.req_integer(tag::BATCH_COUNT).map_err(with_v)?;
    // The batch items are moved out of the message, not copied: a payload
    // may carry a megabyte of data.
    let Value::Structure(children) = msg.value else {
        return Err(invalid(
            version,
            "the Request Message is not a Structure".into(),
        ));
    };
    let mut items = Vec::new();
    for bi in children.into_iter().filter(|i| i.tag == tag::BATCH_ITEM) {
        let (operation, id) = {
            let b = Fields::new(&bi, "Batch Item").map_err(with_v)?;
            let operation = b.req_enumeration(tag::OPERATION).map_err(with_v)?;
            let id = b
                .bytes(tag::UNIQUE_BATCH_ITEM_ID)
                .map_err(with_v)?
                .map(|v| Zeroizing::new(v.to_vec()));
            (operation, id)
        };
        let Value::Structure(fields) = bi.value else {
            return Err(invalid(version, "a Batch Item must be a Structure".into()));
        };
        let payload = match fields.into_iter().find(|i| i.tag == tag::REQUEST_PAYLOAD) {
            Some(p) if matches!(p.value, Value::Structure(_)) => p,
            Some(_) => {
                return Err(invalid(
                    version,
                    "a Request Payload must be a Structure".into(),
                ))
            }
            None => Item::structure(tag::REQUEST_PAYLOAD, Vec::new()),
        };
        items.push(RequestItem {
            operation,
            id,
            payload,
        });
    }
    if usize::try_from(count).ok() != Some(items.len()) {
        return Err(invalid(
            version,
            format!(
                "the Batch Count says {count} but the message holds {} Batch Items",
                items.len()
            ),
        ));
    }
    if items.is_empty() {
        return Err(invalid(version, "the message holds no Batch Item".into()));
    }
    if items.len() > 1 && items.iter().any(|i| i.id.is_none()) {
        return Err(invalid(
            version,
            "every Batch Item of a batch of several needs a Unique Batch Item ID".into(),
        ));
    }
    Ok(Request {
        version,
        credential,
        continue_on_error,
        max_response_size,
        items,
    })
}

/// The answer to one batch item.
pub struct ResponseItem {
    /// The request's operation (absent when the request could not be read).
    pub operation: Option<u32>,
    /// The request's batch item id.
    pub id: Option<Zeroizing<Vec<u8>>>,
    /// The payload's items, or the failure.
    pub result: Result<Vec<Item>, Failure>,
}

/// Builds a Response Message.
pub fn response(version: Version, now_unix: i64, items: Vec<ResponseItem>) -> Item {
    let count = i32::try_from(items.len()).unwrap_or(i32::MAX);
    let mut out = vec![Item::structure(
        tag::RESPONSE_HEADER,
        vec![
            version.item(),
            Item::new(tag::TIME_STAMP, Value::DateTime(now_unix)),
            Item::integer(tag::BATCH_COUNT, count),
        ],
    )];
    for it in items {
        let mut b = Vec::new();
        if let Some(op) = it.operation {
            b.push(Item::enumeration(tag::OPERATION, op));
        }
        if let Some(id) = it.id {
            b.push(Item::new(tag::UNIQUE_BATCH_ITEM_ID, Value::Bytes(id)));
        }
        match it.result {
            Ok(payload) => {
                b.push(Item::enumeration(tag::RESULT_STATUS, status::SUCCESS));
                b.push(Item::structure(tag::RESPONSE_PAYLOAD, payload));
            }
            Err(f) => {
                b.push(Item::enumeration(
                    tag::RESULT_STATUS,
                    status::OPERATION_FAILED,
                ));
                b.push(Item::enumeration(tag::RESULT_REASON, f.reason));
                b.push(Item::text(tag::RESULT_MESSAGE, f.message));
            }
        }
        out.push(Item::structure(tag::BATCH_ITEM, b));
    }
    Item::structure(tag::RESPONSE_MESSAGE, out)
}

/// A read-only view of a structure's fields with typed getters whose
/// errors name the field (Invalid Field, or Missing Data when required).
pub struct Fields<'a> {
    items: &'a [Item],
}

fn wrong_type(tag: u32, want: &str, got: &Value) -> Failure {
    Failure::new(
        reason::INVALID_FIELD,
        format!(
            "{} must be a {want}; it is a {}",
            tag::name(tag),
            got.type_name()
        ),
    )
}

fn missing(tag: u32) -> Failure {
    Failure::new(
        reason::MISSING_DATA,
        format!(
            "the request has no {}, which this operation needs",
            tag::name(tag)
        ),
    )
}

impl<'a> Fields<'a> {
    /// The fields of `item`, which must be a structure.
    pub fn new(item: &'a Item, what: &str) -> Result<Self, Failure> {
        match &item.value {
            Value::Structure(items) => Ok(Self { items }),
            other => Err(Failure::new(
                reason::INVALID_FIELD,
                format!("{what} must be a Structure; it is a {}", other.type_name()),
            )),
        }
    }

    /// The fields of a structure's children.
    pub fn of(items: &'a [Item]) -> Self {
        Self { items }
    }

    /// The first field with `tag`.
    pub fn get(&self, tag: u32) -> Option<&'a Item> {
        self.items.iter().find(|i| i.tag == tag)
    }

    /// Every field with `tag`.
    pub fn all(&self, tag: u32) -> impl Iterator<Item = &'a Item> + 'a {
        self.items.iter().filter(move |i| i.tag == tag)
    }

    /// Every field.
    pub fn all_items(&self) -> &'a [Item] {
        self.items
    }

    /// Refuses fields other than `allowed` (a KMIP request names only the
    /// fields its operation defines).
    pub fn only(&self, what: &str, allowed: &[u32]) -> Result<(), Failure> {
        match self.items.iter().find(|i| !allowed.contains(&i.tag)) {
            None => Ok(()),
            Some(i) => Err(Failure::new(
                reason::INVALID_FIELD,
                format!("{what} does not take a {} field", tag::name(i.tag)),
            )),
        }
    }

    /// A text field.
    pub fn text(&self, tag: u32) -> Result<Option<&'a str>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::Text(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(tag, "Text String", v)),
        }
    }

    /// A required text field.
    pub fn req_text(&self, tag: u32) -> Result<&'a str, Failure> {
        self.text(tag)?.ok_or_else(|| missing(tag))
    }

    /// An enumeration.
    pub fn enumeration(&self, tag: u32) -> Result<Option<u32>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::Enumeration(v)) => Ok(Some(*v)),
            Some(v) => Err(wrong_type(tag, "Enumeration", v)),
        }
    }

    /// A required enumeration.
    pub fn req_enumeration(&self, tag: u32) -> Result<u32, Failure> {
        self.enumeration(tag)?.ok_or_else(|| missing(tag))
    }

    /// An integer.
    pub fn integer(&self, tag: u32) -> Result<Option<i32>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::Integer(v)) => Ok(Some(*v)),
            Some(v) => Err(wrong_type(tag, "Integer", v)),
        }
    }

    /// A required integer.
    pub fn req_integer(&self, tag: u32) -> Result<i32, Failure> {
        self.integer(tag)?.ok_or_else(|| missing(tag))
    }

    /// A boolean.
    pub fn boolean(&self, tag: u32) -> Result<Option<bool>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::Boolean(v)) => Ok(Some(*v)),
            Some(v) => Err(wrong_type(tag, "Boolean", v)),
        }
    }

    /// A date-time (seconds).
    pub fn date(&self, tag: u32) -> Result<Option<i64>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::DateTime(v)) => Ok(Some(*v)),
            Some(Value::DateTimeExtended(v)) => Ok(Some(v / 1_000_000)),
            Some(v) => Err(wrong_type(tag, "Date-Time", v)),
        }
    }

    /// A byte string.
    pub fn bytes(&self, tag: u32) -> Result<Option<&'a [u8]>, Failure> {
        match self.get(tag).map(|i| &i.value) {
            None => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b.as_slice())),
            Some(v) => Err(wrong_type(tag, "Byte String", v)),
        }
    }

    /// A structure field.
    pub fn structure(&self, tag: u32) -> Result<Option<&'a Item>, Failure> {
        match self.get(tag) {
            None => Ok(None),
            Some(i) if matches!(i.value, Value::Structure(_)) => Ok(Some(i)),
            Some(i) => Err(wrong_type(tag, "Structure", &i.value)),
        }
    }

    /// A required structure field.
    pub fn req_structure(&self, tag: u32) -> Result<&'a Item, Failure> {
        self.structure(tag)?.ok_or_else(|| missing(tag))
    }
}
