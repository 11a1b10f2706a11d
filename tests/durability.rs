//! Acknowledged lifecycle writes survive `kill -9`: the broker runs as a
//! separate process, is killed right after the acknowledgement, restarted,
//! and every acknowledged key is there and decrypts old ciphertexts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let env = Env::new();
    let config = env.config("eu-central", "");
    let app = spiffe("eu-central", "service", "app");
    let c = ctx(&[("durable", "yes")]);

    let mut p = spawn_broker(&config, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        let m = op
            .keys
            .create(pb::CreateKeyRequest {
                name: format!("d{i}"),
                grants: vec![grant(&app, &ALL_OPS)],
                activate: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let ct = encrypt(&mut svc, &m.key_id, format!("record {i}").as_bytes(), &c)
            .await
            .unwrap()
            .ciphertext;
        acked.push((m.key_id, ct));
    }
    // A rekey and a revoke, then kill immediately after their acknowledgement.
    let rekeyed = op
        .keys
        .re_key(pb::KeyRef {
            key_id: acked[0].0.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rekeyed.primary_version, 2);
    op.keys
        .revoke(pb::RevokeRequest {
            key_id: acked[1].0.clone(),
            reason: pb::RevocationReason::Superseded as i32,
            message: String::new(),
        })
        .await
        .unwrap();
    let last = op
        .keys
        .create(pb::CreateKeyRequest {
            name: "last".into(),
            grants: vec![grant(&app, &ALL_OPS)],
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    kill9(&mut p);

    let mut p = spawn_broker(&config, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    op.keys
        .get_attributes(pb::KeyRef {
            key_id: last.key_id.clone(),
        })
        .await
        .expect("last acknowledged key lost");
    for (i, (id, ct)) in acked.iter().enumerate() {
        assert_eq!(
            decrypt(&mut svc, ct, &c).await.unwrap(),
            format!("record {i}").as_bytes(),
            "key {i}"
        );
        let _ = id;
    }
    let m = op
        .keys
        .get_attributes(pb::KeyRef {
            key_id: acked[0].0.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.primary_version, 2, "acknowledged rekey lost");
    let m = op
        .keys
        .get_attributes(pb::KeyRef {
            key_id: acked[1].0.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        m.state,
        pb::KeyState::Deactivated as i32,
        "acknowledged revoke lost"
    );
    let v2 = encrypt(&mut svc, &acked[0].0, b"v2", &c).await.unwrap();
    assert_eq!(v2.key_version, 2);
    kill9(&mut p);
}

/// "Audited, then released", observed from outside the process: under
/// `strace -f`, the write of a decrypt's audit record is followed by an
/// `fdatasync` of the log before any byte goes to a socket. (A kill -9 test
/// cannot show this: the page cache survives a killed process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decrypt_is_answered_only_after_its_record_is_synced() {
    let env = Env::new();
    let config = env.config("eu-central", "");
    let trace = env.dir.path().join("broker.strace");
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-y", "-s", "4096", "-e"])
        .arg("trace=write,pwrite64,writev,sendto,sendmsg,fdatasync,fsync")
        .arg("-o")
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_sovkms"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("SOVKMS_LOG", "warn")
        .stderr(std::process::Stdio::null());
    // strace must be installed (deploy/deps.sh installs it).
    let mut p = started(cmd);
    // The broker is strace's child: it gets the stop signal (strace exits
    // with it).
    let strace_pid = p.child.id();
    let broker_pid =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children"))
            .unwrap()
            .trim()
            .to_owned();
    let app = spiffe("eu-central", "service", "app");
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let k = create_key_as(&mut op, "k", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"x", &c).await.unwrap().ciphertext;
    let markers = [
        "durability-marker-1",
        "durability-marker-2",
        "durability-marker-3",
    ];
    for m in markers {
        // Let buffered records and their periodic sync go by first.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut req = tonic::Request::new(pb::DecryptRequest {
            ciphertext: ct.clone(),
            context: c.clone(),
        });
        req.metadata_mut()
            .insert("x-request-id", m.parse().unwrap());
        svc.crypto.decrypt(req).await.unwrap();
    }
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &broker_pid])
        .status()
        .unwrap();
    assert!(ok.success());
    p.child.wait().unwrap();
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for m in markers {
        let at = lines
            .iter()
            .position(|l| l.contains("audit.log") && l.contains(m) && l.contains("write"))
            .unwrap_or_else(|| panic!("no audit write for {m}"));
        let after = &lines[at + 1..];
        let sync = after
            .iter()
            .position(|l| l.contains("fdatasync(") && l.contains("audit.log"));
        let reply = after
            .iter()
            .position(|l| (l.contains("socket:") || l.contains("TCP")) && !l.contains("resumed>"))
            .unwrap_or_else(|| panic!("no socket write after {m}"));
        assert!(
            sync.is_some_and(|s| s < reply),
            "{m}: the answer left before the record was synced:\n{}",
            after[..=reply].join("\n")
        );
    }
}
