//! Broker configuration: a TOML file parsed into validated [`Settings`].
//! Every key is documented in `deploy/broker.example.toml`.

use crate::broker::{BrokerSettings, MAX_PLAINTEXT_LIMIT};
use crate::region::Region;
use crate::root::pkcs11::{profile::HsmProfile, Pkcs11Settings};
use crate::root::tpm::{PcrPolicy, Purpose, TpmSettings};
use crate::root::PinSource;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config file that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("config {path}: {msg}")]
pub struct ConfigError {
    path: String,
    msg: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    region: String,
    trust_domain: String,
    broker_id: Option<String>,
    listen: String,
    data_dir: PathBuf,
    #[serde(default = "default_max_plaintext")]
    max_plaintext_bytes: usize,
    #[serde(default = "default_destroy_days")]
    default_destroy_days: u32,
    tls: RawTls,
    root: RawRoot,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    break_glass: RawBreakGlass,
    #[serde(default)]
    limits: RawLimits,
    tpm: Option<RawTpm>,
    #[serde(default)]
    kmip: RawKmip,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    store: RawStore,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    kind: Option<String>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    ca: Option<PathBuf>,
    pool_size: Option<usize>,
    listen: Option<bool>,
    max_staleness_ms: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval_seconds: Option<u64>,
    deadline_seconds: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawKmip {
    listen: Option<String>,
    #[serde(default)]
    key_creators: Vec<String>,
    #[serde(default)]
    exportable_for: Vec<String>,
}

/// `[kmip]`: the KMIP listener, when configured.
#[derive(Clone, Debug)]
pub struct KmipSettings {
    /// Listen address (KMIP's port is 5696).
    pub listen: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
    tcti: String,
    #[serde(default = "default_pcr_bank")]
    pcr_bank: String,
    #[serde(default = "default_pcrs")]
    pcrs: Vec<u8>,
    auth_file: Option<PathBuf>,
}

fn default_pcr_bank() -> String {
    "sha256".into()
}
fn default_pcrs() -> Vec<u8> {
    vec![7]
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    requests_per_second_per_caller: Option<u32>,
    requests_per_second_per_region: Option<u32>,
    refusal_records_per_second_per_caller: Option<u32>,
    connections: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreakGlass {
    quorum: Option<u32>,
    max_duration_minutes: Option<u32>,
    approval_window_minutes: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
    checkpoint_every_records: Option<u64>,
    checkpoint_interval_seconds: Option<u64>,
    witness: Option<PathBuf>,
    aggregate_min_group: Option<u64>,
    #[serde(default)]
    aggregate_readers: Vec<String>,
    segment_mib: Option<u64>,
    reserve_mib: Option<u64>,
}

/// Audit log settings.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// The log file.
    pub path: PathBuf,
    /// Signed checkpoint every N records...
    pub checkpoint_every: u64,
    /// ...or after this long.
    pub checkpoint_interval: Duration,
    /// Where signed checkpoint heads are also appended (outside the host's
    /// reach: an append-only or remote medium), checked at every start.
    pub witness: Option<PathBuf>,
    /// Aggregate cells below this count are suppressed.
    pub aggregate_min_group: u64,
    /// Who may read aggregates (any region).
    pub aggregate_readers: Vec<crate::policy::Principal>,
    /// Size at which the active file becomes a closed segment.
    pub segment_bytes: u64,
    /// Free space kept for records that release plaintext or change keys.
    pub reserve_bytes: u64,
}

/// A size in MiB from the config, in bytes: `default` when absent, at
/// least `min`, at most 1 TiB.
fn mib(name: &str, v: Option<u64>, default: u64, min: u64) -> Result<u64, String> {
    let v = v.unwrap_or(default);
    if v < min || v > 1 << 20 {
        return Err(format!("{name} must be {min}..=1048576 (MiB), not {v}"));
    }
    Ok(v << 20)
}

fn default_max_plaintext() -> usize {
    64 * 1024
}
fn default_destroy_days() -> u32 {
    30
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Vec<RawClientCa>,
    #[serde(default)]
    allowed_client_cidrs: Vec<String>,
    #[serde(default)]
    crls: Vec<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCa {
    cert: PathBuf,
    regions: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoot {
    kind: String,
    #[serde(default)]
    danger_development_only: bool,
    profile: Option<PathBuf>,
    module: Option<PathBuf>,
    token_label: Option<String>,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    root_key_label: Option<String>,
    signing_key_label: Option<String>,
    pin_tpm_sealed: Option<PathBuf>,
    sealed_root: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default = "default_cache_entries")]
    max_entries: usize,
    #[serde(default = "default_cache_ttl")]
    ttl_seconds: u64,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_entries: default_cache_entries(),
            ttl_seconds: default_cache_ttl(),
        }
    }
}

fn default_cache_entries() -> usize {
    10_000
}
fn default_cache_ttl() -> u64 {
    300
}

/// A client CA and the regions it may vouch for.
#[derive(Clone, Debug)]
pub struct ClientCa {
    /// PEM file.
    pub cert: PathBuf,
    /// Regions whose identities this CA may issue.
    pub regions: Vec<Region>,
}

/// TLS material.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// Broker certificate chain (PEM).
    pub cert: PathBuf,
    /// Broker private key (PEM). The path only; the key is read at start.
    pub key: PathBuf,
    /// Trusted client CAs.
    pub client_cas: Vec<ClientCa>,
    /// Client networks accepted at the socket, before TLS; empty: any.
    pub allowed_client_cidrs: Vec<ipnet::IpNet>,
    /// Certificate revocation lists (PEM) of the client CAs: a revoked
    /// client certificate is refused at the handshake.
    pub crls: Vec<PathBuf>,
}

/// Which root of trust.
#[derive(Clone, Debug)]
pub enum RootSettings {
    /// Plain-file root, development only.
    Software {
        /// Where the root file lives.
        path: PathBuf,
    },
    /// Root key in a PKCS#11 HSM.
    Pkcs11(Box<Pkcs11Settings>),
    /// Root secret sealed to the host's TPM 2.0.
    Tpm {
        /// The sealed blob (`sovkms tpm seal-root` writes it).
        sealed: PathBuf,
        /// How to reach the TPM.
        tpm: TpmSettings,
    },
}

/// Validated settings of `sovkms serve`.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Core settings.
    pub broker: BrokerSettings,
    /// Listen address.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// TLS.
    pub tls: TlsSettings,
    /// Root of trust.
    pub root: RootSettings,
    /// Audit log.
    pub audit: AuditSettings,
    /// The host's TPM, when `[tpm]` is configured (TPM root, TPM-sealed
    /// HSM PIN, attestation).
    pub tpm: Option<TpmSettings>,
    /// The KMIP listener (None: no KMIP).
    pub kmip: Option<KmipSettings>,
    /// The admin listener's address (metrics, liveness, readiness); None:
    /// no admin listener.
    pub admin_listen: Option<String>,
    /// Where key records (and, over PostgreSQL, the audit chains) live.
    pub store: StoreSettings,
}

/// `[store]`: the embedded default, or the region's shared database.
#[derive(Clone, Debug)]
pub enum StoreSettings {
    /// sled in `data_dir/keys.sled` (one broker).
    Sled,
    /// PostgreSQL shared by the region's brokers.
    Postgres(crate::store::PgSettings),
}

/// `[store]` settings, validated; the staleness bound goes to the broker.
fn store_settings(
    raw: RawStore,
    broker_id: &str,
    abs: &dyn Fn(PathBuf) -> PathBuf,
) -> Result<(StoreSettings, Option<Duration>), String> {
    use crate::store::{PgPassword, PgSettings, PgTls};
    match raw.kind.as_deref().unwrap_or("sled") {
        "sled" => {
            if raw.url.is_some()
                || raw.password_file.is_some()
                || raw.password_env.is_some()
                || raw.ca.is_some()
            {
                return Err(
                    "store: url, password_file, password_env and ca are for kind = \"postgres\""
                        .into(),
                );
            }
            Ok((StoreSettings::Sled, None))
        }
        "postgres" => {
            let url = raw.url.ok_or(
                "store: kind = \"postgres\" needs url (postgres://user@host:port/database)",
            )?;
            if crate::store::url_has_password(&url) {
                return Err("store.url: it holds a password or does not parse as a PostgreSQL URL; give the password in store.password_file or store.password_env".into());
            }
            let password = match (raw.password_file, raw.password_env) {
                (Some(_), Some(_)) => {
                    return Err("store: give password_file or password_env, not both".into())
                }
                (Some(f), None) => PgPassword::File(abs(f)),
                (None, Some(v)) => PgPassword::Env(v),
                (None, None) => PgPassword::None,
            };
            let staleness = raw.max_staleness_ms.unwrap_or(2000);
            if !(100..=60_000).contains(&staleness) {
                return Err(format!(
                    "store.max_staleness_ms must be 100..=60000 (got {staleness})"
                ));
            }
            let timeout = raw.timeout_ms.unwrap_or(5000);
            if !(100..=60_000).contains(&timeout) {
                return Err(format!(
                    "store.timeout_ms must be 100..=60000 (got {timeout})"
                ));
            }
            let pool_size = raw.pool_size.unwrap_or(16);
            if !(2..=1024).contains(&pool_size) {
                return Err(format!(
                    "store.pool_size must be 2..=1024 (got {pool_size})"
                ));
            }
            Ok((
                StoreSettings::Postgres(PgSettings {
                    url,
                    password,
                    tls: raw.ca.map_or(PgTls::Off, |c| PgTls::Ca(abs(c))),
                    pool_size,
                    listen: raw.listen.unwrap_or(true),
                    timeout: Duration::from_millis(timeout),
                    application_name: format!("sovkms {broker_id}"),
                }),
                Some(Duration::from_millis(staleness)),
            ))
        }
        other => Err(format!(
            "store.kind: {other:?} is not a store (sled or postgres)"
        )),
    }
}

impl Settings {
    /// Secrets and state that others than the owner can read: the TLS key,
    /// the HSM PIN file, the data directory. One sentence each, to warn.
    pub fn readable_secrets(&self) -> Vec<String> {
        let mut paths: Vec<(&str, &Path)> = vec![
            ("TLS private key", &self.tls.key),
            ("data directory", &self.data_dir),
        ];
        if let RootSettings::Pkcs11(p) = &self.root {
            if let PinSource::File(f) = &p.pin {
                paths.push(("HSM PIN file", f));
            }
        }
        crate::files::readable_by_others(&paths)
    }

    /// The blob this config seals to the TPM and what it holds: the root
    /// (`kind = "tpm"`) or the HSM PIN (`pin_tpm_sealed`); None otherwise.
    pub fn tpm_sealed(&self) -> Option<(PathBuf, Purpose)> {
        match &self.root {
            RootSettings::Tpm { sealed, .. } => Some((sealed.clone(), Purpose::Root)),
            RootSettings::Pkcs11(p) => match &p.pin {
                PinSource::Tpm { sealed, .. } => Some((sealed.clone(), Purpose::HsmPin)),
                _ => None,
            },
            RootSettings::Software { .. } => None,
        }
    }

    /// Reads and validates a config file. Relative paths are relative to
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError {
            path: path.display().to_string(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_text(&text, base).map_err(err)
    }

    /// Validates a config's text; relative paths are relative to `base`,
    /// and errors name `base` as the config's place. (The fuzz target
    /// `config_parse` feeds it arbitrary text.)
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_text(text, base).map_err(|msg| ConfigError {
            path: base.display().to_string(),
            msg,
        })
    }

    fn parse_text(text: &str, base: &Path) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::from_raw(raw, base)
    }

    fn from_raw(raw: RawConfig, base: &Path) -> Result<Self, String> {
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let region = Region::parse(&raw.region).map_err(|e| format!("region: {e}"))?;
        check_listen(&raw.listen)?;
        let td = raw.trust_domain;
        if td.is_empty() || td.contains('/') || td.contains(':') {
            return Err(format!(
                "trust_domain {td:?} is not a SPIFFE trust domain name"
            ));
        }
        if !(1..=MAX_PLAINTEXT_LIMIT).contains(&raw.max_plaintext_bytes) {
            return Err(format!(
                "max_plaintext_bytes = {} must be between 1 and {MAX_PLAINTEXT_LIMIT}",
                raw.max_plaintext_bytes
            ));
        }
        if !(1..=3650).contains(&raw.default_destroy_days) {
            return Err("default_destroy_days must be between 1 and 3650".into());
        }
        if raw.cache.max_entries == 0 || raw.cache.ttl_seconds == 0 {
            return Err("cache.max_entries and cache.ttl_seconds must be at least 1".into());
        }
        if raw.tls.client_ca.is_empty() {
            return Err(
                "tls.client_ca: at least one client CA is required (mTLS is mandatory)".into(),
            );
        }
        let mut client_cas = Vec::new();
        for ca in raw.tls.client_ca {
            if ca.regions.is_empty() {
                return Err(format!(
                    "tls.client_ca {}: list the regions this CA may issue identities for",
                    ca.cert.display()
                ));
            }
            let regions = ca
                .regions
                .iter()
                .map(|r| Region::parse(r))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls.client_ca regions: {e}"))?;
            client_cas.push(ClientCa {
                cert: abs(ca.cert),
                regions,
            });
        }
        let allowed_client_cidrs = raw
            .tls
            .allowed_client_cidrs
            .iter()
            .map(|c| {
                c.parse::<ipnet::IpNet>().map_err(|_| {
                    format!("tls.allowed_client_cidrs: {c:?} is not a network in CIDR form (e.g. \"10.20.0.0/16\")")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let data_dir = abs(raw.data_dir);
        let tpm = match raw.tpm {
            None => None,
            Some(t) => Some(TpmSettings {
                tcti: t.tcti,
                policy: PcrPolicy::new(&t.pcr_bank, &t.pcrs).map_err(|e| format!("tpm: {e}"))?,
                auth_file: t.auth_file.map(&abs),
            }),
        };
        let root = root_settings(raw.root, &data_dir, &abs, tpm.as_ref())?;
        let bg = &raw.break_glass;
        if bg.quorum == Some(0) {
            return Err("break_glass.quorum must be at least 1 (approvals by operators other than the requester)".into());
        }
        if bg
            .max_duration_minutes
            .is_some_and(|m| !(1..=1440).contains(&m))
            || bg
                .approval_window_minutes
                .is_some_and(|m| !(1..=10080).contains(&m))
        {
            return Err("break_glass: max_duration_minutes must be 1..=1440 and approval_window_minutes 1..=10080".into());
        }
        let audit = AuditSettings {
            path: raw
                .audit
                .path
                .map(&abs)
                .unwrap_or_else(|| data_dir.join("audit.log")),
            checkpoint_every: raw.audit.checkpoint_every_records.unwrap_or(1000).max(1),
            checkpoint_interval: Duration::from_secs(
                raw.audit.checkpoint_interval_seconds.unwrap_or(60).max(1),
            ),
            witness: raw.audit.witness.map(&abs),
            aggregate_min_group: raw.audit.aggregate_min_group.unwrap_or(10).max(1),
            aggregate_readers: raw
                .audit
                .aggregate_readers
                .iter()
                .map(|p| crate::policy::Principal::parse(p))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("audit.aggregate_readers: {e}"))?,
            segment_bytes: mib("audit.segment_mib", raw.audit.segment_mib, 64, 1)?,
            reserve_bytes: mib("audit.reserve_mib", raw.audit.reserve_mib, 64, 0)?,
        };
        let key_creators = raw
            .kmip
            .key_creators
            .iter()
            .map(|p| {
                let p = crate::policy::Principal::parse(p)
                    .map_err(|e| format!("kmip.key_creators: {e}"))?;
                if p.role() != crate::region::Role::Service || *p.region() != region {
                    return Err(format!(
                        "kmip.key_creators: {} can never create keys here: only service identities of region {region} may",
                        p.as_str()
                    ));
                }
                Ok(p)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let exportable_creators = raw
            .kmip
            .exportable_for
            .iter()
            .map(|p| {
                let p = crate::policy::Principal::parse(p)
                    .map_err(|e| format!("kmip.exportable_for: {e}"))?;
                if !key_creators.iter().any(|k| k == &p) {
                    return Err(format!(
                        "kmip.exportable_for: {} is not in kmip.key_creators, so it creates no keys",
                        p.as_str()
                    ));
                }
                Ok(p)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let kmip = match raw.kmip.listen {
            Some(listen) => {
                check_listen(&listen).map_err(|e| format!("kmip.listen: {e}"))?;
                Some(KmipSettings { listen })
            }
            None => None,
        };
        let admin_listen = match raw.admin.listen {
            Some(listen) => {
                check_listen(&listen).map_err(|e| format!("admin.listen: {e}"))?;
                Some(listen)
            }
            None => None,
        };
        let interval = raw.health.interval_seconds.unwrap_or(10);
        let deadline = raw.health.deadline_seconds.unwrap_or(5);
        if !(1..=3600).contains(&interval) || !(1..=interval).contains(&deadline) {
            return Err(format!(
                "health: interval_seconds must be 1..=3600 and deadline_seconds 1..=interval_seconds (got {interval} and {deadline})"
            ));
        }
        // Several replicas of one config (a StatefulSet) each need their
        // own id: the environment may give it (e.g. the pod's name).
        let broker_id = match std::env::var("SOVKMS_BROKER_ID") {
            Ok(id) => id,
            Err(_) => raw.broker_id.unwrap_or_else(|| format!("{region}-1")),
        };
        if broker_id.is_empty()
            || broker_id.len() > 64
            || !broker_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(format!(
                "broker_id {broker_id:?} must be 1 to 64 letters, digits, '-', '_' or '.' (it names this broker's audit chain)"
            ));
        }
        let (store, record_ttl) = store_settings(raw.store, &broker_id, &abs)?;
        Ok(Self {
            kmip,
            admin_listen,
            store,
            broker: BrokerSettings {
                record_ttl,
                key_creators,
                exportable_creators,
                broker_id,
                region,
                trust_domain: td,
                max_plaintext_bytes: raw.max_plaintext_bytes,
                cache_max_entries: raw.cache.max_entries,
                cache_ttl: Duration::from_secs(raw.cache.ttl_seconds),
                default_destroy_days: raw.default_destroy_days,
                audit_path: audit.path.clone(),
                aggregate_min_group: audit.aggregate_min_group,
                aggregate_readers: audit.aggregate_readers.clone(),
                break_glass_quorum: raw.break_glass.quorum.unwrap_or(2),
                break_glass_max_minutes: raw.break_glass.max_duration_minutes.unwrap_or(60),
                break_glass_approval_minutes: raw.break_glass.approval_window_minutes.unwrap_or(60),
                limits: limits(&raw.limits)?,
                readiness_interval: Duration::from_secs(interval),
                readiness_deadline: Duration::from_secs(deadline),
            },
            listen: raw.listen,
            data_dir,
            tls: TlsSettings {
                cert: abs(raw.tls.cert),
                key: abs(raw.tls.key),
                client_cas,
                allowed_client_cidrs,
                crls: raw.tls.crls.into_iter().map(&abs).collect(),
            },
            root,
            audit,
            tpm,
        })
    }
}

/// `[limits]`: every value at least 1 (a limit of 0 would refuse everything).
fn limits(raw: &RawLimits) -> Result<crate::broker::LimitSettings, String> {
    let d = crate::broker::LimitSettings::default();
    let l = crate::broker::LimitSettings {
        per_caller: raw.requests_per_second_per_caller.unwrap_or(d.per_caller),
        per_region: raw.requests_per_second_per_region.unwrap_or(d.per_region),
        refusal_records_per_caller: raw
            .refusal_records_per_second_per_caller
            .unwrap_or(d.refusal_records_per_caller),
        connections: raw.connections.unwrap_or(d.connections),
    };
    if l.per_caller == 0
        || l.per_region == 0
        || l.refusal_records_per_caller == 0
        || l.connections == 0
    {
        return Err("limits: every value must be at least 1".into());
    }
    Ok(l)
}

/// `listen` is `host:port` (IPv6 hosts in brackets), with a port: a broker
/// without one would bind a port the clients cannot know.
fn check_listen(listen: &str) -> Result<(), String> {
    let port = listen
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && (!host.contains(':') || host.starts_with('[')))
        .map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(_)) => Ok(()),
        _ => Err(format!(
            "listen = {listen:?} is not host:port; write e.g. \"0.0.0.0:7443\" or \"[::]:7443\""
        )),
    }
}

fn root_settings(
    r: RawRoot,
    data_dir: &Path,
    abs: &dyn Fn(PathBuf) -> PathBuf,
    tpm: Option<&TpmSettings>,
) -> Result<RootSettings, String> {
    let need_tpm = |what: &str| {
        tpm.cloned().ok_or_else(|| {
            format!("{what} needs a [tpm] section (at least tcti = \"device:/dev/tpmrm0\")")
        })
    };
    if r.sealed_root.is_some() && r.kind != "tpm" {
        return Err("root.sealed_root belongs to kind = \"tpm\"".into());
    }
    if r.pin_tpm_sealed.is_some() && r.kind != "pkcs11" {
        return Err("root.pin_tpm_sealed belongs to kind = \"pkcs11\"".into());
    }
    let pkcs11_fields = r.profile.is_some()
        || r.module.is_some()
        || r.token_label.is_some()
        || r.pin_file.is_some()
        || r.pin_env.is_some()
        || r.root_key_label.is_some()
        || r.signing_key_label.is_some();
    match r.kind.as_str() {
        "software" | "tpm" if pkcs11_fields => {
            Err("root: profile, module, token_label, pin_file, pin_env and *_key_label belong to kind = \"pkcs11\"".into())
        }
        "tpm" if r.danger_development_only => {
            Err("root.danger_development_only applies only to kind = \"software\"".into())
        }
        "tpm" => Ok(RootSettings::Tpm {
            sealed: r
                .sealed_root
                .map(abs)
                .unwrap_or_else(|| data_dir.join("tpm-root.sealed")),
            tpm: need_tpm("root.kind = \"tpm\"")?,
        }),
        "software" if r.danger_development_only => Ok(RootSettings::Software {
            path: data_dir.join("software-root.key"),
        }),
        "software" => Err("root.kind = \"software\" keeps the root key in a plain file and is for development only; \
             set root.danger_development_only = true to use it anyway, or use kind = \"pkcs11\""
            .into()),
        "pkcs11" => {
            if r.danger_development_only {
                return Err("root.danger_development_only applies only to kind = \"software\"".into());
            }
            let spec = r.profile.ok_or("root.profile (a built-in HSM profile such as \"softhsm2\", or a profile file) is required for kind = \"pkcs11\"")?;
            let profile = HsmProfile::find(&spec.to_string_lossy(), &abs(PathBuf::new())).map_err(|e| e.to_string())?;
            let token_label = r.token_label.ok_or("root.token_label is required for kind = \"pkcs11\"")?;
            if token_label.is_empty() || token_label.len() > 32 {
                return Err("root.token_label must be 1-32 characters (PKCS#11 token labels are 32 bytes)".into());
            }
            let pin = match (r.pin_file, r.pin_env, r.pin_tpm_sealed) {
                (Some(f), None, None) => PinSource::File(abs(f)),
                (None, Some(v), None) => PinSource::Env(v),
                (None, None, Some(s)) => PinSource::Tpm {
                    sealed: abs(s),
                    tpm: Box::new(need_tpm("root.pin_tpm_sealed")?),
                },
                _ => {
                    return Err("root: give exactly one of pin_file, pin_env or pin_tpm_sealed for the HSM user PIN \
                         (never put the PIN itself in the config or on the command line)"
                        .into())
                }
            };
            Ok(RootSettings::Pkcs11(Box::new(Pkcs11Settings {
                module: r.module.map(abs).unwrap_or_else(|| profile.module.clone()),
                profile,
                token_label,
                pin,
                root_label: r.root_key_label.unwrap_or_else(|| "sovkms-root".into()),
                signing_label: r.signing_key_label.unwrap_or_else(|| "sovkms-signing".into()),
            })))
        }
        other => Err(format!("root.kind {other:?} is not known; use \"pkcs11\", \"tpm\" or \"software\" (development only)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
region = "eu-central"
trust_domain = "sovkms.example"
listen = "127.0.0.1:0"
data_dir = "data"
[tls]
cert = "b.pem"
key = "b.key"
[[tls.client_ca]]
cert = "ca.pem"
regions = ["eu-central"]
[root]
kind = "software"
danger_development_only = true
"#;

    fn parse(s: &str) -> Result<Settings, String> {
        let raw: RawConfig = toml::from_str(s).map_err(|e| e.to_string())?;
        Settings::from_raw(raw, Path::new("/etc/sovkms"))
    }

    #[test]
    fn valid_config() {
        let s = parse(OK).unwrap();
        assert_eq!(s.broker.region.as_str(), "eu-central");
        assert_eq!(s.data_dir, PathBuf::from("/etc/sovkms/data"));
        assert_eq!(s.broker.max_plaintext_bytes, 65536);
    }

    #[test]
    fn a_database_password_never_sits_in_the_config_or_a_debug_print() {
        let store = "\n[store]\nkind = \"postgres\"\nurl = \"postgres://sovkms:hunter2@db.internal/sovkms\"\nca = \"ca.pem\"\n";
        let e = parse(&format!("{OK}{store}")).unwrap_err();
        assert!(e.contains("password_file") && !e.contains("hunter2"), "{e}");
        let ok = parse(&format!("{OK}{}", store.replace(":hunter2", ""))).unwrap();
        let StoreSettings::Postgres(mut pg) = ok.store else {
            panic!("postgres store expected")
        };
        assert!(format!("{pg:?}").contains("db.internal"));
        pg.url = "postgres://sovkms:hunter2@db.internal/sovkms".into();
        assert!(!format!("{pg:?}").contains("hunter2"));
    }

    #[test]
    fn software_root_needs_explicit_danger_flag() {
        let e = parse(&OK.replace("danger_development_only = true", "")).unwrap_err();
        assert!(e.contains("development only"), "{e}");
    }

    #[test]
    fn tpm_root_and_defaults() {
        let s = parse(&OK.replace(
            "kind = \"software\"\ndanger_development_only = true",
            "kind = \"tpm\"\n[tpm]\ntcti = \"device:/dev/tpmrm0\"",
        ))
        .unwrap();
        let RootSettings::Tpm { sealed, tpm } = &s.root else {
            panic!("tpm root expected")
        };
        assert_eq!(sealed, &PathBuf::from("/etc/sovkms/data/tpm-root.sealed"));
        assert_eq!(tpm.policy.spec(), "sha256:7");
        assert!(s.tpm.is_some(), "attestation available");
    }

    #[test]
    fn shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/broker.example.toml");
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "/usr/share/sovkms/hsm-profiles",
            &format!("{}/hsm-profiles", env!("CARGO_MANIFEST_DIR")),
        );
        let raw: RawConfig = toml::from_str(&text).unwrap();
        let s = Settings::from_raw(raw, Path::new("/etc/sovkms")).unwrap();
        assert_eq!(s.tls.client_cas.len(), 2);
        let RootSettings::Pkcs11(p) = &s.root else {
            panic!("example should use pkcs11")
        };
        assert_eq!(p.token_label, "sovkms-eu-central");
        assert_eq!(p.profile.name, "SoftHSM2");
    }

    #[test]
    fn bad_configs_say_why() {
        for (from, to, want) in [
            ("\"eu-central\"\ntrust", "\"EU\"\ntrust", "region"),
            (
                "regions = [\"eu-central\"]",
                "regions = []",
                "list the regions",
            ),
            ("kind = \"software\"", "kind = \"magic\"", "not known"),
            (
                "kind = \"software\"",
                "kind = \"pkcs11\"",
                "applies only to kind = \"software\"",
            ),
            (
                "kind = \"software\"\ndanger_development_only = true",
                "kind = \"pkcs11\"",
                "root.profile",
            ),
            ("listen", "lisen", "unknown field"),
            (
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1\"",
                "is not host:port",
            ),
            (
                "listen = \"127.0.0.1:0\"",
                "listen = \"https://127.0.0.1:7443\"",
                "is not host:port",
            ),
            (
                "kind = \"software\"\ndanger_development_only = true",
                "kind = \"tpm\"",
                "needs a [tpm] section",
            ),
            (
                "danger_development_only = true",
                "danger_development_only = true\nsealed_root = \"x\"",
                "belongs to kind = \"tpm\"",
            ),
            (
                "danger_development_only = true",
                "danger_development_only = true\n[tpm]\ntcti = \"device\"\npcrs = [24]",
                "between 0 and 23",
            ),
            (
                "danger_development_only = true",
                "danger_development_only = true\n[tpm]\ntcti = \"device\"\npcr_bank = \"md5\"",
                "not supported",
            ),
        ] {
            let e = parse(&OK.replace(from, to)).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
