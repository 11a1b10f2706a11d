//! The PostgreSQL store: several brokers of one region over one in-region
//! database. Same records as sled (JSON, wrapped material only), one row
//! per key with a revision; the schema is migrated at start, in versions.
//!
//! The broker's calls block; this store runs the async driver on a small
//! runtime of its own and waits for each call with a deadline, so a call
//! made from anywhere (a blocking thread, an offline command) works and a
//! database that stops answering turns into `Unavailable`, not a hang.
//!
//! Every session runs with `synchronous_commit = on` whatever the server's
//! default: a write returns only after the commit is durable on the
//! primary (and on the synchronous standbys the operator configured).

use super::{Change, ChangeHandler, LifecycleLock, Store, StoreError};
use crate::keys::{KeyId, KeyRecord};
use crate::policy::breakglass::BreakGlass;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::AsyncMessage;

/// The newest schema this binary knows (and migrates a database to).
pub const SCHEMA_VERSION: i32 = 3;

/// Migrations in order: version, what it adds, the SQL.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "key records and break-glass grants",
        "CREATE TABLE sovkms_keys (
             id text PRIMARY KEY,
             revision bigint NOT NULL,
             body text NOT NULL
         );
         CREATE TABLE sovkms_break_glass (
             id text PRIMARY KEY,
             body text NOT NULL
         );",
    ),
    (
        2,
        "each broker's audit chain",
        "CREATE TABLE sovkms_audit (
             broker_id text NOT NULL,
             seq bigint NOT NULL,
             line text NOT NULL,
             PRIMARY KEY (broker_id, seq)
         );",
    ),
    (
        3,
        "the brokers' own values (the wrapped record key)",
        "CREATE TABLE sovkms_meta (
             name text PRIMARY KEY,
             value bytea NOT NULL
         );",
    ),
];

/// The channel on which brokers announce committed changes.
const CHANNEL: &str = "sovkms_changes";
/// Advisory lock ids ("sovkms" and a number): one lifecycle change at a
/// time in the region; one migration at a time.
const LIFECYCLE_LOCK: i64 = 0x736f_766b_6d73_0001;
const MIGRATION_LOCK: i64 = 0x736f_766b_6d73_0002;
/// Records read per round trip by `scan`.
const SCAN_PAGE: i64 = 500;
/// Wait between reconnections of the change listener.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Where the database password comes from (never the config file itself).
#[derive(Clone, Debug)]
pub enum PgPassword {
    /// No password (peer or certificate authentication, or a test cluster).
    None,
    /// This file (one trailing newline ignored).
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

/// TLS to the database.
#[derive(Clone, Debug)]
pub enum PgTls {
    /// Plain TCP or a Unix socket: accepted only for a database on this host.
    Off,
    /// TLS, with the server's certificate checked against this CA file (PEM).
    Ca(PathBuf),
}

/// How to reach the region's database. Its `Debug` never prints a URL
/// that holds a password (such a URL is refused anyway).
#[derive(Clone)]
pub struct PgSettings {
    /// `postgres://user@host:port/db` (no password in it).
    pub url: String,
    /// The password's source.
    pub password: PgPassword,
    /// TLS to the database.
    pub tls: PgTls,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Listen for other brokers' changes (off behind a pooler that cannot
    /// LISTEN: the broker's staleness bound alone then limits how long a
    /// change takes to reach it).
    pub listen: bool,
    /// Longest a database call may take before it counts as unavailable.
    pub timeout: Duration,
    /// Shown in `pg_stat_activity` (the broker's id).
    pub application_name: String,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = if url_has_password(&self.url) {
            "(a URL that holds a password: refused)"
        } else {
            self.url.as_str()
        };
        f.debug_struct("PgSettings")
            .field("url", &url)
            .field("password", &self.password)
            .field("tls", &self.tls)
            .field("pool_size", &self.pool_size)
            .field("listen", &self.listen)
            .field("timeout", &self.timeout)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Whether a connection URL (or key=value string) carries a password, or
/// cannot be read at all (then it is treated as if it did: never shown).
pub fn url_has_password(url: &str) -> bool {
    url.parse::<tokio_postgres::Config>()
        .map_or(true, |c| c.get_password().is_some())
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn unavailable_msg(m: String) -> StoreError {
    StoreError::Unavailable(m.into())
}

/// Several brokers' shared store.
pub struct PgStore {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    pool: Pool,
    settings: PgSettings,
    connect: Arc<Connector>,
    handler: Arc<Mutex<Option<ChangeHandler>>>,
    appender: Mutex<Option<Appender>>,
}

/// Opens single connections (the listener's) with the pool's settings.
struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            std::pin::Pin<Box<dyn ConnectionStream>>,
        ),
        tokio_postgres::Error,
    > {
        match &self.tls {
            None => {
                let (c, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                Ok((c, Box::pin(conn)))
            }
            Some(tls) => {
                let (c, conn) = self.config.connect(tls.clone()).await?;
                Ok((c, Box::pin(conn)))
            }
        }
    }
}

/// A connection whose messages (notifications) are read by polling it.
trait ConnectionStream: Send {
    fn poll_message(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>>;
}

impl<S, T> ConnectionStream for tokio_postgres::Connection<S, T>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    fn poll_message(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<AsyncMessage, tokio_postgres::Error>>> {
        tokio_postgres::Connection::poll_message(self.get_mut(), cx)
    }
}

fn is_local(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        tokio_postgres::config::Host::Unix(_) => true,
        tokio_postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    })
}

fn read_password(p: &PgPassword) -> Result<Option<crate::secret::Pin>, StoreError> {
    let bad = |m: String| StoreError::Unavailable(m.into());
    Ok(match p {
        PgPassword::None => None,
        PgPassword::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("database password file {}: {e}", path.display())))?;
            Some(crate::secret::Pin::new(text))
        }
        PgPassword::Env(var) => Some(crate::secret::Pin::new(
            std::env::var(var)
                .map_err(|_| bad(format!("database password variable {var} is not set")))?,
        )),
    })
}

fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let bad = |m: String| StoreError::Unavailable(m.into());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .map_err(|e| bad(format!("database CA {}: {e}", ca.display())))?
    {
        let c = c.map_err(|e| bad(format!("database CA {}: {e}", ca.display())))?;
        roots
            .add(c)
            .map_err(|e| bad(format!("database CA {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("database TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl PgStore {
    /// Connects, migrates the schema to [`SCHEMA_VERSION`] (refusing a
    /// newer one), and starts the pool.
    pub fn open(settings: PgSettings) -> Result<Self, StoreError> {
        Self::open_at_schema(settings, SCHEMA_VERSION)
    }

    /// Like [`open`](Self::open), migrating only up to `version` (tests of
    /// upgrades from an older schema).
    #[doc(hidden)]
    pub fn open_at_schema(settings: PgSettings, version: i32) -> Result<Self, StoreError> {
        let store = Self::connect(settings)?;
        store.call(move |pool| async move { migrate(&pool, version).await })?;
        Ok(store)
    }

    /// Opens without changing anything (auditors' reads): the schema must
    /// be the one this binary knows.
    pub fn open_for_reading(settings: PgSettings) -> Result<Self, StoreError> {
        let store = Self::connect(settings)?;
        let found = store.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(store)
    }

    fn connect(settings: PgSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| unavailable_msg(format!("database url: {e}")))?;
        if config.get_password().is_some() {
            return Err(unavailable_msg(
                "database url: it holds a password; give it in store.password_file or store.password_env instead".into(),
            ));
        }
        if let Some(pw) = read_password(&settings.password)? {
            config.password(pw.expose_secret());
        }
        config
            .application_name(&settings.application_name)
            .connect_timeout(settings.timeout)
            // Durable commits whatever the server's default; a stuck lock
            // or statement fails instead of holding a request forever.
            .options("-c synchronous_commit=on -c lock_timeout=10s -c statement_timeout=30s");
        let tls = match &settings.tls {
            PgTls::Off if !is_local(&config) => {
                return Err(unavailable_msg(
                    "database url: a database on another host needs TLS (store.ca)".into(),
                ))
            }
            PgTls::Off => None,
            PgTls::Ca(ca) => Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
                ca,
            )?)),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sovkms-pg")
            .enable_all()
            .build()
            .map_err(unavailable)?;
        let handle = runtime.handle().clone();
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &tls {
            None => Manager::from_config(config.clone(), tokio_postgres::NoTls, manager_config),
            Some(t) => Manager::from_config(config.clone(), t.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(2))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .build()
            .map_err(unavailable)?;
        let store = Self {
            runtime: Some(runtime),
            handle,
            pool,
            connect: Arc::new(Connector { config, tls }),
            settings,
            handler: Arc::default(),
            appender: Mutex::new(None),
        };
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for it, at most the
    /// configured timeout.
    fn call<T, F>(&self, f: impl FnOnce(Pool) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let fut = f(self.pool.clone());
        let timeout = self.settings.timeout;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let r = tokio::time::timeout(timeout, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(unavailable_msg(format!(
                        "the database did not answer within {} ms",
                        timeout.as_millis()
                    )))
                });
            let _ = tx.send(r);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(unavailable_msg("the store's runtime stopped".into())))
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        self.call(|pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            current_version(&c).await
        })
    }

    fn listen(&self) {
        let connect = Arc::clone(&self.connect);
        let handler = Arc::clone(&self.handler);
        self.handle.spawn(async move {
            let tell = |c: Change| {
                if let Some(h) = handler.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                    h(c);
                }
            };
            loop {
                match listen_once(&connect, &tell).await {
                    Ok(()) => tracing::warn!("database change listener closed; reconnecting"),
                    Err(e) => {
                        tracing::warn!(error = %e, "database change listener failed; reconnecting")
                    }
                }
                // Changes in the gap were missed.
                tell(Change::All);
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
    }
}

/// One listening session: LISTEN, then hand each notification over until
/// the connection ends.
async fn listen_once(
    connect: &Connector,
    tell: &impl Fn(Change),
) -> Result<(), tokio_postgres::Error> {
    let (client, mut conn) = connect.connect().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(m) = std::future::poll_fn(|cx| conn.as_mut().poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "database change listener connection failed");
                    return;
                }
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    // Whatever changed before LISTEN took effect was missed.
    tell(Change::All);
    while let Some(payload) = rx.recv().await {
        match payload.strip_prefix("k:") {
            Some(id) => match KeyId::parse(id) {
                Ok(id) => tell(Change::Key(id)),
                Err(_) => tell(Change::All),
            },
            None if payload == "b" => tell(Change::BreakGlass),
            None => tell(Change::All),
        }
    }
    driver.abort();
    Ok(())
}

async fn current_version(c: &impl deadpool_postgres::GenericClient) -> Result<i32, StoreError> {
    let row = c
        .query_one("SELECT coalesce(max(version), 0) FROM sovkms_schema", &[])
        .await
        .map_err(unavailable)?;
    Ok(row.get(0))
}

/// Brings the schema to `target`, one migration at a time, under a lock
/// (brokers starting together migrate once).
async fn migrate(pool: &Pool, target: i32) -> Result<(), StoreError> {
    let mut c = pool.get().await.map_err(unavailable)?;
    let tx = c.transaction().await.map_err(unavailable)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(unavailable)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS sovkms_schema (
             version integer PRIMARY KEY,
             description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(unavailable)?;
    let found = current_version(&tx).await?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, what, sql) in MIGRATIONS {
        if *version <= found || *version > target {
            continue;
        }
        tx.batch_execute(sql).await.map_err(unavailable)?;
        tx.execute(
            "INSERT INTO sovkms_schema (version, description) VALUES ($1, $2)",
            &[version, what],
        )
        .await
        .map_err(unavailable)?;
        tracing::info!(version, what, "database schema migrated");
    }
    tx.commit().await.map_err(unavailable)
}

fn encode(rec: &KeyRecord) -> Result<String, StoreError> {
    serde_json::to_string(rec).map_err(|source| StoreError::Corrupt {
        id: rec.id.to_string(),
        source,
    })
}

fn decode(id: &str, body: &str) -> Result<KeyRecord, StoreError> {
    serde_json::from_str(body).map_err(|source| StoreError::Corrupt {
        id: id.to_owned(),
        source,
    })
}

fn revision(r: &KeyRecord) -> i64 {
    i64::try_from(r.revision).unwrap_or(i64::MAX)
}

/// Rows to write: (id, revision read, body at the next revision).
fn prepared(recs: &[&KeyRecord]) -> Result<Vec<(String, i64, String)>, StoreError> {
    recs.iter()
        .map(|r| {
            Ok((
                r.id.to_string(),
                revision(r),
                encode(&super::next_revision(r))?,
            ))
        })
        .collect()
}

async fn write(
    pool: Pool,
    inserts: Vec<(String, i64, String)>,
    updates: Vec<(String, i64, String)>,
) -> Result<(), StoreError> {
    let mut c = pool.get().await.map_err(unavailable)?;
    let tx = c.transaction().await.map_err(unavailable)?;
    for (id, rev, body) in &inserts {
        let n = tx
            .execute(
                "INSERT INTO sovkms_keys (id, revision, body) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO NOTHING",
                &[id, rev, body],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            let id = KeyId::parse(id).map_err(|e| unavailable_msg(e.to_string()))?;
            return Err(StoreError::AlreadyExists(id));
        }
    }
    for (id, rev, body) in &updates {
        let n = tx
            .execute(
                "UPDATE sovkms_keys SET revision = $2 + 1, body = $3 WHERE id = $1 AND revision = $2",
                &[id, rev, body],
            )
            .await
            .map_err(unavailable)?;
        if n == 0 {
            let id = KeyId::parse(id).map_err(|e| unavailable_msg(e.to_string()))?;
            return Err(StoreError::Conflict(id));
        }
        // Delivered to every listening broker when (and only if) this commits.
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &format!("k:{id}")])
            .await
            .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// The region's lifecycle lock: a session advisory lock held on one pooled
/// connection until dropped.
struct PgLock {
    conn: Option<Object>,
    handle: tokio::runtime::Handle,
}

impl Drop for PgLock {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        self.handle.spawn(async move {
            match conn
                .execute("SELECT pg_advisory_unlock($1)", &[&LIFECYCLE_LOCK])
                .await
            {
                Ok(_) => drop(conn),
                Err(e) => {
                    // Never return a connection that may still hold the
                    // lock to the pool: closing it releases the lock.
                    tracing::warn!(error = %e, "lifecycle lock not released; closing its connection");
                    drop(Object::take(conn));
                }
            }
        });
    }
}

impl Store for PgStore {
    fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let key = id.to_string();
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            let row = c
                .query_opt("SELECT body FROM sovkms_keys WHERE id = $1", &[&key])
                .await
                .map_err(unavailable)?;
            row.map(|r| decode(&key, r.get(0))).transpose()
        })
    }

    fn insert(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.write_batch(&[rec], &[])
    }

    fn update(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.write_batch(&[], &[rec])
    }

    fn write_batch(
        &self,
        inserts: &[&KeyRecord],
        updates: &[&KeyRecord],
    ) -> Result<(), StoreError> {
        let ins = inserts
            .iter()
            .map(|r| Ok((r.id.to_string(), revision(r), encode(r)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let upd = prepared(updates)?;
        self.call(move |pool| write(pool, ins, upd))
    }

    fn scan(
        &self,
        after: Option<&KeyId>,
        limit: usize,
        filter: &dyn Fn(&KeyRecord) -> bool,
    ) -> Result<(Vec<KeyRecord>, bool), StoreError> {
        let mut from = after.map(|a| a.to_string()).unwrap_or_default();
        let mut out = Vec::new();
        loop {
            let start = from.clone();
            let page: Vec<(String, String)> = self.call(move |pool| async move {
                let c = pool.get().await.map_err(unavailable)?;
                let rows = c
                    .query(
                        "SELECT id, body FROM sovkms_keys WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&start, &SCAN_PAGE],
                    )
                    .await
                    .map_err(unavailable)?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })?;
            let full = page.len() as i64 == SCAN_PAGE;
            for (id, body) in &page {
                let rec = decode(id, body)?;
                if filter(&rec) {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(rec);
                }
            }
            match page.last() {
                Some((id, _)) if full => from = id.clone(),
                _ => return Ok((out, false)),
            }
        }
    }

    fn put_break_glass(&self, bg: &BreakGlass) -> Result<(), StoreError> {
        let body = serde_json::to_string(bg).map_err(|source| StoreError::Corrupt {
            id: bg.id.clone(),
            source,
        })?;
        let id = bg.id.clone();
        self.call(move |pool| async move {
            let mut c = pool.get().await.map_err(unavailable)?;
            let tx = c.transaction().await.map_err(unavailable)?;
            tx.execute(
                "INSERT INTO sovkms_break_glass (id, body) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
                &[&id, &body],
            )
            .await
            .map_err(unavailable)?;
            tx.execute("SELECT pg_notify($1, 'b')", &[&CHANNEL])
                .await
                .map_err(unavailable)?;
            tx.commit().await.map_err(unavailable)
        })
    }

    fn list_break_glass(&self) -> Result<Vec<BreakGlass>, StoreError> {
        let rows: Vec<(String, String)> = self.call(|pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            let rows = c
                .query("SELECT id, body FROM sovkms_break_glass ORDER BY id", &[])
                .await
                .map_err(unavailable)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })?;
        rows.iter()
            .map(|(id, body)| {
                serde_json::from_str(body).map_err(|source| StoreError::Corrupt {
                    id: id.clone(),
                    source,
                })
            })
            .collect()
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.to_owned();
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            let row = c
                .query_opt("SELECT value FROM sovkms_meta WHERE name = $1", &[&name])
                .await
                .map_err(unavailable)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn put_meta_once(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            c.execute(
                "INSERT INTO sovkms_meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[&name, &value],
            )
            .await
            .map_err(unavailable)?;
            let row = c
                .query_one("SELECT value FROM sovkms_meta WHERE name = $1", &[&name])
                .await
                .map_err(unavailable)?;
            Ok(row.get(0))
        })
    }

    fn replace_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            c.execute(
                "INSERT INTO sovkms_meta (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &value],
            )
            .await
            .map_err(unavailable)?;
            Ok(())
        })
    }

    fn lifecycle_lock(&self) -> Result<LifecycleLock, StoreError> {
        // No deadline of ours here: a lock granted after we stopped
        // waiting would stay on a pooled connection. The session's
        // lock_timeout bounds the wait instead.
        let pool = self.pool.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let r = async {
                let c = pool.get().await.map_err(unavailable)?;
                c.execute("SELECT pg_advisory_lock($1)", &[&LIFECYCLE_LOCK])
                    .await
                    .map_err(unavailable)?;
                Ok(c)
            }
            .await;
            if let Err(std::sync::mpsc::SendError(Ok(c))) = tx.send(r) {
                drop(Object::take(c));
            }
        });
        let conn = rx
            .recv()
            .unwrap_or_else(|_| Err(unavailable_msg("the store's runtime stopped".into())))?;
        Ok(Box::new(PgLock {
            conn: Some(conn),
            handle: self.handle.clone(),
        }))
    }

    fn snapshot(
        &self,
        each: &mut dyn FnMut(super::Item) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // One read-only REPEATABLE READ transaction on a connection of its
        // own: a cursor over the keys, then the grants, all as of its start.
        let connect = Arc::clone(&self.connect);
        let client = self.call(move |_| async move {
            let (client, mut conn) = connect.connect().await.map_err(unavailable)?;
            tokio::spawn(async move {
                while let Some(Ok(_)) =
                    std::future::poll_fn(|cx| conn.as_mut().poll_message(cx)).await
                {
                }
            });
            client
                .batch_execute(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
                     DECLARE sovkms_backup NO SCROLL CURSOR FOR
                         SELECT id, body FROM sovkms_keys ORDER BY id",
                )
                .await
                .map_err(unavailable)?;
            Ok(Arc::new(client))
        })?;
        let rows = |sql: &'static str| {
            let c = Arc::clone(&client);
            self.call(move |_| async move {
                let rows = c.query(sql, &[]).await.map_err(unavailable)?;
                Ok(rows
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>())
            })
        };
        loop {
            let page = rows("FETCH 1000 FROM sovkms_backup")?;
            if page.is_empty() {
                break;
            }
            for (id, body) in &page {
                each(super::Item::Key(decode(id, body)?))?;
            }
        }
        for (id, body) in rows("SELECT id, body FROM sovkms_break_glass ORDER BY id")? {
            let bg = serde_json::from_str(&body).map_err(|source| StoreError::Corrupt {
                id: id.clone(),
                source,
            })?;
            each(super::Item::BreakGlass(bg))?;
        }
        Ok(())
    }

    fn on_change(&self, handler: ChangeHandler) {
        let first = {
            let mut h = self.handler.lock().unwrap_or_else(|p| p.into_inner());
            let first = h.is_none();
            *h = Some(handler);
            first
        };
        if first && self.settings.listen {
            self.listen();
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime may not block inside another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn io_err(e: StoreError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// One COPY, one transaction: the whole group or nothing, and the
/// database's cheapest way in (no statement to plan).
async fn copy_rows(
    c: &tokio_postgres::Client,
    broker: &str,
    rows: &[(u64, String)],
) -> Result<(), StoreError> {
    use tokio_postgres::types::Type;
    let sink = c
        .copy_in("COPY sovkms_audit (broker_id, seq, line) FROM STDIN (FORMAT binary)")
        .await
        .map_err(unavailable)?;
    let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
        sink,
        &[Type::TEXT, Type::INT8, Type::TEXT],
    );
    let mut writer = std::pin::pin!(writer);
    for (seq, line) in rows {
        let seq = i64::try_from(*seq).unwrap_or(i64::MAX);
        writer
            .as_mut()
            .write(&[&broker, &seq, line])
            .await
            .map_err(unavailable)?;
    }
    writer.finish().await.map_err(unavailable)?;
    Ok(())
}

async fn last_line(c: &tokio_postgres::Client, broker: &str) -> Result<Option<String>, StoreError> {
    let row = c
        .query_opt(
            "SELECT line FROM sovkms_audit WHERE broker_id = $1 ORDER BY seq DESC LIMIT 1",
            &[&broker],
        )
        .await
        .map_err(unavailable)?;
    Ok(row.map(|r| r.get(0)))
}

/// The audit writer's own connection, driven on the writer's thread by a
/// runtime of its own: a group commit then crosses no thread (through the
/// pool's runtime, waking it and being woken back cost the broker more CPU
/// per commit than the COPY itself).
struct Appender {
    rt: Option<tokio::runtime::Runtime>,
    client: Option<tokio_postgres::Client>,
}

impl Appender {
    fn new() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            rt: Some(rt),
            client: None,
        })
    }

    /// Appends on this connection (opened again when it was lost). A
    /// failure on a connection that was already open is settled on a new
    /// one: rows that landed are not sent again, rows that did not are
    /// sent once more, so a database restart between two group commits
    /// costs no batch.
    fn append(
        &mut self,
        connect: &Connector,
        timeout: Duration,
        broker: &str,
        rows: &[(u64, String)],
    ) -> Result<(), StoreError> {
        let Self { rt, client } = self;
        let Some(rt) = rt.as_ref() else {
            return Err(unavailable_msg("the audit appender stopped".into()));
        };
        rt.block_on(async {
            let attempt = tokio::time::timeout(timeout, async {
                let was_open = client.as_ref().is_some_and(|c| !c.is_closed());
                let first = match Self::open(client, connect).await {
                    Ok(c) => copy_rows(c, broker, rows).await,
                    Err(e) => return Err(e),
                };
                let Err(e) = first else { return Ok(()) };
                *client = None;
                if !was_open {
                    return Err(e);
                }
                let c = Self::open(client, connect).await?;
                let (Some((first_seq, _)), Some((_, last))) = (rows.first(), rows.last()) else {
                    return Ok(());
                };
                let head = last_line(c, broker).await?;
                // Landed: the head is this batch's last record, to the byte.
                if head.as_deref() == Some(last.as_str()) {
                    return Ok(());
                }
                let head_seq = match &head {
                    None => 0,
                    Some(line) => serde_json::from_str::<HeadSeq>(line)
                        .map(|h| h.seq)
                        .map_err(|_| e)?,
                };
                if head_seq + 1 == *first_seq {
                    copy_rows(c, broker, rows).await
                } else {
                    Err(unavailable_msg(
                        "the audit chain's head in the database is not where this broker left it"
                            .into(),
                    ))
                }
            })
            .await;
            attempt.unwrap_or_else(|_| {
                *client = None;
                Err(unavailable_msg(format!(
                    "the database did not answer within {} ms",
                    timeout.as_millis()
                )))
            })
        })
    }

    async fn open<'c>(
        client: &'c mut Option<tokio_postgres::Client>,
        connect: &Connector,
    ) -> Result<&'c tokio_postgres::Client, StoreError> {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            let (c, mut conn) = connect.connect().await.map_err(unavailable)?;
            tokio::spawn(async move {
                while let Some(m) = std::future::poll_fn(|cx| conn.as_mut().poll_message(cx)).await
                {
                    if m.is_err() {
                        return;
                    }
                }
            });
            *client = Some(c);
        }
        client
            .as_ref()
            .ok_or_else(|| unavailable_msg("no audit connection".into()))
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        // Dropping a runtime may not block inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The one field of a stored record the appender reads back.
#[derive(serde::Deserialize)]
struct HeadSeq {
    seq: u64,
}

impl super::ChainTable for PgStore {
    fn append(&self, broker_id: &str, rows: Vec<(u64, String)>) -> std::io::Result<()> {
        // The audit writer's thread (no runtime of its own): its connection,
        // driven right here.
        if tokio::runtime::Handle::try_current().is_err() {
            let mut g = self.appender.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(Appender::new()?);
            }
            if let Some(a) = g.as_mut() {
                return a
                    .append(&self.connect, self.settings.timeout, broker_id, &rows)
                    .map_err(io_err);
            }
        }
        let broker = broker_id.to_owned();
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            copy_rows(&c, &broker, &rows).await
        })
        .map_err(io_err)
    }

    fn last(&self, broker_id: &str) -> std::io::Result<Option<String>> {
        let broker = broker_id.to_owned();
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            last_line(&c, &broker).await
        })
        .map_err(io_err)
    }

    fn page(
        &self,
        broker_id: &str,
        after_seq: u64,
        limit: usize,
    ) -> std::io::Result<Vec<(u64, String)>> {
        let broker = broker_id.to_owned();
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.call(move |pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            let rows = c
                .query(
                    "SELECT seq, line FROM sovkms_audit WHERE broker_id = $1 AND seq > $2
                     ORDER BY seq LIMIT $3",
                    &[&broker, &after, &limit],
                )
                .await
                .map_err(unavailable)?;
            Ok(rows
                .iter()
                .map(|r| (u64::try_from(r.get::<_, i64>(0)).unwrap_or(0), r.get(1)))
                .collect())
        })
        .map_err(io_err)
    }

    fn brokers(&self) -> std::io::Result<Vec<String>> {
        self.call(|pool| async move {
            let c = pool.get().await.map_err(unavailable)?;
            let rows = c
                .query(
                    "SELECT DISTINCT broker_id FROM sovkms_audit ORDER BY broker_id",
                    &[],
                )
                .await
                .map_err(unavailable)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .map_err(io_err)
    }
}
