//! `bench rpc`: RPC load against a broker and the echo ceiling, interleaved.

use super::*;
use crate::api::bench::proto as echo_pb;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    DataKey,
    ReEncrypt,
    Mix,
}

impl Op {
    fn parse(s: &str) -> Result<Self, CliError> {
        Ok(match s.trim() {
            "encrypt" => Self::Encrypt,
            "decrypt" => Self::Decrypt,
            "generate-data-key" => Self::DataKey,
            "re-encrypt" => Self::ReEncrypt,
            "mix" => Self::Mix,
            o => {
                return Err(CliError::new(
                    format!("unknown op {o:?}"),
                    "use encrypt, decrypt, generate-data-key, re-encrypt, mix",
                ))
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::DataKey => "generate-data-key",
            Self::ReEncrypt => "re-encrypt",
            Self::Mix => "mix",
        }
    }
}

pub async fn echo(a: EchoArgs) -> Result<(), CliError> {
    let s =
        crate::config::Settings::load(&a.config).map_err(|e| CliError::new(e.to_string(), ""))?;
    // One audit log for every durable ceiling (gRPC and KMIP).
    let log = durable_log(&s.data_dir)?;
    let server = crate::api::bench::start_echo(&s, Arc::clone(&log))
        .await
        .map_err(err)?;
    // The KMIP ceilings, when the config has [kmip]: a TTLV echo on the
    // KMIP listener code, and a durable TTLV echo (one audit record per
    // request, answered after its sync) on a second listener.
    let mut kmip = Vec::new();
    if let Some(k) = &s.kmip {
        let bound = crate::kmip::server::bind(&k.listen, &s.tls, 4096)
            .await
            .map_err(err)?;
        kmip.push(crate::kmip::server::start_with(
            bound,
            crate::kmip::bench::echo_handler(),
            Arc::default(),
        ));
        let bound = crate::kmip::server::bind(&k.listen, &s.tls, 4096)
            .await
            .map_err(err)?;
        kmip.push(crate::kmip::server::start_with(
            bound,
            crate::kmip::bench::durable_echo_handler(Arc::clone(&log)),
            Arc::default(),
        ));
    }
    match kmip.as_slice() {
        [plain, durable] => println!(
            "listening on {}; KMIP on {}; KMIP durable on {}",
            server.local_addr, plain.local_addr, durable.local_addr
        ),
        _ => println!("listening on {}", server.local_addr),
    }
    let _ = tokio::signal::ctrl_c().await;
    for k in kmip {
        k.shutdown().await;
    }
    server.shutdown().await.map_err(err)
}

/// The durable echo's own audit log (a development software root signs
/// its checkpoints; it is a benchmark, never a broker).
fn durable_log(data_dir: &Path) -> Result<Arc<dyn crate::audit::AuditSink>, CliError> {
    use crate::audit::{AuditLog, LogSettings};
    let dir = data_dir.join("durable-echo");
    crate::files::create_private_dir(&dir).map_err(err)?;
    let root = Arc::new(
        crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).map_err(err)?,
    );
    let log = AuditLog::open(
        LogSettings {
            path: dir.join("audit.log"),
            region: "eu-central".into(),
            broker_id: "durable-echo".into(),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            witness: None,
            segment_bytes: 64 << 20,
            reserve_bytes: 0,
            table: None,
        },
        root,
    )
    .map_err(err)?;
    Ok(Arc::new(log))
}

/// The KEK and record caches' sizes, from the admin listener's metrics.
async fn cache_sizes(admin: &str) -> Result<(u64, u64), CliError> {
    let (_, text) = devenv::admin_get(admin, "/metrics").await?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    Ok((
        value("sovkms_kek_cache_entries "),
        value("sovkms_record_cache_entries "),
    ))
}

pub(super) async fn rpc(a: RpcArgs) -> Result<(), CliError> {
    let ops = list(&a.ops, Op::parse)?;
    let sizes = list(&a.sizes, |s| {
        s.parse::<usize>()
            .map_err(|_| CliError::new(format!("bad size {s:?}"), ""))
    })?;
    // The admin listener (loopback) gives the caches' sizes.
    let env = setup(
        &a.dir,
        a.software_root,
        &a.profile,
        "\n[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await?;
    let broker = env.start("serve").await?;
    let echo = env.start("bench-echo").await?;
    let (bpid, epid) = (broker.child.id().unwrap_or(0), echo.child.id().unwrap_or(0));
    let mut op = env.connect("operator-admin", &broker.addr).await?;
    devenv::wait_serving(&op).await?;
    let key = bench_key(&mut op).await?;
    let conns = a.connections.max(1);
    let mut svc = Vec::new();
    let mut echo_c = Vec::new();
    for _ in 0..conns {
        svc.push(env.connect("service-app", &broker.addr).await?);
        let e = env.connect("service-app", &echo.addr).await?;
        echo_c.push(
            echo_pb::echo_service_client::EchoServiceClient::new(e.channel.clone())
                .max_decoding_message_size(2 << 20)
                .max_encoding_message_size(2 << 20),
        );
    }
    let svc = Arc::new(svc);
    let echo_c = Arc::new(echo_c);
    let ctx: HashMap<String, String> = [("bench".to_string(), "1".to_string())].into();
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sovkms bench rpc: {} in flight over {conns} mTLS connections, {}s per run, {ncpu} cores (client and servers share them); root: {}",
        a.inflight,
        a.seconds,
        if a.software_root { "software (dev)" } else { "SoftHSM2" }
    );
    println!(
        "{:<18} {:>6} {:>10} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7} {:>7} {:>8} {:>6}",
        "op",
        "bytes",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9",
        "cpu µs/r",
        "×rps",
        "×p99",
        "×cpu",
        "hsm/req",
        "hit%"
    );
    let mut rows = Vec::new();
    let mut below = Vec::new();
    let mut peak = (0u64, 0u64);
    for &o in &ops {
        for &size in &sizes {
            let pt = vec![0x5au8; size];
            let ct = ciphertext(&svc[0], &key, &pt, &ctx).await?;
            // Ceiling: echo of the request's payload size.
            let payload = match o {
                Op::Decrypt | Op::ReEncrypt => ct.clone(),
                Op::DataKey => vec![0u8; 64],
                _ => pt.clone(),
            };
            let ec = Arc::clone(&echo_c);
            let p2 = payload.clone();
            let echo_call = Arc::new(move |w: usize, _| {
                let mut c = ec[w % ec.len()].clone();
                let p = p2.clone();
                async move { c.echo(echo_pb::EchoMessage { payload: p }).await.is_ok() }
            });
            // The durable ceiling (what "audited, then released" costs on
            // this disk) for the operations that wait for their record.
            let durable = matches!(o, Op::Decrypt | Op::DataKey | Op::ReEncrypt | Op::Mix);
            let ec = Arc::clone(&echo_c);
            let p2 = payload.clone();
            let durable_call = Arc::new(move |w: usize, _| {
                let mut c = ec[w % ec.len()].clone();
                let p = p2.clone();
                async move {
                    c.durable_echo(echo_pb::EchoMessage { payload: p })
                        .await
                        .is_ok()
                }
            });
            let (s2, k2, c2, pt2, ct2) = (
                Arc::clone(&svc),
                key.clone(),
                ctx.clone(),
                pt.clone(),
                ct.clone(),
            );
            let broker_call = Arc::new(move |w: usize, i: u64| {
                let mut c = s2[w % s2.len()].crypto.clone();
                let (k, cx, pt, ct) = (k2.clone(), c2.clone(), pt2.clone(), ct2.clone());
                let which = match o {
                    Op::Mix => match i % 10 {
                        0 => Op::DataKey,
                        1..=5 => Op::Encrypt,
                        _ => Op::Decrypt,
                    },
                    other => other,
                };
                async move {
                    match which {
                        Op::Encrypt | Op::Mix => c
                            .encrypt(pb::EncryptRequest {
                                key_id: k,
                                plaintext: pt,
                                context: cx,
                            })
                            .await
                            .is_ok(),
                        Op::Decrypt => c
                            .decrypt(pb::DecryptRequest {
                                ciphertext: ct,
                                context: cx,
                            })
                            .await
                            .is_ok(),
                        Op::DataKey => c
                            .generate_data_key(pb::GenerateDataKeyRequest {
                                key_id: k,
                                context: cx,
                            })
                            .await
                            .is_ok(),
                        Op::ReEncrypt => c
                            .re_encrypt(pb::ReEncryptRequest {
                                ciphertext: ct,
                                source_context: cx.clone(),
                                destination_key_id: String::new(),
                                destination_context: cx,
                            })
                            .await
                            .is_ok(),
                    }
                }
            });
            let info0 = op.info(pb::GetInfoRequest {}).await?;
            // Interleaved slices: a machine whose speed drifts during the
            // run (shared, noisy) slows both sides alike.
            let rounds = a.rounds.max(1);
            let slice = a.seconds / rounds as f64;
            let (mut ce, mut de, mut br) =
                (Samples::default(), Samples::default(), Samples::default());
            for _ in 0..rounds {
                ce.merge(drive(a.inflight, slice, epid, Arc::clone(&echo_call)).await);
                if durable {
                    de.merge(drive(a.inflight, slice, epid, Arc::clone(&durable_call)).await);
                }
                br.merge(drive(a.inflight, slice, bpid, Arc::clone(&broker_call)).await);
            }
            let (ceiling, m) = (ce.summary(), br.summary());
            let durable_ceiling = durable.then(|| de.summary());
            let info1 = op.info(pb::GetInfoRequest {}).await?;
            let reqs = m.requests.max(1) as f64;
            let hsm_per_req = (info1.root_calls - info0.root_calls) as f64 / reqs;
            let (h, mi) = (
                info1.cache_hits - info0.cache_hits,
                info1.cache_misses - info0.cache_misses,
            );
            let hit = if h + mi > 0 {
                100.0 * h as f64 / (h + mi) as f64
            } else {
                0.0
            };
            let r = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
            let (x_rps, x_p99, x_cpu) = (
                r(m.rps, ceiling.rps),
                r(m.p99_ms, ceiling.p99_ms),
                r(m.server_cpu_us_per_req, ceiling.server_cpu_us_per_req),
            );
            println!(
                "{:<18} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>7.2} {:>7.2} {:>7.2} {:>8.3} {:>6.1}",
                o.name(), size, m.rps, m.p50_ms, m.p99_ms, m.p999_ms, m.server_cpu_us_per_req, x_rps, x_p99, x_cpu, hsm_per_req, hit
            );
            println!(
                "{:<18} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>9.1}",
                "  echo ceiling",
                payload.len(),
                ceiling.rps,
                ceiling.p50_ms,
                ceiling.p99_ms,
                ceiling.p999_ms,
                ceiling.server_cpu_us_per_req
            );
            let mut durable_json = serde_json::Value::Null;
            if let Some(d) = &durable_ceiling {
                let (d_rps, d_p99, d_cpu) = (
                    r(m.rps, d.rps),
                    r(m.p99_ms, d.p99_ms),
                    r(m.server_cpu_us_per_req, d.server_cpu_us_per_req),
                );
                let p50_over_us = (m.p50_ms - d.p50_ms) * 1000.0;
                println!(
                    "{:<18} {:>6} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>9.1} {:>7.2} {:>7.2} {:>7.2}  (broker ÷ durable; p50 {:+.0} µs)",
                    "  durable echo",
                    payload.len(),
                    d.rps,
                    d.p50_ms,
                    d.p99_ms,
                    d.p999_ms,
                    d.server_cpu_us_per_req,
                    d_rps,
                    d_p99,
                    d_cpu,
                    p50_over_us
                );
                durable_json = serde_json::json!({
                    "ceiling": d, "ratio_rps": d_rps, "ratio_p99": d_p99,
                    "ratio_cpu": d_cpu, "p50_over_us": p50_over_us,
                });
            }
            if m.errors > 0 {
                println!("  ({} errors)", m.errors);
            }
            if let Some(admin) = &broker.admin_addr {
                let (kek, rec) = cache_sizes(admin).await?;
                peak = (peak.0.max(kek), peak.1.max(rec));
            }
            if let Some(min) = a.min_ratio {
                if matches!(o, Op::Encrypt | Op::Decrypt) && x_rps < min {
                    below.push(format!("{} {size} B: {x_rps:.2}× the ceiling", o.name()));
                }
            }
            rows.push(serde_json::json!({
                "op": o.name(), "bytes": size, "broker": m, "ceiling": ceiling,
                "ratio_rps": x_rps, "ratio_p99": x_p99, "ratio_cpu": x_cpu,
                "durable": durable_json,
                "hsm_calls_per_request": hsm_per_req, "cache_hit_percent": hit,
            }));
        }
    }
    drop((broker, echo));
    println!(
        "cache sizes, largest seen after a measurement: {} KEK entries, {} key records (bounds: [cache] max_entries each)",
        peak.0, peak.1
    );
    if let Some(p) = a.json_file {
        let v = serde_json::json!({"cores": ncpu, "inflight": a.inflight, "connections": conns, "seconds": a.seconds, "rows": rows,
            "cache_peak": {"kek_entries": peak.0, "record_entries": peak.1}});
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
