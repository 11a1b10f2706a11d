//! What a new operator hits in the first hour with the CLI, each against a
//! real broker on a SoftHSM2 token over mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn sovkms_in(dir: &Path, env: &Env, b: &TestBroker, who: &str, args: &[&str]) -> Output {
    let (r, stem) = who.split_once('/').unwrap();
    let pki = env.pki.join(r);
    Command::new(env!("CARGO_BIN_EXE_sovkms"))
        .current_dir(dir)
        .args(args)
        .env("SOVKMS_ADDR", &b.addr)
        .env("SOVKMS_CA", env.pki.join(&b.region).join("ca.pem"))
        .env("SOVKMS_CERT", pki.join(format!("{stem}.pem")))
        .env("SOVKMS_KEY", pki.join(format!("{stem}.key")))
        .env_remove("SOVKMS_SERVER_NAME")
        .env("SOVKMS_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_files_names_and_confirmations() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "reports", vec![grant(&app, &ALL_OPS)]).await;
    let work = env.dir.path().join("work");
    std::fs::create_dir_all(work.join("dir")).unwrap();
    std::fs::write(work.join("report.pdf"), b"quarterly figures").unwrap();
    let svc = "eu-central/service-app";

    // A bare --out name, exactly as the README writes it (the server name
    // defaults to the host of --addr: 127.0.0.1, in the broker's certificate).
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &[
            "encrypt",
            "--key-id",
            &k,
            "--in",
            "report.pdf",
            "--out",
            "report.pdf.skms",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(work.join("report.pdf.skms").is_file());

    // An unrelated NAME.tmp is never touched; the output is 0600.
    std::fs::write(work.join("dir/notes.tmp"), b"someone else's file").unwrap();
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &[
            "decrypt",
            "--in",
            "report.pdf.skms",
            "--out",
            "dir/notes.txt",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        std::fs::read(work.join("dir/notes.txt")).unwrap(),
        b"quarterly figures"
    );
    assert_eq!(
        std::fs::read(work.join("dir/notes.tmp")).unwrap(),
        b"someone else's file"
    );
    let mode = std::fs::metadata(work.join("dir/notes.txt"))
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    // --out naming a directory: an error, and no plaintext left behind.
    let before = names(&work);
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &["decrypt", "--in", "report.pdf.skms", "--out", "dir"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(names(&work), before);
    assert_eq!(names(&work.join("dir")), ["notes.tmp", "notes.txt"]);

    // --json is global, and with --out the file is still written.
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &[
            "--json",
            "encrypt",
            "--key-id",
            &k,
            "--in",
            "report.pdf",
            "--out",
            "j.skms",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["out"], "j.skms");
    assert!(v.get("ciphertext_base64").is_none());
    assert!(work.join("j.skms").is_file());
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        "eu-central/operator-admin",
        &["--json", "key", "list"],
    );
    assert!(o.status.success(), "{}", err(&o));
    serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap();

    // Addresses: a URL or a missing port is refused with what to write.
    for (addr, says) in [
        ("https://127.0.0.1:7443", "is a URL"),
        ("127.0.0.1", "has no port"),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args([
                "health",
                "--addr",
                addr,
                "--ca",
                "x",
                "--tls-cert",
                "x",
                "--tls-key",
                "x",
            ])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(
            err(&o).contains(says) && err(&o).contains("host:port"),
            "{}",
            err(&o)
        );
    }
    // A wrong explicit server name fails; the default (the host) works.
    let mut o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &["health", "--server-name", "elsewhere.example"],
    );
    assert_eq!(o.status.code(), Some(1));
    o = sovkms_in(&work, &env, &eu, svc, &["health"]);
    assert!(o.status.success(), "{}", err(&o));

    // Destroy: no silent default, no unconfirmed destruction, and a
    // scheduled key shows it and cannot be activated.
    let op = "eu-central/operator-admin";
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        op,
        &["key", "destroy", &k, "--days", "0", "--yes"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("--days 0"), "{}", err(&o));
    let o = sovkms_in(&work, &env, &eu, op, &["key", "destroy", &k, "--days", "3"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("--yes"), "{}", err(&o));
    let o = sovkms_in(&work, &env, &eu, op, &["key", "show", &k]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("scheduled"));
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        op,
        &["key", "destroy", &k, "--days", "3", "--yes"],
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = sovkms_in(&work, &env, &eu, op, &["key", "show", &k]);
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(shown.contains("scheduled for destruction at 20"), "{shown}");
    let o = sovkms_in(&work, &env, &eu, op, &["key", "activate", &k]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("cancel the destruction first"),
        "{}",
        err(&o)
    );
}

/// A broker that cannot serve (bad TLS file, busy port, listen without a
/// port) stops before it logs in to the HSM or writes its audit log.
#[test]
fn a_broker_that_cannot_serve_touches_nothing() {
    let env = Env::new();
    let cfg = env.config("eu-central", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let audit = env.dir.path().join("data/eu-central/audit.log");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    for (what, from, to) in [
        ("bad TLS path", "broker.pem", "no-such.pem"),
        ("busy port", "127.0.0.1:0", busy_addr.as_str()),
        ("no port", "127.0.0.1:0", "127.0.0.1"),
    ] {
        std::fs::write(&cfg, text.replacen(from, to, 1)).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("SOVKMS_LOG", "error")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{what}");
        assert!(
            !audit.exists(),
            "{what}: the audit log was written: {}",
            err(&o)
        );
    }
}

/// `audit export | head -1`: the closed pipe ends the export quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_into_a_closed_pipe_is_quiet() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    for i in 0..300 {
        create_key(&env, &eu, &format!("k{i}"), vec![]).await;
    }
    let log = eu.audit_path.clone();
    eu.stop().await;
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' audit export --log '{}' | head -1",
            env!("CARGO_BIN_EXE_sovkms"),
            log.display()
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    assert!(!err(&o).contains("error"), "{}", err(&o));
    assert!(!err(&o).contains("panicked"), "{}", err(&o));
}

/// Client-side TLS mistakes each get one sentence naming the problem and
/// what to do, never a bare "transport error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_mistakes_say_what_to_do() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let work = env.dir.path().to_owned();
    let eu_pki = env.pki.join("eu-central");
    let p = |f: &str| eu_pki.join(f).display().to_string();
    let us_ca = env.pki.join("us-east/ca.pem").display().to_string();
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec!["--ca".into(), us_ca],
            "was not issued by the CA in --ca",
            "pass with --ca the CA certificate",
        ),
        (
            vec![
                "--tls-cert".into(),
                p("service-app.key"),
                "--tls-key".into(),
                p("service-app.pem"),
            ],
            "are --tls-cert and --tls-key swapped?",
            "",
        ),
        (
            vec!["--tls-key".into(), p("operator-admin.key")],
            "does not belong to the certificate",
            "",
        ),
        (
            vec![
                "--tls-cert".into(),
                p("rogue-service.pem"),
                "--tls-key".into(),
                p("rogue-service.key"),
            ],
            "the broker closed the connection during TLS",
            "trusts for your region",
        ),
        (
            vec!["--server-name".into(), "other.example".into()],
            "is not valid for the name other.example",
            "--server-name",
        ),
    ];
    for (flags, says, hint) in cases {
        let mut args = vec!["health"];
        args.extend(flags.iter().map(String::as_str));
        let o = sovkms_in(&work, &env, &eu, "eu-central/service-app", &args);
        let e = err(&o);
        assert_eq!(o.status.code(), Some(1), "{flags:?}: {e}");
        assert!(e.contains(says) && e.contains(hint), "{flags:?}: {e}");
        assert_eq!(e.matches("invalid peer certificate").count(), 0, "{e}");
    }
    // A CA certificate where the broker's signing key belongs.
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        "eu-central/auditor-audit",
        &[
            "audit",
            "verify",
            "--log",
            &eu.audit_path.display().to_string(),
            "--pubkey",
            &p("ca.pem"),
        ],
    );
    assert!(
        err(&o).contains("this is a certificate, not the broker's signing public key"),
        "{}",
        err(&o)
    );
}

/// A second broker on a data directory in use is told so.
#[test]
fn a_second_broker_on_a_data_directory_in_use_is_told_so() {
    let env = Env::new();
    let cfg = env.config("eu-central", "");
    let mut first = spawn_broker(&cfg, &[]);
    // The broker dumps no core (SECURITY M26).
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", first.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_sovkms"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("SOVKMS_LOG", "error")
        .output()
        .unwrap();
    stop(&mut first);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("is in use by another sovkms process"),
        "{}",
        err(&o)
    );
}

/// The audit log and the store are created private; `config check` names a
/// PIN file or a TLS key that others can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_private_and_loose_secrets_are_named() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
    assert_eq!(mode(&eu.audit_path), 0o600);
    let data = eu.audit_path.parent().unwrap();
    assert_eq!(mode(&data.join("keys.sled")), 0o700);
    eu.stop().await;

    let cfg = env.config("us-east", "");
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args(["config", "check"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = check();
    assert!(o.status.success(), "{}", err(&o));
    assert!(!err(&o).contains("warning"), "{}", err(&o));
    let key = env.pki.join("us-east/broker.key");
    let before = mode(&key);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = check();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(before)).unwrap();
    assert!(o.status.success());
    assert!(
        err(&o).contains("TLS private key") && err(&o).contains("chmod 600"),
        "{}",
        err(&o)
    );
}

/// Client profiles replace the four variables; flags still win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_profiles_choose_the_connection() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let pki = env.pki.join("eu-central");
    let file = env.dir.path().join("profiles.toml");
    std::fs::write(
        &file,
        format!(
            "default = \"eu-audit\"\n\n\
             [profiles.eu-op]\naddr = \"{addr}\"\nca = \"{p}/ca.pem\"\ntls_cert = \"{p}/operator-admin.pem\"\ntls_key = \"{p}/operator-admin.key\"\n\n\
             [profiles.eu-audit]\naddr = \"{addr}\"\nca = \"{p}/ca.pem\"\ntls_cert = \"{p}/auditor-audit.pem\"\ntls_key = \"{p}/auditor-audit.key\"\n",
            addr = eu.addr,
            p = pki.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args(args)
            .env("SOVKMS_CONFIG", &file)
            .env_remove("SOVKMS_ADDR")
            .env_remove("SOVKMS_CA")
            .env_remove("SOVKMS_CERT")
            .env_remove("SOVKMS_KEY")
            .env("SOVKMS_LOG", "error")
            .output()
            .unwrap()
    };
    let o = run(&["--json", "info"]);
    assert!(o.status.success(), "{}", err(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["caller"].as_str().unwrap().ends_with("/auditor/audit"),
        "{v}"
    );
    let o = run(&["--json", "info", "--profile", "eu-op"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["caller"].as_str().unwrap().ends_with("/operator/admin"),
        "{v}"
    );
    // A flag beats the profile.
    let o = run(&[
        "--json",
        "info",
        "--profile",
        "eu-op",
        "--tls-cert",
        &pki.join("service-app.pem").display().to_string(),
        "--tls-key",
        &pki.join("service-app.key").display().to_string(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["caller"].as_str().unwrap().ends_with("/service/app"),
        "{v}"
    );
    let o = run(&["info", "--profile", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("eu-audit, eu-op"), "{}", err(&o));
}

/// Keys by name: for services among the keys granted to them only, and an
/// ambiguous name is refused with the candidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_by_name() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let mine = create_key(&env, &eu, "patient-records", vec![grant(&app, &ALL_OPS)]).await;
    let d1 = create_key(&env, &eu, "dup", vec![grant(&app, &ALL_OPS)]).await;
    let d2 = create_key(&env, &eu, "dup", vec![grant(&app, &ALL_OPS)]).await;
    let other = spiffe("eu-central", "service", "other");
    let hidden = create_key(&env, &eu, "hidden", vec![grant(&other, &ALL_OPS)]).await;
    let work = env.dir.path().to_owned();
    std::fs::write(work.join("r.txt"), b"x").unwrap();
    let svc = "eu-central/service-app";
    for name in ["patient-records", "alias/patient-records"] {
        let o = sovkms_in(
            &work,
            &env,
            &eu,
            svc,
            &["--json", "encrypt", "--key", name, "--in", "r.txt"],
        );
        assert!(o.status.success(), "{name}: {}", err(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["key_id"], mine.as_str());
    }
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &["encrypt", "--key", "dup", "--in", "r.txt"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("2 keys are named \"dup\"")
            && err(&o).contains(&d1)
            && err(&o).contains(&d2),
        "{}",
        err(&o)
    );
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &["encrypt", "--key", "hidden", "--in", "r.txt"],
    );
    assert!(err(&o).contains("no key named \"hidden\""), "{}", err(&o));
    // A service lists only its own keys; an operator sees them all and
    // manages by name.
    let o = sovkms_in(&work, &env, &eu, svc, &["key", "list"]);
    let listed = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        listed.contains(&mine) && !listed.contains(&hidden),
        "{listed}"
    );
    let op = "eu-central/operator-admin";
    let o = sovkms_in(&work, &env, &eu, op, &["key", "show", "hidden"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&hidden),
        "{}",
        err(&o)
    );

    // A data key's plaintext goes to a 0600 file, not to the screen.
    let o = sovkms_in(
        &work,
        &env,
        &eu,
        svc,
        &[
            "generate-data-key",
            "--key",
            "patient-records",
            "--out",
            "dk.bin",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("plaintext key (base64)"));
    let dk = work.join("dk.bin");
    assert_eq!(std::fs::read(&dk).unwrap().len(), 32);
    assert_eq!(std::fs::metadata(&dk).unwrap().mode() & 0o777, 0o600);

    // The command describes itself.
    let o = sovkms_in(&work, &env, &eu, svc, &["version"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
    let o = sovkms_in(&work, &env, &eu, svc, &["completions", "bash"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("generate-data-key"));
}

/// `sovkms doctor`: one line per check, and a failure says what to do.
#[test]
fn doctor_checks_the_broker_host() {
    let env = Env::new();
    let cfg = env.config("eu-central", "");
    let doctor = || {
        Command::new(env!("CARGO_BIN_EXE_sovkms"))
            .args(["doctor", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = doctor();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", err(&o));
    for check in [
        "config",
        "tls files",
        "broker certificate",
        "listen",
        "token",
        "hsm pin",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("ok") && l.contains(check)),
            "{check}: {out}"
        );
    }
    let text = std::fs::read_to_string(&cfg).unwrap();
    let label = text
        .lines()
        .find_map(|l| l.strip_prefix("token_label = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    std::fs::write(&cfg, text.replace(&label, "no-such-token")).unwrap();
    let o = doctor();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        out.contains("FAIL  token") && out.contains("no token labelled 'no-such-token'"),
        "{out}"
    );
    assert!(out.contains("→ check [root] token_label"), "{out}");
}
