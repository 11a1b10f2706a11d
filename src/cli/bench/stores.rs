//! `bench stores`: the same load against one broker on sled, one broker on
//! PostgreSQL and two brokers on one PostgreSQL (a throwaway cluster on
//! this machine), all on one SoftHSM2 token, next to the echo ceiling
//! measured in the same run.

use super::*;
use crate::api::bench::proto as echo_pb;
use crate::store::cluster::{ThrowawayCluster, ROLE};

/// A setup under test: its brokers (processes) and their clients.
struct Setup {
    brokers: Vec<devenv::Broker>,
    services: Vec<Client>,
    operators: Vec<Client>,
}

impl Setup {
    fn pids(&self) -> Vec<u32> {
        self.brokers
            .iter()
            .map(|b| b.child.id().unwrap_or(0))
            .collect()
    }
}

/// What one row measures: the first `n` brokers of a setup, their
/// clients, and a ciphertext of the setup's key.
struct View {
    name: &'static str,
    pids: Vec<u32>,
    services: Arc<Vec<Client>>,
    operators: Arc<Vec<Client>>,
    key: String,
    ct: Vec<u8>,
    on_pg: bool,
}

impl View {
    async fn of(
        name: &'static str,
        s: &Setup,
        n: usize,
        key: &str,
        payload: &[u8],
        ctx: &HashMap<String, String>,
    ) -> Result<Self, CliError> {
        // `start` opens two service clients per broker, in broker order.
        let services: Vec<Client> = s.services.iter().take(2 * n).cloned().collect();
        let ct = ciphertext(&services[0], key, payload, ctx).await?;
        Ok(Self {
            name,
            pids: s.pids().into_iter().take(n).collect(),
            services: Arc::new(services),
            operators: Arc::new(s.operators.iter().take(n).cloned().collect()),
            key: key.to_owned(),
            ct,
            on_pg: name.contains("postgres"),
        })
    }

    /// One request of `op` by worker `w` (its `i`th).
    #[allow(clippy::type_complexity)]
    fn call(
        &self,
        op: &'static str,
        ctx: &HashMap<String, String>,
    ) -> Arc<
        impl Fn(usize, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
            + Send
            + Sync
            + 'static,
    > {
        let (svc, ops) = (Arc::clone(&self.services), Arc::clone(&self.operators));
        let (k, cx, ct) = (self.key.clone(), ctx.clone(), self.ct.clone());
        let pt = vec![0x5au8; 1024];
        Arc::new(move |w: usize, i: u64| {
            let mut c = svc[w % svc.len()].clone();
            let mut o = ops[w % ops.len()].clone();
            let (k, cx, pt, ct) = (k.clone(), cx.clone(), pt.clone(), ct.clone());
            let fut: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> =
                Box::pin(async move {
                    match op {
                        "encrypt" => c
                            .crypto
                            .encrypt(pb::EncryptRequest {
                                key_id: k,
                                plaintext: pt,
                                context: cx,
                            })
                            .await
                            .is_ok(),
                        "decrypt" => c
                            .crypto
                            .decrypt(pb::DecryptRequest {
                                ciphertext: ct,
                                context: cx,
                            })
                            .await
                            .is_ok(),
                        _ => o
                            .keys
                            .create(pb::CreateKeyRequest {
                                name: format!("c{w}-{i}"),
                                activate: true,
                                ..Default::default()
                            })
                            .await
                            .is_ok(),
                    }
                });
            fut
        })
    }
}

/// Like [`drive`], charging the CPU time of every process in `pids`.
async fn drive_all<F, Fut>(inflight: usize, secs: f64, pids: &[u32], call: Arc<F>) -> Samples
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let cpu = |pids: &[u32]| pids.iter().filter_map(|p| cpu_seconds(*p)).sum::<f64>();
    let c0 = cpu(pids);
    let mut s = drive(inflight, secs, 0, call).await;
    s.cpu = cpu(pids) - c0;
    s
}

fn pg_config(env: &Env, db: &ThrowawayCluster, name: &str) -> Result<PathBuf, CliError> {
    let text = std::fs::read_to_string(&env.cfg).map_err(err)?;
    let data = env.dir.join(format!("data-{name}"));
    let text = text
        .replace(
            &format!("data_dir = \"{}\"", env.dir.join("data").display()),
            &format!("data_dir = \"{}\"", data.display()),
        )
        .replace(
            "broker_id = \"eu-central-dev\"",
            &format!("broker_id = \"eu-central-{name}\""),
        );
    let cfg = env.dir.join(format!("broker-{name}.toml"));
    let store = format!(
        "\n[store]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
        db.url(ROLE),
        db.password_file().display()
    );
    std::fs::write(&cfg, text + &store).map_err(err)?;
    Ok(cfg)
}

async fn start(env: &Env, name: &'static str, configs: &[PathBuf]) -> Result<Setup, CliError> {
    let mut s = Setup {
        brokers: Vec::new(),
        services: Vec::new(),
        operators: Vec::new(),
    };
    for (i, cfg) in configs.iter().enumerate() {
        let log = env.dir.join(format!("{name}-{i}.log"));
        let b = devenv::start_child(&env.exe, "serve", cfg, &log, env.conf.as_deref()).await?;
        let op = env.connect("operator-admin", &b.addr).await?;
        devenv::wait_serving(&op).await?;
        for _ in 0..2 {
            s.services.push(env.connect("service-app", &b.addr).await?);
        }
        s.operators.push(op);
        s.brokers.push(b);
    }
    Ok(s)
}

/// `sovkms bench stores`.
pub(super) async fn stores(seconds: f64, inflight: usize, dir: &Path) -> Result<(), CliError> {
    let env = setup(dir, false, "softhsm2", "").await?;
    let db = tokio::task::block_in_place(ThrowawayCluster::start).map_err(err)?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sovkms bench stores: 1 KiB, {inflight} in flight, {seconds}s per run, {ncpu} cores shared by client, brokers, echo and PostgreSQL; SoftHSM2 token; PostgreSQL on this host (synchronous_commit on, fsync on)"
    );
    let echo = env.start("bench-echo").await?;
    let epid = echo.child.id().unwrap_or(0);
    let echo_c: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let e = env.connect("service-app", &echo.addr).await?;
            v.push(echo_pb::echo_service_client::EchoServiceClient::new(
                e.channel.clone(),
            ));
        }
        v
    };
    let echo_c = Arc::new(echo_c);
    let payload = vec![0x5au8; 1024];
    let ctx: HashMap<String, String> = [("bench".to_string(), "1".to_string())].into();
    println!(
        "{:<22} {:<8} {:>9} {:>8} {:>8} {:>9} {:>9} {:>7} {:>13} {:>9}",
        "setup",
        "op",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu µs/r",
        "db µs/r",
        "×echo",
        "records/s/brk",
        "rec/commit"
    );
    let mut rows = Vec::new();
    let mut decrypt_rps = HashMap::new();
    // Every setup runs from the start and each is measured in slices that
    // alternate with the others' and the echo's: a slow moment of this
    // shared machine then weighs on all of them, not on one.
    let sled = start(&env, "sled", std::slice::from_ref(&env.cfg)).await?;
    let pg = start(
        &env,
        "postgres",
        &[pg_config(&env, &db, "pg1")?, pg_config(&env, &db, "pg2")?],
    )
    .await?;
    let (sled_key, pg_key) = (
        bench_key(&mut sled.operators[0].clone()).await?,
        bench_key(&mut pg.operators[0].clone()).await?,
    );
    let views = [
        View::of("1 broker, sled", &sled, 1, &sled_key, &payload, &ctx).await?,
        View::of("1 broker, postgres", &pg, 1, &pg_key, &payload, &ctx).await?,
        View::of("2 brokers, postgres", &pg, 2, &pg_key, &payload, &ctx).await?,
    ];
    // Audit rows, and the transactions that committed them (one per group
    // commit: each COPY's rows share its xmin).
    let count = |db: &ThrowawayCluster| -> (u64, u64) {
        let t = db
            .sql(
                ROLE,
                "SELECT count(*) || ' ' || count(DISTINCT xmin::text) FROM sovkms_audit",
            )
            .unwrap_or_default();
        let mut n = t.split_whitespace().map(|v| v.parse().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    };
    // The database shares these cores: its CPU time is reported apart
    // (its backends are listed again per slice: pools open them on demand).
    let db_cpu = |pids: &[u32]| pids.iter().filter_map(|p| cpu_seconds(*p)).sum::<f64>();
    for op in ["encrypt", "decrypt", "create"] {
        let body = if op == "decrypt" {
            views[0].ct.clone()
        } else {
            payload.clone()
        };
        let ec = Arc::clone(&echo_c);
        let echo_call = Arc::new(move |w: usize, _| {
            let mut c = ec[w % ec.len()].clone();
            let p = body.clone();
            async move { c.echo(echo_pb::EchoMessage { payload: p }).await.is_ok() }
        });
        let mut ce = Samples::default();
        let mut got: Vec<(Samples, f64, u64, u64)> = views
            .iter()
            .map(|_| (Samples::default(), 0.0, 0, 0))
            .collect();
        // Warm up (pools filled, caches loaded); not counted.
        for v in &views {
            drive(inflight, 0.3, 0, v.call(op, &ctx)).await;
        }
        for _ in 0..3 {
            ce.merge(drive(inflight, seconds / 3.0, epid, Arc::clone(&echo_call)).await);
            for (v, (br, db_used, records, commits)) in views.iter().zip(got.iter_mut()) {
                let before = if v.on_pg { count(&db) } else { (0, 0) };
                let db_pids = if v.on_pg { db.pids() } else { Vec::new() };
                let d0 = db_cpu(&db_pids);
                let s = drive_all(inflight, seconds / 3.0, &v.pids, v.call(op, &ctx)).await;
                if v.on_pg {
                    *db_used += db_cpu(&db_pids) - d0;
                    let after = count(&db);
                    *records += after.0 - before.0;
                    *commits += after.1 - before.1;
                } else {
                    *records += s.lat_us.len() as u64;
                }
                br.merge(s);
            }
        }
        let ceiling = ce.summary();
        for (v, (br, db_used, records, commits)) in views.iter().zip(got) {
            let per_commit = if commits > 0 {
                format!("{:.1}", records as f64 / commits as f64)
            } else {
                "-".into()
            };
            let elapsed = br.elapsed;
            let m = br.summary();
            let db_us = db_used * 1e6 / m.requests.max(1) as f64;
            // Records committed per second per broker (every operation
            // writes one; the database counts them; sled: one per request).
            let records_n = records;
            let records = records as f64 / elapsed / v.pids.len() as f64;
            let x = if ceiling.rps > 0.0 {
                m.rps / ceiling.rps
            } else {
                0.0
            };
            println!(
                "{:<22} {:<8} {:>9.0} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>7.2} {:>13.0} {:>9}{}",
                v.name,
                op,
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.server_cpu_us_per_req,
                db_us,
                x,
                records,
                per_commit,
                if m.errors > 0 {
                    format!("  ({} errors)", m.errors)
                } else {
                    String::new()
                }
            );
            if op == "decrypt" {
                decrypt_rps.insert(v.name, m.rps);
            }
            rows.push(serde_json::json!({
                "setup": v.name, "op": op, "bytes": if op == "create" { 0 } else { 1024 },
                "broker": m, "ceiling": ceiling, "ratio_rps": x, "database_cpu_us_per_req": db_us, "audit_records_per_s_per_broker": records,
                "audit_records_per_commit": (commits > 0).then(|| records_n as f64 / commits as f64),
            }));
        }
    }
    for mut b in sled.brokers.into_iter().chain(pg.brokers) {
        let _ = b.child.kill().await;
    }
    let sled = decrypt_rps.get("1 broker, sled").copied().unwrap_or(0.0);
    for name in ["1 broker, postgres", "2 brokers, postgres"] {
        let pg = decrypt_rps.get(name).copied().unwrap_or(0.0);
        println!(
            "decrypt, {name} ÷ 1 broker, sled: {:.2}×",
            if sled > 0.0 { pg / sled } else { 0.0 }
        );
    }
    drop(echo);
    let path = env.dir.join("stores.json");
    write_rows(Some(&path), ncpu, rows)?;
    println!("(JSON: {})", path.display());
    Ok(())
}
