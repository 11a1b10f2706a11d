//! Protocol surface: generic gRPC clients work (health, reflection v1 and
//! v1alpha), and only TLS 1.3 is offered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_v1_and_v1alpha() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let c = client(&env, "eu-central/auditor-audit", &eu).await;
    assert_eq!(serving(&c).await, Some(true));

    use tonic_reflection::pb::v1 as r1;
    let mut rc = r1::server_reflection_client::ServerReflectionClient::new(c.channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = rc
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        resp.message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = l.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "sovkms.v1.CryptoService",
        "sovkms.v1.KeyService",
        "sovkms.v1.BrokerService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    // The benchmark's echo ceiling is not part of a broker.
    assert!(
        names
            .iter()
            .all(|n| !n.contains("bench") && !n.contains("Echo")),
        "{names:?}"
    );
    let echo =
        sovkms::api::bench::proto::echo_service_client::EchoServiceClient::new(c.channel.clone())
            .echo(sovkms::api::bench::proto::EchoMessage { payload: vec![1] })
            .await
            .unwrap_err();
    assert_eq!(echo.code(), tonic::Code::Unimplemented);

    use tonic_reflection::pb::v1alpha as ra;
    let mut rc = ra::server_reflection_client::ServerReflectionClient::new(c.channel.clone());
    let req = ra::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            ra::server_reflection_request::MessageRequest::FileContainingSymbol(
                "sovkms.v1.CryptoService".into(),
            ),
        ),
    };
    let mut stream = rc
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(ra::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_refused() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let dir = env.pki.join("eu-central");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("service-app.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("service-app.key")).unwrap();
    let connect = |versions: &'static [&'static rustls::SupportedProtocolVersion]| {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .unwrap();
        let addr = eu.addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        }
    };
    static TLS12: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];
    static TLS13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    assert!(
        connect(&TLS12).await.is_err(),
        "TLS 1.2 handshake must fail"
    );
    let ok = connect(&TLS13).await.unwrap();
    assert_eq!(
        ok.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

/// Post-quantum key exchange: our client and the broker agree on the hybrid
/// X25519MLKEM768 group, and a client that offers only a classical group
/// still connects (with X25519).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_post_quantum_key_exchange_is_preferred_and_classical_still_works() {
    let env = Env::new();
    let eu = start_broker(&env, "eu-central").await;
    let mut c = client(&env, "eu-central/service-app", &eu).await;
    let info = c
        .broker
        .get_info(sovkms::api::proto::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.tls_key_exchange, "X25519MLKEM768");

    let dir = env.pki.join("eu-central");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.pem")).unwrap())
        .unwrap();
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("service-app.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("service-app.key")).unwrap();
    let mut classical = rustls::crypto::aws_lc_rs::default_provider();
    classical.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(classical))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(eu.addr.clone())
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref()
            .1
            .negotiated_key_exchange_group()
            .map(|g| g.name()),
        Some(rustls::NamedGroup::X25519)
    );
}

/// A client certificate its CA's CRL lists (`[tls] crls`) is refused at the
/// handshake, on gRPC and on KMIP; other certificates of the same CA work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_is_refused_at_the_handshake() {
    let env = Env::new();
    env.issue(
        "eu-central",
        "eu-central",
        sovkms::pki::Kind::Caller(sovkms::region::Role::Service),
        "app",
        "service-stolen",
    );
    let stolen = std::fs::read_to_string(env.pki.join("eu-central/service-stolen.pem")).unwrap();
    let (ca, ca_key) = env.ca("eu-central");
    let crl = sovkms::pki::crl(&ca, &ca_key, &[&stolen], 7).unwrap();
    let crl_path = env.dir.path().join("eu-central.crl.pem");
    std::fs::write(&crl_path, crl).unwrap();
    let cfg = env.config_with_tail("eu-central", "\n[kmip]\nlisten = \"127.0.0.1:0\"\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        "[tls]\n",
        &format!("[tls]\ncrls = [\"{}\"]\n", crl_path.display()),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let b = start_broker_from(&env, "eu-central", &cfg).await;
    // Same identity, another (unrevoked) certificate: served.
    let mut ok = client(&env, "eu-central/service-app", &b).await;
    assert!(ok
        .broker
        .get_info(sovkms::api::proto::GetInfoRequest {})
        .await
        .is_ok());
    // The revoked one: no connection.
    let stolen_tls = env.tls("eu-central/service-stolen", "eu-central");
    match sovkms::client::connect(&b.addr, &stolen_tls).await {
        Err(_) => {}
        Ok(mut c) => {
            let r = c
                .broker
                .get_info(sovkms::api::proto::GetInfoRequest {})
                .await;
            assert!(r.is_err(), "a revoked certificate was served: {r:?}");
        }
    }
    let kmip = b.server.kmip_addr.unwrap().to_string();
    let cfg = sovkms::kmip::client::client_config(&stolen_tls, false).unwrap();
    let refused = match sovkms::kmip::client::KmipClient::connect(&kmip, cfg, "localhost").await {
        Err(_) => true,
        Ok(mut c) => c.send_raw(&[0x42, 0, 0x78, 1, 0, 0, 0, 0]).await.is_err(),
    };
    assert!(refused, "a revoked certificate reached the KMIP listener");
    b.server.shutdown().await.unwrap();
}

/// Certificates without downtime: the broker's certificate rotated and a
/// CRL added while requests run (none fails, the open connection goes on,
/// new handshakes see the new certificate and refuse the revoked client);
/// a file that does not load leaves the ones in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_reload_without_dropping_connections() {
    let env = Env::new();
    env.issue(
        "eu-central",
        "eu-central",
        sovkms::pki::Kind::Caller(sovkms::region::Role::Service),
        "app",
        "service-stolen",
    );
    let cfg = env.config("eu-central", "");
    let b = start_broker_from(&env, "eu-central", &cfg).await;
    let mut settings = sovkms::config::Settings::load(&cfg).unwrap();
    // Load on one connection, across both reloads.
    let mut svc = client(&env, "eu-central/service-app", &b).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, mut svc2) = (Arc::clone(&stop), svc.clone());
    let load = tokio::spawn(async move {
        let (mut ok, mut failed) = (0u32, 0u32);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            match svc2
                .broker
                .get_info(sovkms::api::proto::GetInfoRequest {})
                .await
            {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
            // A call that fails at once must not starve the runtime (a
            // failing test would hang instead of reporting).
            tokio::task::yield_now().await;
        }
        (ok, failed)
    });
    let stolen_tls = env.tls("eu-central/service-stolen", "eu-central");
    let mut stolen = sovkms::client::connect(&b.addr, &stolen_tls).await.unwrap();
    assert!(stolen
        .broker
        .get_info(sovkms::api::proto::GetInfoRequest {})
        .await
        .is_ok());
    // A new broker certificate (new key, same names) and a CRL.
    let (ca, ca_key) = env.ca("eu-central");
    let fresh = fresh_broker_cert(&env);
    std::fs::write(&settings.tls.cert, &fresh.cert_pem).unwrap();
    std::fs::write(&settings.tls.key, fresh.key_pem.as_bytes()).unwrap();
    let stolen_pem =
        std::fs::read_to_string(env.pki.join("eu-central/service-stolen.pem")).unwrap();
    let crl_path = env.dir.path().join("crl.pem");
    std::fs::write(
        &crl_path,
        sovkms::pki::crl(&ca, &ca_key, &[&stolen_pem], 7).unwrap(),
    )
    .unwrap();
    settings.tls.crls = vec![crl_path];
    b.server.reload_tls(&settings.tls).unwrap();
    // New handshakes: the new certificate, the revoked client refused.
    let seen = server_cert(&env, &b.addr).await;
    assert_eq!(seen, pem_der(&fresh.cert_pem));
    match sovkms::client::connect(&b.addr, &stolen_tls).await {
        Err(_) => {}
        Ok(mut c) => assert!(c
            .broker
            .get_info(sovkms::api::proto::GetInfoRequest {})
            .await
            .is_err()),
    }
    // The refusal is counted, by the alert it amounts to (the server's
    // handshake task may finish just after the client has its answer, and
    // the client's channel may try more than once).
    let counted =
        "sovkms_tls_handshake_failures_total{listener=\"grpc\",alert=\"certificate_revoked\"} ";
    let mut m = String::new();
    for _ in 0..250 {
        m = b.broker.metrics().encode();
        if m.contains(counted) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let seen: Vec<&str> = m.lines().filter(|l| l.contains("handshake")).collect();
    assert!(m.contains(counted), "{seen:#?}");
    // A broken file: refused, the files in force stay.
    std::fs::write(&settings.tls.cert, "not a certificate").unwrap();
    assert!(b.server.reload_tls(&settings.tls).is_err());
    assert_eq!(server_cert(&env, &b.addr).await, pem_der(&fresh.cert_pem));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        ok > 0 && failed == 0,
        "{ok} served, {failed} failed across the reloads"
    );
    assert!(svc
        .broker
        .get_info(sovkms::api::proto::GetInfoRequest {})
        .await
        .is_ok());
    b.server.shutdown().await.unwrap();
}

/// A new certificate and key for the eu-central broker (same names).
fn fresh_broker_cert(env: &Env) -> sovkms::pki::Issued {
    let (ca, ca_key) = env.ca("eu-central");
    sovkms::pki::issue(
        &ca,
        &ca_key,
        TD,
        &region("eu-central"),
        sovkms::pki::Kind::Broker,
        "broker",
        &["localhost".to_string()],
        2,
    )
    .unwrap()
}

fn pem_der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// The certificate the broker presents to a new handshake.
async fn server_cert(env: &Env, addr: &str) -> Vec<u8> {
    let tls = env.tls("eu-central/service-app", "eu-central");
    let cfg = sovkms::kmip::client::client_config(&tls, false).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The value of one series in a Prometheus text exposition (0 if absent).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// A scripted mix of requests, then a scrape of the admin listener: the
/// request counters say exactly what was done, by operation, outcome and
/// code; refusals by reason; and no key id or principal appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_done() {
    use sovkms::api::proto as pb;
    let env = Env::new();
    let cfg = env.config_with_tail("eu-central", "\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let admin = eu.server.admin_addr.unwrap().to_string();
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(&env, &eu, "metered", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(&env, "eu-central/service-app", &eu).await;
    let mut us = client(&env, "us-east/service-app", &eu).await;
    let c = ctx(&[("tenant", "42")]);
    let mut ct = Vec::new();
    for i in 0..3u8 {
        ct = encrypt(&mut svc, &k, &[i; 8], &c).await.unwrap().ciphertext;
    }
    for _ in 0..2 {
        decrypt(&mut svc, &ct, &c).await.unwrap();
    }
    let e = decrypt(&mut us, &ct, &c).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = decrypt(&mut svc, b"not a ciphertext", &c)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = svc
        .keys
        .create(pb::CreateKeyRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    let (status, text) = http_get(&admin, "/metrics").await;
    assert_eq!(status, 200);
    let req = |op: &str, outcome: &str, code: &str| {
        series(
            &text,
            &format!("sovkms_requests_total{{operation=\"{op}\",outcome=\"{outcome}\",code=\"{code}\",protocol=\"\"}}"),
        )
    };
    assert_eq!(req("create-key", "allowed", "OK"), 1.0, "{text}");
    assert_eq!(req("encrypt", "allowed", "OK"), 3.0);
    assert_eq!(req("decrypt", "allowed", "OK"), 2.0);
    assert_eq!(req("decrypt", "refused", "PERMISSION_DENIED"), 1.0);
    assert_eq!(req("decrypt", "refused", "INVALID_ARGUMENT"), 1.0);
    assert_eq!(req("create-key", "refused", "PERMISSION_DENIED"), 1.0);
    assert_eq!(
        series(&text, "sovkms_refusals_total{reason=\"region\"}"),
        1.0
    );
    assert_eq!(
        series(&text, "sovkms_refusals_total{reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(series(&text, "sovkms_refusals_total{reason=\"role\"}"), 1.0);
    assert_eq!(
        series(
            &text,
            "sovkms_request_duration_seconds_count{operation=\"decrypt\"}"
        ),
        4.0
    );
    // One version material unwrapped once, then served from memory.
    assert!(
        series(
            &text,
            "sovkms_root_calls_total{call=\"unwrap\",result=\"ok\"}"
        ) >= 1.0
    );
    assert!(
        series(&text, "sovkms_kek_cache_hits_total") >= 4.0,
        "{text}"
    );
    assert!(series(&text, "sovkms_audit_sync_duration_seconds_count") >= 3.0);
    assert!(
        series(
            &text,
            "sovkms_store_calls_total{call=\"insert\",result=\"ok\"}"
        ) >= 1.0
    );
    // svc and us (create_key's operator connection has closed).
    assert_eq!(
        series(
            &text,
            "sovkms_open_connections{listener=\"grpc\",event=\"open\"}"
        ),
        2.0
    );
    assert_eq!(series(&text, "sovkms_ready"), 1.0);
    assert!(text.contains("region=\"eu-central\""));
    assert!(!text.contains(&k), "a key id is a label value");
    assert!(!text.contains("spiffe://"), "a principal is a label value");

    assert_eq!(http_get(&admin, "/livez").await, (200, "live\n".into()));
    assert_eq!(http_get(&admin, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(&admin, "/nope").await.0, 404);
}

/// `--log-format json` at debug level: every line is one JSON object, each
/// request has a line with its request id, caller, operation and outcome,
/// and no secret appears in any form (plaintext, data key, HSM PIN,
/// context value; raw, hex or base64).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_each_request_and_never_a_secret() {
    use base64::Engine;
    use sovkms::api::proto as pb;
    let env = Env::new();
    let token = new_token(env.dir.path(), "eu-central");
    let cfg = env.config_with_root("eu-central", "", &token.root_toml);
    let log = env.dir.path().join("broker.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sovkms"));
    cmd.args(["serve", "--config"])
        .arg(&cfg)
        .env("SOVKMS_LOG", "debug")
        .env("SOVKMS_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut p = started(cmd);
    let addr = p.addr.clone();
    let mut op = connect_ready(&env, "eu-central/operator-admin", "eu-central", &addr).await;
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &addr).await;
    let mut us = connect_ready(&env, "us-east/service-app", "eu-central", &addr).await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key_as(&mut op, "logged", vec![grant(&app, &ALL_OPS)]).await;
    let secret = b"TOP-SECRET-PLAINTEXT-4711";
    let c = ctx(&[("patient", "patient-4712-context-value")]);
    let ct = encrypt(&mut svc, &k, secret, &c).await.unwrap().ciphertext;
    assert_eq!(decrypt(&mut svc, &ct, &c).await.unwrap(), secret);
    let dk = svc
        .crypto
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id: k.clone(),
            context: c.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    decrypt(&mut us, &ct, &c).await.unwrap_err();
    stop(&mut p);

    let text = std::fs::read_to_string(&log).unwrap();
    let pin = std::fs::read_to_string(&token.pin_file).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut secrets = vec![
        String::from_utf8(secret.to_vec()).unwrap(),
        "patient-4712-context-value".to_owned(),
        pin.trim().to_owned(),
    ];
    for bytes in [&secret[..], &dk.plaintext_key[..], pin.trim().as_bytes()] {
        secrets.push(hex::encode(bytes));
        secrets.push(b64.encode(bytes));
    }
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret is in the log: {s}");
    }
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = |op: &str, outcome: &str| {
        lines
            .iter()
            .find(|l| l["operation"] == op && l["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {op} {outcome} line in\n{text}"))
    };
    let d = request("decrypt", "allowed");
    assert_eq!(d["caller"], app.as_str());
    assert_eq!(d["request_id"].as_str().unwrap().len(), 24, "{d}");
    let r = request("decrypt", "refused");
    assert_eq!(r["level"], "INFO");
    assert!(r["reason"].as_str().unwrap().contains("us-east"), "{r}");
    request("generate-data-key", "allowed");
}

/// GET over mTLS as `who`: the status code (None: the handshake or the
/// connection failed).
async fn https_get(env: &Env, who: &str, addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg =
        (*sovkms::kmip::client::client_config(&env.tls(who, "eu-central"), false).ok()?).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", addr.port()))
        .await
        .ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut text = String::new();
    tls.read_to_string(&mut text).await.ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

/// Off loopback the admin listener is TLS, and its metrics are for the
/// region's operators and auditors only: not its services, not another
/// region's operators or the central plane, not a caller without a
/// certificate; those see only whether the broker is ready (a kubelet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_off_loopback_is_for_the_regions_operators_and_auditors() {
    let env = Env::new();
    let cfg = env.config_with_tail("eu-central", "\n[admin]\nlisten = \"0.0.0.0:0\"\n");
    let eu = start_broker_from(&env, "eu-central", &cfg).await;
    let admin = eu.server.admin_addr.unwrap();
    assert_eq!(
        https_get(&env, "eu-central/operator-admin", admin, "/metrics").await,
        Some(200)
    );
    assert_eq!(
        https_get(&env, "eu-central/auditor-audit", admin, "/readyz").await,
        Some(200)
    );
    assert_eq!(
        https_get(&env, "eu-central/service-app", admin, "/metrics").await,
        Some(403)
    );
    assert_eq!(
        https_get(&env, "us-east/operator-admin", admin, "/metrics").await,
        Some(403)
    );
    assert_eq!(
        https_get(&env, "central/service-app", admin, "/metrics").await,
        Some(403)
    );
    // Plain HTTP gets no answer at all.
    let plain = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        http_get_status(&format!("127.0.0.1:{}", admin.port())),
    )
    .await
    .unwrap();
    assert_eq!(plain, None);
}

/// Plain HTTP against a TLS listener: the status, if any answer parses.
async fn http_get_status(addr: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = Vec::new();
    let _ = s.read_to_end(&mut text).await;
    String::from_utf8_lossy(&text)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// A rotated certificate is picked up without a signal: the broker sees
/// its files change and new handshakes get the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_seen_without_a_signal() {
    let env = Env::new();
    let cfg = env.config("eu-central", "");
    let settings = sovkms::config::Settings::load(&cfg).unwrap();
    let mut p = spawn_broker(&cfg, &[]);
    let mut svc = connect_ready(&env, "eu-central/service-app", "eu-central", &p.addr).await;
    let fresh = fresh_broker_cert(&env);
    // Key first, then certificate: the half-written state is refused and
    // the files in force stay until the pair matches.
    std::fs::write(&settings.tls.key, fresh.key_pem.as_bytes()).unwrap();
    std::fs::write(&settings.tls.cert, &fresh.cert_pem).unwrap();
    let start = std::time::Instant::now();
    while server_cert(&env, &p.addr).await != pem_der(&fresh.cert_pem) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "the new certificate was never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The connection opened before goes on.
    assert!(svc
        .broker
        .get_info(sovkms::api::proto::GetInfoRequest {})
        .await
        .is_ok());
    stop(&mut p);
}
