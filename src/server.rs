//! Wiring: validated settings → store, root of trust, broker core, API.

use crate::api::{self, RunningServer, ServeError};
use crate::audit::table::TableRef;
use crate::audit::{AuditError, AuditLog, AuditSink, Event, Kind, LogSettings};
use crate::broker::Broker;
use crate::clock::Clock;
use crate::config::{RootSettings, Settings};
use crate::root::tpm::{TpmAttestor, TpmRoot};
use crate::root::{pkcs11::Pkcs11Root, software::SoftwareRoot, RootOfTrust};
use crate::store::{PgStore, SledStore, Store};
use std::sync::Arc;

/// Start-up failure, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Root of trust.
    #[error("root of trust: {0}")]
    Root(#[from] crate::root::RootError),
    /// Store.
    #[error("{}", match err {
        crate::store::StoreError::Locked(_) => err.to_string(),
        _ => format!("store at {path}: {err}"),
    })]
    Store {
        /// data dir
        path: String,
        /// cause
        err: crate::store::StoreError,
    },
    /// Server.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// KMIP listener.
    #[error(transparent)]
    Kmip(#[from] crate::kmip::server::KmipServeError),
    /// Admin listener.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// Audit log.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The core refused to start (its stored state cannot be loaded).
    #[error("broker: {0}")]
    Broker(#[from] crate::error::Error),
}

/// Opens the store of a broker's config: sled (fails while the broker
/// runs: sled holds an exclusive lock) or the region's PostgreSQL.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, StartError> {
    Ok(open_store_and_chains(settings)?.0)
}

/// The store, and the database table of audit chains when the store is
/// the region's PostgreSQL (the audit log then lives there too).
pub fn open_store_and_chains(
    settings: &Settings,
) -> Result<(Arc<dyn Store>, Option<TableRef>), StartError> {
    match &settings.store {
        crate::config::StoreSettings::Sled => Ok((Arc::new(open_sled(settings)?), None)),
        crate::config::StoreSettings::Postgres(pg) => {
            let store = Arc::new(PgStore::open(pg.clone()).map_err(|err| StartError::Store {
                path: "the database".into(),
                err,
            })?);
            let table = TableRef(Arc::clone(&store) as Arc<dyn crate::audit::table::ChainTable>);
            Ok((store, Some(table)))
        }
    }
}

/// `store` with every record authenticated under the region's record key
/// (made with `root` on first use).
pub fn authenticate(
    store: Arc<dyn Store>,
    root: &dyn RootOfTrust,
) -> Result<Arc<dyn Store>, StartError> {
    let a = crate::store::authenticated::Authenticated::open(store, root).map_err(|err| {
        StartError::Store {
            path: "its records".into(),
            err,
        }
    })?;
    Ok(Arc::new(a))
}

/// Opens the sled store in the config's data directory.
pub fn open_sled(settings: &Settings) -> Result<SledStore, StartError> {
    let keys_dir = settings.data_dir.join("keys.sled");
    crate::files::create_private_dir(&keys_dir).map_err(|e| StartError::Store {
        path: keys_dir.display().to_string(),
        err: crate::store::StoreError::Unavailable(Box::new(e)),
    })?;
    SledStore::open(&keys_dir).map_err(|err| StartError::Store {
        path: keys_dir.display().to_string(),
        err,
    })
}

/// Opens the configured root of trust.
pub fn open_root(settings: &Settings) -> Result<Arc<dyn RootOfTrust>, StartError> {
    let root: Arc<dyn RootOfTrust> = match &settings.root {
        RootSettings::Software { path } => {
            let r = SoftwareRoot::open_or_create(path)?;
            tracing::warn!(
                file = %path.display(),
                "DEVELOPMENT ONLY: the software root of trust keeps the root key in a plain file; \
                 a copy of the data directory is a copy of every key. Never use it in production."
            );
            Arc::new(r)
        }
        RootSettings::Pkcs11(p) => Arc::new(Pkcs11Root::open((**p).clone())?),
        RootSettings::Tpm { sealed, tpm } => Arc::new(TpmRoot::open(tpm, sealed)?),
    };
    Ok(root)
}

/// Opens the store and the root of trust and builds the core. The audit
/// log gets its `start` record from [`start`], once the broker can serve.
pub fn open_broker(settings: &Settings, clock: Arc<dyn Clock>) -> Result<Arc<Broker>, StartError> {
    for warning in settings.readable_secrets() {
        tracing::warn!("{warning}");
    }
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let root: Arc<dyn RootOfTrust> = Arc::new(crate::metrics::MeteredRoot::new(
        open_root(settings)?,
        Arc::clone(&metrics),
    ));
    let (store, chains) = open_store_and_chains(settings)?;
    let store = authenticate(store, root.as_ref())?;
    let store: Arc<dyn Store> = Arc::new(crate::metrics::MeteredStore::new(
        store,
        Arc::clone(&metrics),
    ));
    let info = root.info();
    tracing::info!(kind = info.kind, root_key = %info.root_key_id, description = %info.description, "root of trust ready");
    metrics.set_build(settings.broker.region.as_str(), info.kind);
    let audit = AuditLog::open(log_settings(settings, chains.clone()), Arc::clone(&root))?;
    metrics.register_audit(&audit.metrics());
    let mut broker = Broker::new(settings.broker.clone(), root, store, clock, Arc::new(audit))
        .with_metrics(Arc::clone(&metrics))
        .with_audit_table(chains);
    if let Some(tpm) = &settings.tpm {
        broker = broker.with_attestor(Arc::new(TpmAttestor::new(tpm.clone())));
    }
    broker.load_break_glass()?;
    let broker = Arc::new(broker);
    let weak = Arc::downgrade(&broker);
    metrics.register_caches(move || weak.upgrade().map(|b| b.cache_stats()).unwrap_or_default());
    Ok(broker)
}

fn log_settings(settings: &Settings, table: Option<TableRef>) -> LogSettings {
    LogSettings {
        path: settings.audit.path.clone(),
        region: settings.broker.region.to_string(),
        broker_id: settings.broker.broker_id.clone(),
        checkpoint_every: settings.audit.checkpoint_every,
        checkpoint_interval: settings.audit.checkpoint_interval,
        witness: settings.audit.witness.clone(),
        segment_bytes: settings.audit.segment_bytes,
        reserve_bytes: settings.audit.reserve_bytes,
        table,
    }
}

/// Records an operator's offline change (broker stopped: root rotation or
/// retirement) in the broker's own audit chain, durably, and closes it with
/// a signed checkpoint. The chain is checked first, as at every start.
pub fn audit_offline(
    settings: &Settings,
    root: Arc<dyn RootOfTrust>,
    operation: &'static str,
    reason: &str,
) -> Result<u64, StartError> {
    let chains = open_store_and_chains(settings)?.1;
    let log = AuditLog::open(log_settings(settings, chains), root)?;
    let seq = log.append_durable(Event::system(Kind::Request, operation, reason))?;
    log.shutdown();
    Ok(seq)
}

/// Opens everything and starts serving.
pub async fn start(
    settings: &Settings,
    clock: Arc<dyn Clock>,
) -> Result<(Arc<Broker>, RunningServer), StartError> {
    // Everything that can fail without the root of trust fails first: a bad
    // TLS file or a busy port never logs in to the HSM or writes the log.
    let bound = api::bind_broker(settings).await?;
    let kmip = match &settings.kmip {
        Some(k) => Some(
            crate::kmip::server::bind(
                &k.listen,
                &settings.tls,
                settings.broker.limits.connections as usize,
            )
            .await?,
        ),
        None => None,
    };
    let admin = match &settings.admin_listen {
        Some(a) => Some(crate::admin::bind(a, &settings.tls).await?),
        None => None,
    };
    let broker = open_broker(settings, clock)?;
    let info = broker.status().root;
    let start = format!(
        "{} ({}); root key {}",
        info.description, info.kind, info.root_key_id
    );
    broker.audit_system(Event::system(Kind::Start, "start", &start))?;
    let mut server = api::start(bound, Arc::clone(&broker)).await?;
    tracing::info!(addr = %server.local_addr, region = %settings.broker.region, "sovkms broker listening (mTLS, TLS 1.3)");
    if let Some(k) = kmip {
        let (addr, stop, task, tls) =
            crate::kmip::server::start(k, Arc::clone(&broker)).into_parts();
        tracing::info!(%addr, "KMIP listening (mTLS, TLS 1.3 and 1.2)");
        server.kmip_addr = Some(addr);
        server.attach(stop, task, Some(tls));
    }
    if let Some(a) = admin {
        let r = crate::admin::start(a, Arc::clone(&broker));
        tracing::info!(addr = %r.addr, mtls = r.tls.is_some(), "admin listening (/metrics, /livez, /readyz)");
        server.admin_addr = Some(r.addr);
        server.attach(r.stop, r.task, r.tls);
    }
    Ok((broker, server))
}
