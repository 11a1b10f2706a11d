//! The PKCS#11 root of trust on real SoftHSM2 tokens: conformance, the root
//! key's attributes (through PKCS#11 and pkcs11-tool), wrong PIN, missing
//! mechanism, provisioning idempotence.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::root::pkcs11::{admin, Pkcs11Root};
use sovkms::root::PinSource;
use sovkms::root::{RootErrorKind, RootOfTrust};
use std::process::Command;

#[test]
fn conformance_suite_on_softhsm2() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "eu-central");
    let root = Pkcs11Root::open(pkcs11_settings(&token)).unwrap();
    sovkms::root::conformance::run(&root);
    let info = root.info();
    assert_eq!(info.kind, "pkcs11");
    assert!(!info.development_only);
    assert!(
        info.root_key_id.starts_with("p11:00000001"),
        "{}",
        info.root_key_id
    );
    // The signing public key verifies what the HSM signed (also in the suite);
    // here: it is the key `hsm init` reported.
    let again = admin::provision(&pkcs11_settings(&token)).unwrap();
    assert!(!again.created, "init must be idempotent");
    assert_eq!(
        hex::decode(&again.signing_public_key_hex).unwrap(),
        root.signing_public_key().unwrap()
    );
    assert!(again
        .signing_public_key_pem
        .starts_with("-----BEGIN PUBLIC KEY-----"));
}

#[test]
fn root_key_attributes_through_pkcs11() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "eu-central");
    let st = admin::status(&pkcs11_settings(&token)).unwrap();
    let root = st
        .objects
        .iter()
        .find(|o| o.role.starts_with("root key (current)"))
        .unwrap();
    let flag =
        |o: &admin::ObjectReport, n: &str| o.flags.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    for (name, want) in [
        ("CKA_TOKEN", true),
        ("CKA_PRIVATE", true),
        ("CKA_SENSITIVE", true),
        ("CKA_ALWAYS_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_NEVER_EXTRACTABLE", true),
        ("CKA_LOCAL", true),
        ("CKA_MODIFIABLE", false),
        ("CKA_WRAP", true),
        ("CKA_UNWRAP", true),
        ("CKA_ENCRYPT", false),
        ("CKA_DECRYPT", false),
        ("CKA_SIGN", false),
        ("CKA_VERIFY", false),
        ("CKA_DERIVE", false),
    ] {
        assert_eq!(flag(root, name), Some(want), "root key {name}");
    }
    assert_eq!(root.check_value.len(), 6, "3-byte check value");
    let signing = st
        .objects
        .iter()
        .find(|o| o.role == "signing private key")
        .unwrap();
    for (name, want) in [
        ("CKA_SENSITIVE", true),
        ("CKA_EXTRACTABLE", false),
        ("CKA_NEVER_EXTRACTABLE", true),
        ("CKA_SIGN", true),
        ("CKA_DECRYPT", false),
    ] {
        assert_eq!(flag(signing, name), Some(want), "signing key {name}");
    }
}

#[test]
fn pkcs11_tool_sees_the_key_but_cannot_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "eu-central");
    let pin = std::fs::read_to_string(&token.pin_file).unwrap();
    let module = softhsm_module();
    let tool = |args: &[&str]| {
        Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&module)
            .args(["--token-label", &token.label, "--login", "--pin", &pin])
            .args(args)
            .output()
            .expect("pkcs11-tool (package opensc) must be installed")
    };
    let o = tool(&["--list-objects", "--type", "secrkey"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("sovkms-root"), "{out}");
    assert!(out.contains("AES"), "{out}");
    let usage = out
        .lines()
        .find(|l| l.trim_start().starts_with("Usage:"))
        .unwrap_or("");
    assert!(usage.contains("wrap") && usage.contains("unwrap"), "{out}");
    assert!(
        !usage.contains("encrypt") && !usage.contains("sign"),
        "usage must be wrap/unwrap only: {usage}"
    );
    assert!(
        out.contains("sensitive") || out.contains("never extractable"),
        "{out}"
    );
    let o = tool(&[
        "--read-object",
        "--type",
        "secrkey",
        "--label",
        "sovkms-root",
    ]);
    assert!(
        !o.status.success(),
        "pkcs11-tool read the root key's value: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("CKR_ATTRIBUTE_SENSITIVE"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn wrong_pin_gives_a_clear_error_without_the_pin() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "eu-central");
    let bad = dir.path().join("bad.pin");
    std::fs::write(&bad, "wrong-pin-4711").unwrap();
    let mut s = pkcs11_settings(&token);
    s.pin = PinSource::File(bad);
    let e = Pkcs11Root::open(s).err().expect("login must fail");
    assert_eq!(e.kind, RootErrorKind::Auth);
    assert!(e.message.contains("CKR_PIN_INCORRECT"), "{}", e.message);
    assert!(e.message.contains(&token.label), "{}", e.message);
    assert!(!e.message.contains("4711"), "PIN leaked into the error");
    let mut s = pkcs11_settings(&token);
    s.pin = PinSource::Env("SOVKMS_TEST_PIN_THAT_IS_NOT_SET".into());
    let e = Pkcs11Root::open(s).err().unwrap();
    assert!(
        e.message.contains("SOVKMS_TEST_PIN_THAT_IS_NOT_SET"),
        "{}",
        e.message
    );
}

#[test]
fn unprovisioned_or_missing_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let token = new_unprovisioned_token(dir.path(), "eu-central");
    let e = Pkcs11Root::open(pkcs11_settings(&token)).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Config);
    assert!(e.message.contains("sovkms hsm init"), "{}", e.message);
    let mut s = pkcs11_settings(&token);
    s.token_label = "no-such-token".into();
    let e = Pkcs11Root::open(s).err().unwrap();
    assert!(
        e.message.contains("no token labelled 'no-such-token'"),
        "{}",
        e.message
    );
}

#[test]
fn profile_asking_for_a_mechanism_the_token_lacks_is_refused() {
    // SoftHSM2 offers every mechanism our shipped profiles name, so the
    // token's real mechanism list is checked against a profile that also
    // requires one it lacks (the check is the same code path at start).
    let dir = tempfile::tempdir().unwrap();
    let token = new_token(dir.path(), "eu-central");
    let mut s = pkcs11_settings(&token);
    s.profile.extra_required = vec!["CKM_SHA3_256".into()];
    let e = Pkcs11Root::open(s).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Config);
    assert!(
        e.message.contains("CKM_SHA3_256") && e.message.contains(&token.label),
        "{}",
        e.message
    );
}
