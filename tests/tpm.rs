//! TPM 2.0 binding against real swtpm instances (one per test).

mod common;

use common::*;
use sovkms::root::tpm::{self, Purpose, TpmRoot};
use sovkms::root::{RootErrorKind, RootOfTrust};

#[test]
fn tpm_root_passes_conformance_and_leaks_no_handles() {
    let sw = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("root.sealed");
    let s = sw.settings(&[7]);
    let r = tpm::seal_root(&s, &blob).unwrap();
    assert!(r.root_key_id.as_deref().unwrap().starts_with("tpm:"));
    let root = TpmRoot::open(&s, &blob).unwrap();
    sovkms::root::conformance::run(&root);
    assert_eq!(root.info().kind, "tpm");
    assert_eq!(sw.transients(), 0, "a transient object was left loaded");
    // Same blob, new process state: what was wrapped unwraps.
    let m = root.generate_material().unwrap();
    let w = root.wrap(&m).unwrap();
    drop(root);
    let again = TpmRoot::open(&s, &blob).unwrap();
    assert_eq!(again.unwrap(&w).unwrap().expose_secret(), m.expose_secret());
    // Never overwrites.
    let e = tpm::seal_root(&s, &blob).unwrap_err();
    assert!(e.message.contains("never overwrites"), "{e}");
    assert_eq!(sw.transients(), 0);
}

#[test]
fn pcr_change_refuses_unseal_naming_the_policy() {
    let sw = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("root.sealed");
    let s = sw.settings(&[7]);
    tpm::seal_root(&s, &blob).unwrap();
    sw.extend(7, b"new bootloader");
    let e = TpmRoot::open(&s, &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Auth);
    assert!(e.message.contains("sha256:7"), "{e}");
    assert!(e.message.contains("refused to unseal"), "{e}");
    assert_eq!(sw.transients(), 0, "error paths must flush too");
    let _ = Purpose::Root;
}
