//! The deployment files are checked by tools, not by eye: the systemd unit
//! by `systemd-analyze verify` and its `security` exposure score, the
//! Kubernetes manifests by their schemas and the sovereignty invariants,
//! the alert rules and the dashboard by a PromQL parser and against the
//! series a real broker exports.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_python() -> PathBuf {
    repo().join("target/pyvenv/bin/python")
}

fn run(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// The unit (and its TPM drop-in) as installed, with ExecStart pointing at
/// the binary under test (verify checks that it exists).
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("deploy/systemd/sovkms.service"))
        .unwrap()
        .replace("/usr/local/bin/sovkms", env!("CARGO_BIN_EXE_sovkms"));
    let unit = dir.join("sovkms.service");
    std::fs::write(&unit, text).unwrap();
    let dropins = dir.join("sovkms.service.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::copy(
        repo().join("deploy/systemd/sovkms.service.d/tpm.conf"),
        dropins.join("tpm.conf"),
    )
    .unwrap();
    unit
}

#[test]
fn systemd_unit_verifies_and_its_exposure_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    let (ok, out) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit));
    assert!(ok, "systemd-analyze security: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in {out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    println!("{}", line.trim());
    assert!(score <= 2.0, "exposure {score} above 2.0: {line}");
}

#[test]
fn kubernetes_manifests_validate_and_keep_the_region() {
    let (ok, out) = run(Command::new(venv_python())
        .arg(repo().join(".ci/check_deploy.py"))
        .arg("kubernetes")
        .arg(repo().join("deploy/kubernetes/sovkms-eu-central.yaml"))
        .arg(repo().join("deploy/kubernetes/sovkms-eu-central-ha.yaml")));
    assert!(ok, "{out}");
}

/// A broker that served a few requests (one refused, one failed
/// handshake: families appear with their first observation) exports every
/// family the alert rules and the dashboard use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_and_dashboard_use_series_the_broker_exports() {
    let env = Env::new();
    let (eu, mut svc, ct) = decrypting_region(&env).await;
    decrypt(&mut svc, &ct, &ctx(&[])).await.unwrap();
    let mut us = client(&env, "us-east/service-app", &eu).await;
    decrypt(&mut us, &ct, &ctx(&[])).await.unwrap_err();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&eu.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = s.read_to_end(&mut Vec::new()).await;
    }
    let metrics = env.dir.path().join("metrics.txt");
    std::fs::write(&metrics, eu.broker.metrics().encode()).unwrap();
    let (ok, out) = run(Command::new(venv_python())
        .arg(repo().join(".ci/check_deploy.py"))
        .arg("monitoring")
        .arg(&metrics));
    println!("{out}");
    assert!(ok, "{out}");
}
