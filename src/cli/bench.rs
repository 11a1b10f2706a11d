//! `sovkms bench`: the benchmark harness. Every broker figure is printed
//! next to the same load against an echo service with the same TLS setup,
//! runtime and message sizes, measured in the same run, as a ratio.

use super::devenv::{self, err, Broker};
use super::CliError;
use crate::api::proto as pb;
use crate::client::{self, Client, ClientTls};
use crate::pki;
use crate::region::Region;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Benchmark commands.
#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// RPC load against a broker on a SoftHSM2 token and against the echo ceiling.
    Rpc(RpcArgs),
    /// Envelope seal/open against the raw AES-256-GCM primitives.
    Crypto {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Write results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Key creation rate, start-up time, memory and Locate latency by key count.
    Lifecycle(LifecycleArgs),
    /// TPM: unseal and quote latency against the config's TPM (each round
    /// connects, loads, runs the policy session, flushes: what a start or an
    /// auditor's request costs).
    Tpm {
        /// Broker config with [tpm] and a provisioned sealed blob.
        #[arg(long, short)]
        config: PathBuf,
        /// Rounds of each.
        #[arg(long, default_value_t = 50)]
        rounds: usize,
    },
    /// The audit log alone: durable (group commit) against buffered appends.
    Audit {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Working directory; wiped first.
        #[arg(long, default_value = "target/bench-audit")]
        dir: PathBuf,
    },
}

/// Arguments of `bench rpc`.
#[derive(clap::Args)]
pub struct RpcArgs {
    /// Operations: encrypt, decrypt, generate-data-key, mix (comma-separated).
    #[arg(long, default_value = "encrypt,decrypt,generate-data-key,mix")]
    ops: String,
    /// Payload sizes in bytes (comma-separated).
    #[arg(long, default_value = "64,1024,4096,65536")]
    sizes: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// mTLS connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds per measurement (of the broker, and again of the ceiling).
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Slices each measurement is cut into, alternating broker and ceiling.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Working directory (PKI, token, data); wiped first.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    /// Use the development software root instead of SoftHSM2.
    #[arg(long)]
    software_root: bool,
    /// HSM profile.
    #[arg(long, default_value = "hsm-profiles/softhsm2.toml")]
    profile: PathBuf,
    /// Fail unless every Encrypt/Decrypt rate is at least this ratio of the ceiling.
    #[arg(long)]
    min_ratio: Option<f64>,
    /// Write results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Arguments of `bench lifecycle`.
#[derive(clap::Args)]
pub struct LifecycleArgs {
    /// Key counts for start-up, memory and Locate (comma-separated).
    #[arg(long, default_value = "10000,100000,1000000")]
    keys: String,
    /// Seconds of key creation.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent creators.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Working directory; wiped first.
    #[arg(long, default_value = "target/bench-lifecycle")]
    dir: PathBuf,
    /// HSM profile.
    #[arg(long, default_value = "hsm-profiles/softhsm2.toml")]
    profile: PathBuf,
    /// Write results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `sovkms bench-echo`: serve the echo ceiling with a broker config's TLS.
#[derive(clap::Args)]
pub struct EchoArgs {
    /// A broker config (its TLS and listen settings are used).
    #[arg(long, short)]
    config: PathBuf,
}

pub async fn echo(a: EchoArgs) -> Result<(), CliError> {
    let s =
        crate::config::Settings::load(&a.config).map_err(|e| CliError::new(e.to_string(), ""))?;
    let server = crate::api::start_echo(&s).await.map_err(err)?;
    println!("listening on {}", server.local_addr);
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown().await.map_err(err)
}

const TD: &str = "sovkms.example";

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Env {
    dir: PathBuf,
    exe: PathBuf,
    pki: PathBuf,
    conf: Option<PathBuf>,
    cfg: PathBuf,
}

async fn setup(
    dir: &Path,
    software_root: bool,
    profile: &Path,
    tail: &str,
) -> Result<Env, CliError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(err)?;
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let dir = dir.canonicalize().map_err(err)?;
    let exe = std::env::current_exe().map_err(err)?;
    let pki_dir = dir.join("pki");
    let eu = Region::parse("eu-central").map_err(err)?;
    pki::dev_pki(&pki_dir, TD, std::slice::from_ref(&eu), 2).map_err(err)?;
    let (root, conf) = if software_root {
        (pki::DEV_SOFTWARE_ROOT.to_owned(), None)
    } else {
        let profile = profile.canonicalize().map_err(|e| {
            CliError::new(
                format!("{}: {e}", profile.display()),
                "run from the repository root or pass --profile",
            )
        })?;
        let (root, conf) = devenv::softhsm_token(&exe, &dir, &eu, &profile)?;
        (root, Some(conf))
    };
    let mut text = pki::dev_broker_config(
        &pki_dir,
        &dir.join("data"),
        &eu,
        TD,
        std::slice::from_ref(&eu),
        &root,
    );
    text.push_str(tail);
    let cfg = dir.join("broker.toml");
    std::fs::write(&cfg, text).map_err(err)?;
    if let Some(c) = &conf {
        devenv::provision(&exe, &cfg, c)?;
    }
    Ok(Env {
        dir,
        exe,
        pki: pki_dir,
        conf,
        cfg,
    })
}

impl Env {
    async fn start(&self, command: &str) -> Result<Broker, CliError> {
        let log = self.dir.join(format!("{command}.log"));
        devenv::start_child(&self.exe, command, &self.cfg, &log, self.conf.as_deref()).await
    }

    async fn connect(&self, who: &str, addr: &str) -> Result<Client, CliError> {
        let d = self.pki.join("eu-central");
        let tls = ClientTls::from_files(
            &d.join("ca.pem"),
            &d.join(format!("{who}.pem")),
            &d.join(format!("{who}.key")),
            "localhost",
        )
        .map_err(err)?;
        client::connect(addr, &tls).await.map_err(err)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Encrypt,
    Decrypt,
    DataKey,
    Mix,
}

impl Op {
    fn parse(s: &str) -> Result<Self, CliError> {
        Ok(match s.trim() {
            "encrypt" => Self::Encrypt,
            "decrypt" => Self::Decrypt,
            "generate-data-key" => Self::DataKey,
            "mix" => Self::Mix,
            o => {
                return Err(CliError::new(
                    format!("unknown op {o:?}"),
                    "use encrypt, decrypt, generate-data-key, mix",
                ))
            }
        })
    }
    fn name(self) -> &'static str {
        match self {
            Self::Encrypt => "encrypt",
            Self::Decrypt => "decrypt",
            Self::DataKey => "generate-data-key",
            Self::Mix => "mix",
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Measure {
    requests: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    server_cpu_us_per_req: f64,
}

/// Raw samples of one or more measurement slices.
#[derive(Default)]
struct Samples {
    lat_us: Vec<u32>,
    errors: u64,
    elapsed: f64,
    cpu: f64,
}

impl Samples {
    fn merge(&mut self, o: Samples) {
        self.lat_us.extend(o.lat_us);
        self.errors += o.errors;
        self.elapsed += o.elapsed;
        self.cpu += o.cpu;
    }

    fn summary(mut self) -> Measure {
        self.lat_us.sort_unstable();
        let all = &self.lat_us;
        let pct = |p: f64| -> f64 {
            if all.is_empty() {
                return 0.0;
            }
            let i = ((all.len() as f64 - 1.0) * p).round() as usize;
            f64::from(all[i]) / 1000.0
        };
        let n = all.len() as u64;
        Measure {
            requests: n,
            errors: self.errors,
            rps: if self.elapsed > 0.0 {
                n as f64 / self.elapsed
            } else {
                0.0
            },
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            server_cpu_us_per_req: if n > 0 {
                self.cpu * 1e6 / n as f64
            } else {
                0.0
            },
        }
    }
}

/// Runs `inflight` loops for `secs`, each calling `call`; `pid` is the
/// server whose CPU time is charged to the requests.
async fn drive<F, Fut>(inflight: usize, secs: f64, pid: u32, call: Arc<F>) -> Samples
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let call = Arc::clone(&call);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if call(w, i).await {
                    lat.push(t.elapsed().as_micros() as u32);
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut out = Samples::default();
    for t in tasks {
        if let Ok((l, e)) = t.await {
            out.lat_us.extend(l);
            out.errors += e;
        }
    }
    out.elapsed = start.elapsed().as_secs_f64();
    out.cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    out
}

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T, CliError>) -> Result<Vec<T>, CliError> {
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| f(x.trim()))
        .collect()
}

pub async fn rpc(a: RpcArgs) -> Result<(), CliError> {
    let ops = list(&a.ops, Op::parse)?;
    let sizes = list(&a.sizes, |s| {
        s.parse::<usize>()
            .map_err(|_| CliError::new(format!("bad size {s:?}"), ""))
    })?;
    let env = setup(&a.dir, a.software_root, &a.profile, "").await?;
    let broker = env.start("serve").await?;
    let echo = env.start("bench-echo").await?;
    let (bpid, epid) = (broker.child.id().unwrap_or(0), echo.child.id().unwrap_or(0));
    let mut op = env.connect("operator-admin", &broker.addr).await?;
    devenv::wait_serving(&op).await?;
    let app = format!("spiffe://{TD}/region/eu-central/service/app");
    let all_ops = [1, 2, 3, 4, 5];
    let key = op
        .keys
        .create(pb::CreateKeyRequest {
            name: "bench".into(),
            grants: vec![pb::Grant {
                principal: app,
                operations: all_ops.to_vec(),
            }],
            activate: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .key_id;
    let conns = a.connections.max(1);
    let mut svc = Vec::new();
    let mut echo_c = Vec::new();
    for _ in 0..conns {
        svc.push(env.connect("service-app", &broker.addr).await?);
        let e = env.connect("service-app", &echo.addr).await?;
        echo_c.push(
            pb::bench_echo_service_client::BenchEchoServiceClient::new(e.channel.clone())
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
    for &o in &ops {
        for &size in &sizes {
            let pt = vec![0x5au8; size];
            let ct = svc[0]
                .crypto
                .clone()
                .encrypt(pb::EncryptRequest {
                    key_id: key.clone(),
                    plaintext: pt.clone(),
                    context: ctx.clone(),
                })
                .await?
                .into_inner()
                .ciphertext;
            // Ceiling: echo of the request's payload size.
            let payload = match o {
                Op::Decrypt => ct.clone(),
                Op::DataKey => vec![0u8; 64],
                _ => pt.clone(),
            };
            let ec = Arc::clone(&echo_c);
            let p2 = payload.clone();
            let echo_call = Arc::new(move |w: usize, _| {
                let mut c = ec[w % ec.len()].clone();
                let p = p2.clone();
                async move { c.echo(pb::EchoMessage { payload: p }).await.is_ok() }
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
                    }
                }
            });
            let info0 = op
                .broker
                .get_info(pb::GetInfoRequest {})
                .await?
                .into_inner();
            // Interleaved slices: a machine whose speed drifts during the
            // run (shared, noisy) slows both sides alike.
            let rounds = a.rounds.max(1);
            let slice = a.seconds / rounds as f64;
            let (mut ce, mut br) = (Samples::default(), Samples::default());
            for _ in 0..rounds {
                ce.merge(drive(a.inflight, slice, epid, Arc::clone(&echo_call)).await);
                br.merge(drive(a.inflight, slice, bpid, Arc::clone(&broker_call)).await);
            }
            let (ceiling, m) = (ce.summary(), br.summary());
            let info1 = op
                .broker
                .get_info(pb::GetInfoRequest {})
                .await?
                .into_inner();
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
            if m.errors > 0 {
                println!("  ({} errors)", m.errors);
            }
            if let Some(min) = a.min_ratio {
                if matches!(o, Op::Encrypt | Op::Decrypt) && x_rps < min {
                    below.push(format!("{} {size} B: {x_rps:.2}× the ceiling", o.name()));
                }
            }
            rows.push(serde_json::json!({
                "op": o.name(), "bytes": size, "broker": m, "ceiling": ceiling,
                "ratio_rps": x_rps, "ratio_p99": x_p99, "ratio_cpu": x_cpu,
                "hsm_calls_per_request": hsm_per_req, "cache_hit_percent": hit,
            }));
        }
    }
    drop((broker, echo));
    if let Some(p) = a.json {
        let v = serde_json::json!({"cores": ncpu, "inflight": a.inflight, "connections": conns, "seconds": a.seconds, "rows": rows});
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

pub fn crypto(seconds: f64, json: Option<PathBuf>) -> Result<(), CliError> {
    use crate::envelope::{self, EncryptionContext, Envelope};
    use crate::keys::KeyId;
    use crate::secret::{KeyMaterial, Plaintext};
    use aes_gcm::aead::AeadInPlace;
    use aes_gcm::KeyInit;
    use aws_lc_rs::aead as lc;
    use ring::aead;
    let kek = envelope::Kek::new(KeyMaterial::from_slice(&[7u8; 32]).ok_or_else(|| err("key"))?)
        .map_err(err)?;
    let region = Region::parse("eu-central").map_err(err)?;
    let kid = KeyId::parse("k-bench").map_err(err)?;
    let ctx = EncryptionContext::new([("a".to_string(), "b".to_string())]).map_err(err)?;
    let rng = ring::rand::SystemRandom::new();
    let ring_key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, &[7u8; 32]).map_err(|_| err("key"))?,
    );
    let lc_key = lc::LessSafeKey::new(
        lc::UnboundKey::new(&lc::AES_256_GCM, &[7u8; 32]).map_err(|_| err("key"))?,
    );
    let rc = aes_gcm::Aes256Gcm::new_from_slice(&[7u8; 32]).map_err(|_| err("key"))?;
    let dur = Duration::from_secs_f64(seconds);
    let rate = |f: &mut dyn FnMut() -> bool| -> f64 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < dur {
            for _ in 0..16 {
                if f() {
                    n += 1;
                }
            }
        }
        n as f64 / start.elapsed().as_secs_f64()
    };
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("sovkms bench crypto: one thread, {seconds}s per figure, {ncpu} cores");
    println!(
        "raw = AES-256-GCM sealing in place with a fixed key; ×best = envelope seal or \
         open (per-message key, header, fresh output buffer) over the fastest raw seal"
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "bytes",
        "seal MB/s",
        "open MB/s",
        "ring raw",
        "aws-lc raw",
        "aes-gcm",
        "seal×best",
        "open×best",
        "derive µs",
        "alg1 µs"
    );
    let mut rows = Vec::new();
    for size in [64usize, 1024, 16 * 1024, 1024 * 1024] {
        let pt = vec![0x42u8; size];
        let sealed = envelope::seal(
            &rng,
            &kek,
            &region,
            &kid,
            1,
            &ctx,
            &Plaintext::new(pt.clone()),
        )
        .map_err(err)?;
        let env = Envelope::parse(&sealed).map_err(err)?;
        // The caller's plaintext is reused: seal reads it, and zeroizing the
        // caller's buffer is the caller's cost, once per request.
        let owned = Plaintext::new(pt.clone());
        let seal = rate(&mut || {
            envelope::seal(
                &crate::envelope::BatchedRandom,
                &kek,
                &region,
                &kid,
                1,
                &ctx,
                &owned,
            )
            .is_ok()
        });
        let derive = rate(&mut || envelope::derive_only(&kek, &env).is_ok());
        // Algorithm 1 (read only): the per-message extract it pays.
        let legacy = envelope::seal_with_header(
            &kek,
            &envelope::Header {
                algorithm: envelope::ALG_AES256GCM_HKDF_SHA256,
                ..env.header.clone()
            },
            &ctx,
            &pt,
        )
        .map_err(err)?;
        let legacy = Envelope::parse(&legacy).map_err(err)?;
        let derive_v1 = rate(&mut || envelope::derive_only(&kek, &legacy).is_ok());
        let open = rate(&mut || envelope::open(&kek, &env, &ctx).is_ok());
        let mut buf = pt.clone();
        let mut nonce = 0u64;
        let mut next_nonce = || {
            nonce += 1;
            let mut n = [0u8; 12];
            n[4..].copy_from_slice(&nonce.to_be_bytes());
            n
        };
        let ring_rate = rate(&mut || {
            buf.truncate(size);
            ring_key
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(next_nonce()),
                    aead::Aad::from(b"hdr"),
                    &mut buf,
                )
                .is_ok()
        });
        let lc_rate = rate(&mut || {
            buf.truncate(size);
            lc_key
                .seal_in_place_append_tag(
                    lc::Nonce::assume_unique_for_key(next_nonce()),
                    lc::Aad::from(b"hdr"),
                    &mut buf,
                )
                .is_ok()
        });
        let rc_rate = rate(&mut || {
            buf.truncate(size);
            rc.encrypt_in_place(aes_gcm::Nonce::from_slice(&next_nonce()), b"hdr", &mut buf)
                .is_ok()
        });
        let mb = |r: f64| r * size as f64 / 1e6;
        let best = ring_rate.max(lc_rate).max(rc_rate);
        println!(
            "{:>8} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            size,
            mb(seal),
            mb(open),
            mb(ring_rate),
            mb(lc_rate),
            mb(rc_rate),
            seal / best,
            open / best,
            1e6 / derive,
            1e6 / derive_v1
        );
        rows.push(serde_json::json!({"bytes": size, "seal_per_s": seal, "open_per_s": open, "derive_us": 1e6 / derive, "alg1_derive_us": 1e6 / derive_v1, "ring_aes_gcm_per_s": ring_rate, "aws_lc_aes_gcm_per_s": lc_rate, "rustcrypto_aes_gcm_per_s": rc_rate, "seal_ratio_to_best": seal / best, "open_ratio_to_best": open / best}));
    }
    if let Some(p) = json {
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&serde_json::json!({"cores": ncpu, "rows": rows}))
                .map_err(err)?,
        )
        .map_err(err)?;
    }
    Ok(())
}

pub async fn lifecycle(a: LifecycleArgs) -> Result<(), CliError> {
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
        let store = crate::server::open_store(&settings).map_err(err)?;
        let (page, _) = crate::store::Store::scan(&store, None, 1, &|_| true).map_err(err)?;
        page.into_iter()
            .next()
            .ok_or_else(|| err("no key to copy"))?
    };
    let mut rows = vec![serde_json::json!({"create_per_s": m.rps, "create": m})];
    let mut have = 0u64;
    for n in counts {
        {
            let store = crate::server::open_store(&settings).map_err(err)?;
            while have < n {
                let mut r = template.clone();
                r.id =
                    crate::keys::KeyId::parse(&format!("k-synthetic-{have:012}")).map_err(err)?;
                r.name = format!("synthetic-{}", have % 1000);
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
        let mut k = c.keys.clone();
        let t = Instant::now();
        let first = k
            .locate(pb::LocateRequest {
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner();
        let first_page_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let by_name = k
            .locate(pb::LocateRequest {
                name: "synthetic-7".into(),
                page_size: 100,
                ..Default::default()
            })
            .await?
            .into_inner();
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
    if let Some(p) = a.json {
        std::fs::write(
            &p,
            serde_json::to_string_pretty(&serde_json::json!({"cores": ncpu, "rows": rows}))
                .map_err(err)?,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Durable appends by 1..64 concurrent writers against buffered appends,
/// on the real log file (software root signs the checkpoints).
pub fn audit(seconds: f64, dir: &Path) -> Result<(), CliError> {
    use crate::audit::{AuditLog, AuditSink, Event, Kind, LogSettings};
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(err)?;
    }
    std::fs::create_dir_all(dir).map_err(err)?;
    let root = Arc::new(
        crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).map_err(err)?,
    );
    let log = Arc::new(
        AuditLog::open(
            LogSettings {
                path: dir.join("audit.log"),
                region: "eu-central".into(),
                broker_id: "bench".into(),
                checkpoint_every: 1000,
                checkpoint_interval: Duration::from_secs(60),
            },
            root,
        )
        .map_err(err)?,
    );
    let ev = || {
        let mut e = Event::system(Kind::Request, "decrypt", "");
        e.key_id = "k-0123456789abcdef0123456789abcdef".into();
        e.context_sha256 = "ab".repeat(32);
        e.request_id = "0123456789abcdef01234567".into();
        e
    };
    let dur = Duration::from_secs_f64(seconds);
    let ncpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "sovkms bench audit: {ncpu} cores, {seconds}s per figure, file {}",
        dir.join("audit.log").display()
    );
    // Buffered: the rate counts until the writer has written them all (a
    // durable append at the end waits behind every one of them).
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..100 {
            log.append(ev());
        }
        n += 100;
        if n % 100_000 == 0 {
            log.append_durable(ev()).map_err(err)?;
        }
    }
    log.append_durable(ev()).map_err(err)?;
    let buffered = n as f64 / start.elapsed().as_secs_f64();
    println!("buffered appends (nobody waits):   {buffered:>10.0} records/s written");
    for writers in [1usize, 8, 64] {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..writers)
                .map(|_| {
                    let log = Arc::clone(&log);
                    s.spawn(move || {
                        let mut n = 0u64;
                        while start.elapsed() < dur {
                            if log.append_durable(ev()).is_ok() {
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let rate = total as f64 / start.elapsed().as_secs_f64();
        println!(
            "durable appends, {writers:>2} waiting writers: {rate:>10.0} records/s ({:.2} ms per acknowledged record per writer)",
            writers as f64 * 1000.0 / rate.max(1.0)
        );
    }
    log.close();
    Ok(())
}

/// Entry point.
pub async fn run(c: BenchCmd) -> Result<(), CliError> {
    match c {
        BenchCmd::Audit { seconds, dir } => tokio::task::block_in_place(|| audit(seconds, &dir)),
        BenchCmd::Rpc(a) => rpc(a).await,
        BenchCmd::Crypto { seconds, json } => tokio::task::block_in_place(|| crypto(seconds, json)),
        BenchCmd::Lifecycle(a) => lifecycle(a).await,
        BenchCmd::Tpm { config, rounds } => {
            tokio::task::block_in_place(|| tpm_bench(&config, rounds.max(1)))
        }
    }
}

fn tpm_bench(config: &std::path::Path, rounds: usize) -> Result<(), CliError> {
    use crate::config::Settings;
    use crate::root::tpm;
    let s = Settings::load(config).map_err(|e| CliError::new(e.to_string(), "fix the config"))?;
    let t = s
        .tpm
        .clone()
        .ok_or_else(|| CliError::new("the config has no [tpm] section", ""))?;
    let (path, purpose) = s
        .tpm_sealed()
        .ok_or_else(|| CliError::new("the config seals nothing to the TPM", ""))?;
    let err = |e: crate::root::RootError| CliError::new(e.message, "");
    let mut connect = Vec::with_capacity(rounds);
    let mut unseal = Vec::with_capacity(rounds);
    let mut quote = Vec::with_capacity(rounds);
    let nonce = [0x5au8; 16];
    for _ in 0..rounds {
        // The fixed part of both: open the TCTI and run one command.
        let t0 = Instant::now();
        tpm::Tpm::connect(&t.tcti)
            .and_then(|mut d| d.random(1))
            .map_err(err)?;
        connect.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        tpm::check(&t, &path, purpose).map_err(err)?;
        unseal.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        tpm::quote(&t, &nonce).map_err(err)?;
        quote.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    for (name, v) in [
        ("connect", &mut connect),
        ("unseal", &mut unseal),
        ("quote", &mut quote),
    ] {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        println!(
            "tpm {name:<7} {rounds} rounds via {}: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            t.tcti,
            v[0],
            at(0.5),
            at(0.9),
            v[v.len() - 1]
        );
    }
    Ok(())
}
