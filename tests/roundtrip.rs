//! Round trips and the key lifecycle over real mTLS: data keys, re-encrypt
//! across rekey, revoked/destroyed keys, destroy window, locate, and the
//! KEK cache keeping the root of trust off the steady-state path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use tonic::Code;

fn key_ref(id: &str) -> pb::KeyRef {
    pb::KeyRef { key_id: id.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_decrypt_data_keys_and_reencrypt_across_rekey() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k1 = create_key(&env, &eu, "k1", vec![grant(&app, &ALL_OPS)]).await;
    let k2 = create_key(&env, &eu, "k2", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let c = ctx(&[("tenant", "acme"), ("table", "patients")]);

    for len in [0usize, 1, 100, 64 * 1024] {
        let pt: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        let r = encrypt(&mut svc, &k1, &pt, &c).await.unwrap();
        assert_eq!((r.key_id.as_str(), r.key_version), (k1.as_str(), 1));
        assert_eq!(
            decrypt(&mut svc, &r.ciphertext, &c).await.unwrap(),
            pt,
            "len {len}"
        );
    }

    // Data keys: the wrapped copy decrypts to the plaintext copy.
    let mut dk = svc
        .crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: k1.clone(),
            context: c.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let plain = std::mem::take(&mut dk.plaintext_key);
    assert_eq!(plain.len(), 32);
    assert_eq!(decrypt(&mut svc, &dk.wrapped_key, &c).await.unwrap(), plain);
    let wrapped_only = svc
        .crypto
        .generate_data_key_without_plaintext(pb::GenerateDataKeyRequest {
            key_id: k1.clone(),
            context: c.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decrypt(&mut svc, &wrapped_only.wrapped_key, &c)
            .await
            .unwrap()
            .len(),
        32
    );

    // Rekey: new encryptions use v2, v1 ciphertext still decrypts, re-encrypt moves it to v2.
    let old = encrypt(&mut svc, &k1, b"before rekey", &c)
        .await
        .unwrap()
        .ciphertext;
    let m = op.keys.re_key(key_ref(&k1)).await.unwrap().into_inner();
    assert_eq!((m.primary_version, m.versions.len()), (2, 2));
    let new = encrypt(&mut svc, &k1, b"after rekey", &c).await.unwrap();
    assert_eq!(new.key_version, 2);
    assert_eq!(decrypt(&mut svc, &old, &c).await.unwrap(), b"before rekey");
    let re = svc
        .crypto
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext: old.clone(),
            source_context: c.clone(),
            destination_key_id: String::new(),
            destination_context: c.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (re.source_key_version, re.key_version, re.key_id.as_str()),
        (1, 2, k1.as_str())
    );
    assert_eq!(
        decrypt(&mut svc, &re.ciphertext, &c).await.unwrap(),
        b"before rekey"
    );

    // Re-encrypt under another key with a new context.
    let c2 = ctx(&[("moved", "yes")]);
    let re2 = svc
        .crypto
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext: old,
            source_context: c.clone(),
            destination_key_id: k2.clone(),
            destination_context: c2.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(re2.key_id, k2);
    assert_eq!(
        decrypt(&mut svc, &re2.ciphertext, &c2).await.unwrap(),
        b"before rekey"
    );
    assert_eq!(
        code(&decrypt(&mut svc, &re2.ciphertext, &c).await),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_states_gate_operations() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let c = ctx(&[]);

    // Pre-active: nothing until activated.
    let k = op
        .keys
        .create(pb::CreateKeyRequest {
            name: "pre".into(),
            grants: vec![grant(&app, &ALL_OPS)],
            activate: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.state, pb::KeyState::PreActive as i32);
    let e = encrypt(&mut svc, &k.key_id, b"x", &c).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("activate"), "{}", e.message());
    op.keys.activate(key_ref(&k.key_id)).await.unwrap();
    assert_eq!(
        code(&op.keys.activate(key_ref(&k.key_id)).await),
        Code::FailedPrecondition
    );
    let ct = encrypt(&mut svc, &k.key_id, b"x", &c)
        .await
        .unwrap()
        .ciphertext;

    // Revoked (superseded): decrypts, never encrypts.
    let m = op
        .keys
        .revoke(pb::RevokeRequest {
            key_id: k.key_id.clone(),
            reason: pb::RevocationReason::Superseded as i32,
            message: "rotated".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, pb::KeyState::Deactivated as i32);
    assert_eq!(
        code(&encrypt(&mut svc, &k.key_id, b"x", &c).await),
        Code::FailedPrecondition
    );
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"x");
    assert_eq!(
        code(&op.keys.re_key(key_ref(&k.key_id)).await),
        Code::FailedPrecondition
    );

    // Compromised: no decrypt; only re-encrypt away from it.
    let other = create_key(&env, &eu, "other", vec![grant(&app, &ALL_OPS)]).await;
    op.keys
        .revoke(pb::RevokeRequest {
            key_id: k.key_id.clone(),
            reason: pb::RevocationReason::KeyCompromise as i32,
            message: String::new(),
        })
        .await
        .unwrap();
    let e = decrypt(&mut svc, &ct, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("compromised"), "{}", e.message());
    let moved = svc
        .crypto
        .re_encrypt(pb::ReEncryptRequest {
            ciphertext: ct.clone(),
            source_context: c.clone(),
            destination_key_id: other.clone(),
            destination_context: c.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        decrypt(&mut svc, &moved.ciphertext, &c).await.unwrap(),
        b"x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_is_scheduled_cancellable_and_final() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let c = ctx(&[("k", "v")]);
    let k = create_key(&env, &eu, "doomed", vec![grant(&app, &ALL_OPS)]).await;
    let ct = encrypt(&mut svc, &k, b"gone soon", &c)
        .await
        .unwrap()
        .ciphertext;

    // Default window 30 days; 0 days refused.
    let m = op
        .keys
        .destroy(pb::DestroyRequest {
            key_id: k.clone(),
            pending_window_days: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let now = eu.clock.now_unix_for_tests();
    assert!((m.destroy_after_unix - now - 30 * 86_400).abs() < 5);
    assert_eq!(
        code(&encrypt(&mut svc, &k, b"x", &c).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(&decrypt(&mut svc, &ct, &c).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(
            &op.keys
                .destroy(pb::DestroyRequest {
                    key_id: k.clone(),
                    pending_window_days: 1
                })
                .await
        ),
        Code::FailedPrecondition
    );
    op.keys.cancel_destroy(key_ref(&k)).await.unwrap();
    assert_eq!(
        code(&op.keys.cancel_destroy(key_ref(&k)).await),
        Code::FailedPrecondition
    );
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"gone soon");

    // One-day window, then time passes: the material is gone for good.
    op.keys
        .destroy(pb::DestroyRequest {
            key_id: k.clone(),
            pending_window_days: 1,
        })
        .await
        .unwrap();
    eu.clock.advance(86_400 + 1);
    let e = decrypt(&mut svc, &ct, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("destroyed"), "{}", e.message());
    let m = op
        .keys
        .get_attributes(key_ref(&k))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.state, pb::KeyState::Destroyed as i32);
    assert!(
        m.versions.iter().all(|v| v.root_key_id.is_empty()),
        "wrapped material must be erased"
    );
    assert_eq!(
        code(&op.keys.cancel_destroy(key_ref(&k)).await),
        Code::FailedPrecondition
    );
    assert_eq!(
        code(&op.keys.activate(key_ref(&k)).await),
        Code::FailedPrecondition
    );
}

/// Every key `Locate` finds for `name` ("" = any), read in pages of 3.
async fn locate_pages(op: &mut sovkms::client::Client, name: &str) -> Vec<pb::KeyMetadata> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = op
            .keys
            .locate(pb::LocateRequest {
                name: name.into(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.keys.len() <= 3);
        out.extend(r.keys);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locate_filters_and_pages() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    for i in 0..7 {
        op.keys
            .create(pb::CreateKeyRequest {
                name: format!("n{}", i % 2),
                tenant: "t".into(),
                activate: i % 3 != 0,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let seen = locate_pages(&mut op, "").await;
    assert_eq!(seen.len(), 7);
    let mut dedup: Vec<_> = seen.iter().map(|k| &k.key_id).collect();
    dedup.dedup();
    assert_eq!(dedup.len(), 7);
    // By name, in pages of 3: the token carries over the filter's gaps.
    let by_name = locate_pages(&mut op, "n0").await;
    assert_eq!(by_name.len(), 4);
    assert!(by_name.iter().all(|k| k.name == "n0"));
    assert!(
        by_name.windows(2).all(|w| w[0].key_id < w[1].key_id),
        "{by_name:?}"
    );
    let r = op
        .keys
        .locate(pb::LocateRequest {
            state: pb::KeyState::PreActive as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.keys.len(), 3);
    assert_eq!(
        code(
            &op.keys
                .locate(pb::LocateRequest {
                    page_size: 5000,
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_makes_no_root_calls_and_grant_changes_apply_at_once() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "hot", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"warm", &c).await.unwrap().ciphertext;
    let before = eu.broker.status();
    for _ in 0..50 {
        let ct = encrypt(&mut svc, &k, b"steady", &c)
            .await
            .unwrap()
            .ciphertext;
        decrypt(&mut svc, &ct, &c).await.unwrap();
    }
    let after = eu.broker.status();
    assert_eq!(
        after.root_calls, before.root_calls,
        "steady state must not call the root of trust"
    );
    assert_eq!(after.cache.hits - before.cache.hits, 100);

    // Taking away decrypt takes effect on the next request.
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    op.keys
        .set_grants(pb::SetGrantsRequest {
            key_id: k.clone(),
            grants: vec![grant(&app, &[pb::Operation::Encrypt])],
        })
        .await
        .unwrap();
    let e = decrypt(&mut svc, &ct, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("no grant to decrypt"),
        "{}",
        e.message()
    );

    // GetInfo names the HSM root of trust (to the region's auditors; a
    // service learns only the kind).
    let svc_info = svc
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svc_info.root_kind, "pkcs11");
    assert!(
        svc_info.root_description.is_empty()
            && svc_info.root_calls == 0
            && svc_info.cache_hits == 0
    );
    let mut aud = client(&env, "eu-central/auditor-audit", &eu).await;
    let info = aud
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.development_only);
    assert_eq!(
        (info.region.as_str(), info.root_kind.as_str()),
        ("eu-central", "pkcs11")
    );
    assert!(
        info.root_description.contains("SoftHSM"),
        "{}",
        info.root_description
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_share_one_unwrap() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "cold", vec![grant(&app, &ALL_OPS)]).await;
    let svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc.clone(), &k, b"v1", &c)
        .await
        .unwrap()
        .ciphertext;
    // Rekey drops version 1 from the cache: the next decrypts find it cold.
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    op.keys
        .re_key(pb::KeyRef { key_id: k.clone() })
        .await
        .unwrap();
    let before = eu.broker.status().root_calls;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut s, ct, c) = (svc.clone(), ct.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            decrypt(&mut s, &ct, &c).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), b"v1");
    }
    assert_eq!(
        eu.broker.status().root_calls - before,
        1,
        "16 concurrent cold decrypts must share one unwrap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn software_root_says_loudly_it_is_for_development() {
    let env = Env::new();
    let cfg = env.config_with_root("eu-central", "", sovkms::pki::DEV_SOFTWARE_ROOT);
    let settings = sovkms::config::Settings::load(&cfg).unwrap();
    let (_b, server) =
        sovkms::server::start(&settings, std::sync::Arc::new(sovkms::clock::SystemClock))
            .await
            .unwrap();
    let addr = server.local_addr.to_string();
    let c = sovkms::client::connect(&addr, &env.tls("eu-central/auditor-audit", "eu-central"))
        .await
        .unwrap();
    let info = c
        .broker
        .clone()
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.development_only);
    assert!(info.root_description.contains("DEVELOPMENT ONLY"));
    server.shutdown().await.unwrap();
}
