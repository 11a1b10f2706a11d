//! The cross-region matrix over real mTLS: every operation × caller × broker
//! gets the expected status code, and every refusal says why.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use sovkms::client::{self, Client};
use tonic::Code;

#[derive(Clone, Copy, Debug)]
enum Op {
    Encrypt,
    Decrypt,
    DataKey,
    DataKeyWrappedOnly,
    ReEncrypt,
    CreateKey,
    GetAttributes,
    Locate,
}

const OPS: [Op; 8] = [
    Op::Encrypt,
    Op::Decrypt,
    Op::DataKey,
    Op::DataKeyWrappedOnly,
    Op::ReEncrypt,
    Op::CreateKey,
    Op::GetAttributes,
    Op::Locate,
];

async fn call(c: &mut Client, op: Op, key_id: &str, ct: &[u8]) -> tonic::Result<()> {
    let context = ctx(&[("purpose", "matrix")]);
    match op {
        Op::Encrypt => encrypt(c, key_id, b"hello", &context).await.map(|_| ()),
        Op::Decrypt => decrypt(c, ct, &context).await.map(|_| ()),
        Op::DataKey => c
            .crypto
            .generate_data_key(pb::GenerateDataKeyRequest {
                key_id: key_id.into(),
                context,
            })
            .await
            .map(|_| ()),
        Op::DataKeyWrappedOnly => c
            .crypto
            .generate_data_key_without_plaintext(pb::GenerateDataKeyRequest {
                key_id: key_id.into(),
                context,
            })
            .await
            .map(|_| ()),
        Op::ReEncrypt => c
            .crypto
            .re_encrypt(pb::ReEncryptRequest {
                ciphertext: ct.to_vec(),
                source_context: context.clone(),
                destination_key_id: String::new(),
                destination_context: context,
            })
            .await
            .map(|_| ()),
        Op::CreateKey => c
            .keys
            .create(pb::CreateKeyRequest {
                name: "m".into(),
                activate: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        Op::GetAttributes => c
            .keys
            .get_attributes(pb::KeyRef {
                key_id: key_id.into(),
            })
            .await
            .map(|_| ()),
        Op::Locate => c
            .keys
            .locate(pb::LocateRequest::default())
            .await
            .map(|_| ()),
    }
}

const OK: Code = Code::Ok;
const PD: Code = Code::PermissionDenied;
const FP: Code = Code::FailedPrecondition;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_region_matrix() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let us = start_broker(&env, "us-east").await;

    let eu_key = create_key(
        &env,
        &eu,
        "eu-data",
        vec![
            grant(&spiffe("eu-central", "service", "app"), &ALL_OPS),
            grant(
                &spiffe("us-east", "service", "app"),
                &[
                    pb::Operation::Encrypt,
                    pb::Operation::GenerateDataKeyWithoutPlaintext,
                ],
            ),
            grant(
                &spiffe("central", "service", "app"),
                &[pb::Operation::Encrypt],
            ),
        ],
    )
    .await;
    let us_key = create_key(
        &env,
        &us,
        "us-data",
        vec![grant(&spiffe("us-east", "service", "app"), &ALL_OPS)],
    )
    .await;
    let context = ctx(&[("purpose", "matrix")]);
    let eu_ct = encrypt(
        &mut client(&env, "eu-central/service-app", &eu).await,
        &eu_key,
        b"eu secret",
        &context,
    )
    .await
    .unwrap()
    .ciphertext;
    let us_ct = encrypt(
        &mut client(&env, "us-east/service-app", &us).await,
        &us_key,
        b"us secret",
        &context,
    )
    .await
    .unwrap()
    .ciphertext;

    // Columns: Encrypt, Decrypt, DataKey, DataKeyWrappedOnly, ReEncrypt, CreateKey, GetAttributes, Locate
    // (an in-region service may Locate, and sees only the keys granted to it:
    // tests/first_hour.rs `keys_by_name`).
    let eu_rows: [(&str, [Code; 8]); 9] = [
        ("eu-central/service-app", [OK, OK, OK, OK, OK, PD, PD, OK]),
        (
            "eu-central/service-nogrant",
            [PD, PD, PD, PD, PD, PD, PD, OK],
        ),
        ("us-east/service-app", [OK, PD, PD, OK, PD, PD, PD, PD]),
        ("central/service-app", [OK, PD, PD, PD, PD, PD, PD, PD]),
        (
            "eu-central/operator-admin",
            [PD, PD, PD, PD, PD, OK, OK, OK],
        ),
        ("us-east/operator-admin", [PD, PD, PD, PD, PD, PD, PD, PD]),
        ("eu-central/auditor-audit", [PD, PD, PD, PD, PD, PD, OK, OK]),
        (
            "eu-central/forged-eu-service",
            [PD, PD, PD, PD, PD, PD, PD, PD],
        ),
        (
            "eu-central/nospiffe-service",
            [PD, PD, PD, PD, PD, PD, PD, PD],
        ),
    ];
    let us_rows: [(&str, [Code; 8]); 3] = [
        ("us-east/service-app", [OK, OK, OK, OK, OK, PD, PD, OK]),
        ("eu-central/service-app", [PD, PD, PD, PD, PD, PD, PD, PD]),
        ("central/service-app", [PD, PD, PD, PD, PD, PD, PD, PD]),
    ];
    let mut failures = Vec::new();
    for (broker, key, ct, rows) in [
        (&eu, &eu_key, &eu_ct, &eu_rows[..]),
        (&us, &us_key, &us_ct, &us_rows[..]),
    ] {
        for (who, expected) in rows {
            let mut c = client(&env, who, broker).await;
            for (op, want) in OPS.iter().zip(expected) {
                let r = call(&mut c, *op, key, ct).await;
                if code(&r) != *want {
                    failures.push(format!(
                        "{who} → {} broker: {op:?}: got {:?} ({:?}), want {want:?}",
                        broker.region,
                        code(&r),
                        r.err().map(|s| s.message().to_owned())
                    ));
                } else if let Err(s) = &r {
                    assert!(
                        !s.message().is_empty(),
                        "refusal without a reason: {who} {op:?}"
                    );
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "matrix mismatches:\n{}",
        failures.join("\n")
    );

    // eu-central ciphertext presented to the us-east broker: refused, both regions named.
    let mut us_app = client(&env, "us-east/service-app", &us).await;
    for op in [Op::Decrypt, Op::ReEncrypt] {
        let e = call(&mut us_app, op, &us_key, &eu_ct).await.unwrap_err();
        assert_eq!(e.code(), FP, "{op:?}");
        assert!(
            e.message().contains("eu-central") && e.message().contains("us-east"),
            "{}",
            e.message()
        );
    }

    // Reasons are precise.
    let mut us_at_eu = client(&env, "us-east/service-app", &eu).await;
    let e = decrypt(&mut us_at_eu, &eu_ct, &context).await.unwrap_err();
    // Refused before the ciphertext is parsed, so the sentence names the
    // broker's region, not a data region the broker has not read.
    assert_eq!(
        e.message(),
        "caller region us-east may not decrypt at the broker of region eu-central"
    );
    // An eu-central caller sending eu-central data to the us-east broker: the
    // sentence must not call the data us-east's.
    let mut eu_at_us = client(&env, "eu-central/service-app", &us).await;
    let e = decrypt(&mut eu_at_us, &eu_ct, &context).await.unwrap_err();
    assert_eq!(
        e.message(),
        "caller region eu-central may not decrypt at the broker of region us-east"
    );
    let mut forged = client(&env, "eu-central/forged-eu-service", &eu).await;
    let e = decrypt(&mut forged, &eu_ct, &context).await.unwrap_err();
    assert!(
        e.message()
            .contains("not issued by a CA trusted for region eu-central"),
        "{}",
        e.message()
    );
    let mut other_td = client(&env, "eu-central/otherdomain-service", &eu).await;
    let e = decrypt(&mut other_td, &eu_ct, &context).await.unwrap_err();
    assert_eq!(e.code(), PD);
    assert!(e.message().contains("trust domain"), "{}", e.message());

    // The key's home region is the broker's, as reported to the operator.
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    let m = op
        .keys
        .get_attributes(pb::KeyRef {
            key_id: eu_key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.home_region, "eu-central");

    // Grants that could never take effect are refused at grant time.
    let e = op
        .keys
        .set_grants(pb::SetGrantsRequest {
            key_id: eu_key.clone(),
            grants: vec![grant(
                &spiffe("us-east", "service", "app"),
                &[pb::Operation::Decrypt],
            )],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("can never take effect"),
        "{}",
        e.message()
    );
}

/// No client certificate, or one from an untrusted CA: the TLS handshake
/// fails, no request reaches a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_or_untrusted_certificate_is_refused_at_the_socket() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let eu_key = create_key(
        &env,
        &eu,
        "k",
        vec![grant(&spiffe("eu-central", "service", "app"), &ALL_OPS)],
    )
    .await;

    let mut anonymous = env.tls("eu-central/service-app", "eu-central");
    anonymous.cert_pem = None;
    anonymous.key_pem = None;
    let rogue = env.tls("eu-central/rogue-service", "eu-central");
    for (label, tls) in [("no certificate", anonymous), ("untrusted CA", rogue)] {
        let r = match client::connect(&eu.addr, &tls).await {
            Err(_) => continue, // refused during connect: fine
            Ok(mut c) => call(&mut c, Op::Encrypt, &eu_key, b"").await,
        };
        let e = r.expect_err(label);
        assert!(
            // The connection is torn down by the TLS alert; depending on timing the
            // client sees it as unavailable, unknown or cancelled: never a handler reply.
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{label}: expected a transport failure, got {:?} {}",
            e.code(),
            e.message()
        );
    }
    // The broker keeps serving others.
    let mut ok = client(&env, "eu-central/service-app", &eu).await;
    assert!(encrypt(&mut ok, &eu_key, b"x", &ctx(&[])).await.is_ok());
}

/// The regional client routes each ciphertext by the region in its header:
/// with brokers of two regions listed it sends an eu-central ciphertext to
/// eu-central and a us-east one to us-east; it fails over past a broker of
/// the region that is down; and a ciphertext of a region it has no broker
/// for is refused locally, with nothing sent (the broker counts no request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_regional_client_routes_by_region_fails_over_and_never_crosses() {
    use sovkms::client::{Endpoint, Regional, RegionalError};
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let us = start_broker(&env, "us-east").await;
    let ke = create_key(
        &env,
        &eu,
        "eu",
        vec![grant(&spiffe("eu-central", "service", "app"), &ALL_OPS)],
    )
    .await;
    let ku = create_key(
        &env,
        &us,
        "us",
        vec![grant(&spiffe("us-east", "service", "app"), &ALL_OPS)],
    )
    .await;
    // A broker of eu-central that is down (nothing listens there), listed first.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_addr = down.local_addr().unwrap().to_string();
    drop(down);
    let eu_tls = env.tls("eu-central/service-app", "eu-central");
    let both = Regional::new(vec![
        Endpoint::new("eu-central", &down_addr, eu_tls.clone()),
        Endpoint::new("eu-central", &eu.addr, eu_tls.clone()),
        Endpoint::new(
            "us-east",
            &us.addr,
            env.tls("us-east/service-app", "us-east"),
        ),
    ])
    .unwrap();
    let c = ctx(&[("record", "7")]);
    let ct_eu = both
        .encrypt("eu-central", &ke, b"eu data", c.clone())
        .await
        .unwrap();
    let ct_us = both
        .encrypt("us-east", &ku, b"us data", c.clone())
        .await
        .unwrap();
    assert_eq!(*both.decrypt(&ct_eu, c.clone()).await.unwrap(), b"eu data");
    assert_eq!(*both.decrypt(&ct_us, c.clone()).await.unwrap(), b"us data");
    assert_eq!(Regional::region_of(&ct_eu).unwrap().as_str(), "eu-central");

    // A client of us-east only: the eu-central ciphertext never leaves.
    let us_only = Regional::new(vec![Endpoint::new(
        "us-east",
        &us.addr,
        env.tls("us-east/service-app", "us-east"),
    )])
    .unwrap();
    let decrypts = |b: &TestBroker| {
        b.broker
            .metrics()
            .encode()
            .lines()
            .filter(|l| l.starts_with("sovkms_requests_total{operation=\"decrypt\""))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>()
    };
    let (eu_before, us_before) = (decrypts(&eu), decrypts(&us));
    match us_only.decrypt(&ct_eu, c.clone()).await {
        Err(RegionalError::NoEndpoint { region, known }) => {
            assert_eq!((region.as_str(), known.as_str()), ("eu-central", "us-east"));
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(
        (decrypts(&eu), decrypts(&us)),
        (eu_before, us_before),
        "a request left"
    );

    // Only the dead broker listed: UNAVAILABLE after the retries, named.
    let dead = Regional::new(vec![Endpoint::new("eu-central", &down_addr, eu_tls)]).unwrap();
    match dead.decrypt(&ct_eu, c).await {
        Err(RegionalError::Unavailable { region, tries, .. }) => {
            assert_eq!(region, "eu-central");
            assert_eq!(tries, 3);
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// Every refusal carries the broker's reason in a form the client types:
/// a caller acts on `Reason::Region` or `Reason::Grant`, not on a sentence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_their_reason_to_the_client() {
    use sovkms::client::{Reason, RemoteError};
    let env = Env::new();
    let (eu, mut svc, ct) = decrypting_region(&env).await;
    let reason = |r: Result<Vec<u8>, tonic::Status>| RemoteError::from(r.unwrap_err()).reason;
    let mut us = client(&env, "us-east/service-app", &eu).await;
    assert_eq!(
        reason(decrypt(&mut us, &ct, &ctx(&[])).await),
        Reason::Region
    );
    let mut op = client(&env, "eu-central/operator-admin", &eu).await;
    assert_eq!(reason(decrypt(&mut op, &ct, &ctx(&[])).await), Reason::Role);
    let mut nogrant = client(&env, "eu-central/service-nogrant", &eu).await;
    assert_eq!(
        reason(decrypt(&mut nogrant, &ct, &ctx(&[])).await),
        Reason::Grant
    );
    assert_eq!(
        reason(decrypt(&mut svc, &ct, &ctx(&[("x", "y")])).await),
        Reason::Invalid
    );
    let r = encrypt(
        &mut svc,
        "k-00000000000000000000000000000000",
        b"x",
        &ctx(&[]),
    )
    .await;
    assert_eq!(RemoteError::from(r.unwrap_err()).reason, Reason::NotFound);
    assert!(!Reason::Region.retryable() && Reason::AuditUnavailable.retryable());
    eu.stop().await;
}

/// The opt-in data-key cache shares a broker data key across messages up
/// to its limits, and each data key opens (in the region) to the
/// plaintext it handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_data_keys_respect_their_limits_and_open_in_the_region() {
    use sovkms::client::{CacheLimits, DataKeyCache, Endpoint, Regional};
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let key = create_key(&env, &eu, "dk", vec![grant(&app, &ALL_OPS)]).await;
    let regional = Regional::new(vec![Endpoint::new(
        "eu-central",
        &eu.addr,
        env.tls("eu-central/service-app", "eu-central"),
    )])
    .unwrap();
    let cache = DataKeyCache::new(CacheLimits {
        max_messages: 2,
        max_bytes: 1 << 20,
        max_age: std::time::Duration::from_secs(60),
        max_entries: 8,
    });
    let cx = ctx(&[("tenant", "t1")]);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            cache
                .data_key(&regional, "eu-central", &key, &cx, 100)
                .await
                .unwrap(),
        );
    }
    assert_eq!(got[0].wrapped, got[1].wrapped);
    assert_ne!(got[1].wrapped, got[2].wrapped);
    for dk in &got {
        let pt = regional.decrypt(&dk.wrapped, cx.clone()).await.unwrap();
        assert_eq!(&pt[..], dk.plaintext.expose_secret());
    }
    // Another context never shares a data key.
    let other = cache
        .data_key(
            &regional,
            "eu-central",
            &key,
            &ctx(&[("tenant", "t2")]),
            100,
        )
        .await
        .unwrap();
    assert!(got.iter().all(|g| g.wrapped != other.wrapped));
    eu.stop().await;
}
