//! Hardening against callers and insiders (issue: audit anchor, limits,
//! certificate lifetime), each against a real broker over mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::pki::{self, Kind};
use sovkms::region::Role;
use std::time::{Duration, Instant};
use tonic::Code;

/// A connection opened with a certificate that then expires is refused
/// from that moment, although the TLS session lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_stops_working_on_an_open_connection() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let app = spiffe("eu-central", "service", "brief");
    let k = create_key(&env, &eu, "k", vec![grant(&app, &ALL_OPS)]).await;
    let dir = env.pki.join("eu-central");
    let issued = pki::issue_for(
        &std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(dir.join("ca.key")).unwrap(),
        TD,
        &region("eu-central"),
        Kind::Caller(Role::Service),
        "brief",
        &[],
        Duration::from_secs(3),
    )
    .unwrap();
    pki::write(&dir, "service-brief", &issued).unwrap();
    let issued_at = Instant::now();
    let mut c = client(&env, "eu-central/service-brief", &eu).await;
    assert!(encrypt(&mut c, &k, b"x", &ctx(&[])).await.is_ok());
    // Let the certificate's lifetime pass on the same connection.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(issued_at.elapsed())).await;
    let e = encrypt(&mut c, &k, b"x", &ctx(&[])).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("expired"), "{}", e.message());
}

/// The differencing attack on aggregates: two windows that differ by one
/// millisecond (or a day still being written) would isolate one record
/// below the minimum group size. Only whole past UTC days are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_cannot_be_differenced_down_to_one_record() {
    use sovkms::api::proto as pb;
    let env = Env::new();
    let tail = format!(
        "\n[audit]\naggregate_min_group = 5\naggregate_readers = [\"{}\"]\n",
        spiffe("central", "service", "app")
    );
    let cfg = env.config_with_tail("eu-central", &tail);
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "agg", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let ct = encrypt(&mut svc, &k, b"x", &ctx(&[]))
        .await
        .unwrap()
        .ciphertext;
    for _ in 0..6 {
        decrypt(&mut svc, &ct, &ctx(&[])).await.unwrap();
    }
    let mut central = client(&env, "central/service-app", &eu).await;
    let now_ms = u64::try_from(eu.clock.now_unix_for_tests()).unwrap() * 1000;
    let day = 86_400_000;
    let midnight = now_ms / day * day;
    for (from, to) in [
        (midnight, now_ms),     // today, to the millisecond
        (midnight, now_ms + 1), // the neighbouring window
        (midnight - day, midnight + 1),
        (midnight - day + 1, midnight),
        (midnight, midnight + day), // a day not over yet
    ] {
        let e = central
            .audit
            .get_aggregates(pb::AggregatesRequest {
                from_unix_ms: from,
                to_unix_ms: to,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{from}..{to}");
        assert!(
            e.message().contains("whole past UTC days"),
            "{}",
            e.message()
        );
    }
    // Once the day is over, its counts are answered as one cell.
    eu.clock.advance(86_400);
    let agg = central
        .audit
        .get_aggregates(pb::AggregatesRequest {
            from_unix_ms: midnight,
            to_unix_ms: midnight + day,
        })
        .await
        .unwrap()
        .into_inner();
    let dec = agg
        .cells
        .iter()
        .find(|c| c.operation == "decrypt" && c.outcome == "allowed")
        .unwrap();
    assert_eq!(dec.count, 6);
}
