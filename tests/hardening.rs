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
