//! AES-GCM and AES-CBC with a managed object's key and the caller's
//! parameters (KMIP Encrypt/Decrypt). The envelope format does not apply:
//! the client chose the IV and mode, and keeps the result itself.

use super::objects::Cipher;
use crate::error::CipherError;
use crate::secret::Plaintext;
use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{
    self as blk, DecryptionContext, EncryptionContext, PaddedBlockDecryptingKey,
    PaddedBlockEncryptingKey, UnboundCipherKey,
};
use aws_lc_rs::iv::FixedLength;
use ring::rand::SecureRandom;

const GCM_IV: usize = 12;
const GCM_TAG: usize = 16;
const BLOCK: usize = 16;

fn gcm_key(key: &Plaintext) -> Result<LessSafeKey, CipherError> {
    let alg = match key.len() {
        16 => &aead::AES_128_GCM,
        24 => &aead::AES_192_GCM,
        _ => &aead::AES_256_GCM,
    };
    UnboundKey::new(alg, key.expose_secret())
        .map(LessSafeKey::new)
        .map_err(|_| CipherError::Failed)
}

fn block_key(key: &Plaintext) -> Result<UnboundCipherKey, CipherError> {
    let alg = match key.len() {
        16 => &blk::AES_128,
        24 => &blk::AES_192,
        _ => &blk::AES_256,
    };
    UnboundCipherKey::new(alg, key.expose_secret()).map_err(|_| CipherError::Failed)
}

fn iv_or_random(
    iv: &Option<Vec<u8>>,
    mode: &'static str,
    want: usize,
) -> Result<Vec<u8>, CipherError> {
    match iv {
        Some(iv) if iv.len() == want => Ok(iv.clone()),
        Some(iv) => Err(CipherError::IvLength {
            mode,
            want,
            got: iv.len(),
        }),
        None => {
            let mut v = vec![0u8; want];
            ring::rand::SystemRandom::new()
                .fill(&mut v)
                .map_err(|_| CipherError::Failed)?;
            Ok(v)
        }
    }
}

fn given_iv<const N: usize>(
    iv: &Option<Vec<u8>>,
    mode: &'static str,
) -> Result<[u8; N], CipherError> {
    let iv = iv.as_ref().ok_or(CipherError::MissingIv(mode))?;
    iv.as_slice().try_into().map_err(|_| CipherError::IvLength {
        mode,
        want: N,
        got: iv.len(),
    })
}

/// Ciphertext, the IV used, and the GCM tag (empty for CBC).
pub(super) struct Sealed(pub Vec<u8>, pub Vec<u8>, pub Vec<u8>);

/// Encrypts.
pub(super) fn encrypt(
    key: &Plaintext,
    cipher: &Cipher,
    data: &[u8],
) -> Result<Sealed, CipherError> {
    match cipher {
        Cipher::Gcm { iv, aad, tag_len } => {
            if *tag_len != GCM_TAG {
                return Err(CipherError::TagLength(*tag_len));
            }
            let iv = iv_or_random(iv, "AES-GCM", GCM_IV)?;
            let nonce = Nonce::try_assume_unique_for_key(&iv).map_err(|_| CipherError::Failed)?;
            let mut out = data.to_vec();
            let tag = gcm_key(key)?
                .seal_in_place_separate_tag(nonce, Aad::from(aad.as_slice()), &mut out)
                .map_err(|_| CipherError::Failed)?;
            Ok(Sealed(out, iv, tag.as_ref().to_vec()))
        }
        Cipher::Cbc { iv, pkcs5 } => {
            let iv = iv_or_random(iv, "AES-CBC", BLOCK)?;
            let iv_arr: [u8; BLOCK] = iv.as_slice().try_into().map_err(|_| CipherError::Failed)?;
            let ctx = EncryptionContext::Iv128(FixedLength::from(iv_arr));
            let mut out = data.to_vec();
            if *pkcs5 {
                PaddedBlockEncryptingKey::cbc_pkcs7(block_key(key)?)
                    .and_then(|k| k.less_safe_encrypt(&mut out, ctx))
                    .map_err(|_| CipherError::Failed)?;
            } else {
                if data.len() % BLOCK != 0 {
                    return Err(CipherError::PartialBlock(data.len()));
                }
                blk::EncryptingKey::cbc(block_key(key)?)
                    .and_then(|k| k.less_safe_encrypt(&mut out, ctx))
                    .map_err(|_| CipherError::Failed)?;
            }
            Ok(Sealed(out, iv, Vec::new()))
        }
    }
}

/// Decrypts; the plaintext comes back only if it authenticates (GCM) or
/// its padding is correct (CBC with PKCS#5).
pub(super) fn decrypt(
    key: &Plaintext,
    cipher: &Cipher,
    data: &[u8],
    tag: &[u8],
) -> Result<Plaintext, CipherError> {
    match cipher {
        Cipher::Gcm { iv, aad, tag_len } => {
            if *tag_len != GCM_TAG {
                return Err(CipherError::TagLength(*tag_len));
            }
            if tag.len() != GCM_TAG {
                return Err(CipherError::MissingTag(tag.len()));
            }
            let iv: [u8; GCM_IV] = given_iv(iv, "AES-GCM")?;
            let mut buf = Vec::with_capacity(data.len() + GCM_TAG);
            buf.extend_from_slice(data);
            buf.extend_from_slice(tag);
            let n = gcm_key(key)?
                .open_in_place(
                    Nonce::assume_unique_for_key(iv),
                    Aad::from(aad.as_slice()),
                    &mut buf,
                )
                .map_err(|_| CipherError::Failed)?
                .len();
            buf.truncate(n);
            Ok(Plaintext::new(buf))
        }
        Cipher::Cbc { iv, pkcs5 } => {
            let iv: [u8; BLOCK] = given_iv(iv, "AES-CBC")?;
            let ctx = DecryptionContext::Iv128(FixedLength::from(iv));
            if data.len() % BLOCK != 0 {
                return Err(CipherError::PartialBlock(data.len()));
            }
            let mut buf = data.to_vec();
            let n = if *pkcs5 {
                PaddedBlockDecryptingKey::cbc_pkcs7(block_key(key)?)
                    .and_then(|k| k.decrypt(&mut buf, ctx).map(|p| p.len()))
                    .map_err(|_| CipherError::Failed)?
            } else {
                blk::DecryptingKey::cbc(block_key(key)?)
                    .and_then(|k| k.decrypt(&mut buf, ctx).map(|p| p.len()))
                    .map_err(|_| CipherError::Failed)?
            };
            buf.truncate(n);
            Ok(Plaintext::new(buf))
        }
    }
}

/// AES key wrap of `data` under `kek` (RFC 3394, or RFC 5649 with padding).
pub(super) fn key_wrap(kek: &Plaintext, data: &[u8], padded: bool) -> Result<Vec<u8>, CipherError> {
    use aes::cipher::generic_array::GenericArray;
    if !padded && (data.len() < 16 || data.len() % 8 != 0) {
        return Err(CipherError::WrapLength(data.len()));
    }
    let len = if padded {
        data.len().div_ceil(8).max(1) * 8 + 8
    } else {
        data.len() + 8
    };
    let mut out = vec![0u8; len];
    let k = kek.expose_secret();
    macro_rules! wrap {
        ($kek:ty) => {{
            let w = <$kek>::new(GenericArray::from_slice(k));
            if padded {
                w.wrap_with_padding(data, &mut out)
            } else {
                w.wrap(data, &mut out)
            }
        }};
    }
    let r = match k.len() {
        16 => wrap!(aes_kw::KekAes128),
        24 => wrap!(aes_kw::KekAes192),
        32 => wrap!(aes_kw::KekAes256),
        _ => return Err(CipherError::Failed),
    };
    r.map_err(|_| CipherError::Failed)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NIST SP 800-38A F.2.1 (CBC-AES128.Encrypt), first block.
    #[test]
    fn cbc_known_answer() {
        let key = Plaintext::new(hex::decode("2b7e151628aed2a6abf7158809cf4f3c").unwrap());
        let iv = hex::decode("000102030405060708090a0b0c0d0e0f").unwrap();
        let pt = hex::decode("6bc1bee22e409f96e93d7e117393172a").unwrap();
        let c = Cipher::Cbc {
            iv: Some(iv),
            pkcs5: false,
        };
        let Sealed(ct, _, _) = encrypt(&key, &c, &pt).unwrap();
        assert_eq!(hex::encode(&ct), "7649abac8119b246cee98e9b12e9197d");
        assert_eq!(decrypt(&key, &c, &ct, &[]).unwrap().expose_secret(), pt);
        let padded = Cipher::Cbc {
            iv: Some(vec![0; 16]),
            pkcs5: true,
        };
        let Sealed(ct, _, _) = encrypt(&key, &padded, b"abc").unwrap();
        assert_eq!(ct.len(), 16);
        assert_eq!(
            decrypt(&key, &padded, &ct, &[]).unwrap().expose_secret(),
            b"abc"
        );
        assert_eq!(
            encrypt(&key, &c, b"abc").err(),
            Some(CipherError::PartialBlock(3))
        );
    }

    /// RFC 3394 §4.6 (256-bit data, 256-bit KEK) and RFC 5649 §6 (20 bytes, 192-bit KEK).
    #[test]
    fn key_wrap_known_answers() {
        let kek = Plaintext::new(
            hex::decode("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
                .unwrap(),
        );
        let data = hex::decode("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
            .unwrap();
        assert_eq!(
            hex::encode_upper(key_wrap(&kek, &data, false).unwrap()),
            "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
        );
        let kek = Plaintext::new(
            hex::decode("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8").unwrap(),
        );
        let data = hex::decode("c37b7e6492584340bed12207808941155068f738").unwrap();
        assert_eq!(
            hex::encode(key_wrap(&kek, &data, true).unwrap()),
            "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"
        );
        assert_eq!(
            key_wrap(&kek, &data, false).err(),
            Some(CipherError::WrapLength(20))
        );
    }

    /// The GCM test case 3 of the original GCM paper (AES-128).
    #[test]
    fn gcm_known_answer_and_tamper() {
        let key = Plaintext::new(hex::decode("feffe9928665731c6d6a8f9467308308").unwrap());
        let iv = hex::decode("cafebabefacedbaddecaf888").unwrap();
        let pt = hex::decode("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255").unwrap();
        let c = Cipher::Gcm {
            iv: Some(iv),
            aad: Vec::new(),
            tag_len: 16,
        };
        let Sealed(ct, _, tag) = encrypt(&key, &c, &pt).unwrap();
        assert_eq!(hex::encode(&tag), "4d5c2af327cd64a62cf35abd2ba6fab4");
        assert!(hex::encode(&ct).starts_with("42831ec2217774244b7221b784d0d49c"));
        assert_eq!(decrypt(&key, &c, &ct, &tag).unwrap().expose_secret(), pt);
        let mut bad = tag.clone();
        bad[0] ^= 1;
        assert_eq!(
            decrypt(&key, &c, &ct, &bad).unwrap_err(),
            CipherError::Failed
        );
        let no_iv = Cipher::Gcm {
            iv: None,
            aad: Vec::new(),
            tag_len: 16,
        };
        assert_eq!(
            decrypt(&key, &no_iv, &ct, &tag).unwrap_err(),
            CipherError::MissingIv("AES-GCM")
        );
    }
}
