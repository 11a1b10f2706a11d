//! The `sovkms` command line: one file per command family.

/// `println!` for results: a closed pipe (`sovkms … | head -1`) ends the
/// process quietly with the status a shell gives a SIGPIPE (141), instead of
/// a panic.
macro_rules! outln {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!("{}\n", format_args!($($t)*))) };
}

/// `print!` with the same handling of a closed pipe.
macro_rules! out {
    ($($t:tt)*) => { $crate::cli::write_out(format_args!($($t)*)) };
}

mod audit;
mod backup;
mod bench;
mod breakglass;
mod crypto;
mod demo;
mod devenv;
mod doctor;
mod file;
mod hsm;
mod key;
mod pki;
mod profile;
mod serve;
mod tpm;

use crate::client::{self, Client, ClientTls, Code, RemoteError};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// sovkms: a sovereign key-management and HSM broker.
#[derive(Parser)]
#[command(name = "sovkms", version, about, long_about = None)]
struct Cli {
    /// Machine-readable JSON output (every command that prints a result).
    #[arg(long, global = true)]
    json: bool,
    /// Log lines on stderr: `text` for people, `json` (one object per
    /// line) for log pipelines. The level comes from SOVKMS_LOG.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SOVKMS_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Writes to stdout; exits quietly on a closed pipe, and with a message on
/// any other write error.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `--json`, set once from the command line before any command runs.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when the command line asked for JSON output.
pub(crate) fn json() -> bool {
    JSON.load(std::sync::atomic::Ordering::Relaxed)
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker.
    Serve(serve::ServeArgs),
    /// Mint a development PKI (real deployments bring their own CA).
    #[command(subcommand)]
    Pki(pki::PkiCmd),
    /// HSM (PKCS#11) operator commands: list, init, status, rotate-root, retire-root, bench.
    #[command(subcommand)]
    Hsm(hsm::HsmCmd),
    /// TPM 2.0 commands: info, seal-root, seal-pin, check, reseal, attest.
    #[command(subcommand)]
    Tpm(tpm::TpmCmd),
    /// Manage keys (operators; auditors may list and show).
    #[command(subcommand)]
    Key(key::KeyCmd),
    /// Encrypt a file or stdin under a key.
    Encrypt(crypto::EncryptArgs),
    /// Decrypt a sovkms ciphertext (in-region services only).
    Decrypt(crypto::DecryptArgs),
    /// Generate a data key (plaintext + wrapped, or wrapped only).
    GenerateDataKey(crypto::DataKeyArgs),
    /// Files of any size: encrypted locally under a data key of the broker,
    /// decrypted only in the key's region; inspect a file's header offline.
    #[command(subcommand)]
    File(file::FileCmd),
    /// Break-glass: time-boxed emergency grants approved by a quorum of operators.
    #[command(subcommand)]
    BreakGlass(breakglass::BreakGlassCmd),
    /// Audit log: verify, export, fetch, aggregates, the signing public key.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Ask a broker whether it is serving (gRPC health check).
    Health(HealthArgs),
    /// Check a broker config as `serve` would, without opening anything that writes.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Check a broker host: config, TLS files and certificate, clock,
    /// permissions, port, HSM module and token, PIN, TPM. One line per check.
    Doctor {
        /// Broker config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Version and build facts.
    Version,
    /// Shell completions: `sovkms completions bash > /etc/bash_completion.d/sovkms`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Show what a broker is (region, root of trust, cache figures).
    Info(ConnArgs),
    /// Benchmarks: RPC load against the echo ceiling, crypto, lifecycle.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Serve the benchmark's echo ceiling (used by `sovkms bench`).
    #[command(hide = true)]
    BenchEcho(bench::EchoArgs),
    /// Run the two-region demonstration: PKI, two brokers, a scenario.
    Demo(demo::DemoArgs),
    /// Write a consistent snapshot of a broker's store (wrapped material only).
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty store of the same region.
    Restore(backup::RestoreArgs),
}

/// A broker's config file, for commands run on the broker's host.
#[derive(Args)]
pub struct ConfigArg {
    /// Broker config file.
    #[arg(long, short)]
    config: PathBuf,
}

/// `sovkms health`.
#[derive(Args)]
pub struct HealthArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Keep asking for up to this many seconds until the broker serves.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<f64>,
}

/// `sovkms config …`.
#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse and validate a broker config: every value, the TLS files, the
    /// HSM profile. Opens no store, token or audit log.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

/// How to reach a broker: flags, else environment variables, else the
/// client profile (`--profile`, see `cli/profile.rs`).
#[derive(Args, Clone)]
pub struct ConnArgs {
    /// Client profile to use from the profile file (default: its `default`).
    #[arg(long, env = "SOVKMS_PROFILE")]
    profile: Option<String>,
    /// Broker address, host:port; several brokers of one region separated
    /// by commas (the first that serves is used).
    #[arg(long, env = "SOVKMS_ADDR")]
    addr: Option<String>,
    /// CA certificate that issued the broker's certificate (PEM).
    #[arg(long, env = "SOVKMS_CA")]
    ca: Option<PathBuf>,
    /// Your client certificate (PEM).
    #[arg(long = "tls-cert", alias = "cert", env = "SOVKMS_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Your client private key (PEM).
    #[arg(long = "tls-key", env = "SOVKMS_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Name to check in the broker's certificate (DNS name or IP address);
    /// default: the host of --addr.
    #[arg(long, env = "SOVKMS_SERVER_NAME")]
    server_name: Option<String>,
}

/// A value from the flag or variable, else the profile, else an error
/// naming all three ways to give it.
fn need<T: Clone>(
    v: &Option<T>,
    from_profile: &Option<T>,
    flag: &str,
    var: &str,
) -> Result<T, CliError> {
    v.clone().or_else(|| from_profile.clone()).ok_or_else(|| {
        CliError::new(
            format!("no {flag} given"),
            format!("pass {flag}, set {var}, or name a client profile with --profile"),
        )
    })
}

/// The variables of earlier releases, still read when the new ones are unset.
fn old_var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).map(PathBuf::from)
}

impl ConnArgs {
    async fn connect(&self) -> Result<Client, CliError> {
        let p = profile::load(self.profile.as_deref())?;
        let addr = need(&self.addr, &p.addr, "--addr", "SOVKMS_ADDR")?;
        let ca = need(&self.ca, &p.ca, "--ca", "SOVKMS_CA")?;
        let cert = need(
            &self.tls_cert.clone().or_else(|| old_var("SOVKMS_CERT")),
            &p.tls_cert,
            "--tls-cert",
            "SOVKMS_TLS_CERT",
        )?;
        let key = need(
            &self.tls_key.clone().or_else(|| old_var("SOVKMS_KEY")),
            &p.tls_key,
            "--tls-key",
            "SOVKMS_TLS_KEY",
        )?;
        // Several brokers of one region (one CA): the first that connects
        // and serves; else the first that connects (its refusal then says
        // why); else the last connection error.
        let mut fallback: Option<Client> = None;
        let mut last = None;
        let addrs: Vec<&str> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        for a in &addrs {
            let host = client::addr_host(a).map_err(|e| {
                CliError::new(e, "set --addr (or SOVKMS_ADDR) to the broker's host:port")
            })?;
            let server_name = self
                .server_name
                .clone()
                .or(p.server_name.clone())
                .unwrap_or_else(|| host.to_owned());
            let tls = ClientTls::from_files(&ca, &cert, &key, &server_name)
                .map_err(|e| CliError::new(&e, e.hint()))?;
            match client::connect(a, &tls).await {
                Ok(c) if addrs.len() == 1 => return Ok(c),
                Ok(c) => {
                    if c.serving().await.unwrap_or(false) {
                        return Ok(c);
                    }
                    fallback.get_or_insert(c);
                }
                Err(e) => last = Some(CliError::new(&e, e.hint())),
            }
        }
        fallback.ok_or_else(|| {
            last.unwrap_or_else(|| {
                CliError::new("no broker address given", "set --addr (or SOVKMS_ADDR)")
            })
        })
    }
}

/// A key named on the command line: its id (`k-` and 32 hex digits), or its
/// name (`alias/NAME` says so explicitly), resolved through Locate among
/// the keys the caller may see. Several keys of one name are refused.
pub(crate) async fn resolve_key(c: &mut Client, spec: &str) -> Result<String, CliError> {
    let is_id = spec.len() == 34
        && spec.starts_with("k-")
        && spec[2..].bytes().all(|b| b.is_ascii_hexdigit());
    if is_id {
        return Ok(spec.to_owned());
    }
    let name = spec.strip_prefix("alias/").unwrap_or(spec);
    let r = c
        .locate(crate::api::proto::LocateRequest {
            name: name.to_owned(),
            page_size: 10,
            ..Default::default()
        })
        .await?;
    match r.keys.as_slice() {
        [one] => Ok(one.key_id.clone()),
        [] => Err(CliError::new(
            format!("no key named {name:?} that you may use"),
            "check the name with `sovkms key list`, or give the key id",
        )),
        several => Err(CliError::new(
            format!(
                "{}{} keys are named {name:?}: {}",
                several.len(),
                if r.next_page_token.is_empty() {
                    ""
                } else {
                    " or more"
                },
                several
                    .iter()
                    .map(|k| k.key_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "name the key by its id",
        )),
    }
}

/// An error for humans: what went wrong and what to do.
pub struct CliError {
    what: String,
    hint: String,
}

impl CliError {
    fn new(what: impl std::fmt::Display, hint: impl Into<String>) -> Self {
        Self {
            what: what.to_string(),
            hint: hint.into(),
        }
    }
}

impl From<RemoteError> for CliError {
    fn from(e: RemoteError) -> Self {
        // TLS 1.3: a client certificate the broker refuses is only seen at
        // the first call, as a transport error.
        if matches!(e.code, Code::Unknown | Code::Unavailable | Code::Cancelled)
            && (e.message.contains("transport error")
                || e.message.contains("operation was canceled"))
        {
            return Self::new(
                "the broker closed the connection during TLS",
                "is your certificate (--tls-cert) issued by a CA the broker trusts for your region, and still valid?",
            );
        }
        let hint = match e.code {
            Code::PermissionDenied => "the broker refused this identity; the reason above says which rule",
            Code::NotFound => "check the key id with `sovkms key list`",
            Code::InvalidArgument => "the request or ciphertext is malformed, or the encryption context differs",
            Code::FailedPrecondition => "the key's state or the ciphertext's region does not allow this",
            Code::Unavailable => "the broker, its store or its root of trust is unavailable; retry, or check `sovkms health`",
            Code::ResourceExhausted => "a size or count limit was exceeded",
            _ => "see the broker's log",
        };
        Self::new(e, hint)
    }
}

fn print_json(v: &serde_json::Value) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::new(e.to_string(), ""))?;
    outln!("{s}");
    Ok(())
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    JSON.store(cli.json, std::sync::atomic::Ordering::Relaxed);
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOVKMS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Command::Serve(a) => serve::run(a).await,
            Command::Pki(c) => pki::run(c),
            Command::Key(c) => key::run(c).await,
            Command::Hsm(c) => tokio::task::block_in_place(|| hsm::run(c)),
            Command::Tpm(c) => tokio::task::block_in_place(|| tpm::run(c)),
            Command::Encrypt(a) => crypto::encrypt(a).await,
            Command::Decrypt(a) => crypto::decrypt(a).await,
            Command::GenerateDataKey(a) => crypto::data_key(a).await,
            Command::File(c) => file::run(c).await,
            Command::Health(a) => health(a).await,
            Command::Config(ConfigCmd::Check { file }) => config_check(&file).await,
            Command::Version => version(),
            Command::Doctor { config } => tokio::task::block_in_place(|| doctor::run(&config)),
            Command::Backup(a) => tokio::task::block_in_place(|| backup::backup(a)),
            Command::Restore(a) => tokio::task::block_in_place(|| backup::restore(a)),
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "sovkms",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
            Command::Audit(c) => audit::run(c).await,
            Command::BreakGlass(c) => breakglass::run(c).await,
            Command::Info(a) => info(a).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Bench(c) => bench::run(c).await,
            Command::BenchEcho(a) => bench::echo(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.what);
            if !e.hint.is_empty() {
                eprintln!("hint: {}", e.hint);
            }
            ExitCode::FAILURE
        }
    }
}

async fn health(h: HealthArgs) -> Result<(), CliError> {
    let a = h.conn;
    let deadline = h
        .wait
        .map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s.max(0.0)));
    let serving = loop {
        let answer = match a.connect().await {
            Ok(c) => c.serving().await.map_err(CliError::from),
            Err(e) => Err(e),
        };
        match (answer, deadline) {
            (Ok(true), _) => break true,
            (Ok(false), None) => break false,
            (Err(e), None) => return Err(e),
            (_, Some(d)) if std::time::Instant::now() >= d => {
                return Err(CliError::new(
                    format!(
                        "the broker did not serve within {} s",
                        h.wait.unwrap_or(0.0)
                    ),
                    "see the broker's log",
                ))
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    if json() {
        print_json(&serde_json::json!({ "serving": serving }))?;
    } else {
        outln!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
    }
    if serving {
        Ok(())
    } else {
        Err(CliError::new(
            "broker is not serving",
            "its root of trust is unavailable; see the broker's log",
        ))
    }
}

/// `sovkms version`.
fn version() -> Result<(), CliError> {
    let profiles: Vec<_> = crate::root::pkcs11::profile::HsmProfile::built_in_names().collect();
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
        "roots": ["pkcs11", "tpm", "software (development only)"],
        "hsm_profiles": profiles,
        "envelope": "sovkms ciphertext format v1, algorithms 1 and 2 (writes 2)",
    });
    if json() {
        return print_json(&v);
    }
    outln!(
        "sovkms {} ({})",
        env!("CARGO_PKG_VERSION"),
        v["target"].as_str().unwrap_or("")
    );
    outln!("roots of trust   pkcs11, tpm, software (development only)");
    outln!("HSM profiles     {}", profiles.join(", "));
    outln!("ciphertext       format v1, algorithms 1 and 2 (writes 2)");
    Ok(())
}

/// `sovkms config check FILE`.
async fn config_check(file: &std::path::Path) -> Result<(), CliError> {
    let s = crate::config::Settings::load(file).map_err(|e| {
        CliError::new(
            e,
            "fix the config; deploy/broker.example.toml documents every key",
        )
    })?;
    crate::api::check_tls(&s.tls).map_err(|e| {
        CliError::new(
            e,
            "check [tls] cert, key and client_ca paths and that the key matches the certificate",
        )
    })?;
    let root = match &s.root {
        crate::config::RootSettings::Pkcs11(p) => format!(
            "pkcs11, profile {} (module {}), token '{}'",
            p.profile.name,
            p.module.display(),
            p.token_label
        ),
        crate::config::RootSettings::Tpm { sealed, .. } => {
            format!("tpm, sealed root {}", sealed.display())
        }
        crate::config::RootSettings::Software { .. } => "software (DEVELOPMENT ONLY)".into(),
    };
    let warnings = s.readable_secrets();
    if json() {
        return print_json(&serde_json::json!({
            "ok": true, "region": s.broker.region.to_string(), "listen": s.listen,
            "data_dir": s.data_dir.display().to_string(), "root": root, "warnings": warnings,
        }));
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    outln!("{}: ok", file.display());
    outln!("region           {}", s.broker.region);
    outln!("listen           {}", s.listen);
    outln!("data directory   {}", s.data_dir.display());
    outln!("root of trust    {root}");
    Ok(())
}

async fn info(a: ConnArgs) -> Result<(), CliError> {
    let mut c = a.connect().await?;
    let i = c.info(crate::api::proto::GetInfoRequest {}).await?;
    if json() {
        print_json(&serde_json::json!({
            "region": i.region, "broker_id": i.broker_id, "root_kind": i.root_kind,
            "root_description": i.root_description, "development_only": i.development_only,
            "version": i.version, "cache_hits": i.cache_hits, "cache_misses": i.cache_misses,
            "root_calls": i.root_calls, "caller": i.caller,
            "tls_key_exchange": i.tls_key_exchange,
        }))
    } else {
        outln!("region           {}", i.region);
        outln!("broker           {} (sovkms {})", i.broker_id, i.version);
        outln!("root of trust    {}: {}", i.root_kind, i.root_description);
        if i.development_only {
            outln!("WARNING          development-only root of trust: not for production data");
        }
        outln!(
            "kek cache        {} hits, {} misses; {} root calls",
            i.cache_hits,
            i.cache_misses,
            i.root_calls
        );
        outln!("you are          {}", i.caller);
        outln!("key exchange     {}", i.tls_key_exchange);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency check of every command and flag (ids, types,
    /// conflicts): a flag that collides with a global one fails here, not
    /// at run time.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        for args in [
            &[
                "sovkms",
                "--json",
                "bench",
                "crypto",
                "--json-file",
                "x.json",
            ][..],
            &["sovkms", "bench", "rpc", "--json-file", "x.json", "--json"],
            &["sovkms", "bench", "lifecycle", "--json-file", "x.json"],
        ] {
            let cli = <super::Cli as clap::Parser>::try_parse_from(args).unwrap();
            assert!(matches!(cli.cmd, super::Command::Bench(_)));
        }
    }
}
