//! Break-glass: quorum of other operators, expiry, revocation, no
//! self-approval, never outside the region, never plaintext to operators;
//! every step in the audit chain.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use sovkms::pki::Kind;
use sovkms::region::Role;
use tonic::Code;

fn ask(principal: &str, key: &str, ops: &[pb::Operation], minutes: u32) -> pb::BreakGlassRequest {
    pb::BreakGlassRequest {
        principal: principal.into(),
        key_id: key.into(),
        operations: ops.iter().map(|o| *o as i32).collect(),
        reason: "incident 4711: restore patient records".into(),
        duration_minutes: minutes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_expiry_revocation_and_limits() {
    let env = Env::new();
    for n in ["o2", "o3"] {
        env.issue(
            "eu-central",
            "eu-central",
            Kind::Caller(Role::Operator),
            n,
            &format!("operator-{n}"),
        );
    }
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    // The key grants the service encrypt only.
    let k = create_key(
        &env,
        &eu,
        "bg",
        vec![grant(&app, &[pb::Operation::Encrypt])],
    )
    .await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"emergency", &c)
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(
        code(&decrypt(&mut svc, &ct, &c).await),
        Code::PermissionDenied
    );

    let mut o1 = client(&env, "eu-central/operator-admin", &eu).await;
    let mut o2 = client(&env, "eu-central/operator-o2", &eu).await;
    let mut o3 = client(&env, "eu-central/operator-o3", &eu).await;

    // Limits: never outside the region, never an operator or a wildcard, bounded duration.
    for (p, why) in [
        (
            spiffe("us-east", "service", "app"),
            "never crosses the region rule",
        ),
        (
            spiffe("central", "service", "app"),
            "never crosses the region rule",
        ),
        (
            spiffe("eu-central", "operator", "o2"),
            "exactly one service",
        ),
        (
            format!("spiffe://{TD}/region/eu-central/service/*"),
            "exactly one service",
        ),
    ] {
        let e = o1
            .break_glass
            .request(ask(&p, &k, &[pb::Operation::Decrypt], 10))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{p}");
        assert!(e.message().contains(why), "{p}: {}", e.message());
    }
    let e = o1
        .break_glass
        .request(ask(&app, &k, &[pb::Operation::Decrypt], 61))
        .await
        .unwrap_err();
    assert!(e.message().contains("1 to 60 minutes"), "{}", e.message());
    let mut svc_req = client(&env, "eu-central/service-app", &eu).await;
    assert_eq!(
        code(
            &svc_req
                .break_glass
                .request(ask(&app, &k, &[pb::Operation::Decrypt], 10))
                .await
        ),
        Code::PermissionDenied
    );
    let mut us_op = client(&env, "us-east/operator-admin", &eu).await;
    assert_eq!(
        code(
            &us_op
                .break_glass
                .request(ask(&app, &k, &[pb::Operation::Decrypt], 10))
                .await
        ),
        Code::PermissionDenied
    );

    // Request; the requester cannot approve; one approval is not a quorum.
    let g = o1
        .break_glass
        .request(ask(&app, &k, &[pb::Operation::Decrypt], 30))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((g.state.as_str(), g.quorum), ("pending", 2));
    let e = o1
        .break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("cannot approve"), "{}", e.message());
    let g1 = o2
        .break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g1.state, "pending");
    assert_eq!(
        code(
            &o2.break_glass
                .approve(pb::BreakGlassRef { id: g.id.clone() })
                .await
        ),
        Code::FailedPrecondition,
        "same approver twice"
    );
    assert_eq!(
        code(&decrypt(&mut svc, &ct, &c).await),
        Code::PermissionDenied,
        "not active before quorum"
    );
    let g2 = o3
        .break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g2.state, "active");

    // Active: the service may decrypt; others still may not; operators never get plaintext.
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), b"emergency");
    let mut nogrant = client(&env, "eu-central/service-nogrant", &eu).await;
    assert_eq!(
        code(&decrypt(&mut nogrant, &ct, &c).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(&decrypt(&mut o1, &ct, &c).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            &svc.crypto
                .re_encrypt(pb::ReEncryptRequest {
                    ciphertext: ct.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied,
        "only the granted operations"
    );

    // It expires by itself.
    eu.clock.advance(30 * 60 + 1);
    assert_eq!(
        code(&decrypt(&mut svc, &ct, &c).await),
        Code::PermissionDenied,
        "expired"
    );
    let list = o1
        .break_glass
        .list(pb::ListBreakGlassRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.grants[0].state, "expired");

    // A second grant, revoked while active.
    let g = o1
        .break_glass
        .request(ask(&app, &k, &[pb::Operation::Decrypt], 30))
        .await
        .unwrap()
        .into_inner();
    o2.break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap();
    o3.break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap();
    assert!(decrypt(&mut svc, &ct, &c).await.is_ok());
    let r = o2
        .break_glass
        .revoke(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "revoked");
    assert_eq!(
        code(&decrypt(&mut svc, &ct, &c).await),
        Code::PermissionDenied,
        "revoked"
    );

    // A pending request lapses if no quorum comes in time.
    let g = o1
        .break_glass
        .request(ask(&app, &k, &[pb::Operation::Decrypt], 30))
        .await
        .unwrap()
        .into_inner();
    eu.clock.advance(61 * 60);
    assert_eq!(
        code(
            &o2.break_glass
                .approve(pb::BreakGlassRef { id: g.id.clone() })
                .await
        ),
        Code::FailedPrecondition
    );

    // Every step is in the audit chain; decrypts under break-glass say so.
    let path = eu.audit_path.clone();
    let pk = signing_key(&mut svc).await;
    eu.stop().await;
    let recs = read_records(&path);
    for op in [
        "request-break-glass",
        "approve-break-glass",
        "revoke-break-glass",
    ] {
        assert!(
            recs.iter()
                .any(|r| r.operation == op && r.outcome == "allowed"),
            "{op} not audited"
        );
    }
    assert!(recs.iter().any(|r| r.operation == "approve-break-glass"
        && r.outcome == "refused"
        && r.reason.contains("cannot approve")));
    // The records say what was asked and approved, not only that it was.
    assert!(recs.iter().any(|r| r.operation == "request-break-glass"
        && r.outcome == "allowed"
        && r.reason.contains("asks spiffe://")
        && r.reason.contains("minutes")));
    assert!(recs.iter().any(|r| r.operation == "approve-break-glass"
        && r.outcome == "allowed"
        && r.reason.contains("approval 1 of")));
    let via: Vec<_> = recs
        .iter()
        .filter(|r| r.operation == "decrypt" && r.reason.contains("break-glass grant bg-"))
        .collect();
    assert_eq!(via.len(), 2);
    sovkms::audit::verify(
        std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
        &pk,
        true,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_survive_a_restart() {
    let env = Env::new();
    env.issue(
        "eu-central",
        "eu-central",
        Kind::Caller(Role::Operator),
        "o2",
        "operator-o2",
    );
    let cfg = env.config_with_tail(
        "eu-central",
        "\n[break_glass]\nquorum = 1\nmax_duration_minutes = 120\n",
    );
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(
        &env,
        &eu,
        "bg",
        vec![grant(&app, &[pb::Operation::Encrypt])],
    )
    .await;
    let mut o1 = client(&env, "eu-central/operator-admin", &eu).await;
    let mut o2 = client(&env, "eu-central/operator-o2", &eu).await;
    let g = o1
        .break_glass
        .request(ask(&app, &k, &[pb::Operation::Decrypt], 90))
        .await
        .unwrap()
        .into_inner();
    let a = o2
        .break_glass
        .approve(pb::BreakGlassRef { id: g.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.state, "active", "quorum 1");
    eu.stop().await;
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let c = ctx(&[]);
    let ct = encrypt(&mut svc, &k, b"x", &c).await.unwrap().ciphertext;
    assert!(
        decrypt(&mut svc, &ct, &c).await.is_ok(),
        "active grant must survive a restart"
    );
    eu.stop().await;
}
