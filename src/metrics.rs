//! Metrics for operators, served by the admin listener in the Prometheus
//! text format through prometheus-client.
//!
//! Label values are drawn from small fixed sets (operation, outcome, gRPC
//! code, refusal reason, component): never a key id or a principal. Those
//! would make one series per key or caller (millions of series, a
//! Prometheus that falls over) and would copy who-used-which-key out of the
//! audit log, which only the region's auditors read, into a monitoring
//! system that many more people read.

use crate::keys::CacheStats;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: &'static str,
    outcome: &'static str,
    code: &'static str,
    protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallResultLabels {
    call: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    listener: &'static str,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    listener: &'static str,
    alert: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabel {
    component: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    region: String,
    root: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 50 µs to about 1.6 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Records per audit batch: 1 to 4096, doubling.
fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// What the audit writer reports; owned by the log, registered beside the
/// broker's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    /// Events waiting for the writer.
    pub queue_depth: Gauge,
    /// Time of each fdatasync of the log.
    pub sync_seconds: Histogram,
    /// Records per written batch.
    pub batch_records: Histogram,
    /// Buffered records not written (full queue or disk below the reserve).
    pub unwritten: Counter,
    /// Failed writes or syncs (each fails its whole batch).
    pub write_failures: Counter,
    /// 1 while free space is below the reserve.
    pub below_reserve: Gauge,
}

impl Default for AuditMetrics {
    fn default() -> Self {
        Self {
            queue_depth: Gauge::default(),
            sync_seconds: latency(),
            batch_records: batch_sizes(),
            unwritten: Counter::default(),
            write_failures: Counter::default(),
            below_reserve: Gauge::default(),
        }
    }
}

/// The components readiness checks, as label values.
pub const COMPONENTS: [&str; 3] = ["root_of_trust", "store", "audit"];

/// Reads the caches' counters at scrape time.
type CacheReader = Box<dyn Fn() -> (CacheStats, u64) + Send + Sync>;

struct CacheCollector(CacheReader);

impl std::fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl prometheus_client::collector::Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (kek, records) = (self.0)();
        let counters = [
            (
                "sovkms_kek_cache_hits",
                "Key-version material found in memory",
                kek.hits,
            ),
            (
                "sovkms_kek_cache_misses",
                "Key-version material that needed the root of trust",
                kek.misses,
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            (
                "sovkms_kek_cache_entries",
                "Key versions whose material is in memory now",
                kek.entries,
            ),
            (
                "sovkms_record_cache_entries",
                "Key records in memory now",
                records,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// The broker's metrics. One per broker (tests run several in a process).
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Histograms<OperationLabel>,
    refusals: Family<ReasonLabel, Counter>,
    root_calls: Family<CallResultLabels, Counter>,
    root_seconds: Histograms<CallLabel>,
    store_calls: Family<CallResultLabels, Counter>,
    store_seconds: Histograms<CallLabel>,
    connections: Family<ConnectionLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    open_connections: Family<ConnectionLabels, Gauge>,
    healthy: Family<ComponentLabel, Gauge>,
    ready: Gauge,
    build: Family<BuildLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every series registered, none observed yet.
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency),
            refusals: Family::default(),
            root_calls: Family::default(),
            root_seconds: Family::new_with_constructor(latency),
            store_calls: Family::default(),
            store_seconds: Family::new_with_constructor(latency),
            connections: Family::default(),
            handshake_failures: Family::default(),
            open_connections: Family::default(),
            healthy: Family::default(),
            ready: Gauge::default(),
            build: Family::default(),
        };
        {
            let mut r = m.lock();
            r.register(
                "sovkms_requests",
                "Requests by operation, outcome (allowed, refused, failed), gRPC code and protocol (\"\" is gRPC)",
                m.requests.clone(),
            );
            r.register(
                "sovkms_request_duration_seconds",
                "Time from the request reaching the core to its answer being released (for plaintext releases: after the audit record is durable)",
                m.request_seconds.clone(),
            );
            r.register(
                "sovkms_refusals",
                "Refused requests by reason: identity, role, region, grant, state, invalid, not_found, limit",
                m.refusals.clone(),
            );
            r.register(
                "sovkms_root_calls",
                "Calls to the root of trust (HSM or TPM) by call and result",
                m.root_calls.clone(),
            );
            r.register(
                "sovkms_root_call_duration_seconds",
                "Root-of-trust call latency by call",
                m.root_seconds.clone(),
            );
            r.register(
                "sovkms_store_calls",
                "Key store calls by call and result",
                m.store_calls.clone(),
            );
            r.register(
                "sovkms_store_call_duration_seconds",
                "Key store call latency by call",
                m.store_seconds.clone(),
            );
            r.register(
                "sovkms_connections",
                "Connection events by listener: accepted, refused_network, refused_cap, refused_handshakes, refused_handshakes_per_address, handshake_ok, handshake_failed",
                m.connections.clone(),
            );
            r.register(
                "sovkms_tls_handshake_failures",
                "Failed TLS handshakes by listener and the alert they amount to (certificate_revoked, certificate_expired, unknown_ca, bad_certificate, certificate_required, protocol_version, decode_error, timeout, io, other)",
                m.handshake_failures.clone(),
            );
            r.register(
                "sovkms_open_connections",
                "Established TLS connections by listener (event is \"open\").",
                m.open_connections.clone(),
            );
            r.register(
                "sovkms_component_healthy",
                "1 if the component passed its last readiness check, else 0.",
                m.healthy.clone(),
            );
            r.register(
                "sovkms_ready",
                "1 if the broker is ready (every component healthy), else 0.",
                m.ready.clone(),
            );
            r.register(
                "sovkms_build_info",
                "Version, region and kind of root of trust (always 1)",
                m.build.clone(),
            );
        }
        m
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Names the broker's region and root in `sovkms_build_info`.
    pub fn set_build(&self, region: &str, root_kind: &str) {
        self.build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                region: region.to_owned(),
                root: root_kind.to_owned(),
            })
            .set(1);
    }

    /// Adds the audit writer's series.
    pub fn register_audit(&self, a: &AuditMetrics) {
        let mut r = self.lock();
        r.register(
            "sovkms_audit_queue_depth",
            "Audit events waiting for the writer",
            a.queue_depth.clone(),
        );
        r.register(
            "sovkms_audit_sync_duration_seconds",
            "Time of each fdatasync of the audit log",
            a.sync_seconds.clone(),
        );
        r.register(
            "sovkms_audit_batch_records",
            "Records per audit batch (one write, at most one sync)",
            a.batch_records.clone(),
        );
        r.register(
            "sovkms_audit_unwritten_records",
            "Buffered audit records counted instead of written (queue full, or disk below the reserve)",
            a.unwritten.clone(),
        );
        r.register(
            "sovkms_audit_write_failures",
            "Failed audit writes or syncs (each refuses the requests of its batch)",
            a.write_failures.clone(),
        );
        r.register(
            "sovkms_audit_below_reserve",
            "1 while the audit disk's free space is below the reserve.",
            a.below_reserve.clone(),
        );
    }

    /// Adds the caches' counters, read at each scrape.
    pub fn register_caches(&self, read: impl Fn() -> (CacheStats, u64) + Send + Sync + 'static) {
        self.lock()
            .register_collector(Box::new(CacheCollector(Box::new(read))));
    }

    /// The text exposition (Prometheus 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.lock());
        out
    }

    /// One finished request.
    pub fn request(
        &self,
        operation: &'static str,
        outcome: &'static str,
        code: &'static str,
        protocol: &'static str,
        refusal: Option<&'static str>,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                operation,
                outcome,
                code,
                protocol,
            })
            .inc();
        self.request_seconds
            .get_or_create(&OperationLabel { operation })
            .observe(took.as_secs_f64());
        if let Some(reason) = refusal {
            self.refusals.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    /// One root-of-trust call.
    pub fn root_call(&self, call: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.root_calls
            .get_or_create(&CallResultLabels { call, result })
            .inc();
        self.root_seconds
            .get_or_create(&CallLabel { call })
            .observe(took.as_secs_f64());
    }

    /// One store call.
    pub fn store_call(&self, call: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.store_calls
            .get_or_create(&CallResultLabels { call, result })
            .inc();
        self.store_seconds
            .get_or_create(&CallLabel { call })
            .observe(took.as_secs_f64());
    }

    /// A connection event on a listener ("grpc", "kmip", "admin").
    pub fn connection(&self, listener: &'static str, event: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { listener, event })
            .inc();
    }

    /// A failed TLS handshake on a listener.
    pub fn handshake_failure(&self, listener: &'static str, alert: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels {
                listener,
                event: "handshake_failed",
            })
            .inc();
        self.handshake_failures
            .get_or_create(&HandshakeLabels { listener, alert })
            .inc();
    }

    /// An established connection opened (+1) or closed (-1).
    pub fn open_connection(&self, listener: &'static str, delta: i64) {
        self.open_connections
            .get_or_create(&ConnectionLabels {
                listener,
                event: "open",
            })
            .inc_by(delta);
    }

    /// The result of a readiness check: each component's health.
    pub fn readiness(&self, healthy: &[(&'static str, bool)]) {
        for (component, ok) in healthy {
            self.healthy
                .get_or_create(&ComponentLabel { component })
                .set(i64::from(*ok));
        }
        self.ready.set(i64::from(healthy.iter().all(|(_, ok)| *ok)));
    }
}

/// A root of trust or a store with each call counted and timed (the
/// core does not know it is watched).
pub struct Metered<T: ?Sized> {
    inner: std::sync::Arc<T>,
    metrics: std::sync::Arc<Metrics>,
}

impl<T: ?Sized> Metered<T> {
    /// Wraps `inner`.
    pub fn new(inner: std::sync::Arc<T>, metrics: std::sync::Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

/// The root of trust, with every call but `info` observed.
pub type MeteredRoot = Metered<dyn crate::root::RootOfTrust>;
/// The key store, with every call observed.
pub type MeteredStore = Metered<dyn crate::store::Store>;

impl MeteredRoot {
    fn timed<T, E>(&self, call: &'static str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = std::time::Instant::now();
        let r = f();
        self.metrics.root_call(call, r.is_ok(), start.elapsed());
        r
    }
}

impl MeteredStore {
    fn timed<T, E>(&self, call: &'static str, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        let start = std::time::Instant::now();
        let r = f();
        self.metrics.store_call(call, r.is_ok(), start.elapsed());
        r
    }
}

impl crate::root::RootOfTrust for MeteredRoot {
    fn info(&self) -> crate::root::RootInfo {
        self.inner.info()
    }
    fn health(&self) -> Result<(), crate::root::RootError> {
        self.timed("health", || self.inner.health())
    }
    fn generate_material(&self) -> Result<crate::secret::KeyMaterial, crate::root::RootError> {
        self.timed("generate", || self.inner.generate_material())
    }
    fn wrap(
        &self,
        m: &crate::secret::KeyMaterial,
    ) -> Result<crate::root::WrappedKey, crate::root::RootError> {
        self.timed("wrap", || self.inner.wrap(m))
    }
    fn unwrap(
        &self,
        w: &crate::root::WrappedKey,
    ) -> Result<crate::secret::KeyMaterial, crate::root::RootError> {
        self.timed("unwrap", || self.inner.unwrap(w))
    }
    fn sign(&self, m: &[u8]) -> Result<Vec<u8>, crate::root::RootError> {
        self.timed("sign", || self.inner.sign(m))
    }
    fn signing_public_key(&self) -> Result<Vec<u8>, crate::root::RootError> {
        self.timed("public_key", || self.inner.signing_public_key())
    }
}

impl crate::store::Store for MeteredStore {
    fn get(
        &self,
        id: &crate::keys::KeyId,
    ) -> Result<Option<crate::keys::KeyRecord>, crate::store::StoreError> {
        self.timed("get", || self.inner.get(id))
    }
    fn insert(&self, rec: &crate::keys::KeyRecord) -> Result<(), crate::store::StoreError> {
        self.timed("insert", || self.inner.insert(rec))
    }
    fn update(&self, rec: &crate::keys::KeyRecord) -> Result<(), crate::store::StoreError> {
        self.timed("update", || self.inner.update(rec))
    }
    fn write_batch(
        &self,
        inserts: &[&crate::keys::KeyRecord],
        updates: &[&crate::keys::KeyRecord],
    ) -> Result<(), crate::store::StoreError> {
        self.timed("write_batch", || self.inner.write_batch(inserts, updates))
    }
    fn scan(
        &self,
        after: Option<&crate::keys::KeyId>,
        limit: usize,
        filter: &dyn Fn(&crate::keys::KeyRecord) -> bool,
    ) -> Result<(Vec<crate::keys::KeyRecord>, bool), crate::store::StoreError> {
        self.timed("scan", || self.inner.scan(after, limit, filter))
    }
    fn put_break_glass(
        &self,
        bg: &crate::policy::breakglass::BreakGlass,
    ) -> Result<(), crate::store::StoreError> {
        self.timed("put_break_glass", || self.inner.put_break_glass(bg))
    }
    fn list_break_glass(
        &self,
    ) -> Result<Vec<crate::policy::breakglass::BreakGlass>, crate::store::StoreError> {
        self.timed("list_break_glass", || self.inner.list_break_glass())
    }
    fn lifecycle_lock(&self) -> Result<crate::store::LifecycleLock, crate::store::StoreError> {
        self.timed("lifecycle_lock", || self.inner.lifecycle_lock())
    }
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
        self.inner.meta(name)
    }
    fn put_meta_once(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, crate::store::StoreError> {
        self.inner.put_meta_once(name, value)
    }
    fn replace_meta(&self, name: &str, value: &[u8]) -> Result<(), crate::store::StoreError> {
        self.inner.replace_meta(name, value)
    }
    fn on_change(&self, handler: crate::store::ChangeHandler) {
        self.inner.on_change(handler)
    }
    fn snapshot(
        &self,
        each: &mut dyn FnMut(crate::store::Item) -> Result<(), crate::store::StoreError>,
    ) -> Result<(), crate::store::StoreError> {
        self.inner.snapshot(each)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_series_and_no_identities() {
        let m = Metrics::new();
        m.set_build("eu-central", "pkcs11");
        m.request(
            "decrypt",
            "refused",
            "PERMISSION_DENIED",
            "",
            Some("region"),
            Duration::from_micros(300),
        );
        m.register_audit(&AuditMetrics::default());
        m.register_caches(|| (CacheStats::default(), 3));
        let text = m.encode();
        for want in [
            "sovkms_requests_total{operation=\"decrypt\",outcome=\"refused\",code=\"PERMISSION_DENIED\",protocol=\"\"} 1",
            "sovkms_refusals_total{reason=\"region\"} 1",
            "sovkms_request_duration_seconds_bucket{operation=\"decrypt\",le=\"0.0004\"} 1",
            "sovkms_build_info{version=",
            "sovkms_record_cache_entries 3",
            "sovkms_audit_queue_depth 0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
