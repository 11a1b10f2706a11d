//! The core: request → identity → one gate (role, region, grant, state) →
//! crypto → audit.
//!
//! Knows nothing of gRPC, KMIP or any particular root of trust. Every
//! operation passes [`gate`](Broker::gate), which reads the table in
//! `policy/table.rs`; every outcome is audited (`audited.rs`). Methods
//! block (store flushes, root-of-trust calls); the hot crypto path also has
//! a non-blocking form that front ends try first on the async runtime.
//!
//! Files: `crypto.rs` (Encrypt, Decrypt, data keys, ReEncrypt),
//! `lifecycle.rs` (keys), `breakglass.rs`, `audit_read.rs` (exports,
//! aggregates, attestation), `audited.rs` (audit-before-release),
//! `gate.rs` (the one gate), `rewrap.rs` (offline root rotation).

mod audit_read;
mod audited;
mod breakglass;
mod cipher;
mod crypto;
mod gate;
mod health;
mod lifecycle;
mod limits;
mod objects;
pub mod rewrap;
mod shared;

pub use audited::AfterAudit;
pub use breakglass::BreakGlassAsk;
pub use crypto::{DataKey, Opened, ReEncrypted, Sealed};
pub use health::Readiness;
pub use lifecycle::{effective_state, CreateKey, GrantRequest, LocateFilter};
pub use limits::LimitSettings;
pub use objects::{Cipher, CipherError, Described, Enciphered, NewObject, MAX_SECRET_BYTES};

use crate::audit::AuditSink;
use crate::clock::Clock;
use crate::error::{Error, Fault, NotFound, Result, Unavailable};
use crate::keys::{CacheStats, KeyId, KeyRecord, Keyring};
use crate::region::{Caller, Region};
use crate::root::{Attestor, RootError, RootErrorKind, RootInfo, RootOfTrust};
use crate::store::{Store, StoreError};
use ring::rand::SystemRandom;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Hard upper bound for `max_plaintext_bytes` (the gRPC message limit is set above it).
pub const MAX_PLAINTEXT_LIMIT: usize = 1024 * 1024;

/// The broker's own settings (already validated).
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// This broker's region.
    pub region: Region,
    /// Name of this broker instance.
    pub broker_id: String,
    /// SPIFFE trust domain callers must belong to.
    pub trust_domain: String,
    /// Largest plaintext accepted by Encrypt.
    pub max_plaintext_bytes: usize,
    /// Bound of the record and version-material caches.
    pub cache_max_entries: usize,
    /// Version-material cache lifetime.
    pub cache_ttl: Duration,
    /// Destroy window when the request gives none.
    pub default_destroy_days: u32,
    /// The audit log file (read for exports and aggregates).
    pub audit_path: std::path::PathBuf,
    /// Aggregate cells below this count are suppressed.
    pub aggregate_min_group: u64,
    /// Who, besides the region's auditors, may read aggregates.
    pub aggregate_readers: Vec<crate::policy::Principal>,
    /// Approvals (by operators other than the requester) a break-glass grant needs.
    pub break_glass_quorum: u32,
    /// Longest a break-glass grant may last, in minutes.
    pub break_glass_max_minutes: u32,
    /// How long a break-glass request waits for its quorum, in minutes.
    pub break_glass_approval_minutes: u32,
    /// Request rates and refusal records per caller and region.
    pub limits: LimitSettings,
    /// In-region services that may create and register keys of their own
    /// (over KMIP); each such key is granted to its creator.
    pub key_creators: Vec<crate::policy::Principal>,
    /// Key creators whose created keys are exportable (to them) even when
    /// the request does not ask: clients that fetch what they create.
    pub exportable_creators: Vec<crate::policy::Principal>,
    /// How often the deep readiness check runs...
    pub readiness_interval: Duration,
    /// ...and how long it may take before the broker reports not ready.
    pub readiness_deadline: Duration,
    /// Longest a key record is used from memory without reading the store
    /// again (brokers sharing a store: the bound on a missed change); None:
    /// until this broker changes it.
    pub record_ttl: Option<Duration>,
}

/// Broker facts for `GetInfo`.
#[derive(Clone, Debug)]
pub struct BrokerStatus {
    /// Region.
    pub region: Region,
    /// Instance name.
    pub broker_id: String,
    /// Root of trust.
    pub root: RootInfo,
    /// KEK cache counters.
    pub cache: CacheStats,
    /// Calls made to the root of trust since start.
    pub root_calls: u64,
}

/// The broker core.
pub struct Broker {
    settings: BrokerSettings,
    root: Arc<dyn RootOfTrust>,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
    /// Serializes read-modify-write of key records on this node.
    lifecycle: Mutex<()>,
    root_calls: AtomicU64,
    audit: Arc<dyn AuditSink>,
    break_glass: Arc<std::sync::RwLock<Vec<crate::policy::breakglass::BreakGlass>>>,
    /// The host's TPM, for the auditors' quotes (None: not configured).
    attestor: Option<Arc<dyn Attestor>>,
    limits: limits::Limiter,
    /// Aggregate counts of the log read so far, and where reading stopped:
    /// each call reads only the records written since.
    aggregates: Mutex<Aggregates>,
    /// The region's database table of audit chains, when the log lives
    /// there (brokers over PostgreSQL).
    audit_table: Option<crate::audit::table::TableRef>,
    metrics: Arc<crate::metrics::Metrics>,
    readiness: std::sync::RwLock<Readiness>,
}

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::Unavailable(cause) => {
            tracing::error!(error = %cause, "store unavailable");
            Unavailable::Store.into()
        }
        StoreError::Conflict(id) => Unavailable::Conflict(id).into(),
        other => Fault::Store(other).into(),
    }
}

fn root_err(e: RootError) -> Error {
    match e.kind {
        RootErrorKind::Unavailable | RootErrorKind::Auth | RootErrorKind::Config => {
            tracing::error!(error = %e, "root of trust unavailable");
            Unavailable::RootOfTrust.into()
        }
        RootErrorKind::Integrity | RootErrorKind::UnknownRootKey => Fault::Root(e).into(),
    }
}

fn rng_err() -> Error {
    Unavailable::Random.into()
}

impl Broker {
    /// Assembles a broker.
    pub fn new(
        settings: BrokerSettings,
        root: Arc<dyn RootOfTrust>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        let keyring = Arc::new(
            Keyring::new(settings.cache_max_entries, settings.cache_ttl)
                .with_record_ttl(settings.record_ttl),
        );
        let limits = limits::Limiter::new(settings.limits.clone());
        let break_glass = Arc::default();
        if let Some(bound) = settings.record_ttl {
            shared::follow(&store, &keyring, &break_glass, bound);
        }
        Self {
            limits,
            settings,
            root,
            store,
            keyring,
            clock,
            rng: SystemRandom::new(),
            lifecycle: Mutex::new(()),
            root_calls: AtomicU64::new(0),
            audit,
            break_glass,
            attestor: None,
            aggregates: Mutex::default(),
            audit_table: None,
            metrics: Arc::default(),
            readiness: std::sync::RwLock::default(),
        }
    }

    /// Reads exports and aggregates from the database's chains.
    pub fn with_audit_table(mut self, table: Option<crate::audit::table::TableRef>) -> Self {
        self.audit_table = table;
        self
    }

    /// Counts requests into `metrics` (by default, a set of its own).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// KEK cache counters and the number of key records in memory.
    pub fn cache_stats(&self) -> (CacheStats, u64) {
        (self.keyring.stats(), self.keyring.records_held())
    }

    /// Adds the host's TPM for `Attest`.
    pub fn with_attestor(mut self, attestor: Arc<dyn Attestor>) -> Self {
        self.attestor = Some(attestor);
        self
    }

    /// This broker's region.
    pub fn region(&self) -> &Region {
        &self.settings.region
    }

    /// `GetInfo`: the status, audited like every request.
    pub fn info(&self, cx: &CallCtx) -> Result<(BrokerStatus, String)> {
        use crate::policy::Operation;
        self.audited(cx, Operation::GetInfo, None, |note| {
            self.gate(cx, Operation::GetInfo, None, note)?;
            let mut status = self.status();
            // Device details and live counters are for the region's
            // operators and auditors; services and other regions learn the
            // region, the kind of root and whether it is for development.
            let insider = cx.caller.region == self.settings.region
                && cx.caller.role != crate::region::Role::Service;
            if !insider {
                status.root.description = String::new();
                status.root.root_key_id = String::new();
                status.cache = CacheStats::default();
                status.root_calls = 0;
            }
            Ok((status, self.signing_public_key_pem().unwrap_or_default()))
        })
    }

    /// `GetInfo` without the answer: the audited, gated "who is there"
    /// that KMIP's Discover Versions and Query stand for.
    pub fn inform(&self, cx: &CallCtx) -> Result<()> {
        use crate::policy::Operation;
        self.audited(cx, Operation::GetInfo, None, |note| {
            self.gate(cx, Operation::GetInfo, None, note)
        })
    }

    /// True when keys `caller` creates are exportable by default.
    pub fn creates_exportable(&self, caller: &crate::region::Caller) -> bool {
        self.settings
            .exportable_creators
            .iter()
            .any(|p| p.matches(caller))
    }

    /// The broker's clock, in unix seconds.
    pub fn now_unix(&self) -> i64 {
        self.clock.now_unix()
    }

    /// Status for `GetInfo` and benchmarks.
    pub fn status(&self) -> BrokerStatus {
        BrokerStatus {
            region: self.settings.region.clone(),
            broker_id: self.settings.broker_id.clone(),
            root: self.root.info(),
            cache: self.keyring.stats(),
            root_calls: self.root_calls.load(Ordering::Relaxed),
        }
    }

    /// The root's signing public key as SubjectPublicKeyInfo PEM.
    pub fn signing_public_key_pem(&self) -> Result<String> {
        let point = self.with_root(|r| r.signing_public_key())?;
        Ok(crate::root::p256_spki_pem(&point))
    }

    /// Flushes the audit log and signs a final checkpoint (at shutdown).
    pub fn close_audit(&self) {
        self.audit.close();
    }

    /// Health of what requests depend on (root of trust).
    pub fn health(&self) -> Result<()> {
        self.root.health().map_err(root_err)
    }

    fn with_root<T>(
        &self,
        f: impl FnOnce(&dyn RootOfTrust) -> std::result::Result<T, RootError>,
    ) -> Result<T> {
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        f(self.root.as_ref()).map_err(root_err)
    }

    /// Reads a key from the store (not the cache), completing its
    /// destruction if the window has passed.
    fn load(&self, id: &KeyId) -> Result<KeyRecord> {
        let rec = self.get_record(id)?;
        match rec.destroy_after {
            Some(t)
                if rec.state != crate::keys::KeyState::Destroyed && self.clock.now_unix() >= t =>
            {
                self.finish_destroy(id)
            }
            _ => Ok(rec),
        }
    }

    fn get_record(&self, id: &KeyId) -> Result<KeyRecord> {
        self.store.get(id).map_err(store_err)?.ok_or_else(|| {
            NotFound::Key {
                key: id.clone(),
                region: self.settings.region.clone(),
            }
            .into()
        })
    }
}

/// Aggregate counts of the log read so far, and where reading stopped (the
/// file's position, or each database chain's last sequence number).
#[derive(Default)]
struct Aggregates {
    at: crate::audit::segments::Position,
    chains: std::collections::HashMap<String, u64>,
    counts: crate::audit::Aggregator,
}

/// What a request reached, filled in as the core learns it (for the audit record).
#[derive(Default)]
pub(crate) struct Note {
    key_id: String,
    key_version: u32,
    via: String,
}

impl Note {
    fn key(&mut self, id: &KeyId, version: u32) {
        // Set twice by most requests (named, then found): one allocation.
        if self.key_id != id.as_str() {
            self.key_id.clear();
            self.key_id.push_str(id.as_str());
        }
        self.key_version = version;
    }
}

/// A fresh request id (24 hex digits).
pub fn new_request_id() -> String {
    use crate::envelope::Entropy;
    let mut b = [0u8; 12];
    let _ = crate::envelope::BatchedRandom.fill(&mut b);
    crate::hex_lower(&b)
}

/// Who is asking, and the request's id (in audit records and responses).
#[derive(Clone, Debug)]
pub struct CallCtx {
    /// Authenticated caller (shared with the connection).
    pub caller: Arc<Caller>,
    /// Request id.
    pub request_id: String,
    /// The front end, for the audit record.
    pub front: Front,
}

/// The front end a request came through, and its name for the operation:
/// audit records of KMIP requests carry the KMIP operation's name and the
/// protocol, so an auditor reads what the client asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Front {
    /// The gRPC API (operation names are the core's).
    #[default]
    Grpc,
    /// KMIP, with the operation's name as the specification writes it.
    Kmip(&'static str),
}
