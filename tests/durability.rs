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
