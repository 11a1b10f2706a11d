//! Several brokers of one region over one PostgreSQL (a throwaway cluster
//! these tests start: initdb, a free port, stopped at the end). Brokers
//! run as separate processes on one SoftHSM2 token, as a region's brokers
//! share its HSM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use sovkms::api::proto as pb;
use sovkms::store::cluster::ThrowawayCluster;
use std::time::{Duration, Instant};
use tonic::Code;

const R: &str = "eu-central";

struct Region {
    env: Env,
    db: ThrowawayCluster,
    token: Token,
}

fn region_over_postgres() -> Region {
    let env = Env::new();
    let db = pg_cluster();
    let token = new_token(env.dir.path(), R);
    Region { env, db, token }
}

impl Region {
    fn broker(&self, name: &str, store_extra: &str) -> Proc {
        self.broker_with(name, store_extra, "")
    }

    fn broker_with(&self, name: &str, store_extra: &str, tables: &str) -> Proc {
        let tail = pg_store_toml(&self.db, store_extra) + tables;
        spawn_broker(
            &config_shared(&self.env, R, name, &self.token.root_toml, &tail),
            &[],
        )
    }

    async fn client(&self, who: &str, p: &Proc) -> sovkms::client::Client {
        connect_ready(&self.env, &format!("{R}/{who}"), R, &p.addr).await
    }
}

/// A key granted to `service-app` (named `name`), created by an operator
/// at `op_at`; the operator's client, the service's client at `svc_at`,
/// the key's id and a ciphertext of "kept" under no context.
async fn kept_at(
    reg: &Region,
    op_at: &Proc,
    svc_at: &Proc,
    name: &str,
) -> (
    sovkms::client::Client,
    sovkms::client::Client,
    String,
    Vec<u8>,
) {
    let app = spiffe(R, "service", "app");
    let mut op = reg.client("operator-admin", op_at).await;
    let key = create_key_as(&mut op, name, vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = reg.client("service-app", svc_at).await;
    let ct = encrypt(&mut svc, &key, b"kept", &ctx(&[]))
        .await
        .unwrap()
        .ciphertext;
    (op, svc, key, ct)
}

/// The broker's signing public key, saved in the test's directory.
async fn save_signing_key(reg: &Region, op: &mut sovkms::client::Client) -> std::path::PathBuf {
    let pubkey = reg.env.dir.path().join("signing.pem");
    std::fs::write(
        &pubkey,
        op.broker
            .get_info(pb::GetInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .signing_public_key_pem,
    )
    .unwrap();
    pubkey
}

/// `sovkms audit verify --database` (broker a's config) with `pubkey`.
fn verify_chains(reg: &Region, pubkey: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let cfg = reg.env.dir.path().join(format!("{R}-a.toml"));
    let mut args = vec!["audit", "verify", "--database", cfg.to_str().unwrap()];
    args.extend(["--pubkey", pubkey.to_str().unwrap()]);
    args.extend(extra);
    run_sovkms(&args, &[])
}

async fn rekey(op: &mut sovkms::client::Client, id: &str) -> Result<u32, tonic::Status> {
    op.keys
        .re_key(pb::KeyRef { key_id: id.into() })
        .await
        .map(|r| r.into_inner().primary_version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_share_keys_over_one_database() {
    let reg = region_over_postgres();
    let (a, b, c) = (
        reg.broker("a", ""),
        reg.broker("b", ""),
        reg.broker("c", ""),
    );
    let app = spiffe(R, "service", "app");
    let cx = ctx(&[("tenant", "t1")]);

    let mut op_a = reg.client("operator-admin", &a).await;
    let mut op_b = reg.client("operator-admin", &b).await;
    let mut svc_a = reg.client("service-app", &a).await;
    let mut svc_b = reg.client("service-app", &b).await;
    let mut svc_c = reg.client("service-app", &c).await;

    // Created on A, encrypted on B, decrypted on C.
    let key = create_key_as(&mut op_a, "shared", vec![grant(&app, &ALL_OPS)]).await;
    let old = encrypt(&mut svc_b, &key, b"written on b", &cx)
        .await
        .unwrap();
    assert_eq!(old.key_version, 1);
    assert_eq!(
        decrypt(&mut svc_c, &old.ciphertext, &cx).await.unwrap(),
        b"written on b"
    );

    // Rekeyed on B: the old ciphertext still opens on A, and every broker
    // encrypts under version 2 once the change reaches it.
    assert_eq!(rekey(&mut op_b, &key).await.unwrap(), 2);
    assert_eq!(
        decrypt(&mut svc_a, &old.ciphertext, &cx).await.unwrap(),
        b"written on b"
    );
    for svc in [&mut svc_a, &mut svc_c] {
        let start = Instant::now();
        loop {
            let v = encrypt(svc, &key, b"after", &cx).await.unwrap().key_version;
            if v == 2 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "the rekey never reached this broker"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let new = encrypt(&mut svc_c, &key, b"after rekey", &cx)
        .await
        .unwrap();
    assert_eq!(
        decrypt(&mut svc_b, &new.ciphertext, &cx).await.unwrap(),
        b"after rekey"
    );

    // A key created on C is listed on A.
    let mut op_c = reg.client("operator-admin", &c).await;
    let other = create_key_as(&mut op_c, "from-c", vec![]).await;
    op_a.keys
        .get_attributes(pb::KeyRef { key_id: other })
        .await
        .expect("a key created on another broker");
    for mut p in [a, b, c] {
        stop(&mut p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rekeys_from_two_brokers_lose_nothing() {
    let reg = region_over_postgres();
    let (a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let mut op_a = reg.client("operator-admin", &a).await;
    let op_b = reg.client("operator-admin", &b).await;
    let key = create_key_as(&mut op_a, "contended", vec![]).await;

    const ROUNDS: usize = 25;
    let mut tasks = Vec::new();
    for mut op in [op_a.clone(), op_b] {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..ROUNDS {
                got.push(rekey(&mut op, &key).await.unwrap());
            }
            got
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.extend(t.await.unwrap());
    }
    // Every acknowledged rekey made its own version: 2..=51, none twice.
    versions.sort_unstable();
    let want: Vec<u32> = (2..=(ROUNDS as u32 * 2 + 1)).collect();
    assert_eq!(versions, want);
    let meta = op_a
        .keys
        .get_attributes(pb::KeyRef {
            key_id: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.primary_version, ROUNDS as u32 * 2 + 1);
    for mut p in [a, b] {
        stop(&mut p);
    }
}

/// Revokes a key on A and measures how long B keeps decrypting with it.
async fn revoke_reaches(reg: &Region, store_extra: &str, rounds: usize) -> Vec<Duration> {
    let (a, b) = (reg.broker("a", store_extra), reg.broker("b", store_extra));
    let app = spiffe(R, "service", "app");
    let cx = ctx(&[]);
    let mut op_a = reg.client("operator-admin", &a).await;
    let mut svc_b = reg.client("service-app", &b).await;
    let mut took = Vec::new();
    for i in 0..rounds {
        let key = create_key_as(&mut op_a, &format!("r{i}"), vec![grant(&app, &ALL_OPS)]).await;
        let ct = encrypt(&mut svc_b, &key, b"x", &cx)
            .await
            .unwrap()
            .ciphertext;
        // B holds the record in memory now.
        decrypt(&mut svc_b, &ct, &cx).await.unwrap();
        op_a.keys
            .revoke(pb::RevokeRequest {
                key_id: key.clone(),
                reason: pb::RevocationReason::KeyCompromise as i32,
                message: String::new(),
            })
            .await
            .unwrap();
        let committed = Instant::now();
        loop {
            match decrypt(&mut svc_b, &ct, &cx).await {
                Ok(_) => {}
                Err(s) => {
                    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                    break;
                }
            }
            assert!(
                committed.elapsed() < Duration::from_secs(10),
                "revoke never reached B"
            );
        }
        took.push(committed.elapsed());
    }
    for mut p in [a, b] {
        stop(&mut p);
    }
    took.sort();
    took
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_on_one_broker_is_refused_on_another_within_the_bound() {
    let reg = region_over_postgres();
    // Pushed (LISTEN/NOTIFY).
    let pushed = revoke_reaches(&reg, "max_staleness_ms = 2000", 30).await;
    // Notifications lost (a pooler that cannot LISTEN): the record bound.
    let bounded = revoke_reaches(&reg, "listen = false\nmax_staleness_ms = 500", 8).await;
    println!(
        "revoke on A -> refused on B: pushed p50 {:?} p99 {:?} max {:?}; without notifications p50 {:?} max {:?} (bound 500 ms)",
        quantile(&pushed, 0.5),
        quantile(&pushed, 0.99),
        pushed.last().unwrap(),
        quantile(&bounded, 0.5),
        bounded.last().unwrap()
    );
    // The push is what makes it fast: well inside the 2 s bound.
    assert!(
        quantile(&pushed, 0.5) < Duration::from_millis(500),
        "{pushed:?}"
    );
    // Lost notifications cost at most the bound (and a request's time).
    assert!(
        *bounded.last().unwrap() < Duration::from_millis(500 + 300),
        "{bounded:?}"
    );
}

#[test]
fn schema_migrates_from_the_previous_version_and_refuses_a_newer_one() {
    use sovkms::store::{PgPassword, PgSettings, PgStore, PgTls, Store, StoreError};
    let db = pg_cluster();
    let settings = PgSettings {
        url: db.url(sovkms::store::cluster::ROLE),
        password: PgPassword::File(db.password_file()),
        tls: PgTls::Off,
        pool_size: 2,
        listen: false,
        timeout: Duration::from_secs(5),
        application_name: "test".into(),
    };
    // A database at schema 1 (before the audit chains) with a key in it.
    let old = PgStore::open_at_schema(settings.clone(), 1).unwrap();
    assert_eq!(old.schema_version().unwrap(), 1);
    let rec = sovkms::keys::KeyRecord::new(
        sovkms::keys::KeyId::parse("k-kept").unwrap(),
        region(R),
        sovkms::keys::VersionRecord {
            version: 1,
            created_at: 0,
            wrapped: None,
            provenance: None,
            sealed_object: None,
            request: None,
        },
        true,
        0,
        String::new(),
    );
    old.insert(&rec).unwrap();
    drop(old);
    // The current binary migrates it and keeps the key.
    let store = PgStore::open(settings.clone()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        sovkms::store::SCHEMA_VERSION
    );
    assert_eq!(store.get(&rec.id).unwrap().unwrap().name, rec.name);
    let tables = db
        .sql(
            sovkms::store::cluster::ROLE,
            "SELECT count(*) FROM sovkms_audit",
        )
        .unwrap();
    assert_eq!(tables.trim(), "0");
    // A fresh database gets the whole schema at once.
    db.sql("postgres", "CREATE DATABASE fresh").unwrap();
    let fresh = PgStore::open(PgSettings {
        url: db.url("fresh"),
        ..settings.clone()
    })
    .unwrap();
    assert_eq!(
        fresh.schema_version().unwrap(),
        sovkms::store::SCHEMA_VERSION
    );
    drop(fresh);
    // A schema from a newer sovkms: refused, nothing touched.
    db.sql(
        sovkms::store::cluster::ROLE,
        "INSERT INTO sovkms_schema (version, description) VALUES (99, 'from the future')",
    )
    .unwrap();
    drop(store);
    match PgStore::open(settings) {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("upgrade sovkms"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
}

/// Decrypts with our own request id; Ok(id) when the plaintext came back.
async fn decrypt_with_id(
    c: &mut sovkms::client::Client,
    ct: &[u8],
    id: String,
) -> Result<String, tonic::Status> {
    let mut req = tonic::Request::new(pb::DecryptRequest {
        ciphertext: ct.to_vec(),
        context: Default::default(),
    });
    req.metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    c.crypto.decrypt(req).await.map(|_| id)
}

fn committed_request_ids(db: &ThrowawayCluster) -> std::collections::HashSet<String> {
    db.sql(
        sovkms::store::cluster::ROLE,
        "SELECT line::json->>'request_id' FROM sovkms_audit WHERE line::json->>'operation' = 'decrypt' AND line::json->>'outcome' = 'allowed'",
    )
    .unwrap()
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_under_decrypt_load_loses_no_acknowledged_record() {
    let reg = region_over_postgres();
    let (mut a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let app = spiffe(R, "service", "app");
    let mut op = reg.client("operator-admin", &b).await;
    let key = create_key_as(&mut op, "load", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc_b = reg.client("service-app", &b).await;
    let ct = encrypt(&mut svc_b, &key, b"under load", &ctx(&[]))
        .await
        .unwrap()
        .ciphertext;

    // Four streams of decrypts on each broker, each request with its own id.
    let stop_at = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for (p, name) in [(&a, "a"), (&b, "b")] {
        for s in 0..4 {
            let mut c = reg.client("service-app", p).await;
            let ct = ct.clone();
            tasks.push(tokio::spawn(async move {
                let (mut acked, mut failed) = (Vec::new(), 0u32);
                let mut i = 0;
                while Instant::now() < stop_at {
                    i += 1;
                    match decrypt_with_id(&mut c, &ct, format!("{name}-{s}-{i}")).await {
                        Ok(id) => acked.push(id),
                        Err(_) => failed += 1,
                    }
                }
                (acked, failed)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    kill9(&mut a);
    let (mut acked, mut failed_on) = (Vec::new(), [0u32; 2]);
    for (i, t) in tasks.into_iter().enumerate() {
        let (ids, failed) = t.await.unwrap();
        acked.extend(ids);
        failed_on[i / 4] += failed;
    }
    let committed = committed_request_ids(&reg.db);
    let missing: Vec<_> = acked.iter().filter(|id| !committed.contains(*id)).collect();
    let on_a = acked.iter().filter(|i| i.starts_with("a-")).count();
    let on_b = acked.len() - on_a;
    println!(
        "acknowledged decrypts: {on_a} on a (killed), {on_b} on b; failed after the kill: {} on a, {} on b; records missing: {}",
        failed_on[0],
        failed_on[1],
        missing.len()
    );
    assert!(on_a > 0 && on_b > 0);
    assert!(
        missing.is_empty(),
        "{} acknowledged without a committed record, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    // The survivor never failed a request.
    assert_eq!(failed_on[1], 0);

    // A client that lists both brokers carries on with the survivor.
    let tls = reg.env.tls(&format!("{R}/service-app"), R);
    let regional = sovkms::client::Regional::new(vec![
        sovkms::client::Endpoint::new(R, &a.addr, tls.clone()),
        sovkms::client::Endpoint::new(R, &b.addr, tls),
    ])
    .unwrap();
    for _ in 0..5 {
        let pt = regional.decrypt(&ct, Default::default()).await.unwrap();
        assert_eq!(&pt[..], b"under load");
    }
    // So does the CLI given both addresses (the dead one first).
    let pki = reg.env.pki.join(R);
    let both = format!("{},{}", a.addr, b.addr);
    let out = run_sovkms(
        &["key", "list"],
        &[
            ("SOVKMS_ADDR", std::path::Path::new(&both)),
            ("SOVKMS_CA", &pki.join("ca.pem")),
            ("SOVKMS_TLS_CERT", &pki.join("operator-admin.pem")),
            ("SOVKMS_TLS_KEY", &pki.join("operator-admin.key")),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("load"));
    let mut b = b;
    stop(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_brokers_chain_verifies_from_the_database_and_an_edit_is_named() {
    let reg = region_over_postgres();
    let (a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let app = spiffe(R, "service", "app");
    let mut op = reg.client("operator-admin", &a).await;
    let key = create_key_as(&mut op, "audited", vec![grant(&app, &ALL_OPS)]).await;
    for p in [&a, &b] {
        let mut svc = reg.client("service-app", p).await;
        let ct = encrypt(&mut svc, &key, b"x", &ctx(&[]))
            .await
            .unwrap()
            .ciphertext;
        for _ in 0..20 {
            decrypt(&mut svc, &ct, &ctx(&[])).await.unwrap();
        }
    }
    let pubkey = save_signing_key(&reg, &mut op).await;
    // Stopped brokers end their chains with a signed checkpoint.
    for mut p in [a, b] {
        stop(&mut p);
    }
    let cfg = reg.env.dir.path().join(format!("{R}-a.toml"));
    let verify = |extra: &[&str]| verify_chains(&reg, &pubkey, extra);
    let ok = verify(&["--require-checkpoint"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(text.contains(&format!("broker {R}-a: OK")), "{text}");
    assert!(text.contains(&format!("broker {R}-b: OK")), "{text}");

    // Aggregates of the region, offline from the database: 40 decrypts.
    let agg = run_sovkms(
        &[
            "audit",
            "aggregates",
            "--database",
            cfg.to_str().unwrap(),
            "--min-group",
            "1",
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&agg.stdout);
    assert!(
        agg.status.success(),
        "{}",
        String::from_utf8_lossy(&agg.stderr)
    );
    let decrypts = text
        .lines()
        .find(|l| l.contains("decrypt") && l.contains("allowed"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(decrypts.trim_end().ends_with(" 40"), "{decrypts}");

    // An insider with the database edits one record of b's chain.
    reg.db
        .sql(
            sovkms::store::cluster::ROLE,
            &format!(
                "UPDATE sovkms_audit SET line = replace(line, '\"allowed\"', '\"refused\"')
                 WHERE broker_id = '{R}-b' AND seq = 5"
            ),
        )
        .unwrap();
    let bad = verify(&[]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains(&format!("broker {R}-b")) && err.contains('5'),
        "{err}"
    );

    // The export holds both chains.
    let out = run_sovkms(
        &["audit", "export", "--database", cfg.to_str().unwrap()],
        &[],
    );
    assert!(out.status.success());
    let lines = String::from_utf8_lossy(&out.stdout);
    for who in ["a", "b"] {
        assert!(lines.contains(&format!("\"broker_id\":\"{R}-{who}\"")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_database_fails_closed_and_service_resumes_without_restart() {
    let mut reg = region_over_postgres();
    let mut a = reg.broker_with(
        "a",
        "timeout_ms = 1000\nmax_staleness_ms = 1000",
        "\n[health]\ninterval_seconds = 1\ndeadline_seconds = 1\n",
    );
    let app = spiffe(R, "service", "app");
    let mut op = reg.client("operator-admin", &a).await;
    let key = create_key_as(&mut op, "outage", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = reg.client("service-app", &a).await;
    let cx = ctx(&[]);
    let ct = encrypt(&mut svc, &key, b"kept", &cx)
        .await
        .unwrap()
        .ciphertext;
    assert_eq!(decrypt(&mut svc, &ct, &cx).await.unwrap(), b"kept");

    reg.db.stop().unwrap();
    let stopped = Instant::now();
    // Nothing is released once the database is gone: every decrypt fails.
    for _ in 0..5 {
        let r = decrypt(&mut svc, &ct, &cx).await;
        assert_eq!(code(&r), Code::Unavailable, "{r:?}");
    }
    let why = decrypt(&mut svc, &ct, &cx).await.unwrap_err();
    // The store (its change channel dropped the caches) or the audit log, named.
    assert!(
        why.message().contains("key store is unavailable")
            || why.message().contains("audit log cannot be written"),
        "{why:?}"
    );
    // Health says so.
    while serving(&svc).await != Some(false) {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still SERVING without its database"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Encrypts served from memory stop at the staleness bound.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = encrypt(&mut svc, &key, b"late", &cx).await;
    assert_eq!(code(&r), Code::Unavailable, "{r:?}");

    // The database returns: the same process serves again by itself.
    reg.db.start_again().unwrap();
    let back = Instant::now();
    loop {
        if decrypt(&mut svc, &ct, &cx).await.is_ok() && serving(&svc).await == Some(true) {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(20), "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "outage: failed closed at once; serving again {:?} after the database returned",
        back.elapsed()
    );
    encrypt(&mut svc, &key, b"after", &cx).await.unwrap();
    stop(&mut a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_between_two_decrypts_cost_no_request_and_no_record() {
    let reg = region_over_postgres();
    let mut a = reg.broker("a", "");
    let (mut op, mut svc, _, ct) = kept_at(&reg, &a, &a, "cut").await;
    let cx = ctx(&[]);
    for round in 0..3 {
        assert_eq!(decrypt(&mut svc, &ct, &cx).await.unwrap(), b"kept");
        // A failover, a pooler or an administrator ends every session of
        // the broker (its audit connection among them).
        let cut = reg
            .db
            .sql(
                sovkms::store::cluster::ROLE,
                &format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'sovkms {R}-a'"
                ),
            )
            .unwrap();
        assert!(
            cut.trim().parse::<u32>().unwrap() >= 1,
            "round {round}: {cut}"
        );
        // The next decrypt is served: its record goes in on a new session.
        assert_eq!(
            decrypt(&mut svc, &ct, &cx).await.unwrap(),
            b"kept",
            "round {round}"
        );
    }
    let pubkey = save_signing_key(&reg, &mut op).await;
    stop(&mut a);
    // Every record once, in one unbroken chain.
    let ok = verify_chains(&reg, &pubkey, &["--require-checkpoint"]);
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let decrypts = reg
        .db
        .sql(
            sovkms::store::cluster::ROLE,
            "SELECT count(*) FROM sovkms_audit WHERE line LIKE '%\"operation\":\"decrypt\"%'",
        )
        .unwrap();
    assert_eq!(decrypts.trim(), "6", "{decrypts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_the_same_number_from_another_writer_is_not_taken_for_ours() {
    let reg = region_over_postgres();
    let mut a = reg.broker("a", "");
    let (_op, mut svc, _, ct) = kept_at(&reg, &a, &a, "contested").await;
    let cx = ctx(&[]);
    assert_eq!(decrypt(&mut svc, &ct, &cx).await.unwrap(), b"kept");
    // Another process under this broker's id (or an intruder) takes the
    // chain's next number first, with a well-formed record of its own.
    let id = format!("{R}-a");
    let taken = reg
        .db
        .sql(
            sovkms::store::cluster::ROLE,
            &format!(
                "INSERT INTO sovkms_audit SELECT broker_id, seq + 1, replace(line, '{{\"seq\":' || seq || ',', '{{\"seq\":' || (seq + 1) || ',') \
                 FROM sovkms_audit WHERE broker_id = '{id}' AND seq = (SELECT max(seq) FROM sovkms_audit WHERE broker_id = '{id}') RETURNING seq"
            ),
        )
        .unwrap();
    assert!(taken.trim().parse::<u64>().is_ok(), "{taken}");
    // The broker's next record cannot go in as that number: nothing is
    // released on the strength of somebody else's record.
    let r = decrypt(&mut svc, &ct, &cx).await;
    assert_eq!(code(&r), Code::Unavailable, "{r:?}");
    stop(&mut a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_record_rolled_back_behind_the_brokers_is_refused() {
    let reg = region_over_postgres();
    let (a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let (mut op, mut svc_b, key, ct) = kept_at(&reg, &a, &b, "rolled").await;
    let cx = ctx(&[]);
    assert_eq!(decrypt(&mut svc_b, &ct, &cx).await.unwrap(), b"kept");
    // A database administrator keeps a copy of the key's row ...
    let sql = |q: &str| reg.db.sql(sovkms::store::cluster::ROLE, q).unwrap();
    sql(&format!(
        "CREATE TABLE kept_row AS SELECT * FROM sovkms_keys WHERE id = '{key}'"
    ));
    // ... the key is found compromised and revoked ...
    op.keys
        .revoke(pb::RevokeRequest {
            key_id: key.clone(),
            reason: pb::RevocationReason::KeyCompromise as i32,
            message: String::new(),
        })
        .await
        .unwrap();
    let refused = Instant::now();
    loop {
        match decrypt(&mut svc_b, &ct, &cx).await {
            Err(s) if s.code() == Code::FailedPrecondition => break,
            r => assert!(refused.elapsed() < Duration::from_secs(5), "{r:?}"),
        }
    }
    // ... and the administrator puts the old row back (its code is valid:
    // the brokers wrote it), telling the brokers to read it again.
    sql(&format!(
        "UPDATE sovkms_keys k SET revision = s.revision, body = s.body FROM kept_row s WHERE k.id = s.id; NOTIFY sovkms_changes, 'k:{key}'"
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both brokers have read the later revision: the old one is refused,
    // nothing is released.
    for p in [&a, &b] {
        let mut svc = reg.client("service-app", p).await;
        let r = decrypt(&mut svc, &ct, &cx).await;
        assert_eq!(code(&r), Code::Internal, "{r:?}");
    }
    let (mut a, mut b) = (a, b);
    stop(&mut a);
    stop(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_restores_on_a_fresh_broker_and_is_useless_without_the_root() {
    let reg = region_over_postgres();
    let a = reg.broker("a", "");
    let app = spiffe(R, "service", "app");
    let mut op = reg.client("operator-admin", &a).await;
    let key = create_key_as(&mut op, "backed-up", vec![grant(&app, &ALL_OPS)]).await;
    assert_eq!(rekey(&mut op, &key).await.unwrap(), 2);
    let mut svc = reg.client("service-app", &a).await;
    let cx = ctx(&[("case", "backup")]);
    let ct = encrypt(&mut svc, &key, b"from before the backup", &cx)
        .await
        .unwrap()
        .ciphertext;

    // Taken while the broker serves (one repeatable-read transaction).
    let file = reg.env.dir.path().join("region.backup");
    let cfg_a = reg.env.dir.path().join(format!("{R}-a.toml"));
    let out = run_sovkms(
        &[
            "backup",
            "--config",
            cfg_a.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("{\"format\":\"sovkms-backup\""), "{text}");
    assert!(!text.contains("from before the backup"));

    // A fresh single broker (sled) on the region's root: restore, decrypt.
    let fresh = config_shared(&reg.env, R, "restored", &reg.token.root_toml, "");
    let restore = |cfg: &std::path::Path| {
        run_sovkms(
            &[
                "restore",
                "--config",
                cfg.to_str().unwrap(),
                "--in",
                file.to_str().unwrap(),
            ],
            &[],
        )
    };
    let out = restore(&fresh);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored 1 keys"));
    // Only into an empty store.
    let again = restore(&fresh);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let mut p = spawn_broker(&fresh, &[]);
    let mut svc_fresh = connect_ready(&reg.env, &format!("{R}/service-app"), R, &p.addr).await;
    assert_eq!(
        decrypt(&mut svc_fresh, &ct, &cx).await.unwrap(),
        b"from before the backup"
    );
    stop(&mut p);

    // The same backup on a broker with another root of trust: the region's
    // record key does not open, so nothing is restored.
    let other_token = new_token(reg.env.dir.path(), R);
    let other = config_shared(&reg.env, R, "elsewhere", &other_token.root_toml, "");
    let out = restore(&other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not open with this root of trust"),
        "{err}"
    );
    let mut a = a;
    stop(&mut a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_or_rekey_retried_on_another_broker_with_its_request_id_acts_once() {
    let reg = region_over_postgres();
    let (mut a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let req = pb::CreateKeyRequest {
        name: "idempotent".into(),
        activate: true,
        ..Default::default()
    };
    // The first attempt is carried out at A, and its answer is lost with A.
    let mut op_a = reg.client("operator-admin", &a).await;
    let mut first = tonic::Request::new(req.clone());
    first
        .metadata_mut()
        .insert("x-request-id", "order-42".parse().unwrap());
    let made = op_a.keys.create(first).await.unwrap().into_inner().key_id;
    let mut rotate = tonic::Request::new(pb::KeyRef {
        key_id: made.clone(),
    });
    rotate
        .metadata_mut()
        .insert("x-request-id", "rotate-1".parse().unwrap());
    let rotated = op_a.keys.re_key(rotate).await.unwrap().into_inner();
    assert_eq!(rotated.primary_version, 2);
    kill9(&mut a);
    // The client retries the same request on the region's brokers.
    let tls = reg.env.tls(&format!("{R}/operator-admin"), R);
    let regional = sovkms::client::Regional::new(vec![
        sovkms::client::Endpoint::new(R, &a.addr, tls.clone()),
        sovkms::client::Endpoint::new(R, &b.addr, tls),
    ])
    .unwrap();
    for _ in 0..2 {
        let again = regional
            .create_key(R, "order-42", req.clone())
            .await
            .unwrap();
        assert_eq!(again.key_id, made);
        // The retried rekey finds the version its first attempt added.
        let again = regional.rekey(R, "rotate-1", &made).await.unwrap();
        assert_eq!(again.primary_version, 2);
    }
    let next = regional.rekey(R, "rotate-2", &made).await.unwrap();
    assert_eq!(next.primary_version, 3);
    // Another request id is another key; one key carries the name once.
    let other = regional
        .create_key(R, "order-43", req.clone())
        .await
        .unwrap();
    assert_ne!(other.key_id, made);
    let mut op_b = reg.client("operator-admin", &b).await;
    let found = op_b
        .keys
        .locate(pb::LocateRequest {
            name: "idempotent".into(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(matches!(
        regional.create_key(R, "bad id!", req).await,
        Err(sovkms::client::RegionalError::RequestId(_))
    ));
    let mut b = b;
    stop(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_written_into_the_database_behind_the_brokers_is_refused() {
    let reg = region_over_postgres();
    let (a, b) = (reg.broker("a", ""), reg.broker("b", ""));
    let app = spiffe(R, "service", "app");
    let (_op, _svc, key, ct) = kept_at(&reg, &a, &a, "guarded").await;
    // A database administrator grants the service `nogrant` everything.
    let nogrant = spiffe(R, "service", "nogrant");
    let n = reg
        .db
        .sql(
            sovkms::store::cluster::ROLE,
            &format!(
                "UPDATE sovkms_keys SET body = replace(body, '\"principal\":\"{app}\"', '\"principal\":\"{nogrant}\"') WHERE id = '{key}' RETURNING id"
            ),
        )
        .unwrap();
    assert_eq!(n.trim(), key, "the edit did not apply");
    // Broker B reads the record fresh: refused, nothing released.
    let mut intruder = reg.client("service-nogrant", &b).await;
    let r = decrypt(&mut intruder, &ct, &ctx(&[])).await;
    assert_eq!(code(&r), Code::Internal, "{r:?}");
    // Nor does the rightful service get the edited key's plaintext at B.
    let mut svc_b = reg.client("service-app", &b).await;
    assert!(decrypt(&mut svc_b, &ct, &ctx(&[])).await.is_err());
    for mut p in [a, b] {
        stop(&mut p);
    }
}
