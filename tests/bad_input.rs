//! Malformed requests and ciphertexts get the right status code and a clear
//! message, never a panic, and the broker keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_ciphertexts_and_requests() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "k", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[("a", "b")]);
    let ct = encrypt(&mut svc, &k, b"attack at dawn", &c)
        .await
        .unwrap()
        .ciphertext;
    let header_len = ct.len() - (14 + 16);

    let expect = |r: &Result<Vec<u8>, tonic::Status>, want: Code, needle: &str, what: &str| {
        let e = r.as_ref().expect_err(what);
        assert_eq!(e.code(), want, "{what}: {}", e.message());
        assert!(
            e.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            e.message()
        );
    };

    // Every single-bit flip anywhere is refused; none decrypts.
    for i in 0..ct.len() {
        let mut bad = ct.clone();
        bad[i] ^= 0x01;
        let r = decrypt(&mut svc, &bad, &c).await;
        let got = code(&r);
        assert!(
            matches!(
                got,
                Code::InvalidArgument | Code::FailedPrecondition | Code::NotFound
            ),
            "flip at byte {i}: {got:?}"
        );
    }
    let mut tag = ct.clone();
    *tag.last_mut().unwrap() ^= 0x80;
    expect(
        &decrypt(&mut svc, &tag, &c).await,
        Code::InvalidArgument,
        "failed authentication",
        "tampered tag",
    );
    let mut body = ct.clone();
    body[header_len] ^= 0x80;
    expect(
        &decrypt(&mut svc, &body, &c).await,
        Code::InvalidArgument,
        "failed authentication",
        "tampered body",
    );
    expect(
        &decrypt(&mut svc, &ct, &ctx(&[("a", "c")])).await,
        Code::InvalidArgument,
        "encryption context",
        "wrong context",
    );
    expect(
        &decrypt(&mut svc, &ct, &ctx(&[])).await,
        Code::InvalidArgument,
        "encryption context",
        "missing context",
    );

    // Truncated at every length.
    for n in 0..ct.len() {
        let r = decrypt(&mut svc, &ct[..n], &c).await;
        assert_eq!(code(&r), Code::InvalidArgument, "truncated to {n}");
    }
    expect(
        &decrypt(&mut svc, &[], &c).await,
        Code::InvalidArgument,
        "empty",
        "empty",
    );
    let mut v = ct.clone();
    v[4] = 2;
    expect(
        &decrypt(&mut svc, &v, &c).await,
        Code::InvalidArgument,
        "unsupported ciphertext format version 2",
        "version",
    );
    let mut a = ct.clone();
    a[5] = 9;
    expect(
        &decrypt(&mut svc, &a, &c).await,
        Code::InvalidArgument,
        "algorithm id 9",
        "algorithm",
    );
    let mut t = ct.clone();
    t.extend_from_slice(b"xx");
    expect(
        &decrypt(&mut svc, &t, &c).await,
        Code::InvalidArgument,
        "2 trailing bytes",
        "trailing",
    );
    expect(
        &decrypt(&mut svc, b"not a ciphertext at all", &c).await,
        Code::InvalidArgument,
        "bad magic",
        "magic",
    );

    // Request fields.
    let big = vec![0u8; 64 * 1024 + 1];
    let e = encrypt(&mut svc, &k, &big, &c).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("at most 65536"), "{}", e.message());
    for bad_id in ["", "a b", "../etc", &"x".repeat(65)] {
        let e = encrypt(&mut svc, bad_id, b"x", &c).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::InvalidArgument,
            "{bad_id:?}: {}",
            e.message()
        );
        assert!(e.message().contains("key_id"), "{}", e.message());
    }
    let e = encrypt(&mut svc, "k-doesnotexist", b"x", &c)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("k-doesnotexist"));
    let huge_ctx: std::collections::HashMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    assert_eq!(
        code(&encrypt(&mut svc, &k, b"x", &huge_ctx).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&encrypt(&mut svc, &k, b"x", &ctx(&[("", "v")])).await),
        Code::InvalidArgument
    );

    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let bad_grants = [
        pb::Grant {
            principal: "not-a-uri".into(),
            operations: vec![pb::Operation::Encrypt as i32],
        },
        pb::Grant {
            principal: app.clone(),
            operations: vec![99],
        },
        pb::Grant {
            principal: app.clone(),
            operations: vec![],
        },
        pb::Grant {
            principal: spiffe("eu-central", "operator", "x"),
            operations: vec![pb::Operation::Encrypt as i32],
        },
    ];
    for g in bad_grants {
        let r = op
            .keys
            .create(pb::CreateKeyRequest {
                name: "x".into(),
                grants: vec![g.clone()],
                ..Default::default()
            })
            .await;
        assert_eq!(code(&r), Code::InvalidArgument, "{g:?}");
    }
    assert_eq!(
        code(&op.keys.create(pb::CreateKeyRequest::default()).await),
        Code::InvalidArgument,
        "empty name"
    );
    let r = op
        .keys
        .revoke(pb::RevokeRequest {
            key_id: k.clone(),
            reason: 77,
            message: String::new(),
        })
        .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r = op
        .keys
        .locate(pb::LocateRequest {
            state: 42,
            ..Default::default()
        })
        .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r = op
        .keys
        .destroy(pb::DestroyRequest {
            key_id: k.clone(),
            pending_window_days: 5000,
        })
        .await;
    assert_eq!(code(&r), Code::InvalidArgument);

    // Still serving, and the key still works.
    assert_eq!(serving(&svc).await, Some(true));
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"attack at dawn");
}
