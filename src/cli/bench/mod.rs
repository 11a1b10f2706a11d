//! `sovkms bench`: the benchmark harness. Every broker figure is printed
//! next to the same load against an echo service with the same TLS setup,
//! runtime and message sizes, measured in the same run, as a ratio.

mod audit;
mod crypto;
mod file;
mod kmip;
mod lifecycle;
mod rpc;
mod stores;
mod tpm;

pub use rpc::echo;

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
    /// KMIP Encrypt/Decrypt/Get and connection-per-operation against a TTLV
    /// echo and TLS handshakes on the same listener code.
    Kmip(kmip::KmipArgs),
    /// Envelope seal/open against the raw AES-256-GCM primitives.
    Crypto {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Write results as JSON to this file.
        #[arg(long = "json-file", value_name = "FILE")]
        json_file: Option<PathBuf>,
    },
    /// Encrypt, Decrypt (1 KiB) and key creation against one broker on sled,
    /// one on PostgreSQL and two on one PostgreSQL (a throwaway cluster), with
    /// the echo ceiling and audit records per second per broker.
    Stores {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Requests in flight.
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        /// Working directory; wiped first.
        #[arg(long, default_value = "target/bench-stores")]
        dir: PathBuf,
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
    /// The file format: sealing and opening (memory to /dev/null, and
    /// through a file on disk) against raw AES-256-GCM over the same bytes,
    /// with peak memory at two sizes.
    File {
        /// Bytes per run (the large size; the small one is a tenth).
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Working directory for the on-disk variant; wiped first.
        #[arg(long, default_value = "target/bench-file")]
        dir: PathBuf,
    },
}

/// Arguments of `bench rpc`.
#[derive(clap::Args)]
pub struct RpcArgs {
    /// Operations: encrypt, decrypt, generate-data-key, re-encrypt, mix (comma-separated).
    /// Those that wait for their audit record are also measured against the
    /// durable echo.
    #[arg(
        long,
        default_value = "encrypt,decrypt,generate-data-key,re-encrypt,mix"
    )]
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
    /// HSM profile: a built-in name or a profile file.
    #[arg(long, default_value = "softhsm2")]
    profile: String,
    /// Fail unless every Encrypt/Decrypt rate is at least this ratio of the ceiling.
    #[arg(long)]
    min_ratio: Option<f64>,
    /// Write results as JSON to this file.
    #[arg(long = "json-file", value_name = "FILE")]
    json_file: Option<PathBuf>,
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
    /// HSM profile: a built-in name or a profile file.
    #[arg(long, default_value = "softhsm2")]
    profile: String,
    /// Write results as JSON to this file.
    #[arg(long = "json-file", value_name = "FILE")]
    json_file: Option<PathBuf>,
}

/// `sovkms bench-echo`: serve the echo ceiling with a broker config's TLS.
#[derive(clap::Args)]
pub struct EchoArgs {
    /// A broker config (its TLS and listen settings are used).
    #[arg(long, short)]
    config: PathBuf,
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
    profile: &str,
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
        let profile = devenv::profile_spec(profile)?;
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
    // One identity drives the whole load: its rate limit is raised above
    // anything this machine reaches, so the broker (limiter included) is
    // measured, not the limit.
    text.push_str("\n[limits]\nrequests_per_second_per_caller = 100000000\nrequests_per_second_per_region = 100000000\n");
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

/// Creates the benchmark's key, granted to the service `app` for every
/// crypto operation.
async fn bench_key(op: &mut Client) -> Result<String, CliError> {
    Ok(op
        .create_key(pb::CreateKeyRequest {
            name: "bench".into(),
            grants: vec![pb::Grant {
                principal: format!("spiffe://{TD}/region/eu-central/service/app"),
                operations: vec![1, 2, 3, 4, 5],
            }],
            activate: true,
            ..Default::default()
        })
        .await?
        .key_id)
}

/// One ciphertext of `pt` under `key`, for the decrypt loads.
async fn ciphertext(
    svc: &Client,
    key: &str,
    pt: &[u8],
    ctx: &HashMap<String, String>,
) -> Result<Vec<u8>, CliError> {
    Ok(svc
        .clone()
        .encrypt(pb::EncryptRequest {
            key_id: key.to_owned(),
            plaintext: pt.to_vec(),
            context: ctx.clone(),
        })
        .await?
        .ciphertext)
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

/// Writes a benchmark's rows as JSON (`--json-file FILE`), with the core count.
fn write_rows(
    path: Option<&Path>,
    ncpu: usize,
    rows: Vec<serde_json::Value>,
) -> Result<(), CliError> {
    let Some(p) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(&serde_json::json!({"cores": ncpu, "rows": rows}))
        .map_err(err)?;
    std::fs::write(p, text).map_err(err)
}

/// Entry point.
pub async fn run(c: BenchCmd) -> Result<(), CliError> {
    match c {
        BenchCmd::Audit { seconds, dir } => {
            tokio::task::block_in_place(|| audit::audit(seconds, &dir))
        }
        BenchCmd::Rpc(a) => rpc::rpc(a).await,
        BenchCmd::Stores {
            seconds,
            inflight,
            dir,
        } => stores::stores(seconds, inflight, &dir).await,
        BenchCmd::File { bytes, dir } => tokio::task::block_in_place(|| file::file(bytes, &dir)),
        BenchCmd::Kmip(a) => kmip::kmip(a).await,
        BenchCmd::Crypto { seconds, json_file } => {
            tokio::task::block_in_place(|| crypto::crypto(seconds, json_file))
        }
        BenchCmd::Lifecycle(a) => lifecycle::lifecycle(a).await,
        BenchCmd::Tpm { config, rounds } => {
            tokio::task::block_in_place(|| tpm::tpm_bench(&config, rounds.max(1)))
        }
    }
}
