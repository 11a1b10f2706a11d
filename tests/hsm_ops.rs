//! HSM operations with the broker as a real process: root rotation with a
//! crash injected midway and then completed, and an HSM outage with
//! automatic recovery.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

fn status_roots(cfg: &Path, envs: &[(&str, &Path)]) -> Vec<String> {
    let o = run_sovkms(
        &["hsm", "status", "--json", "--config", cfg.to_str().unwrap()],
        envs,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["role"].as_str().unwrap().starts_with("root key"))
        .map(|o| format!("p11:{}", o["id"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_root_survives_a_crash_and_finishes_when_run_again() {
    let env = Env::new();
    let token = new_token(env.dir.path(), "eu-central");
    let cfg = env.config_with_root("eu-central", "", &token.root_toml);
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let app = spiffe("eu-central", "service", "app");
    let c = ctx(&[("rotation", "test")]);

    let mut p = spawn_broker(&cfg, &[]);
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let mut cts = Vec::new();
    for i in 0..6 {
        let id = create_key_as(&mut op, &format!("r{i}"), vec![grant(&app, &ALL_OPS)]).await;
        cts.push(
            encrypt(&mut svc, &id, format!("v1 of {i}").as_bytes(), &c)
                .await
                .unwrap()
                .ciphertext,
        );
        if i % 2 == 0 {
            op.keys
                .re_key(pb::KeyRef { key_id: id.clone() })
                .await
                .unwrap();
            cts.push(
                encrypt(&mut svc, &id, format!("v2 of {i}").as_bytes(), &c)
                    .await
                    .unwrap()
                    .ciphertext,
            );
        }
    }
    stop(&mut p);
    let old = status_roots(&cfg, &[]);
    assert_eq!(old.len(), 1);

    // Rotation with the broker running is refused (the store is locked).
    let mut p = spawn_broker(&cfg, &[]);
    let o = run_sovkms(&["hsm", "rotate-root", "--config", &cfg_s], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stop the broker first"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stop(&mut p);

    // Crash after 3 of 6 keys were rewritten.
    let o = run_sovkms(
        &[
            "hsm",
            "rotate-root",
            "--config",
            &cfg_s,
            "--danger-crash-after",
            "3",
        ],
        &[],
    );
    assert!(
        !o.status.success(),
        "the injected crash must abort the process"
    );
    let roots = status_roots(&cfg, &[]);
    assert_eq!(roots.len(), 2, "new root created, old one kept");
    let o = run_sovkms(&["hsm", "retire-root", "--config", &cfg_s, &old[0]], &[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("still wraps"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Half-rotated: every version still decrypts.
    let mut p = spawn_broker(&cfg, &[]);
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    for ct in &cts {
        decrypt(&mut svc, ct, &c)
            .await
            .expect("a version became undecryptable mid-rotation");
    }
    stop(&mut p);

    // Running it again finishes the job.
    let o = run_sovkms(&["hsm", "rotate-root", "--config", &cfg_s, "--json"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout[o.stdout.iter().position(|b| *b == b'{').unwrap()..])
            .unwrap();
    assert!(
        v["new_root_key_id"].is_null(),
        "a resumed rotation must not create another root key"
    );
    assert_eq!(v["report"]["keys_updated"], 3);
    assert_eq!(status_roots(&cfg, &[]).len(), 2);
    let o = run_sovkms(&["hsm", "retire-root", "--config", &cfg_s, &old[0]], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(status_roots(&cfg, &[]).len(), 1);
    // Both offline changes are in the broker's own audit chain.
    let audit = env.dir.path().join("data/eu-central/audit.log");
    let recs = read_records(&audit);
    for op in ["rotate-root", "retire-root"] {
        assert!(
            recs.iter()
                .any(|r| r.operation == op && r.reason.contains("offline")),
            "{op} not audited"
        );
    }

    let mut p = spawn_broker(&cfg, &[]);
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    for ct in &cts {
        decrypt(&mut svc, ct, &c)
            .await
            .expect("undecryptable after rotation");
    }
    let mut aud = connect_ready(&env, "eu-central/auditor-audit", "eu-central", &p.addr).await;
    let info = aud
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.root_description.contains("SoftHSM"));
    stop(&mut p);
}

async fn wait_health(c: &sovkms::client::Client, want: bool, limit: Duration) {
    let start = Instant::now();
    while serving(c).await != Some(want) {
        assert!(
            start.elapsed() < limit,
            "health never became {}",
            if want { "SERVING" } else { "NOT_SERVING" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hsm_outage_fails_closed_and_recovers_without_restart() {
    let env = Env::new();
    // A token directory of this broker alone, so that taking it away
    // affects nothing else.
    let hsm = env.dir.path().join("private-hsm");
    let tokens = hsm.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(
        &conf,
        sovkms::root::pkcs11::admin::softhsm_dev_conf(&tokens),
    )
    .unwrap();
    let (pin, so) = (hsm.join("user.pin"), hsm.join("so.pin"));
    std::fs::write(&pin, "outage-user-pin").unwrap();
    std::fs::write(&so, "outage-so-pin").unwrap();
    let e: [(&str, &Path); 1] = [("SOFTHSM2_CONF", &conf)];
    let profile = softhsm_profile();
    let o = run_sovkms(
        &[
            "hsm",
            "init-token",
            "--profile",
            profile.to_str().unwrap(),
            "--label",
            "outage",
            "--pin-file",
            pin.to_str().unwrap(),
            "--so-pin-file",
            so.to_str().unwrap(),
        ],
        &e,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = sovkms::pki::pkcs11_root_toml(&path_str(&profile), "outage", &pin);
    let cfg = env.config_with_root(
        "eu-central",
        "",
        &format!("{root}\n[admin]\nlisten = \"127.0.0.1:0\"\n"),
    );
    let o = run_sovkms(&["hsm", "init", "--config", cfg.to_str().unwrap()], &e);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut p = spawn_broker(&cfg, &e);
    let admin = p.admin.clone().expect("the admin listener's address");
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &p.addr).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let app = spiffe("eu-central", "service", "app");
    let c = ctx(&[]);
    let hot = create_key_as(&mut op, "hot", vec![grant(&app, &ALL_OPS)]).await;
    let cold = create_key_as(&mut op, "cold", vec![grant(&app, &ALL_OPS)]).await;
    let hot_ct = encrypt(&mut svc, &hot, b"hot", &c)
        .await
        .unwrap()
        .ciphertext;

    // The token disappears.
    let away = hsm.join("tokens.away");
    std::fs::rename(&tokens, &away).unwrap();
    wait_health(&svc, false, Duration::from_secs(10)).await;
    let why = wait_ready(&admin, 503, Duration::from_secs(10)).await;
    assert!(why.contains("root_of_trust"), "{why}");
    let e1 = encrypt(&mut svc, &cold, b"needs the HSM", &c)
        .await
        .unwrap_err();
    assert_eq!(e1.code(), Code::Unavailable, "{}", e1.message());
    assert!(
        e1.message().contains("root of trust is unavailable"),
        "{}",
        e1.message()
    );
    let r = op
        .keys
        .create(pb::CreateKeyRequest {
            name: "x".into(),
            activate: true,
            ..Default::default()
        })
        .await;
    assert_eq!(code(&r), Code::Unavailable);

    // It comes back: the broker reconnects by itself.
    std::fs::rename(&away, &tokens).unwrap();
    wait_health(&svc, true, Duration::from_secs(15)).await;
    wait_ready(&admin, 200, Duration::from_secs(15)).await;
    let ct = encrypt(&mut svc, &cold, b"back", &c)
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"back");
    assert_eq!(decrypt(&mut svc, &hot_ct, &c).await.unwrap(), b"hot");
    create_key_as(&mut op, "after", vec![grant(&app, &ALL_OPS)]).await;
    stop(&mut p);
}
