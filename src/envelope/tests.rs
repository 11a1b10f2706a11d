use super::*;
use proptest::prelude::*;

fn kek() -> Kek {
    Kek::new(KeyMaterial::from_slice(&[0x42; 32]).unwrap()).unwrap()
}

fn region() -> Region {
    Region::parse("eu-central").unwrap()
}

fn kid() -> KeyId {
    KeyId::parse("k-test").unwrap()
}

fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
    EncryptionContext::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
}

fn sealed(pt: &[u8], c: &EncryptionContext) -> Vec<u8> {
    let rng = ring::rand::SystemRandom::new();
    seal(
        &rng,
        &kek(),
        &region(),
        &kid(),
        3,
        c,
        &Plaintext::new(pt.to_vec()),
    )
    .unwrap()
}

#[test]
fn round_trip_and_layout() {
    let c = ctx(&[("a", "1")]);
    let ct = sealed(b"hello", &c);
    assert_eq!(&ct[..4], b"SKMS");
    assert_eq!(ct[4], FORMAT_V1);
    assert_eq!(ct[5], ALG_AES256GCM_HKDF_EXPAND);
    let header_len = 4 + 1 + 1 + 1 + 10 + 1 + 6 + 4 + 32 + 12 + 4;
    assert_eq!(ct.len(), header_len + 5 + TAG_LEN);
    let env = Envelope::parse(&ct).unwrap();
    assert_eq!(env.header.key_version, 3);
    assert_eq!(env.header.region, region());
    assert_eq!(env.to_bytes(), ct);
    assert_eq!(open(&kek(), &env, &c).unwrap().expose_secret(), b"hello");
}

#[test]
fn salts_and_nonces_differ_per_message() {
    let c = ctx(&[]);
    let (ca, cb) = (sealed(b"x", &c), sealed(b"x", &c));
    let a = Envelope::parse(&ca).unwrap();
    let b = Envelope::parse(&cb).unwrap();
    assert_ne!(a.header.salt, b.header.salt);
    assert_ne!(a.header.nonce, b.header.nonce);
}

#[test]
fn context_and_header_are_authenticated() {
    let c = ctx(&[("a", "1"), ("b", "2")]);
    let ct = sealed(b"payload", &c);
    let env = Envelope::parse(&ct).unwrap();
    assert!(open(&kek(), &env, &ctx(&[("a", "1")])).is_err());
    assert!(open(&kek(), &env, &ctx(&[("a", "1"), ("b", "3")])).is_err());
    let wrong = Kek::new(KeyMaterial::from_slice(&[0x43; 32]).unwrap()).unwrap();
    assert!(open(&wrong, &env, &c).is_err());
    // Every byte flip either fails to parse or fails to open.
    for i in 0..ct.len() {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        if let Ok(env) = Envelope::parse(&bad) {
            assert!(open(&kek(), &env, &c).is_err(), "flip at {i} opened");
        }
    }
}

#[test]
fn both_algorithms_open_and_neither_opens_as_the_other() {
    let c = ctx(&[("a", "1")]);
    let header = Header {
        algorithm: ALG_AES256GCM_HKDF_SHA256,
        region: region(),
        key_id: kid(),
        key_version: 2,
        salt: [5; SALT_LEN],
        nonce: [6; NONCE_LEN],
    };
    let v1 = seal_with_header(&kek(), &header, &c, b"legacy").unwrap();
    let v2 = seal_with_header(
        &kek(),
        &Header {
            algorithm: ALG_AES256GCM_HKDF_EXPAND,
            ..header.clone()
        },
        &c,
        b"legacy",
    )
    .unwrap();
    assert_eq!(v1[5], 1);
    assert_eq!(v2[5], 2);
    for ct in [&v1, &v2] {
        let env = Envelope::parse(ct).unwrap();
        assert_eq!(open(&kek(), &env, &c).unwrap().expose_secret(), b"legacy");
    }
    // Same salt, nonce and key, different derivation: relabelling the
    // algorithm byte never opens.
    let (mut a, mut b) = (v1.clone(), v2.clone());
    a[5] = 2;
    b[5] = 1;
    for ct in [&a, &b] {
        let env = Envelope::parse(ct).unwrap();
        assert_eq!(open(&kek(), &env, &c).err(), Some(OpenError));
    }
}

#[test]
fn an_unknown_algorithm_seals_nothing() {
    let header = Header {
        algorithm: 3,
        region: region(),
        key_id: kid(),
        key_version: 1,
        salt: [0; SALT_LEN],
        nonce: [0; NONCE_LEN],
    };
    assert_eq!(
        seal_with_header(&kek(), &header, &ctx(&[]), b"x"),
        Err(SealError::Derive)
    );
}

#[test]
fn kek_debug_is_redacted() {
    assert_eq!(format!("{:?}", kek()), "Kek([redacted])");
}

#[test]
fn context_encoding_is_canonical() {
    let a = ctx(&[("b", "2"), ("a", "1")]);
    let b = ctx(&[("a", "1"), ("b", "2")]);
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    a.encode_into(&mut ea);
    b.encode_into(&mut eb);
    assert_eq!(ea, eb);
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    let (mut x, mut y) = (Vec::new(), Vec::new());
    ctx(&[("ab", "c")]).encode_into(&mut x);
    ctx(&[("a", "bc")]).encode_into(&mut y);
    assert_ne!(x, y);
}

#[test]
fn strict_parser_errors() {
    let ct = sealed(b"abc", &ctx(&[]));
    let mut v = ct.clone();
    v[4] = 9;
    assert_eq!(Envelope::parse(&v), Err(FormatError::UnknownVersion(9)));
    let mut a = ct.clone();
    a[5] = 0;
    assert_eq!(Envelope::parse(&a), Err(FormatError::UnknownAlgorithm(0)));
    let mut t = ct.clone();
    t.push(0);
    assert_eq!(Envelope::parse(&t), Err(FormatError::TrailingBytes(1)));
    assert_eq!(Envelope::parse(b"XKMS"), Err(FormatError::BadMagic));
    assert!(matches!(
        Envelope::parse(&ct[..ct.len() - 1]),
        Err(FormatError::Truncated(_))
    ));
    let mut zero_region = ct.clone();
    zero_region[6] = 0;
    assert!(Envelope::parse(&zero_region).is_err());
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Envelope::parse(&bytes);
    }

    #[test]
    fn mutated_envelopes_never_panic(pos in 0usize..200, val in any::<u8>(), cut in 0usize..200) {
        let mut ct = sealed(b"proptest payload", &ctx(&[("k", "v")]));
        let n = ct.len();
        ct[pos % n] = val;
        ct.truncate(n - (cut % n));
        if let Ok(env) = Envelope::parse(&ct) {
            let _ = open(&kek(), &env, &ctx(&[("k", "v")]));
        }
    }

    #[test]
    fn parse_serialize_round_trip(
        region in "[a-z][a-z0-9-]{0,30}[a-z0-9]",
        key in "[A-Za-z0-9_-]{1,64}",
        version in 1u32..,
        salt in any::<[u8; 32]>(),
        nonce in any::<[u8; 12]>(),
        pt in proptest::collection::vec(any::<u8>(), 0..300),
        legacy in any::<bool>(),
    ) {
        let algorithm = if legacy { ALG_AES256GCM_HKDF_SHA256 } else { ALG_AES256GCM_HKDF_EXPAND };
        let header = Header {
            algorithm,
            region: Region::parse(&region).unwrap(),
            key_id: KeyId::parse(&key).unwrap(),
            key_version: version,
            salt,
            nonce,
        };
        let c = ctx(&[("p", "q")]);
        let ct = seal_with_header(&kek(), &header, &c, &pt).unwrap();
        let env = Envelope::parse(&ct).unwrap();
        prop_assert_eq!(&env.header, &header);
        prop_assert_eq!(env.to_bytes(), ct.clone());
        let opened = open(&kek(), &env, &c).unwrap();
        prop_assert_eq!(opened.expose_secret(), &pt[..]);
    }
}
