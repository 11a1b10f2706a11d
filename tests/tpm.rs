//! TPM 2.0 binding against real swtpm instances: each test starts its own
//! swtpm (its own seeds and PCRs), so tests run in parallel without sharing
//! a TPM, and stops it by PID when it ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use sovkms::root::tpm::{self, Tpm, TpmRoot};
use sovkms::root::{RootErrorKind, RootOfTrust};
use std::path::{Path, PathBuf};
use tonic::Code;

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut c = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        c.update(p);
    }
    c.finish().as_ref().to_vec()
}

/// A broker config whose root is sealed to `sw`'s PCR 7.
fn tpm_config(env: &Env, sw: &Swtpm, r: &str) -> PathBuf {
    let path = env.config_with_root(r, "", "kind = \"tpm\"\n");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&sw.toml("[7]"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A root sealed to `sw`'s current PCR 7, in a fresh directory.
fn sealed_root(
    sw: &Swtpm,
) -> (
    tempfile::TempDir,
    PathBuf,
    tpm::TpmSettings,
    tpm::SealReport,
) {
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("root.sealed");
    let s = sw.settings(&[7]);
    let r = tpm::seal_root(&s, &blob).unwrap();
    (dir, blob, s, r)
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "sovkms failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(out: &std::process::Output) -> String {
    assert!(
        !out.status.success(),
        "sovkms should have failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sovkms(args: &[&str]) -> std::process::Output {
    run_sovkms(args, &[])
}

#[test]
fn tpm_root_passes_conformance_and_leaks_no_handles() {
    let sw = Swtpm::start();
    let (dir, blob, s, r) = sealed_root(&sw);
    assert!(r.root_key_id.as_deref().unwrap().starts_with("tpm:"));
    let root = TpmRoot::open(&s, &blob).unwrap();
    sovkms::root::conformance::run(&root);
    assert_eq!(root.info().kind, "tpm");
    assert_eq!(root.info().root_key_id, r.root_key_id.unwrap());
    assert_eq!(sw.transients(), 0, "a transient object was left loaded");
    // The blob holds neither the secret nor the signing key in the clear.
    let text = std::fs::read_to_string(&blob).unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    // Reopened (a new unseal): what was wrapped before unwraps.
    let m = root.generate_material().unwrap();
    let w = root.wrap(&m).unwrap();
    let pk = root.signing_public_key().unwrap();
    drop(root);
    let again = TpmRoot::open(&s, &blob).unwrap();
    assert_eq!(again.unwrap(&w).unwrap().expose_secret(), m.expose_secret());
    assert_eq!(again.signing_public_key().unwrap(), pk);
    // Never overwrites.
    let e = tpm::seal_root(&s, &blob).err().unwrap();
    assert!(e.message.contains("never overwrites"), "{e}");
    assert_eq!(sw.transients(), 0);
    // The leak check itself sees a leak: tpm2-tools leaves its primary
    // loaded on a TPM without a resource manager.
    let st = std::process::Command::new("tpm2_createprimary")
        .args(["-C", "o", "-Q", "-c"])
        .arg(dir.path().join("p.ctx"))
        .env("TPM2TOOLS_TCTI", sw.tcti())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(sw.transients() >= 1);
}

#[test]
fn pcr_change_refuses_unseal_naming_the_policy() {
    let sw = Swtpm::start();
    let (_dir, blob, s, _) = sealed_root(&sw);
    let before = hex::encode(
        Tpm::connect(&sw.tcti())
            .unwrap()
            .pcr_values(&s.policy)
            .unwrap()[0]
            .clone(),
    );
    sw.extend(7, b"another bootloader");
    let e = TpmRoot::open(&s, &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Auth);
    assert!(e.message.contains("refused to unseal"), "{e}");
    assert!(e.message.contains("sha256:7"), "{e}");
    assert!(e.message.contains(&before), "names the sealed value: {e}");
    assert_eq!(sw.transients(), 0, "error paths flush too");
}

#[test]
fn blob_from_one_tpm_fails_on_another() {
    let a = Swtpm::start();
    let b = Swtpm::start();
    let (dir, blob, _, _) = sealed_root(&a);
    let e = TpmRoot::open(&b.settings(&[7]), &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Integrity, "{e}");
    assert!(e.message.contains("another TPM"), "{e}");
    assert_eq!(b.transients(), 0);
    // An edited blob is refused, never unsealed to something else.
    let mut f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&blob).unwrap()).unwrap();
    let p = f["tpm_private"].as_str().unwrap().to_string();
    let flipped = format!(
        "{}{}",
        &p[..p.len() - 2],
        if p.ends_with('0') { "1" } else { "0" }
    );
    f["tpm_private"] = serde_json::Value::String(format!("{}{}", flipped, ""));
    let edited = dir.path().join("edited.sealed");
    std::fs::write(&edited, f.to_string()).unwrap();
    let e = TpmRoot::open(&a.settings(&[7]), &edited).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Integrity, "{e}");
    assert_eq!(a.transients(), 0);
}

#[test]
fn unreachable_tpm_and_auth_value() {
    let sw = Swtpm::start();
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("root.sealed");
    let mut s = sw.settings(&[7, 16]);
    let auth = dir.path().join("tpm.auth");
    std::fs::write(&auth, "correct horse\n").unwrap();
    s.auth_file = Some(auth.clone());
    tpm::seal_root(&s, &blob).unwrap();
    TpmRoot::open(&s, &blob).unwrap();
    std::fs::write(&auth, "wrong horse\n").unwrap();
    let e = TpmRoot::open(&s, &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Auth, "{e}");
    s.auth_file = None;
    let e = TpmRoot::open(&s, &blob).err().unwrap();
    assert!(e.message.contains("auth_file"), "{e}");
    // Nobody listening: UNAVAILABLE-kind, naming the TCTI.
    let mut gone = sw.settings(&[7]);
    gone.tcti = "swtpm:host=127.0.0.1,port=1".into();
    let e = TpmRoot::open(&gone, &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Unavailable, "{e}");
    assert!(e.message.contains("port=1"), "{e}");
    gone.tcti = "carrier-pigeon".into();
    let e = TpmRoot::open(&gone, &blob).err().unwrap();
    assert_eq!(e.kind, RootErrorKind::Config, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_in_one_process_serving_in_another_and_refused_after_pcr_change() {
    let env = Env::new();
    let sw = Swtpm::start();
    let cfg = tpm_config(&env, &sw, "eu-central");
    let c = cfg.to_str().unwrap();
    let out = ok(&sovkms(&["tpm", "seal-root", "--config", c]));
    assert!(out.contains("root key         tpm:"), "{out}");
    fails(&sovkms(&["tpm", "seal-root", "--config", c]));
    let info = ok(&sovkms(&["tpm", "info", "--config", c, "--json"]));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert!(info["pcr_banks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b == "sha256"));

    let mut p = spawn_broker(&cfg, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let gi = op
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gi.root_kind, "tpm");
    assert!(!gi.development_only);
    let key = create_key_as(
        &mut op,
        "tpm-bound",
        vec![grant(&spiffe("eu-central", "service", "app"), &ALL_OPS)],
    )
    .await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let cx = ctx(&[("tenant", "t1")]);
    let ct = encrypt(&mut svc, &key, b"in-country record", &cx)
        .await
        .unwrap()
        .ciphertext;
    stop(&mut p);

    // A restart unseals again and decrypts what was written before.
    let mut p = spawn_broker(&cfg, &[]);
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    assert_eq!(
        decrypt(&mut svc, &ct, &cx).await.unwrap(),
        b"in-country record"
    );
    stop(&mut p);

    // The host's boot state changes: the broker refuses to start.
    sw.extend(7, b"unsigned kernel");
    let err = fails(&sovkms(&["tpm", "check", "--config", c]));
    assert!(
        err.contains("refused to unseal") && err.contains("sha256:7"),
        "{err}"
    );
    let err = fails(&sovkms(&["serve", "--config", c]));
    assert!(err.contains("refused to unseal"), "{err}");
    assert_eq!(sw.transients(), 0);
}

#[test]
fn reseal_ahead_of_a_planned_pcr_change() {
    let env = Env::new();
    let sw = Swtpm::start();
    let cfg = tpm_config(&env, &sw, "eu-central");
    let c = cfg.to_str().unwrap();
    ok(&sovkms(&["tpm", "seal-root", "--config", c]));
    let blob = env.dir.path().join("data/eu-central/tpm-root.sealed");
    assert!(blob.exists());
    let before = ok(&sovkms(&["tpm", "check", "--config", c, "--json"]));
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();

    // The operator knows the measurement the update will extend PCR 7 with.
    let measurement = sha256(&[b"firmware 2.0"]);
    let now = Tpm::connect(&sw.tcti())
        .unwrap()
        .pcr_values(&sw.settings(&[7]).policy)
        .unwrap();
    let predicted = hex::encode(sha256(&[&now[0], &measurement]));
    ok(&sovkms(&[
        "tpm",
        "reseal",
        "--config",
        c,
        "--expect-pcr",
        &format!("7={predicted}"),
    ]));
    let pending = tpm::pending_path(&blob);
    assert!(
        pending.exists() && blob.exists(),
        "old blob kept until confirmed"
    );
    // A second reseal does not clobber the pending one.
    fails(&sovkms(&[
        "tpm",
        "reseal",
        "--config",
        c,
        "--expect-pcr",
        &format!("7={predicted}"),
    ]));
    // Bad expectations are refused with a reason.
    let err = fails(&sovkms(&[
        "tpm",
        "reseal",
        "--config",
        c,
        "--expect-pcr",
        "9=00",
    ]));
    assert!(err.contains("not in the configured policy"), "{err}");
    // Before the change the old blob is used; confirming now fails (the new one does not unseal yet).
    let out = ok(&sovkms(&["tpm", "check", "--config", c]));
    assert!(!out.contains(".new"), "{out}");
    fails(&sovkms(&["tpm", "reseal", "--config", c, "--confirm"]));

    // The update happens.
    Tpm::connect(&sw.tcti())
        .unwrap()
        .extend_pcr("sha256", 7, &measurement)
        .unwrap();
    let out = ok(&sovkms(&["tpm", "check", "--config", c]));
    assert!(
        out.contains(".new"),
        "falls back to the pending blob: {out}"
    );
    ok(&sovkms(&["tpm", "reseal", "--config", c, "--confirm"]));
    assert!(!pending.exists());
    let after = ok(&sovkms(&["tpm", "check", "--config", c, "--json"]));
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(
        after["root_key_id"], before["root_key_id"],
        "same root, new binding"
    );
    assert_eq!(after["pcr_values"][0], predicted);
    assert_eq!(sw.transients(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_pin_sealed_to_the_tpm() {
    let env = Env::new();
    let sw = Swtpm::start();
    let token = new_token(env.dir.path(), "eu-central");
    let sealed = env.dir.path().join("hsm-pin.sealed");
    let root_toml = token.root_toml.replace(
        &format!("pin_file = \"{}\"", token.pin_file.display()),
        &format!("pin_tpm_sealed = \"{}\"", sealed.display()),
    );
    assert!(root_toml.contains("pin_tpm_sealed"));
    let cfg = env.config_with_root("eu-central", "", &root_toml);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&sw.toml("[7]"));
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let err = fails(&sovkms(&["serve", "--config", c]));
    assert!(
        err.contains("seal-pin"),
        "unprovisioned: says what to do: {err}"
    );
    ok(&sovkms(&[
        "tpm",
        "seal-pin",
        "--config",
        c,
        "--pin-file",
        token.pin_file.to_str().unwrap(),
    ]));
    // The PIN file is no longer needed by the broker.
    let pin = std::fs::read_to_string(&token.pin_file).unwrap();
    std::fs::remove_file(&token.pin_file).unwrap();
    assert!(
        !std::fs::read_to_string(&sealed)
            .unwrap()
            .contains(pin.trim()),
        "no PIN in clear"
    );

    // The PKCS#11 root with the unsealed PIN passes the conformance suite.
    let settings = sovkms::config::Settings::load(&cfg).unwrap();
    let sovkms::config::RootSettings::Pkcs11(p) = &settings.root else {
        panic!("pkcs11 root expected")
    };
    let root = sovkms::root::pkcs11::Pkcs11Root::open((**p).clone()).unwrap();
    sovkms::root::conformance::run(&root);
    drop(root);

    // The broker serves the crypto operations on SoftHSM2.
    let mut proc_ = spawn_broker(&cfg, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &proc_.addr).await;
    let key = create_key_as(
        &mut op,
        "pin-sealed",
        vec![grant(&spiffe("eu-central", "service", "app"), &ALL_OPS)],
    )
    .await;
    let gi = op
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        gi.root_description
            .contains("PIN sealed to the host's TPM (PCR sha256:7)"),
        "{}",
        gi.root_description
    );
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &proc_.addr).await;
    let cx = ctx(&[("patient", "42")]);
    let ct = encrypt(&mut svc, &key, b"health record", &cx)
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(decrypt(&mut svc, &ct, &cx).await.unwrap(), b"health record");
    let dk = svc
        .crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: key.clone(),
            context: cx.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decrypt(&mut svc, &dk.wrapped_key, &cx).await.unwrap(),
        dk.plaintext_key
    );
    stop(&mut proc_);

    // Another boot state: no PIN, no HSM login, no start.
    sw.extend(7, b"rootkit");
    let err = fails(&sovkms(&["serve", "--config", c]));
    assert!(
        err.contains("HSM PIN sealed to the TPM") && err.contains("refused to unseal"),
        "{err}"
    );
}

fn checkquote(dir: &Path, pcrs: &str, nonce: &str) -> bool {
    std::process::Command::new("tpm2_checkquote")
        .current_dir(dir)
        .args([
            "-u",
            "ak.pem",
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-f",
            "pcrs.bin",
        ])
        .args(["-l", pcrs, "-g", "sha256", "-q", nonce])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("tpm2_checkquote (tpm2-tools) is not installed; deploy/deps.sh installs it")
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_files_pass_tpm2_checkquote() {
    let env = Env::new();
    let sw = Swtpm::start();
    let cfg = tpm_config(&env, &sw, "eu-central");
    let c = cfg.to_str().unwrap();
    sw.extend(7, b"measured boot");
    ok(&sovkms(&["tpm", "seal-root", "--config", c]));

    // Locally, by the operator.
    let out = env.dir.path().join("quote-local");
    let nonce = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    ok(&sovkms(&[
        "tpm",
        "attest",
        "--config",
        c,
        "--nonce",
        nonce,
        "--out",
        out.to_str().unwrap(),
    ]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("attest.json")).unwrap()).unwrap();
    assert_eq!(summary["pcrs"], "sha256:7");
    assert!(checkquote(&out, "sha256:7", nonce), "quote verifies");
    assert!(
        !checkquote(&out, "sha256:7", "a1b2c3d4e5f60718293a4b5c6d7e8f91"),
        "wrong nonce"
    );
    let pcrs = out.join("pcrs.bin");
    let mut v = std::fs::read(&pcrs).unwrap();
    v[0] ^= 1;
    std::fs::write(&pcrs, &v).unwrap();
    assert!(!checkquote(&out, "sha256:7", nonce), "changed PCR value");
    let err = fails(&sovkms(&[
        "tpm", "attest", "--config", c, "--nonce", "00", "--out", "/tmp/x",
    ]));
    assert!(err.contains("8 to 64 bytes"), "{err}");

    // Remotely, by the region's auditor, from the running broker.
    let mut p = spawn_broker(&cfg, &[]);
    let mut aud = connect_ready(&env, "eu-central/auditor-audit", "eu-central", &p.addr).await;
    let r = aud
        .audit
        .attest(pb::AttestRequest {
            nonce: hex::decode(nonce).unwrap(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.pcr_selection, "sha256:7");
    let remote = env.dir.path().join("quote-remote");
    let pki = env.pki.join("eu-central");
    let o = sovkms(&[
        "audit",
        "attest",
        "--addr",
        &p.addr,
        "--ca",
        pki.join("ca.pem").to_str().unwrap(),
        "--tls-cert",
        pki.join("auditor-audit.pem").to_str().unwrap(),
        "--tls-key",
        pki.join("auditor-audit.key").to_str().unwrap(),
        "--nonce",
        "0011223344556677",
        "--out",
        remote.to_str().unwrap(),
        "--json",
    ]);
    let rep: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert!(checkquote(&remote, "sha256:7", "0011223344556677"));
    assert_eq!(
        rep["ak_fingerprint"], summary["ak_fingerprint"],
        "same AK from the same TPM"
    );
    // Only the region's auditors may ask.
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let e = svc
        .audit
        .attest(pb::AttestRequest { nonce: vec![7; 16] })
        .await;
    assert_eq!(code(&e), Code::PermissionDenied);
    let e = aud
        .audit
        .attest(pb::AttestRequest { nonce: vec![7; 3] })
        .await;
    assert_eq!(code(&e), Code::InvalidArgument);
    stop(&mut p);
    assert_eq!(sw.transients(), 0);
}
