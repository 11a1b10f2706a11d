//! The `sovkms` binary as an operator and a service use it, against a real
//! broker over mTLS: readable output, `--json`, and errors that say what to do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::process::{Command, Output};

fn sovkms(env: &Env, b: &TestBroker, who: &str, args: &[&str]) -> Output {
    let (r, stem) = who.split_once('/').unwrap();
    let dir = env.pki.join(r);
    Command::new(env!("CARGO_BIN_EXE_sovkms"))
        .args(args)
        .env("SOVKMS_ADDR", &b.addr)
        .env("SOVKMS_CA", env.pki.join(&b.region).join("ca.pem"))
        .env("SOVKMS_CERT", dir.join(format!("{stem}.pem")))
        .env("SOVKMS_KEY", dir.join(format!("{stem}.key")))
        .env("SOVKMS_LOG", "error")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_service_workflow() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let allow = format!("{app}=encrypt,decrypt,generate-data-key");
    let o = sovkms(
        &env,
        &eu,
        "eu-central/operator-admin",
        &[
            "key", "create", "--name", "files", "--allow", &allow, "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let key_id = meta["key_id"].as_str().unwrap().to_owned();
    assert_eq!(meta["state"], "active");
    assert_eq!(meta["home_region"], "eu-central");

    let o = sovkms(&env, &eu, "eu-central/operator-admin", &["key", "list"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains(&key_id) && stdout(&o).contains("files"));

    // Encrypt a file, decrypt it back to another file.
    let dir = env.dir.path();
    let plain = dir.join("in.txt");
    std::fs::write(&plain, b"line one\nline two\n").unwrap();
    let ct = dir.join("in.txt.skms");
    let back = dir.join("back.txt");
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "encrypt",
            "--key-id",
            &key_id,
            "--in",
            plain.to_str().unwrap(),
            "--out",
            ct.to_str().unwrap(),
            "--context",
            "file=in.txt",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(&std::fs::read(&ct).unwrap()[..4], b"SKMS");
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "decrypt",
            "--in",
            ct.to_str().unwrap(),
            "--out",
            back.to_str().unwrap(),
            "--context",
            "file=in.txt",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&back).unwrap(), b"line one\nline two\n");

    // Wrong context: a clear error and a hint, exit code 1.
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "decrypt",
            "--in",
            ct.to_str().unwrap(),
            "--context",
            "file=other",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("error: INVALID_ARGUMENT: ciphertext failed authentication"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("hint:"), "{}", stderr(&o));

    // The operator may not decrypt, and is told why.
    let o = sovkms(
        &env,
        &eu,
        "eu-central/operator-admin",
        &[
            "decrypt",
            "--in",
            ct.to_str().unwrap(),
            "--context",
            "file=in.txt",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("operators manage keys and never get plaintext"),
        "{}",
        stderr(&o)
    );

    // Data key, JSON.
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &["generate-data-key", "--key-id", &key_id, "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dk: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(dk["plaintext_key_base64"].as_str().unwrap().len(), 44);

    // Lifecycle through the CLI.
    for args in [
        vec!["key", "rekey", &key_id],
        vec!["key", "revoke", &key_id, "--reason", "superseded"],
        vec!["key", "destroy", &key_id, "--days", "7", "--yes"],
        vec!["key", "cancel-destroy", &key_id],
    ] {
        let o = sovkms(&env, &eu, "eu-central/operator-admin", &args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    let o = sovkms(
        &env,
        &eu,
        "eu-central/operator-admin",
        &["key", "show", &key_id, "--json"],
    );
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["state"], "deactivated");
    assert_eq!(meta["primary_version"], 2);

    // Bad arguments: usage error, not a panic.
    let o = sovkms(
        &env,
        &eu,
        "eu-central/operator-admin",
        &["key", "revoke", &key_id, "--reason", "bored"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown reason"), "{}", stderr(&o));
    let o = sovkms(
        &env,
        &eu,
        "eu-central/operator-admin",
        &["key", "create", "--name", "x", "--allow", "nonsense"],
    );
    assert!(stderr(&o).contains("has no '='"), "{}", stderr(&o));
    let o = sovkms(&env, &eu, "eu-central/operator-admin", &["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!stderr(&o).contains("panicked"));

    // Health and info.
    let o = sovkms(&env, &eu, "eu-central/auditor-audit", &["health"]);
    assert!(o.status.success() && stdout(&o).contains("SERVING"));
    let o = sovkms(&env, &eu, "eu-central/auditor-audit", &["info"]);
    assert!(
        stdout(&o).contains("root of trust    pkcs11"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("development-only"), "{}", stdout(&o));
}

#[test]
fn serve_refuses_bad_config_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("b.toml");
    std::fs::write(&cfg, "region = \"EU\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_sovkms"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("error: config") && e.contains("hint:"), "{e}");
}
