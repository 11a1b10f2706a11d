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

/// `sovkms file`: a 3 MiB file round-trips through one GenerateDataKey and
/// one Decrypt; `inspect` reads the header offline; a wrong context, a
/// caller of another region and a cut file are refused with a precise
/// error and leave no output file; the progress bar shows on a terminal
/// (a pseudo-terminal here) and not on a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_encrypt_decrypt_inspect_and_refusals() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "files", vec![grant(&app, &ALL_OPS)]).await;
    let d = env.dir.path();
    let (plain, enc, back) = (
        d.join("plain.bin"),
        d.join("plain.svkf"),
        d.join("back.bin"),
    );
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(&plain, &data).unwrap();
    let p = |x: &std::path::Path| x.to_str().unwrap().to_owned();
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "file",
            "encrypt",
            "--key",
            &k,
            "--in",
            &p(&plain),
            "--out",
            &p(&enc),
            "--context",
            "case=4711",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &["--json", "file", "inspect", "--in", &p(&enc)],
    );
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["region"], "eu-central");
    assert_eq!(v["key_id"], k.as_str());
    assert_eq!(v["segments"], 49, "3 MiB + 17 bytes in 64 KiB segments");
    let o = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "file",
            "decrypt",
            "--in",
            &p(&enc),
            "--out",
            &p(&back),
            "--context",
            "case=4711",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    std::fs::remove_file(&back).unwrap();

    // Refusals: no output file, a sentence that says why.
    let refused = |who: &str, input: &std::path::Path, ctx: &str| {
        let o = sovkms(
            &env,
            &eu,
            who,
            &[
                "file",
                "decrypt",
                "--in",
                &p(input),
                "--out",
                &p(&back),
                "--context",
                ctx,
            ],
        );
        assert!(!o.status.success());
        assert!(!back.exists(), "a refused decrypt left an output file");
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        stderr(&o)
    };
    let e = refused("eu-central/service-app", &enc, "case=4712");
    assert!(e.contains("context"), "{e}");
    let e = refused("us-east/service-app", &enc, "case=4711");
    assert!(e.contains("us-east") && e.contains("eu-central"), "{e}");
    let cut = d.join("cut.svkf");
    let bytes = std::fs::read(&enc).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = refused("eu-central/service-app", &cut, "case=4711");
    assert!(
        e.contains("failed authentication") || e.contains("truncated"),
        "{e}"
    );

    // Progress: drawn on a terminal, never on a pipe.
    let (r, stem) = ("eu-central", "service-app");
    let cmd = format!(
        "{} file encrypt --key {k} --in {} --out {}",
        env!("CARGO_BIN_EXE_sovkms"),
        p(&plain),
        p(&d.join("tty.svkf"))
    );
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("SOVKMS_ADDR", &eu.addr)
        .env("SOVKMS_CA", env.pki.join("eu-central").join("ca.pem"))
        .env("SOVKMS_CERT", env.pki.join(r).join(format!("{stem}.pem")))
        .env("SOVKMS_KEY", env.pki.join(r).join(format!("{stem}.key")))
        .env("SOVKMS_LOG", "error")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("encrypting"),
        "no progress on a terminal: {shown:?}"
    );
    let piped = sovkms(
        &env,
        &eu,
        "eu-central/service-app",
        &[
            "file",
            "encrypt",
            "--key",
            &k,
            "--in",
            &p(&plain),
            "--out",
            &p(&d.join("pipe.svkf")),
        ],
    );
    assert!(!stderr(&piped).contains("encrypting"), "{}", stderr(&piped));
}
