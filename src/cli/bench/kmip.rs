//! `bench kmip`: KMIP Encrypt, Decrypt and Get against a broker, each next
//! to a TTLV echo on the same listener code measured in the same run; and
//! a new connection per operation (pg_tde's pattern) against TLS
//! handshakes alone.

use super::*;
use crate::kmip::client::{client_config, outcomes, request, KmipClient};
use crate::kmip::message::Version;
use crate::kmip::tag::{self, op};
use crate::kmip::ttlv::{self, Item};

/// Arguments of `bench kmip`.
#[derive(clap::Args)]
pub struct KmipArgs {
    /// Connections, each with one request in flight (as KMIP clients do).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Payload of Encrypt/Decrypt in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Seconds per measurement (of the broker, and again of the ceiling).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Slices each measurement is cut into, alternating broker and ceiling.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Working directory (PKI, token, data); wiped first.
    #[arg(long, default_value = "target/bench-kmip")]
    dir: PathBuf,
    /// Use the development software root instead of SoftHSM2.
    #[arg(long)]
    software_root: bool,
    /// HSM profile: a built-in name or a profile file.
    #[arg(long, default_value = "softhsm2")]
    profile: String,
    /// Fail unless Encrypt and Get reach this ratio of the ceiling.
    #[arg(long)]
    min_ratio: Option<f64>,
    /// Write results as JSON to this file.
    #[arg(long = "json-file", value_name = "FILE")]
    json_file: Option<PathBuf>,
}

const V: Version = Version { major: 1, minor: 4 };

fn uid(id: &str) -> Item {
    Item::text(tag::UNIQUE_IDENTIFIER, id)
}

fn gcm(iv: &[u8]) -> Vec<Item> {
    vec![
        Item::structure(
            tag::CRYPTOGRAPHIC_PARAMETERS,
            vec![Item::enumeration(tag::BLOCK_CIPHER_MODE, tag::mode::GCM)],
        ),
        Item::bytes(tag::IV_COUNTER_NONCE, iv.to_vec()),
    ]
}

/// One call on an open connection: true when every batch item succeeded
/// (the echo's answer, the request itself, carries no result: decoding is
/// enough).
async fn call(c: &tokio::sync::Mutex<KmipClient>, bytes: &[u8], echo: bool) -> bool {
    let mut c = c.lock().await;
    let Ok(resp) = c.send_raw(bytes).await else {
        return false;
    };
    match ttlv::decode(&resp, &ttlv::Limits::default()) {
        Ok(item) => echo || outcomes(&item).iter().all(|o| o.status == 0),
        Err(_) => false,
    }
}

pub(super) async fn kmip(a: KmipArgs) -> Result<(), CliError> {
    let app = format!("spiffe://{TD}/region/eu-central/service/app");
    let tail = format!("\n[kmip]\nlisten = \"127.0.0.1:0\"\nkey_creators = [\"{app}\"]\n");
    let env = setup(&a.dir, a.software_root, &a.profile, &tail).await?;
    let broker = env.start("serve").await?;
    let echo = env.start("bench-echo").await?;
    let (bpid, epid) = (broker.child.id().unwrap_or(0), echo.child.id().unwrap_or(0));
    let no_kmip = || err("the broker did not report a KMIP address");
    let (baddr, eaddr) = (
        broker.kmip_addr.clone().ok_or_else(no_kmip)?,
        echo.kmip_addr.clone().ok_or_else(no_kmip)?,
    );
    let mut op_client = env.connect("operator-admin", &broker.addr).await?;
    devenv::wait_serving(&op_client).await?;
    let d = env.pki.join("eu-central");
    let tls = ClientTls::from_files(
        &d.join("ca.pem"),
        &d.join("service-app.pem"),
        &d.join("service-app.key"),
        "localhost",
    )
    .map_err(err)?;
    let cfg = client_config(&tls, false).map_err(err)?;
    let connect = |addr: String| {
        let cfg = Arc::clone(&cfg);
        async move {
            KmipClient::connect(&addr, cfg, "localhost")
                .await
                .map_err(err)
        }
    };
    // A registered (exportable) AES-256 key, active.
    let mut setup_c = connect(baddr.clone()).await?;
    let key = [0x42u8; 32];
    let reg = crate::kmip::client::register_aes_payload(&key);
    let resp = setup_c
        .call(&request(
            V,
            vec![(op::REGISTER, reg), (op::ACTIVATE, vec![])],
        ))
        .await
        .map_err(err)?;
    let o = outcomes(&resp);
    let id = o
        .first()
        .filter(|_| o.iter().all(|x| x.status == 0))
        .and_then(|x| x.text(tag::UNIQUE_IDENTIFIER))
        .ok_or_else(|| err(format!("Register + Activate failed: {o:?}")))?
        .to_owned();
    let iv = [7u8; 12];
    let pt = vec![0x5au8; a.size];
    let mut enc = vec![uid(&id), Item::bytes(tag::DATA, pt)];
    enc.extend(gcm(&iv));
    let resp = setup_c
        .call(&request(V, vec![(op::ENCRYPT, enc.clone())]))
        .await
        .map_err(err)?;
    let e = outcomes(&resp)
        .into_iter()
        .next()
        .ok_or_else(|| err("no Encrypt result"))?;
    let (ct, t) = (
        e.bytes(tag::DATA).map(<[u8]>::to_vec).unwrap_or_default(),
        e.bytes(tag::AUTHENTICATED_ENCRYPTION_TAG)
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
    );
    let mut dec = vec![uid(&id), Item::bytes(tag::DATA, ct)];
    dec.extend(gcm(&iv));
    dec.push(Item::bytes(tag::AUTHENTICATED_ENCRYPTION_TAG, t));
    let cases = [
        (
            "encrypt",
            a.size,
            request(V, vec![(op::ENCRYPT, enc)]).encode(),
        ),
        (
            "decrypt",
            a.size,
            request(V, vec![(op::DECRYPT, dec)]).encode(),
        ),
        (
            "get",
            32,
            request(V, vec![(op::GET, vec![uid(&id)])]).encode(),
        ),
    ];
    let n = a.connections.max(1);
    let mut bconns = Vec::new();
    let mut econns = Vec::new();
    for _ in 0..n {
        bconns.push(tokio::sync::Mutex::new(connect(baddr.clone()).await?));
        econns.push(tokio::sync::Mutex::new(connect(eaddr.clone()).await?));
    }
    let (bconns, econns) = (Arc::new(bconns), Arc::new(econns));
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sovkms bench kmip: {n} mTLS connections, one request in flight on each, {}s per run, {ncpu} cores (client and servers share them); root: {}",
        a.seconds,
        if a.software_root { "software (dev)" } else { "SoftHSM2" }
    );
    println!(
        "{:<22} {:>6} {:>10} {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>8}",
        "op", "bytes", "req/s", "p50 ms", "p99 ms", "cpu µs/r", "×rps", "×p99", "×cpu", "hsm/req"
    );
    let rounds = a.rounds.max(1);
    let slice = a.seconds / rounds as f64;
    let mut rows = Vec::new();
    let mut below = Vec::new();
    let mut report = |name: &str,
                      bytes: usize,
                      m: Measure,
                      ceiling: Measure,
                      ceiling_name: &str,
                      hsm: f64,
                      rows: &mut Vec<serde_json::Value>| {
        let r = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
        let (x_rps, x_p99, x_cpu) = (
            r(m.rps, ceiling.rps),
            r(m.p99_ms, ceiling.p99_ms),
            r(m.server_cpu_us_per_req, ceiling.server_cpu_us_per_req),
        );
        println!(
            "{:<22} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>8.3}",
            name,
            bytes,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.server_cpu_us_per_req,
            x_rps,
            x_p99,
            x_cpu,
            hsm
        );
        println!(
            "{:<22} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>9.1}",
            format!("  {ceiling_name}"),
            "",
            ceiling.rps,
            ceiling.p50_ms,
            ceiling.p99_ms,
            ceiling.server_cpu_us_per_req
        );
        if m.errors > 0 || ceiling.errors > 0 {
            println!("  ({} errors, ceiling {})", m.errors, ceiling.errors);
        }
        if let Some(min) = a.min_ratio {
            if matches!(name, "encrypt" | "get") && x_rps < min {
                below.push(format!("{name}: {x_rps:.2}× the ceiling"));
            }
        }
        rows.push(serde_json::json!({
            "op": name, "bytes": bytes, "broker": m, "ceiling": ceiling, "ceiling_kind": ceiling_name,
            "ratio_rps": x_rps, "ratio_p99": x_p99, "ratio_cpu": x_cpu, "hsm_calls_per_request": hsm,
        }));
    };
    // Plaintext-releasing operations also against the durable echo (one
    // audit record per request, answered after its sync).
    let mut dconns = Vec::new();
    if let Some(d) = &echo.durable_kmip_addr {
        for _ in 0..n {
            dconns.push(tokio::sync::Mutex::new(connect(d.clone()).await?));
        }
    }
    let dconns = Arc::new(dconns);
    for (name, bytes, req) in cases {
        let req = Arc::new(req);
        let durable = name != "encrypt" && !dconns.is_empty();
        let (dc, r3) = (Arc::clone(&dconns), Arc::clone(&req));
        let durable_call = Arc::new(move |w: usize, _| {
            let (c, r) = (Arc::clone(&dc), Arc::clone(&r3));
            async move { call(&c[w % c.len()], &r, true).await }
        });
        let (bc, r1) = (Arc::clone(&bconns), Arc::clone(&req));
        let broker_call = Arc::new(move |w: usize, _| {
            let (c, r) = (Arc::clone(&bc), Arc::clone(&r1));
            async move { call(&c[w % c.len()], &r, false).await }
        });
        let (ec, r2) = (Arc::clone(&econns), Arc::clone(&req));
        let echo_call = Arc::new(move |w: usize, _| {
            let (c, r) = (Arc::clone(&ec), Arc::clone(&r2));
            async move { call(&c[w % c.len()], &r, true).await }
        });
        let info0 = op_client.info(pb::GetInfoRequest {}).await?;
        let (mut ce, mut de, mut br) = (Samples::default(), Samples::default(), Samples::default());
        for _ in 0..rounds {
            ce.merge(drive(n, slice, epid, Arc::clone(&echo_call)).await);
            if durable {
                de.merge(drive(n, slice, epid, Arc::clone(&durable_call)).await);
            }
            br.merge(drive(n, slice, bpid, Arc::clone(&broker_call)).await);
        }
        let info1 = op_client.info(pb::GetInfoRequest {}).await?;
        let m = br.summary();
        let hsm = (info1.root_calls - info0.root_calls) as f64 / m.requests.max(1) as f64;
        report(
            name,
            bytes,
            m.clone(),
            ce.summary(),
            "TTLV echo ceiling",
            hsm,
            &mut rows,
        );
        if durable {
            let d = de.summary();
            let r = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
            println!(
                "{:<22} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>9.1} {:>7.2} {:>7.2} {:>7.2}",
                "  durable TTLV echo",
                "",
                d.rps,
                d.p50_ms,
                d.p99_ms,
                d.server_cpu_us_per_req,
                r(m.rps, d.rps),
                r(m.p99_ms, d.p99_ms),
                r(m.server_cpu_us_per_req, d.server_cpu_us_per_req)
            );
            rows.push(serde_json::json!({
                "op": name, "bytes": bytes, "broker": m.clone(), "ceiling": d.clone(),
                "ceiling_kind": "durable TTLV echo",
                "ratio_rps": r(m.rps, d.rps), "ratio_p99": r(m.p99_ms, d.p99_ms),
                "ratio_cpu": r(m.server_cpu_us_per_req, d.server_cpu_us_per_req),
            }));
        }
    }
    // A new connection per operation (resumed sessions), against TLS
    // handshakes alone on the echo's listener.
    let get = Arc::new(request(V, vec![(op::GET, vec![uid(&id)])]).encode());
    let (c1, a1, g1) = (Arc::clone(&cfg), baddr.clone(), Arc::clone(&get));
    let broker_call = Arc::new(move |_w: usize, _| {
        let (cfg, addr, g) = (Arc::clone(&c1), a1.clone(), Arc::clone(&g1));
        async move {
            match KmipClient::connect(&addr, cfg, "localhost").await {
                Ok(c) => call(&tokio::sync::Mutex::new(c), &g, false).await,
                Err(_) => false,
            }
        }
    });
    let (c2, a2) = (Arc::clone(&cfg), eaddr.clone());
    let handshake = Arc::new(move |_w: usize, _| {
        let (cfg, addr) = (Arc::clone(&c2), a2.clone());
        async move { KmipClient::connect(&addr, cfg, "localhost").await.is_ok() }
    });
    // At most 16 handshakes from one address are in progress at once (the
    // listener's flood guard): connect from no more workers than that.
    let connectors = n.min(8);
    let info0 = op_client.info(pb::GetInfoRequest {}).await?;
    let (mut ce, mut br) = (Samples::default(), Samples::default());
    for _ in 0..rounds {
        ce.merge(drive(connectors, slice, epid, Arc::clone(&handshake)).await);
        br.merge(drive(connectors, slice, bpid, Arc::clone(&broker_call)).await);
    }
    let info1 = op_client.info(pb::GetInfoRequest {}).await?;
    let m = br.summary();
    let hsm = (info1.root_calls - info0.root_calls) as f64 / m.requests.max(1) as f64;
    report(
        "connect+get (resumed)",
        32,
        m,
        ce.summary(),
        "TLS handshake ceiling",
        hsm,
        &mut rows,
    );
    drop((broker, echo));
    if let Some(p) = a.json_file {
        let v = serde_json::json!({"cores": ncpu, "connections": n, "seconds": a.seconds, "bytes": a.size, "rows": rows});
        std::fs::write(&p, serde_json::to_string_pretty(&v).map_err(err)?).map_err(err)?;
    }
    if !below.is_empty() {
        return Err(CliError::new(
            format!("below the minimum ratio: {}", below.join("; ")),
            "a gross regression: see the table",
        ));
    }
    Ok(())
}
