//! `bench lifecycle`: durable key creation, start-up and Locate at scale.

use super::*;

pub(super) async fn lifecycle(a: LifecycleArgs) -> Result<(), CliError> {
    let counts = list(&a.keys, |s| {
        s.parse::<u64>()
            .map_err(|_| CliError::new(format!("bad count {s:?}"), ""))
    })?;
    let env = setup(&a.dir, false, &a.profile, "").await?;
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("sovkms bench lifecycle: {ncpu} cores; SoftHSM2 token; durable audit and store");
    // Key creation rate.
    let broker = env.start("serve").await?;
    let op = env.connect("operator-admin", &broker.addr).await?;
    devenv::wait_serving(&op).await?;
    let pid = broker.child.id().unwrap_or(0);
    let create = Arc::new(move |_, i| {
        let mut c = op.keys.clone();
        async move {
            c.create(pb::CreateKeyRequest {
                name: format!("c{i}"),
                activate: true,
                ..Default::default()
            })
            .await
            .is_ok()
        }
    });
    let m = drive(a.inflight, a.seconds, pid, create).await.summary();
    println!(
        "create key: {:.0}/s ({} in flight), p50 {:.1} ms, p99 {:.1} ms, server cpu {:.0} µs/key, {} errors",
        m.rps, a.inflight, m.p50_ms, m.p99_ms, m.server_cpu_us_per_req, m.errors
    );
    let mut broker = broker;
    let _ = broker.child.kill().await;
    // Start-up, memory and Locate by key count: synthetic records (copies of
    // one real wrapped version) written straight into the store.
    let settings = crate::config::Settings::load(&env.cfg).map_err(err)?;
    let template = {
        let store = crate::server::open_sled(&settings).map_err(err)?;
        let (page, _) = crate::store::Store::scan(&store, None, 1, &|_| true).map_err(err)?;
        page.into_iter()
            .next()
            .ok_or_else(|| err("no key to copy"))?
    };
    let mut rows = vec![serde_json::json!({"create_per_s": m.rps, "create": m})];
    let mut have = 0u64;
    // The synthetic records carry codes under the region's record key, as
    // the broker's own writes do.
    if let Some(c) = &env.conf {
        std::env::set_var("SOFTHSM2_CONF", c);
    }
    let root = crate::server::open_root(&settings).map_err(err)?;
    for n in counts {
        {
            let store = Arc::new(crate::server::open_sled(&settings).map_err(err)?);
            let auth = crate::store::authenticated::Authenticated::open(
                Arc::clone(&store) as Arc<dyn crate::store::Store>,
                root.as_ref(),
            )
            .map_err(err)?;
            while have < n {
                let mut r = template.clone();
                r.id =
                    crate::keys::KeyId::parse(&format!("k-synthetic-{have:012}")).map_err(err)?;
                r.name = format!("synthetic-{}", have % 1000);
                r.mac = auth.record_key().key_code(&r).map_err(err)?;
                store.insert_unflushed(&r).map_err(err)?;
                have += 1;
            }
            store.flush_now().map_err(err)?;
        }
        let t = Instant::now();
        let b = env.start("serve").await?;
        let c = env.connect("auditor-audit", &b.addr).await?;
        devenv::wait_serving(&c).await?;
        let start_s = t.elapsed().as_secs_f64();
        let pid = b.child.id().unwrap_or(0);
        let rss = rss_kib(pid).unwrap_or(0);
        let mut k = c.clone();
        let t = Instant::now();
        let first = k
            .locate(pb::LocateRequest {
                page_size: 100,
                ..Default::default()
            })
            .await?;
        let first_page_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let by_name = k
            .locate(pb::LocateRequest {
                name: "synthetic-7".into(),
                page_size: 100,
                ..Default::default()
            })
            .await?;
        let by_name_ms = t.elapsed().as_secs_f64() * 1000.0;
        // A name no key has: Locate scans every key (no name index).
        let t = Instant::now();
        k.locate(pb::LocateRequest {
            name: "no-such-name".into(),
            ..Default::default()
        })
        .await?;
        let absent_ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "{n:>8} keys: start {start_s:.2} s, RSS {:.1} MiB, Locate first page {first_page_ms:.1} ms ({} keys), by name {by_name_ms:.1} ms ({} keys), by absent name {absent_ms:.1} ms",
            rss as f64 / 1024.0,
            first.keys.len(),
            by_name.keys.len()
        );
        rows.push(serde_json::json!({"keys": n, "start_s": start_s, "rss_kib": rss, "locate_first_page_ms": first_page_ms, "locate_by_name_ms": by_name_ms, "locate_absent_name_ms": absent_ms}));
        let mut b = b;
        let _ = b.child.kill().await;
    }
    write_rows(a.json_file.as_deref(), ncpu, rows)
}
