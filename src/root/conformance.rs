//! The conformance suite every root of trust must pass. Run by each
//! implementation's tests: the software root in its unit tests, SoftHSM2 in
//! `tests/pkcs11.rs`. Public (hidden) so integration tests can run it.

use super::{RootErrorKind, RootOfTrust};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

/// Runs the suite; panics (test failure) on the first violation.
// Test support, never called by the broker: panicking on a violation is its
// whole purpose, hence the unwraps.
#[allow(clippy::unwrap_used, clippy::panic)]
pub fn run(root: &dyn RootOfTrust) {
    root.health().unwrap();
    let info = root.info();
    assert!(!info.root_key_id.is_empty());

    // Material is random and round-trips through wrap/unwrap.
    let a = root.generate_material().unwrap();
    let b = root.generate_material().unwrap();
    assert_ne!(a.expose_secret(), b.expose_secret());
    let wa = root.wrap(&a).unwrap();
    assert_eq!(wa.root_key_id, info.root_key_id);
    assert!(
        !wa.blob.windows(32).any(|w| w == a.expose_secret()),
        "wrapped blob holds the material in the clear"
    );
    assert_eq!(root.unwrap(&wa).unwrap().expose_secret(), a.expose_secret());

    // Altered blobs are refused, never silently unwrapped to other bytes.
    for i in [0, wa.blob.len() / 2, wa.blob.len() - 1] {
        let mut bad = wa.clone();
        bad.blob[i] ^= 1;
        let e = root.unwrap(&bad).unwrap_err();
        assert_eq!(e.kind, RootErrorKind::Integrity, "flip at {i}: {e}");
    }
    let mut short = wa.clone();
    short.blob.truncate(5);
    assert!(root.unwrap(&short).is_err());
    let mut foreign = wa.clone();
    foreign.root_key_id = "no-such-root".into();
    assert_eq!(
        root.unwrap(&foreign).unwrap_err().kind,
        RootErrorKind::UnknownRootKey
    );

    // Signatures verify with the exported public key, and only for the message.
    let pk = root.signing_public_key().unwrap();
    let sig = root.sign(b"checkpoint").unwrap();
    assert_eq!(sig.len(), 64, "signatures are r || s, 32 bytes each");
    assert_eq!(pk.len(), 65, "public key is an uncompressed SEC1 point");
    let v = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &pk);
    v.verify(b"checkpoint", &sig).unwrap();
    assert!(v.verify(b"checkpoinT", &sig).is_err());
}
