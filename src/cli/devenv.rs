//! A development environment for the demo and the benchmark: PKI, SoftHSM2
//! tokens in private directories, broker processes, readiness by health check.

use super::CliError;
use crate::client::{self, Client, ClientTls};
use crate::pki;
use crate::region::Region;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

pub(super) fn err(e: impl std::fmt::Display) -> CliError {
    CliError::new(e.to_string(), "")
}

/// A broker (or echo server) child process.
pub(super) struct Broker {
    pub(super) child: tokio::process::Child,
    pub(super) addr: String,
    /// The KMIP listener's address, when the config has `[kmip]`.
    pub(super) kmip_addr: Option<String>,
    /// The benchmark echo's durable KMIP ceiling, when it serves one.
    pub(super) durable_kmip_addr: Option<String>,
    /// The admin listener's address, when the config has `[admin]`.
    pub(super) admin_addr: Option<String>,
}

pub(super) fn random_hex(n: usize) -> Result<String, CliError> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| err("random generator failed"))?;
    Ok(hex::encode(b))
}

/// A private SoftHSM2 token directory and config for one broker; creates
/// and provisions the token. Returns the `[root]` body and SOFTHSM2_CONF.
pub(super) fn softhsm_token(
    exe: &Path,
    dir: &Path,
    region: &Region,
    profile: &str,
) -> Result<(String, PathBuf), CliError> {
    let hsm = dir.join("hsm").join(region.as_str());
    let tokens = hsm.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(err)?;
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(&conf, crate::root::pkcs11::admin::softhsm_dev_conf(&tokens)).map_err(err)?;
    let pin = hsm.join("user.pin");
    let so = hsm.join("so.pin");
    crate::files::write_file_durably(&pin, random_hex(16)?.as_bytes(), 0o600).map_err(err)?;
    crate::files::write_file_durably(&so, random_hex(16)?.as_bytes(), 0o600).map_err(err)?;
    let label = format!("sovkms-{region}");
    let o = std::process::Command::new(exe)
        .args(["hsm", "init-token", "--profile", profile])
        .args(["--label", &label, "--pin-file"])
        .arg(&pin)
        .arg("--so-pin-file")
        .arg(&so)
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .map_err(err)?;
    if !o.status.success() {
        return Err(CliError::new(
            format!(
                "creating SoftHSM2 token {label} failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "is softhsm2 installed? (bash deploy/deps.sh installs it)",
        ));
    }
    Ok((pki::pkcs11_root_toml(profile, &label, &pin), conf))
}

/// An HSM profile argument as a config can name it: a built-in name as is,
/// a file as an absolute path (the config may live elsewhere).
pub(super) fn profile_spec(spec: &str) -> Result<String, CliError> {
    use crate::root::pkcs11::profile::HsmProfile;
    let abs = if spec.contains('/') || spec.ends_with(".toml") {
        let p = Path::new(spec).canonicalize().map_err(|e| {
            CliError::new(
                format!("HSM profile {spec}: {e}"),
                "pass --profile softhsm2 or a profile file",
            )
        })?;
        p.display().to_string()
    } else {
        spec.to_owned()
    };
    HsmProfile::find(&abs, Path::new("."))
        .map_err(|e| CliError::new(e, "pass --profile softhsm2 or a profile file"))?;
    Ok(abs)
}

pub(super) fn provision(exe: &Path, cfg: &Path, conf: &Path) -> Result<String, CliError> {
    let o = std::process::Command::new(exe)
        .args(["hsm", "init", "--json", "--config"])
        .arg(cfg)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .map_err(err)?;
    if !o.status.success() {
        return Err(CliError::new(
            format!(
                "hsm init failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            "",
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).map_err(err)?;
    Ok(v["check_value"].as_str().unwrap_or("").to_owned())
}

pub(super) async fn start_broker(
    exe: &Path,
    config: &Path,
    log: &Path,
    softhsm_conf: Option<&Path>,
) -> Result<Broker, CliError> {
    start_child(exe, "serve", config, log, softhsm_conf).await
}

/// Starts `sovkms <command> --config <config>` and reads its address line.
pub(super) async fn start_child(
    exe: &Path,
    command: &str,
    config: &Path,
    log: &Path,
    softhsm_conf: Option<&Path>,
) -> Result<Broker, CliError> {
    let log = std::fs::File::create(log).map_err(err)?;
    let mut cmd = tokio::process::Command::new(exe);
    if let Some(c) = softhsm_conf {
        cmd.env("SOFTHSM2_CONF", c);
    }
    let mut child = cmd
        .args([command, "--config"])
        .arg(config)
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CliError::new(format!("cannot start broker: {e}"), ""))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| err("broker has no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| err("broker did not report its address within 30 s"))?
        .map_err(err)?
        .ok_or_else(|| {
            CliError::new(
                "broker exited at start",
                format!("see {}", config.with_extension("log").display()),
            )
        })?;
    let rest = line
        .strip_prefix("listening on ")
        .ok_or_else(|| err(format!("unexpected broker output {line:?}")))?;
    // "ADDR; KMIP on ADDR; admin on ADDR ...": the main address, then
    // named listeners.
    let mut parts = rest.split("; ");
    let addr = parts.next().unwrap_or_default().to_owned();
    let named: std::collections::HashMap<&str, String> = parts
        .filter_map(|p| p.split_once(" on ").map(|(n, a)| (n, a.to_owned())))
        .collect();
    let kmip_addr = named.get("KMIP").cloned();
    let durable_kmip_addr = named.get("KMIP durable").cloned();
    let admin_addr = named.get("admin").cloned();
    Ok(Broker {
        child,
        addr,
        kmip_addr,
        durable_kmip_addr,
        admin_addr,
    })
}

/// Connects as `who` (e.g. `eu-central/service-app`) to `addr`.
pub(super) async fn connect_as(
    pki_dir: &Path,
    who: &str,
    broker_region: &str,
    addr: &str,
) -> Result<Client, CliError> {
    let (region, stem) = who.split_once('/').ok_or_else(|| err("bad identity"))?;
    let tls = ClientTls::from_files(
        &pki_dir.join(broker_region).join("ca.pem"),
        &pki_dir.join(region).join(format!("{stem}.pem")),
        &pki_dir.join(region).join(format!("{stem}.key")),
        "localhost",
    )
    .map_err(err)?;
    client::connect(addr, &tls).await.map_err(err)
}

pub(super) async fn wait_serving(c: &Client) -> Result<(), CliError> {
    let start = Instant::now();
    loop {
        if let Ok(true) = c.serving().await {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(err("broker did not report SERVING within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` from a broker's admin listener on loopback (plain HTTP/1.1):
/// the status code and the body.
pub(super) async fn admin_get(addr: &str, path: &str) -> Result<(u16, String), CliError> {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(err)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(err)?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, "admin")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(err)?;
    let resp = send.send_request(req).await.map_err(err)?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(err)?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
