//! The ciphertext envelope (format v1) and AES-256-GCM seal/open.
//!
//! Byte layout, all integers big-endian (ARCHITECTURE.md, "Ciphertext format v1"):
//!
//! ```text
//! off  len  field
//! 0    4    magic "SKMS"
//! 4    1    format version (1)
//! 5    1    algorithm (1 or 2, below)
//! 6    1    R = region length (1..=32)
//! 7    R    home region (ASCII)
//! ..   1    K = key id length (1..=64)
//! ..   K    key id (ASCII)
//! ..   4    key version (>= 1)
//! ..   32   salt (random per message)
//! ..   12   nonce (random per message)
//! ..   4    L = length of ciphertext+tag (>= 16)
//! ..   L    ciphertext || 16-byte GCM tag
//! ```
//!
//! Every message has its own AES-256-GCM key, derived with HKDF-SHA256
//! (RFC 5869) from the version material `M`; `info = "sovkms/v1/message-key"
//! || header`, where `header` is every byte before the ciphertext
//! (including L), so it holds the message's random salt:
//! - algorithm 2 (written): `HKDF(salt = "sovkms/v1/version-prk", ikm = M, info)`.
//!   The extract step depends only on the version, so it runs once per
//!   unwrap ([`Kek::new`]); a message costs one HMAC (the expand).
//! - algorithm 1 (read only, written before): `HKDF(salt = header salt, ikm = M, info)`,
//!   a full extract and expand per message.
//!
//! AES-GCM associated data: `header || canonical(context)`. Any change to a
//! header byte or to the context therefore fails authentication.

mod context;
mod entropy;

pub use context::{ContextError, EncryptionContext};
pub use entropy::{BatchedRandom, Entropy};

use crate::id::KeyId;
use crate::region::Region;
use crate::secret::{KeyMaterial, Plaintext};
use aws_lc_rs::{aead, hkdf, hmac};
use zeroize::Zeroizing;

/// First four bytes of every sovkms ciphertext.
pub const MAGIC: [u8; 4] = *b"SKMS";
/// The only format version this build reads and writes.
pub const FORMAT_V1: u8 = 1;
/// Algorithm id 1 (read only): AES-256-GCM under a per-message key,
/// HKDF-SHA256 with the header's salt as the extract salt.
pub const ALG_AES256GCM_HKDF_SHA256: u8 = 1;
/// Algorithm id 2 (written): AES-256-GCM under a per-message key,
/// HKDF-SHA256 with a fixed extract salt (one extract per version).
pub const ALG_AES256GCM_HKDF_EXPAND: u8 = 2;
/// HKDF extract salt of algorithm 2.
pub const PRK_SALT: &[u8] = b"sovkms/v1/version-prk";
/// Salt length.
pub const SALT_LEN: usize = 32;
/// GCM nonce length.
pub const NONCE_LEN: usize = 12;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// HKDF info label, followed by the header bytes.
pub const HKDF_LABEL: &[u8] = b"sovkms/v1/message-key";
/// Largest header the format allows.
pub const MAX_HEADER_LEN: usize = 4 + 1 + 1 + 1 + 32 + 1 + 64 + 4 + SALT_LEN + NONCE_LEN + 4;

/// Why a byte string is not a valid envelope. Messages name the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Input ended inside a field.
    #[error("ciphertext is truncated: {0} is incomplete")]
    Truncated(&'static str),
    /// Not an sovkms ciphertext at all.
    #[error("not a sovkms ciphertext (bad magic bytes)")]
    BadMagic,
    /// A version this build does not know.
    #[error("unsupported ciphertext format version {0} (this broker reads version 1)")]
    UnknownVersion(u8),
    /// An algorithm id this build does not know.
    #[error("unsupported ciphertext algorithm id {0}")]
    UnknownAlgorithm(u8),
    /// A field with an invalid value.
    #[error("invalid ciphertext field {field}: {why}")]
    BadField {
        /// field name
        field: &'static str,
        /// what is wrong
        why: String,
    },
    /// Bytes after the declared ciphertext.
    #[error("ciphertext has {n} {unit} after its declared length", n = .0, unit = if *.0 == 1 { "trailing byte" } else { "trailing bytes" })]
    TrailingBytes(usize),
}

/// The parsed, typed header of an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Algorithm id ([`ALG_AES256GCM_HKDF_EXPAND`] for everything sealed now).
    pub algorithm: u8,
    /// Region whose broker holds the key.
    pub region: Region,
    /// Key id.
    pub key_id: KeyId,
    /// Key version (>= 1).
    pub key_version: u32,
    /// Random per message; part of the key derivation.
    pub salt: [u8; SALT_LEN],
    /// GCM nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Header {
    fn fields(&self) -> Fields<'_> {
        Fields {
            algorithm: self.algorithm,
            region: &self.region,
            key_id: &self.key_id,
            key_version: self.key_version,
            salt: &self.salt,
            nonce: &self.nonce,
        }
    }
}

/// A header's fields, borrowed: sealing writes them without cloning the
/// region and key id into a [`Header`].
struct Fields<'a> {
    algorithm: u8,
    region: &'a Region,
    key_id: &'a KeyId,
    key_version: u32,
    salt: &'a [u8; SALT_LEN],
    nonce: &'a [u8; NONCE_LEN],
}

impl Fields<'_> {
    /// Appends the header followed by the ciphertext length `ct_len`.
    fn encode_into(&self, ct_len: u32, out: &mut Vec<u8>) {
        let region = self.region.as_str().as_bytes();
        let kid = self.key_id.as_str().as_bytes();
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_V1);
        out.push(self.algorithm);
        // Lengths are bounded by the Region and KeyId types (<= 32, <= 64).
        out.push(region.len() as u8);
        out.extend_from_slice(region);
        out.push(kid.len() as u8);
        out.extend_from_slice(kid);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(self.salt);
        out.extend_from_slice(self.nonce);
        out.extend_from_slice(&ct_len.to_be_bytes());
    }
}

/// A parsed envelope: the typed header over the caller's bytes (header,
/// then ciphertext+tag), which it borrows: opening decrypts from them
/// into a fresh buffer, with no copy of the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Typed header.
    pub header: Header,
    bytes: &'a [u8],
    header_len: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FormatError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(FormatError::Truncated(field))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn byte(&mut self, field: &'static str) -> Result<u8, FormatError> {
        Ok(self.take(1, field)?[0])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FormatError> {
        let s = self.take(N, field)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}

impl<'a> Envelope<'a> {
    /// Strictly parses `bytes`. Never panics; every defect is a `FormatError`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let (header, header_len) = Self::parse_header(bytes)?;
        Ok(Self {
            header,
            bytes,
            header_len,
        })
    }

    /// The typed header and its length; checks that exactly the declared
    /// ciphertext follows.
    fn parse_header(bytes: &[u8]) -> Result<(Header, usize), FormatError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        if r.array::<4>("magic")? != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.byte("format version")?;
        if version != FORMAT_V1 {
            return Err(FormatError::UnknownVersion(version));
        }
        let algorithm = r.byte("algorithm")?;
        if algorithm != ALG_AES256GCM_HKDF_EXPAND && algorithm != ALG_AES256GCM_HKDF_SHA256 {
            return Err(FormatError::UnknownAlgorithm(algorithm));
        }
        let rlen = r.byte("region length")? as usize;
        let region_bytes = r.take(rlen, "region")?;
        let region = std::str::from_utf8(region_bytes)
            .map_err(|_| bad("region", "not ASCII".into()))
            .and_then(|s| Region::parse(s).map_err(|e| bad("region", e.to_string())))?;
        let klen = r.byte("key id length")? as usize;
        let kid_bytes = r.take(klen, "key id")?;
        let key_id = std::str::from_utf8(kid_bytes)
            .map_err(|_| bad("key id", "not ASCII".into()))
            .and_then(|s| KeyId::parse(s).map_err(|e| bad("key id", e.to_string())))?;
        let key_version = u32::from_be_bytes(r.array::<4>("key version")?);
        if key_version == 0 {
            return Err(bad("key version", "must be at least 1".into()));
        }
        let salt = r.array::<SALT_LEN>("salt")?;
        let nonce = r.array::<NONCE_LEN>("nonce")?;
        let ct_len = u32::from_be_bytes(r.array::<4>("ciphertext length")?) as usize;
        if ct_len < TAG_LEN {
            return Err(bad(
                "ciphertext length",
                format!("{ct_len} is shorter than the {TAG_LEN}-byte tag"),
            ));
        }
        let header_end = r.pos;
        r.take(ct_len, "ciphertext")?;
        let trailing = bytes.len() - r.pos;
        if trailing != 0 {
            return Err(FormatError::TrailingBytes(trailing));
        }
        Ok((
            Header {
                algorithm,
                region,
                key_id,
                key_version,
                salt,
                nonce,
            },
            header_end,
        ))
    }

    /// The serialized envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// The header's exact bytes.
    fn header_bytes(&self) -> &[u8] {
        &self.bytes[..self.header_len]
    }

    /// Length of ciphertext+tag.
    pub fn sealed_len(&self) -> usize {
        self.bytes.len() - self.header_len
    }
}

fn bad(field: &'static str, why: String) -> FormatError {
    FormatError::BadField { field, why }
}

/// Opening failed: wrong key, wrong context, or altered bytes. Deliberately
/// says no more than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ciphertext failed authentication: it was altered, or the encryption context differs from the one used to encrypt")]
pub struct OpenError;

/// One key version as the envelope uses it: the material (algorithm 1
/// derives from it per message) and the HMAC state keyed with the
/// version's PRK (algorithm 2 expands each message key from it). Both are
/// wiped on drop: the material by [`KeyMaterial`], the HMAC state by
/// aws-lc's `HMAC_CTX_cleanup`.
pub struct Kek {
    material: KeyMaterial,
    prk: hmac::Key,
    /// A managed object's own bytes, unsealed once with this version's
    /// material and cached with it (same bound, lifetime and invalidation).
    object: Option<Plaintext>,
}

impl Kek {
    /// Attaches a managed object's unsealed bytes.
    pub fn with_object(mut self, bytes: Plaintext) -> Self {
        self.object = Some(bytes);
        self
    }

    /// The managed object's bytes, if this version seals an object.
    pub fn object(&self) -> Option<&Plaintext> {
        self.object.as_ref()
    }

    /// Runs algorithm 2's extract step, once per version.
    pub fn new(material: KeyMaterial) -> Result<Self, SealError> {
        let mut prk = Zeroizing::new([0u8; 32]);
        let salt = hmac::Key::new(hmac::HMAC_SHA256, PRK_SALT);
        hmac::sign_to_buffer(&salt, material.expose_secret(), &mut prk[..])
            .map_err(|_| SealError::Derive)?;
        let prk = hmac::Key::new(hmac::HMAC_SHA256, &prk[..]);
        Ok(Self {
            material,
            prk,
            object: None,
        })
    }
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

fn message_key(
    kek: &Kek,
    algorithm: u8,
    salt: &[u8; SALT_LEN],
    header_bytes: &[u8],
) -> Result<aead::LessSafeKey, OpenError> {
    match algorithm {
        ALG_AES256GCM_HKDF_EXPAND => expand_key(kek, header_bytes),
        ALG_AES256GCM_HKDF_SHA256 => {
            let prk =
                hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(kek.material.expose_secret());
            let info = [HKDF_LABEL, header_bytes];
            let okm = prk
                .expand(&info, &aead::AES_256_GCM)
                .map_err(|_| OpenError)?;
            Ok(aead::LessSafeKey::new(aead::UnboundKey::from(okm)))
        }
        // Unreachable through the parser; a hand-built header gets nothing.
        _ => Err(OpenError),
    }
}

/// Algorithm 2: HKDF-Expand for one 32-byte block,
/// `T(1) = HMAC(PRK, label || header || 0x01)`, from the PRK's HMAC state.
fn expand_key(kek: &Kek, header_bytes: &[u8]) -> Result<aead::LessSafeKey, OpenError> {
    let mut info = [0u8; HKDF_LABEL.len() + MAX_HEADER_LEN + 1];
    let end = HKDF_LABEL.len() + header_bytes.len();
    let filled = info.get_mut(..=end).ok_or(OpenError)?;
    let (label, rest) = filled.split_at_mut(HKDF_LABEL.len());
    label.copy_from_slice(HKDF_LABEL);
    let (header, counter) = rest.split_at_mut(header_bytes.len());
    header.copy_from_slice(header_bytes);
    counter.fill(1);
    let mut okm = Zeroizing::new([0u8; 32]);
    hmac::sign_to_buffer(&kek.prk, filled, &mut okm[..]).map_err(|_| OpenError)?;
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, &okm[..]).map_err(|_| OpenError)?;
    Ok(aead::LessSafeKey::new(key))
}

fn aad(header_bytes: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let mut a = header_bytes.to_vec();
    context.encode_into(&mut a);
    a
}

/// Sealing failed: the random generator or the crypto library failed, or
/// the input is too large for one envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Salts and nonces could not be drawn.
    #[error("the system random number generator failed")]
    Random,
    /// Larger than one envelope holds (4 GiB); the broker's limit is far lower.
    #[error("plaintext too large for one envelope")]
    TooLarge,
    /// The crypto library refused a key derivation.
    #[error("key derivation failed")]
    Derive,
}

/// Seals `plaintext` under `kek` for key `key_id` version `key_version`.
pub fn seal(
    rng: &dyn Entropy,
    kek: &Kek,
    region: &Region,
    key_id: &KeyId,
    key_version: u32,
    context: &EncryptionContext,
    plaintext: &Plaintext,
) -> Result<Vec<u8>, SealError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut salt).map_err(|_| SealError::Random)?;
    rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
    let header = Fields {
        algorithm: ALG_AES256GCM_HKDF_EXPAND,
        region,
        key_id,
        key_version,
        salt: &salt,
        nonce: &nonce,
    };
    seal_fields(kek, &header, context, plaintext.expose_secret())
}

/// Seals with a caller-chosen salt and nonce. Only for known-answer tests:
/// production code calls [`seal`], which draws both at random.
#[doc(hidden)]
pub fn seal_with_header(
    kek: &Kek,
    header: &Header,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_fields(kek, &header.fields(), context, plaintext)
}

fn seal_fields(
    kek: &Kek,
    header: &Fields<'_>,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let ct_len = u32::try_from(plaintext.len() + TAG_LEN).map_err(|_| SealError::TooLarge)?;
    // The header is written once, straight into the output.
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + plaintext.len() + TAG_LEN);
    header.encode_into(ct_len, &mut out);
    let hl = out.len();
    out.resize(hl + plaintext.len() + TAG_LEN, 0);
    let (header_bytes, body) = out.split_at_mut(hl);
    let aad = aad(header_bytes, context);
    let key = message_key(kek, header.algorithm, header.salt, header_bytes)
        .map_err(|_| SealError::Derive)?;
    // Out of place: the plaintext is read once, never copied (measured
    // faster here than copying it in and sealing in place).
    let (ciphertext, tag) = body.split_at_mut(plaintext.len());
    key.seal_out_of_place_scatter(
        aead::Nonce::assume_unique_for_key(*header.nonce),
        aead::Aad::from(&aad),
        plaintext,
        ciphertext,
        &[],
        tag,
    )
    .map_err(|_| SealError::TooLarge)?;
    Ok(out)
}

/// Opens a parsed envelope with `kek` and the caller's `context`,
/// decrypting out of place from the envelope's bytes (read once, not copied).
pub fn open(
    kek: &Kek,
    env: &Envelope<'_>,
    context: &EncryptionContext,
) -> Result<Plaintext, OpenError> {
    let key = message_key(
        kek,
        env.header.algorithm,
        &env.header.salt,
        env.header_bytes(),
    )?;
    let aad = aad(env.header_bytes(), context);
    // The parser guarantees at least a tag's worth of bytes.
    let body = &env.bytes[env.header_len..];
    let (ciphertext, tag) = body.split_at(body.len().saturating_sub(TAG_LEN));
    let mut out = vec![0u8; ciphertext.len()];
    match key.open_separate_gather(
        aead::Nonce::assume_unique_for_key(env.header.nonce),
        aead::Aad::from(&aad),
        ciphertext,
        tag,
        &mut out,
    ) {
        Ok(()) => Ok(Plaintext::new(out)),
        Err(_) => {
            // Whatever was written before the tag check failed goes too.
            crate::secret::wipe(&mut out);
            Err(OpenError)
        }
    }
}

/// Derives the message key of an envelope and nothing else (benchmarks:
/// the fixed per-message cost of the construction).
#[doc(hidden)]
pub fn derive_only(kek: &Kek, env: &Envelope<'_>) -> Result<(), OpenError> {
    message_key(
        kek,
        env.header.algorithm,
        &env.header.salt,
        env.header_bytes(),
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests;
