//! TTLV, KMIP's binary encoding: 3-byte tag, 1-byte type, 4-byte length,
//! value padded to a multiple of 8 bytes.
//!
//! The decoder is strict and bounded: a message is at most
//! [`Limits::max_message`] bytes, nested at most [`Limits::max_depth`]
//! deep, with at most [`Limits::max_items`] items; lengths must match their
//! type, padding must be zero, text must be UTF-8, and a structure's items
//! must fill it exactly. Anything else is a [`DecodeError`] naming the
//! offset, never a panic. Byte strings (key material, plaintext) are
//! zeroized when dropped.

use std::fmt;
use zeroize::Zeroizing;

/// One TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub struct Item {
    /// The tag (0x42xxxx standard, 0x54xxxx extension).
    pub tag: u32,
    /// The typed value.
    pub value: Value,
}

/// A typed TTLV value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// Nested items.
    Structure(Vec<Item>),
    /// 32-bit signed.
    Integer(i32),
    /// 64-bit signed.
    LongInteger(i64),
    /// Big-endian two's complement, a multiple of 8 bytes.
    BigInteger(Vec<u8>),
    /// 32-bit enumeration value.
    Enumeration(u32),
    /// True or false.
    Boolean(bool),
    /// UTF-8 text.
    Text(String),
    /// Bytes; may hold key material or plaintext, so zeroized on drop.
    Bytes(Zeroizing<Vec<u8>>),
    /// Seconds since the unix epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
    /// Microseconds since the unix epoch (KMIP 2.0).
    DateTimeExtended(i64),
}

impl Value {
    fn type_code(&self) -> u8 {
        match self {
            Self::Structure(_) => 0x01,
            Self::Integer(_) => 0x02,
            Self::LongInteger(_) => 0x03,
            Self::BigInteger(_) => 0x04,
            Self::Enumeration(_) => 0x05,
            Self::Boolean(_) => 0x06,
            Self::Text(_) => 0x07,
            Self::Bytes(_) => 0x08,
            Self::DateTime(_) => 0x09,
            Self::Interval(_) => 0x0A,
            Self::DateTimeExtended(_) => 0x0B,
        }
    }

    /// The type's name, for error messages.
    pub fn type_name(&self) -> &'static str {
        type_name(self.type_code())
    }
}

fn type_name(code: u8) -> &'static str {
    match code {
        0x01 => "Structure",
        0x02 => "Integer",
        0x03 => "Long Integer",
        0x04 => "Big Integer",
        0x05 => "Enumeration",
        0x06 => "Boolean",
        0x07 => "Text String",
        0x08 => "Byte String",
        0x09 => "Date-Time",
        0x0A => "Interval",
        0x0B => "Date-Time Extended",
        _ => "unknown type",
    }
}

// Byte strings are never printed: they may be keys or plaintext.
impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Structure(items) => f.debug_list().entries(items).finish(),
            Self::Integer(v) => write!(f, "Integer({v})"),
            Self::LongInteger(v) => write!(f, "LongInteger({v})"),
            Self::BigInteger(v) => write!(f, "BigInteger({} bytes)", v.len()),
            Self::Enumeration(v) => write!(f, "Enumeration({v:#x})"),
            Self::Boolean(v) => write!(f, "Boolean({v})"),
            Self::Text(v) => write!(f, "Text({v:?})"),
            Self::Bytes(v) => write!(f, "Bytes({} bytes, redacted)", v.len()),
            Self::DateTime(v) => write!(f, "DateTime({v})"),
            Self::Interval(v) => write!(f, "Interval({v})"),
            Self::DateTimeExtended(v) => write!(f, "DateTimeExtended({v})"),
        }
    }
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06X} {:?}", self.tag, self.value)
    }
}

impl Item {
    /// A new item.
    pub fn new(tag: u32, value: Value) -> Self {
        Self { tag, value }
    }

    /// A structure.
    pub fn structure(tag: u32, items: Vec<Item>) -> Self {
        Self::new(tag, Value::Structure(items))
    }

    /// An enumeration.
    pub fn enumeration(tag: u32, v: u32) -> Self {
        Self::new(tag, Value::Enumeration(v))
    }

    /// An integer.
    pub fn integer(tag: u32, v: i32) -> Self {
        Self::new(tag, Value::Integer(v))
    }

    /// A text string.
    pub fn text(tag: u32, v: impl Into<String>) -> Self {
        Self::new(tag, Value::Text(v.into()))
    }

    /// A byte string.
    pub fn bytes(tag: u32, v: Vec<u8>) -> Self {
        Self::new(tag, Value::Bytes(Zeroizing::new(v)))
    }

    /// The items of a structure (empty for other types).
    pub fn children(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// The encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        8 + padded(self.value_len())
    }

    fn value_len(&self) -> usize {
        match &self.value {
            Value::Structure(items) => items.iter().map(Item::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_)
            | Value::Boolean(_)
            | Value::DateTime(_)
            | Value::DateTimeExtended(_) => 8,
            Value::BigInteger(b) => b.len(),
            Value::Text(s) => s.len(),
            Value::Bytes(b) => b.len(),
        }
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let tag = self.tag.to_be_bytes();
        out.extend_from_slice(&tag[1..]);
        out.push(self.value.type_code());
        let len = self.value_len();
        // Lengths beyond u32 cannot be built from decoded input (bounded)
        // or by the server (responses are bounded); saturate to be total.
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        match &self.value {
            Value::Structure(items) => {
                for i in items {
                    i.encode_into(out);
                }
            }
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Enumeration(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) | Value::DateTime(v) | Value::DateTimeExtended(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::BigInteger(b) => out.extend_from_slice(b),
            Value::Text(s) => out.extend_from_slice(s.as_bytes()),
            Value::Bytes(b) => out.extend_from_slice(b),
        }
        out.resize(out.len() + padded(len) - len, 0);
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Bounds on what the decoder accepts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest whole message, header included.
    pub max_message: usize,
    /// Deepest nesting of structures (the message itself is depth 1).
    pub max_depth: usize,
    /// Most items in one message.
    pub max_items: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Encrypt/Decrypt carry up to the broker's 1 MiB plaintext limit.
            max_message: 2 * 1024 * 1024,
            max_depth: 16,
            max_items: 10_000,
        }
    }
}

/// Why bytes are not a TTLV message. `offset` is where the problem starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or a length announces.
    #[error("the message is truncated at byte {offset}: {needed} more bytes were announced")]
    Truncated {
        /// Where.
        offset: usize,
        /// How many bytes are missing.
        needed: usize,
    },
    /// Over the message size limit.
    #[error("the message is {len} bytes long, more than the {max} bytes this server accepts")]
    TooLarge {
        /// Announced or actual length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// Structures nested too deep.
    #[error("structures are nested more than {max} deep at byte {offset}")]
    TooDeep {
        /// Where.
        offset: usize,
        /// The limit.
        max: usize,
    },
    /// Too many items.
    #[error("the message holds more than {max} items")]
    TooManyItems {
        /// The limit.
        max: usize,
    },
    /// A type byte that TTLV does not define.
    #[error("item {tag:06X} at byte {offset} has unknown type {code:#04x}")]
    UnknownType {
        /// Where.
        offset: usize,
        /// Its tag.
        tag: u32,
        /// The byte.
        code: u8,
    },
    /// A tag outside the standard (0x42) and extension (0x54) ranges.
    #[error("item at byte {offset} has tag {tag:06X}, outside the KMIP (42xxxx) and extension (54xxxx) ranges")]
    BadTag {
        /// Where.
        offset: usize,
        /// The tag.
        tag: u32,
    },
    /// A length that does not fit the type.
    #[error(
        "item {tag:06X} at byte {offset} is a {kind} of length {len}, which that type cannot have"
    )]
    BadLength {
        /// Where.
        offset: usize,
        /// Its tag.
        tag: u32,
        /// Its type.
        kind: &'static str,
        /// The length.
        len: u32,
    },
    /// Non-zero padding bytes.
    #[error("item {tag:06X} at byte {offset} has non-zero padding")]
    BadPadding {
        /// Where.
        offset: usize,
        /// Its tag.
        tag: u32,
    },
    /// A boolean other than 0 or 1.
    #[error("item {tag:06X} at byte {offset} is a Boolean with a value other than 0 or 1")]
    BadBoolean {
        /// Where.
        offset: usize,
        /// Its tag.
        tag: u32,
    },
    /// Text that is not UTF-8.
    #[error("item {tag:06X} at byte {offset} is a Text String that is not UTF-8")]
    BadText {
        /// Where.
        offset: usize,
        /// Its tag.
        tag: u32,
    },
    /// Bytes after the message.
    #[error("{extra} bytes follow the end of the message")]
    Trailing {
        /// How many.
        extra: usize,
    },
}

/// Decodes exactly one item from `bytes` (nothing may follow it).
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Item, DecodeError> {
    if bytes.len() > limits.max_message {
        return Err(DecodeError::TooLarge {
            len: bytes.len() as u64,
            max: limits.max_message,
        });
    }
    let mut d = Decoder {
        bytes,
        limits,
        items: 0,
    };
    let (item, end) = d.item(0, 1)?;
    if end != bytes.len() {
        return Err(DecodeError::Trailing {
            extra: bytes.len() - end,
        });
    }
    Ok(item)
}

/// The whole length of the message whose first 8 bytes are `header`
/// (header included), checked against the limit before anything more is
/// read from the network.
pub fn framed_len(header: &[u8; 8], limits: &Limits) -> Result<usize, DecodeError> {
    let len = u64::from(u32::from_be_bytes([
        header[4], header[5], header[6], header[7],
    ]));
    let total = 8 + len.div_ceil(8) * 8;
    if total > limits.max_message as u64 {
        return Err(DecodeError::TooLarge {
            len: total,
            max: limits.max_message,
        });
    }
    // Bounded by max_message above, so it fits usize.
    Ok(usize::try_from(total).unwrap_or(usize::MAX))
}

struct Decoder<'a> {
    bytes: &'a [u8],
    limits: &'a Limits,
    items: usize,
}

impl Decoder<'_> {
    fn take(&self, at: usize, n: usize) -> Result<&[u8], DecodeError> {
        let end = at.checked_add(n).filter(|e| *e <= self.bytes.len());
        match end {
            Some(end) => Ok(&self.bytes[at..end]),
            None => Err(DecodeError::Truncated {
                offset: at,
                needed: at.saturating_add(n) - self.bytes.len(),
            }),
        }
    }

    /// Decodes the item at `at`; returns it and the offset after it.
    fn item(&mut self, at: usize, depth: usize) -> Result<(Item, usize), DecodeError> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return Err(DecodeError::TooManyItems {
                max: self.limits.max_items,
            });
        }
        let h = self.take(at, 8)?;
        let tag = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        let code = h[3];
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if h[0] != 0x42 && h[0] != 0x54 {
            return Err(DecodeError::BadTag { offset: at, tag });
        }
        let body = at + 8;
        let len_usize = len as usize;
        let bad_len = || DecodeError::BadLength {
            offset: at,
            tag,
            kind: type_name(code),
            len,
        };
        let fixed = |want: usize| {
            if len_usize == want {
                Ok(())
            } else {
                Err(bad_len())
            }
        };
        let value = match code {
            0x01 => {
                if depth >= self.limits.max_depth {
                    return Err(DecodeError::TooDeep {
                        offset: at,
                        max: self.limits.max_depth,
                    });
                }
                if len % 8 != 0 {
                    return Err(bad_len());
                }
                self.take(body, len_usize)?;
                let end = body + len_usize;
                let mut items = Vec::new();
                let mut pos = body;
                while pos < end {
                    let (child, next) = self.item(pos, depth + 1)?;
                    if next > end {
                        return Err(bad_len());
                    }
                    items.push(child);
                    pos = next;
                }
                return Ok((Item::structure(tag, items), end));
            }
            0x02 => {
                fixed(4)?;
                let v = self.take(body, 4)?;
                Value::Integer(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            0x05 | 0x0A => {
                fixed(4)?;
                let v = self.take(body, 4)?;
                let n = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                if code == 0x05 {
                    Value::Enumeration(n)
                } else {
                    Value::Interval(n)
                }
            }
            0x03 | 0x09 | 0x0B | 0x06 => {
                fixed(8)?;
                let v = self.take(body, 8)?;
                let n = i64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
                match code {
                    0x03 => Value::LongInteger(n),
                    0x09 => Value::DateTime(n),
                    0x0B => Value::DateTimeExtended(n),
                    _ => match n {
                        0 => Value::Boolean(false),
                        1 => Value::Boolean(true),
                        _ => return Err(DecodeError::BadBoolean { offset: at, tag }),
                    },
                }
            }
            0x04 => {
                if len % 8 != 0 || len == 0 {
                    return Err(bad_len());
                }
                Value::BigInteger(self.take(body, len_usize)?.to_vec())
            }
            0x07 => {
                let v = self.take(body, len_usize)?;
                Value::Text(
                    std::str::from_utf8(v)
                        .map_err(|_| DecodeError::BadText { offset: at, tag })?
                        .to_owned(),
                )
            }
            0x08 => Value::Bytes(Zeroizing::new(self.take(body, len_usize)?.to_vec())),
            _ => {
                return Err(DecodeError::UnknownType {
                    offset: at,
                    tag,
                    code,
                })
            }
        };
        let pad = padded(len_usize) - len_usize;
        if self.take(body + len_usize, pad)?.iter().any(|b| *b != 0) {
            return Err(DecodeError::BadPadding { offset: at, tag });
        }
        Ok((Item { tag, value }, body + padded(len_usize)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(Value::Integer),
            any::<i64>().prop_map(Value::LongInteger),
            proptest::collection::vec(any::<u8>(), 1..3)
                .prop_map(|v| Value::BigInteger(v.repeat(8))),
            any::<u32>().prop_map(Value::Enumeration),
            any::<bool>().prop_map(Value::Boolean),
            ".{0,20}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..40)
                .prop_map(|v| Value::Bytes(Zeroizing::new(v))),
            any::<i64>().prop_map(Value::DateTime),
            any::<u32>().prop_map(Value::Interval),
            any::<i64>().prop_map(Value::DateTimeExtended),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            proptest::collection::vec((0x420001u32..0x420150, inner), 0..6).prop_map(|v| {
                Value::Structure(v.into_iter().map(|(t, v)| Item::new(t, v)).collect())
            })
        })
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(tag in 0x420001u32..0x420150, v in value()) {
            let item = Item::new(tag, v);
            let bytes = item.encode();
            prop_assert_eq!(bytes.len(), item.encoded_len());
            prop_assert_eq!(bytes.len() % 8, 0);
            let back = decode(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(back, item);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, &Limits::default());
        }
    }

    /// The example of KMIP 1.4 §9.1.2: an Integer 8 under tag 420020.
    #[test]
    fn known_encodings() {
        let i = Item::integer(0x420020, 8);
        assert_eq!(hex::encode(i.encode()), "42002002000000040000000800000000");
        let t = Item::text(0x420020, "Hello World");
        assert_eq!(
            hex::encode(t.encode()),
            "420020070000000b48656c6c6f20576f726c640000000000"
        );
        let s = Item::structure(
            0x420020,
            vec![
                Item::enumeration(0x420004, 254),
                Item::integer(0x420005, 255),
            ],
        );
        assert_eq!(
            hex::encode(s.encode()),
            "42002001000000204200040500000004000000fe000000004200050200000004000000ff00000000"
        );
    }

    #[test]
    fn every_truncation_is_an_error() {
        let s = Item::structure(
            0x420078,
            vec![Item::text(0x420055, "abc"), Item::integer(0x42000D, 1)],
        )
        .encode();
        for n in 0..s.len() {
            assert!(decode(&s[..n], &Limits::default()).is_err(), "{n}");
        }
    }

    #[test]
    fn strictness() {
        let lim = Limits::default();
        let mut b = Item::integer(0x420020, 8).encode();
        b[12] = 1; // padding
        assert!(matches!(
            decode(&b, &lim),
            Err(DecodeError::BadPadding { .. })
        ));
        let mut b = Item::integer(0x420020, 8).encode();
        b[7] = 8; // Integer of length 8
        assert!(matches!(
            decode(&b, &lim),
            Err(DecodeError::BadLength { .. })
        ));
        let mut b = Item::new(0x420020, Value::Boolean(true)).encode();
        b[15] = 2;
        assert!(matches!(
            decode(&b, &lim),
            Err(DecodeError::BadBoolean { .. })
        ));
        let mut b = Item::integer(0x420020, 8).encode();
        b[3] = 0x0C;
        assert!(matches!(
            decode(&b, &lim),
            Err(DecodeError::UnknownType { .. })
        ));
        let mut b = Item::integer(0x420020, 8).encode();
        b[0] = 0x43;
        assert!(matches!(decode(&b, &lim), Err(DecodeError::BadTag { .. })));
        let mut b = Item::integer(0x420020, 8).encode();
        b.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode(&b, &lim),
            Err(DecodeError::Trailing { extra: 8 })
        ));
        let mut t = Item::text(0x420020, "ab").encode();
        t[8] = 0xff;
        assert!(matches!(decode(&t, &lim), Err(DecodeError::BadText { .. })));
    }

    #[test]
    fn limits() {
        let mut deep = Item::integer(0x420020, 1);
        for _ in 0..40 {
            deep = Item::structure(0x420021, vec![deep]);
        }
        let lim = Limits::default();
        assert!(matches!(
            decode(&deep.encode(), &lim),
            Err(DecodeError::TooDeep { .. })
        ));
        let many = Item::structure(0x420021, vec![Item::integer(0x420020, 1); 20_000]);
        assert!(matches!(
            decode(&many.encode(), &lim),
            Err(DecodeError::TooManyItems { .. })
        ));
        let huge = [0x42, 0x00, 0x78, 0x01, 0xff, 0xff, 0xff, 0xf8];
        assert!(matches!(
            framed_len(&huge, &lim),
            Err(DecodeError::TooLarge { .. })
        ));
        let ok = [0x42, 0x00, 0x78, 0x01, 0, 0, 0, 0x10];
        assert_eq!(framed_len(&ok, &lim).unwrap(), 24);
    }
}
