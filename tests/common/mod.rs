//! Test harness: a development PKI in a temp dir, brokers started in-process
//! on 127.0.0.1:0 with real mTLS, clients per identity. Readiness is a gRPC
//! health check, never a sleep.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use sovkms::api::RunningServer;
use sovkms::broker::Broker;
use sovkms::client::{self, Client, ClientTls};
use sovkms::clock::ManualClock;
use sovkms::config::Settings;
use sovkms::pki::{self, Kind};
use sovkms::region::{Region, Role};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TD: &str = "sovkms.example";

pub fn region(s: &str) -> Region {
    Region::parse(s).unwrap()
}

pub fn spiffe(region: &str, role: &str, name: &str) -> String {
    format!("spiffe://{TD}/region/{region}/{role}/{name}")
}

/// PKI and directories shared by the brokers of one test.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub regions: Vec<Region>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        let regions: Vec<Region> = ["eu-central", "us-east", "central"]
            .iter()
            .map(|r| region(r))
            .collect();
        pki::dev_pki(&pki, TD, &regions, 2).unwrap();
        let env = Self { dir, pki, regions };
        // Extra identities used by the tests.
        env.issue(
            "eu-central",
            "eu-central",
            Kind::Caller(Role::Service),
            "nogrant",
            "service-nogrant",
        );
        env.issue(
            "us-east",
            "us-east",
            Kind::Caller(Role::Operator),
            "admin",
            "operator-admin",
        );
        // A certificate from the us-east CA that claims an eu-central identity.
        env.issue(
            "us-east",
            "eu-central",
            Kind::Caller(Role::Service),
            "app",
            "forged-eu-service",
        );
        // A certificate from an untrusted CA.
        let rogue = pki::new_ca(TD, &region("eu-central"), 2).unwrap();
        let c = pki::issue(
            &rogue.cert_pem,
            &rogue.key_pem,
            TD,
            &region("eu-central"),
            Kind::Caller(Role::Service),
            "app",
            &[],
            2,
        )
        .unwrap();
        pki::write(&env.pki.join("eu-central"), "rogue-service", &c).unwrap();
        // A certificate of another trust domain, from the eu-central CA.
        let ca = env.ca("eu-central");
        let c = pki::issue(
            &ca.0,
            &ca.1,
            "other.example",
            &region("eu-central"),
            Kind::Caller(Role::Service),
            "app",
            &[],
            2,
        )
        .unwrap();
        pki::write(&env.pki.join("eu-central"), "otherdomain-service", &c).unwrap();
        env.issue_without_spiffe("eu-central", "nospiffe-service");
        env
    }

    pub fn ca(&self, r: &str) -> (String, String) {
        let d = self.pki.join(r);
        (
            std::fs::read_to_string(d.join("ca.pem")).unwrap(),
            std::fs::read_to_string(d.join("ca.key")).unwrap(),
        )
    }

    /// Issues `kind`/`name` of `region` from `ca_region`'s CA into `<pki>/<region>/<stem>`.
    pub fn issue(&self, ca_region: &str, region_s: &str, kind: Kind, name: &str, stem: &str) {
        let (cert, key) = self.ca(ca_region);
        let c = pki::issue(&cert, &key, TD, &region(region_s), kind, name, &[], 2).unwrap();
        pki::write(&self.pki.join(region_s), stem, &c).unwrap();
    }

    fn issue_without_spiffe(&self, r: &str, stem: &str) {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair};
        let (cert, key) = self.ca(r);
        let issuer = Issuer::from_ca_cert_pem(&cert, KeyPair::from_pem(&key).unwrap()).unwrap();
        let k = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["client.example".to_string()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let c = p.signed_by(&k, &issuer).unwrap();
        let issued = pki::Issued {
            cert_pem: c.pem(),
            key_pem: zeroize::Zeroizing::new(k.serialize_pem()),
        };
        pki::write(&self.pki.join(r), stem, &issued).unwrap();
    }

    /// Writes a broker config for `region` with its own fresh, provisioned
    /// SoftHSM2 token, and returns the config's path.
    pub fn config(&self, r: &str, extra: &str) -> PathBuf {
        let token = new_token(self.dir.path(), r);
        self.config_with_root(r, extra, &token.root_toml)
    }

    /// Config with a fresh token and extra TOML appended at the end (tables).
    pub fn config_with_tail(&self, r: &str, tail: &str) -> PathBuf {
        let path = self.config(r, "");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(tail);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes a broker config with the given `[root]` body.
    pub fn config_with_root(&self, r: &str, extra: &str, root_toml: &str) -> PathBuf {
        let data = self.dir.path().join("data").join(r);
        let text =
            pki::dev_broker_config(&self.pki, &data, &region(r), TD, &self.regions, root_toml);
        let text = text.replacen("listen =", &format!("{extra}\nlisten ="), 1);
        let path = self.dir.path().join(format!("{r}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// TLS material of `<pki>/<region>/<stem>`, trusting `broker_region`'s CA.
    pub fn tls(&self, who: &str, broker_region: &str) -> ClientTls {
        let (r, stem) = who.split_once('/').unwrap();
        ClientTls::from_files(
            &self.pki.join(broker_region).join("ca.pem"),
            &self.pki.join(r).join(format!("{stem}.pem")),
            &self.pki.join(r).join(format!("{stem}.key")),
            "localhost",
        )
        .unwrap()
    }
}

/// A broker running in this test process.
pub struct TestBroker {
    pub audit_path: PathBuf,
    pub addr: String,
    pub region: String,
    pub broker: Arc<Broker>,
    pub clock: Arc<ManualClock>,
    pub server: RunningServer,
}

pub async fn start_broker(env: &Env, r: &str) -> TestBroker {
    start_broker_with(env, r, "").await
}

pub async fn start_broker_with(env: &Env, r: &str, extra_config: &str) -> TestBroker {
    start_broker_from(env, r, &env.config(r, extra_config)).await
}

pub async fn start_broker_from(env: &Env, r: &str, config: &Path) -> TestBroker {
    let settings = Settings::load(config).unwrap();
    let clock = Arc::new(ManualClock::new());
    let (broker, server) = sovkms::server::start(&settings, clock.clone())
        .await
        .unwrap();
    let tb = TestBroker {
        audit_path: settings.audit.path.clone(),
        addr: server.local_addr.to_string(),
        region: r.to_owned(),
        broker,
        clock,
        server,
    };
    wait_serving(env, &tb).await;
    tb
}

pub async fn wait_serving(env: &Env, b: &TestBroker) {
    let start = Instant::now();
    loop {
        if let Ok(c) = client::connect(
            &b.addr,
            &env.tls(&format!("{}/operator-admin", b.region), &b.region),
        )
        .await
        {
            if serving(&c).await == Some(true) {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "broker {} never became SERVING",
            b.region
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn serving(c: &Client) -> Option<bool> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let r = HealthClient::new(c.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    Some(r.into_inner().status == ServingStatus::Serving as i32)
}

/// A client as `who` (`<region>/<stem>`) of broker `b`.
pub async fn client(env: &Env, who: &str, b: &TestBroker) -> Client {
    client::connect(&b.addr, &env.tls(who, &b.region))
        .await
        .unwrap()
}

/// The SoftHSM2 profile shipped in hsm-profiles/.
pub fn softhsm_profile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("hsm-profiles/softhsm2.toml")
}

pub fn softhsm_module() -> PathBuf {
    sovkms::root::pkcs11::profile::HsmProfile::load(&softhsm_profile())
        .unwrap()
        .module
}

/// Makes sure the SoftHSM2 config named by SOFTHSM2_CONF (set by
/// .cargo/config.toml) exists, before this process initializes the module.
pub fn ensure_softhsm_conf() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let conf = PathBuf::from(
            std::env::var("SOFTHSM2_CONF").expect("SOFTHSM2_CONF is set by .cargo/config.toml"),
        );
        let dir = conf.parent().unwrap();
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        if !conf.exists() {
            let text = sovkms::root::pkcs11::admin::softhsm_dev_conf(&tokens);
            let tmp = dir.join(format!("softhsm2.conf.{}", std::process::id()));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &conf).unwrap();
        }
    });
}

/// A fresh token in the shared test token directory.
pub struct Token {
    pub label: String,
    pub pin_file: PathBuf,
    pub root_toml: String,
}

fn random_hex(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut b).unwrap();
    hex::encode(b)
}

/// Creates and provisions a token labelled uniquely for this test.
pub fn new_token(dir: &Path, r: &str) -> Token {
    let token = new_unprovisioned_token(dir, r);
    let settings = pkcs11_settings(&token);
    sovkms::root::pkcs11::admin::provision(&settings).unwrap();
    token
}

/// Creates a token with a user PIN but no keys.
pub fn new_unprovisioned_token(dir: &Path, r: &str) -> Token {
    ensure_softhsm_conf();
    let label = format!("t{}-{r}", random_hex(4));
    let pin = random_hex(8);
    let pin_file = dir.join(format!("{label}.pin"));
    sovkms::files::write_file_durably(&pin_file, pin.as_bytes(), 0o600).unwrap();
    sovkms::root::pkcs11::admin::init_dev_token(
        &softhsm_module(),
        &label,
        &sovkms::secret::Pin::new(random_hex(8)),
        &sovkms::secret::Pin::new(pin),
    )
    .unwrap();
    let root_toml = pki::pkcs11_root_toml(&path_str(&softhsm_profile()), &label, &pin_file);
    Token {
        label,
        pin_file,
        root_toml,
    }
}

pub fn pkcs11_settings(t: &Token) -> sovkms::root::pkcs11::Pkcs11Settings {
    let profile = sovkms::root::pkcs11::profile::HsmProfile::load(&softhsm_profile()).unwrap();
    sovkms::root::pkcs11::Pkcs11Settings {
        module: profile.module.clone(),
        profile,
        token_label: t.label.clone(),
        pin: sovkms::root::PinSource::File(t.pin_file.clone()),
        root_label: "sovkms-root".into(),
        signing_label: "sovkms-signing".into(),
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

use sovkms::api::proto as pb;
use std::collections::HashMap;
use tonic::Code;

pub fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn grant(principal: &str, ops: &[pb::Operation]) -> pb::Grant {
    pb::Grant {
        principal: principal.to_owned(),
        operations: ops.iter().map(|o| *o as i32).collect(),
    }
}

pub const ALL_OPS: [pb::Operation; 5] = [
    pb::Operation::Encrypt,
    pb::Operation::Decrypt,
    pb::Operation::GenerateDataKey,
    pb::Operation::GenerateDataKeyWithoutPlaintext,
    pb::Operation::ReEncrypt,
];

/// Creates an active key as the region's operator.
pub async fn create_key(env: &Env, b: &TestBroker, name: &str, grants: Vec<pb::Grant>) -> String {
    let mut op = client(env, &format!("{}/operator-admin", b.region), b).await;
    create_key_as(&mut op, name, grants).await
}

/// Creates an active key through an operator's client; returns its id.
pub async fn create_key_as(op: &mut Client, name: &str, grants: Vec<pb::Grant>) -> String {
    op.keys
        .create(pb::CreateKeyRequest {
            name: name.into(),
            grants,
            activate: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key_id
}

pub async fn encrypt(
    c: &mut Client,
    key_id: &str,
    pt: &[u8],
    context: &HashMap<String, String>,
) -> Result<pb::EncryptResponse, tonic::Status> {
    c.crypto
        .encrypt(pb::EncryptRequest {
            key_id: key_id.into(),
            plaintext: pt.to_vec(),
            context: context.clone(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn decrypt(
    c: &mut Client,
    ct: &[u8],
    context: &HashMap<String, String>,
) -> Result<Vec<u8>, tonic::Status> {
    c.crypto
        .decrypt(pb::DecryptRequest {
            ciphertext: ct.to_vec(),
            context: context.clone(),
        })
        .await
        .map(|mut r| std::mem::take(&mut r.get_mut().plaintext))
}

pub fn code<T>(r: &Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A broker running as a child process (`sovkms serve`).
pub struct Proc {
    pub child: std::process::Child,
    pub addr: String,
    /// The admin listener, when the config has `[admin]`.
    pub admin: Option<String>,
}

/// Starts `sovkms serve --config` with extra environment; reads the address line.
pub fn spawn_broker(config: &Path, envs: &[(&str, &Path)]) -> Proc {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sovkms"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("SOVKMS_LOG", "warn")
        .stderr(std::process::Stdio::null());
    started(cmd)
}

/// Runs `cmd` (a broker, possibly under a wrapper such as strace) with its
/// stdout piped, and reads the "listening on …" line it prints.
pub fn started(mut cmd: std::process::Command) -> Proc {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let rest = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("broker did not start: {line:?}"));
    let mut parts = rest.split("; ");
    let addr = parts.next().unwrap().to_owned();
    let admin = parts
        .find_map(|p| p.strip_prefix("admin on "))
        .map(str::to_owned);
    Proc { child, addr, admin }
}

/// Connects as `who` and waits until the broker reports SERVING.
pub async fn connect_ready(env: &Env, who: &str, broker_region: &str, addr: &str) -> Client {
    let start = Instant::now();
    loop {
        if let Ok(c) = client::connect(addr, &env.tls(who, broker_region)).await {
            if serving(&c).await == Some(true) {
                return c;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "broker never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL: no destructor, no flush, no graceful shutdown.
pub fn kill9(p: &mut Proc) {
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// SIGTERM and wait: the broker's graceful stop.
pub fn stop(p: &mut Proc) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    p.child.wait().unwrap();
}

/// Runs the sovkms binary with arguments and environment.
pub fn run_sovkms(args: &[&str], envs: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sovkms"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.args(args).env("SOVKMS_LOG", "error").output().unwrap()
}

impl TestBroker {
    /// Stops serving and closes the audit log (final signed checkpoint).
    pub async fn stop(self) {
        self.server.shutdown().await.unwrap();
        self.broker.close_audit();
    }
}

/// The broker's signing public key, as GetInfo gives it.
pub async fn signing_key(c: &mut Client) -> Vec<u8> {
    let i = c
        .broker
        .get_info(pb::GetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    sovkms::audit::parse_public_key(&i.signing_public_key_pem).unwrap()
}

pub fn read_records(path: &Path) -> Vec<sovkms::audit::Record> {
    std::io::read_to_string(sovkms::audit::segments::open(path).unwrap())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A private software TPM (swtpm) on two free loopback ports, with its own
/// state directory: a fresh TPM with its own seeds. Stopped (by PID) on drop.
pub struct Swtpm {
    child: std::process::Child,
    pub port: u16,
    pub state: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Swtpm {
    pub fn start() -> Self {
        let state = tempfile::tempdir().unwrap();
        for _ in 0..10 {
            // The swtpm TCTI reaches the control channel at port + 1.
            let port = free_port();
            if port == u16::MAX || std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_err() {
                continue;
            }
            let ctrl = port + 1;
            let mut child = std::process::Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.path().display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("swtpm is not installed (deploy/deps.sh installs it)");
            // Ready when it answers a command; a port taken by someone else
            // makes it exit, and we try other ports.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                let tcti = format!("swtpm:host=127.0.0.1,port={port}");
                if let Ok(mut t) = sovkms::root::tpm::Tpm::connect(&tcti) {
                    // Answered, and by ours: one that lost the port race
                    // to another swtpm exits instead of serving.
                    if t.random(1).is_ok() {
                        drop(t);
                        std::thread::sleep(Duration::from_millis(30));
                        if child.try_wait().unwrap().is_none() {
                            return Self { child, port, state };
                        }
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// `[tpm]` section for a broker config.
    pub fn toml(&self, pcrs: &str) -> String {
        format!("\n[tpm]\ntcti = \"{}\"\npcrs = {pcrs}\n", self.tcti())
    }

    pub fn settings(&self, pcrs: &[u8]) -> sovkms::root::tpm::TpmSettings {
        sovkms::root::tpm::TpmSettings {
            tcti: self.tcti(),
            policy: sovkms::root::tpm::PcrPolicy::new("sha256", pcrs).unwrap(),
            auth_file: None,
        }
    }

    /// Extends a sha256 PCR (simulates a changed boot state).
    pub fn extend(&self, pcr: u8, data: &[u8]) {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut t = sovkms::root::tpm::Tpm::connect(&self.tcti()).unwrap();
        t.extend_pcr("sha256", pcr, d.as_ref()).unwrap();
    }

    /// Transient objects left loaded (must be 0 between operations).
    pub fn transients(&self) -> usize {
        let mut t = sovkms::root::tpm::Tpm::connect(&self.tcti()).unwrap();
        t.loaded_transients().unwrap()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from an admin listener on loopback (plain HTTP/1.1): the
/// status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Waits until `/readyz` answers `want` (200 or 503); its last body.
pub async fn wait_ready(admin: &str, want: u16, within: Duration) -> String {
    let start = Instant::now();
    loop {
        let (status, body) = http_get(admin, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(start.elapsed() < within, "/readyz stayed {status}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A broker, an in-region service with a key and a ciphertext of it.
pub async fn decrypting_region(env: &Env) -> (TestBroker, Client, Vec<u8>) {
    let eu = start_broker(env, "eu-central").await;
    let app = spiffe("eu-central", "service", "app");
    let k = create_key(env, &eu, "k", vec![grant(&app, &ALL_OPS)]).await;
    let mut svc = client(env, "eu-central/service-app", &eu).await;
    let ct = encrypt(&mut svc, &k, b"x", &ctx(&[]))
        .await
        .unwrap()
        .ciphertext;
    (eu, svc, ct)
}

/// A throwaway PostgreSQL cluster, and the `[store]` table of a broker over it.
pub fn pg_cluster() -> sovkms::store::cluster::ThrowawayCluster {
    sovkms::store::cluster::ThrowawayCluster::start().unwrap()
}

pub fn pg_store_toml(db: &sovkms::store::cluster::ThrowawayCluster, extra: &str) -> String {
    format!(
        "\n[store]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n{extra}\n",
        db.url(sovkms::store::cluster::ROLE),
        db.password_file().display()
    )
}

/// Config of broker `name` of region `r` over a shared store: the region's
/// root (`root_toml`, one token for all its brokers), its own id, data
/// directory and listener; `tail` appended (tables).
pub fn config_shared(env: &Env, r: &str, name: &str, root_toml: &str, tail: &str) -> PathBuf {
    let data = env.dir.path().join("data").join(format!("{r}-{name}"));
    let text = pki::dev_broker_config(&env.pki, &data, &region(r), TD, &env.regions, root_toml)
        .replace(
            &format!("broker_id = \"{r}-dev\""),
            &format!("broker_id = \"{r}-{name}\""),
        );
    let path = env.dir.path().join(format!("{r}-{name}.toml"));
    std::fs::write(&path, format!("{text}{tail}")).unwrap();
    path
}
