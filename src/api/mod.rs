//! The only place that knows tonic: gRPC services over the core, the mTLS
//! listener, health and reflection.

mod audit;
pub mod bench;
mod breakglass;
pub mod client;
pub(crate) mod convert;
mod datakeys;
pub mod proto;
mod regional;
mod service;
pub mod tls;

use crate::broker::Broker;
use crate::config::Settings;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tls::{PeerInfo, TlsConn, TlsServer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic_health::ServingStatus;

/// Largest gRPC message accepted: the plaintext limit's ceiling plus room
/// for the envelope and context.
const MAX_MESSAGE_BYTES: usize = crate::broker::MAX_PLAINTEXT_LIMIT + 64 * 1024;
/// Largest message of the services that carry no payload (keys and grants,
/// audit requests, break-glass, info): checked from the gRPC length prefix,
/// before the body is buffered.
const MAX_SMALL_MESSAGE_BYTES: usize = 256 * 1024;
/// Concurrent streams one HTTP/2 connection may open (tonic passes none:
/// unlimited).
const STREAMS_PER_CONNECTION: u32 = 128;
/// TLS handshakes in progress at once, in all and from one address.
const HANDSHAKES: usize = 256;
const HANDSHAKES_PER_ADDRESS: usize = 16;
/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The server with its HTTP/2 and connection limits set explicitly, shared
/// by the broker and the benchmark's echo ceiling (same limits, fair ratio).
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(16 * 1024)
        // Rapid-reset floods: h2 closes a connection that resets more
        // streams than this before they are answered.
        .http2_max_pending_accept_reset_streams(Some(64))
        .http2_max_local_error_reset_streams(Some(256))
        .timeout(Duration::from_secs(30))
        // Also bounds how long a connection outlives anything about its
        // certificate (the per-request notAfter check covers expiry).
        .max_connection_age(Duration::from_secs(3600))
        .max_connection_age_grace(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
}

/// Failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Listen socket.
    #[error("cannot listen on {addr}: {err}")]
    Bind {
        /// address
        addr: String,
        /// cause
        err: std::io::Error,
    },
    /// gRPC transport.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection descriptor.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// A running server; dropping it does not stop it, call [`shutdown`](Self::shutdown).
pub struct RunningServer {
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    /// The KMIP listener's address, when one serves beside gRPC.
    pub kmip_addr: Option<SocketAddr>,
    /// The admin listener's address, when one is configured.
    pub admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    extra_stop: Option<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    /// Other listeners of the same broker, stopped with it.
    attached: Vec<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
    /// The TLS setup of every listener, for [`reload_tls`](Self::reload_tls).
    tls: Vec<Arc<TlsServer>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        if let Some(s) = &self.extra_stop {
            let _ = s.send(true);
        }
        for (stop, _) in &self.attached {
            let _ = stop.send(true);
        }
        let r = match self.task.await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Reflection(format!("server task failed: {e}"))),
        };
        for (_, task) in self.attached {
            let _ = task.await;
        }
        r
    }

    /// Attaches another listener of the same broker (KMIP, admin): `stop`
    /// ends it, `task` finishes once it has stopped, `tls` (if it has TLS)
    /// reloads with the others.
    pub fn attach(
        &mut self,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
        tls: Option<Arc<TlsServer>>,
    ) {
        self.attached.push((stop, task));
        self.tls.extend(tls);
    }

    /// Reads the broker's certificate and key, the client CAs and the CRLs
    /// again (SIGHUP): new handshakes on every listener use them;
    /// established connections go on. A file that does not load leaves
    /// the ones in force and is reported.
    pub fn reload_tls(&self, settings: &crate::config::TlsSettings) -> Result<(), tls::TlsError> {
        // Everything is loaded before anything is swapped.
        for t in &self.tls {
            TlsServer::for_listener(settings, t.listener())?;
        }
        for t in &self.tls {
            t.reload(settings)?;
        }
        Ok(())
    }

    /// Waits until the server stops by itself (error) or `signal` fires.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        signal.await;
        self.shutdown().await
    }
}

/// Loads the TLS material a broker would serve with (certificate, key,
/// client CAs), binding nothing: for `sovkms config check`.
pub fn check_tls(settings: &crate::config::TlsSettings) -> Result<(), ServeError> {
    TlsServer::new(settings)?;
    Ok(())
}

/// A listener bound with its TLS configuration loaded: everything that can
/// fail on the network side, done before the root of trust is opened.
pub struct Bound {
    listener: TcpListener,
    /// The bound address (useful with port 0).
    pub local_addr: SocketAddr,
    tls: Arc<TlsServer>,
}

/// Loads the TLS material and binds the listener.
pub async fn bind_broker(settings: &Settings) -> Result<Bound, ServeError> {
    let (listener, local_addr, tls) = bind(settings).await?;
    Ok(Bound {
        listener,
        local_addr,
        tls,
    })
}

/// Starts serving `broker` with mTLS on a bound listener.
pub async fn start(bound: Bound, broker: Arc<Broker>) -> Result<RunningServer, ServeError> {
    let Bound {
        listener,
        local_addr,
        tls,
    } = bound;
    let (stop_tasks, stop_rx) = watch::channel(false);
    let metrics = Arc::clone(broker.metrics());

    let (health, health_svc) = tonic_health::server::health_reporter();
    tokio::spawn(health_monitor(Arc::clone(&broker), health, stop_rx.clone()));
    tokio::spawn(destroy_sweeper(Arc::clone(&broker), stop_rx.clone()));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let router = server_builder()
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            proto::key_service_server::KeyServiceServer::new(service::Api::new(Arc::clone(
                &broker,
            )))
            .max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES),
        )
        .add_service(
            proto::crypto_service_server::CryptoServiceServer::new(service::Api::new(Arc::clone(
                &broker,
            )))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            proto::audit_service_server::AuditServiceServer::new(service::Api::new(Arc::clone(
                &broker,
            )))
            .max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES),
        )
        .add_service(
            proto::break_glass_service_server::BreakGlassServiceServer::new(service::Api::new(
                Arc::clone(&broker),
            ))
            .max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES),
        )
        .add_service(
            proto::broker_service_server::BrokerServiceServer::new(service::Api::new(broker))
                .max_decoding_message_size(MAX_SMALL_MESSAGE_BYTES),
        );
    let mut server = launch(router, listener, tls, local_addr, metrics);
    // The health monitor and the sweeper stop with the server.
    server.extra_stop = Some(stop_tasks);
    Ok(server)
}

async fn bind(
    settings: &Settings,
) -> Result<(TcpListener, SocketAddr, Arc<TlsServer>), ServeError> {
    let mut tls = TlsServer::new(&settings.tls)?;
    tls.max_connections = settings.broker.limits.connections as usize;
    let tls = Arc::new(tls);
    let listener = TcpListener::bind(&settings.listen)
        .await
        .map_err(|err| ServeError::Bind {
            addr: settings.listen.clone(),
            err,
        })?;
    let local_addr = listener.local_addr().map_err(|err| ServeError::Bind {
        addr: settings.listen.clone(),
        err,
    })?;
    Ok((listener, local_addr, tls))
}

/// Serves `router` on the mTLS listener until stopped.
fn launch(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    tls: Arc<TlsServer>,
    local_addr: SocketAddr,
    metrics: Arc<crate::metrics::Metrics>,
) -> RunningServer {
    let (stop, stop_rx) = watch::channel(false);
    let tls_keep = Arc::clone(&tls);
    let incoming = accept_loop(listener, tls, stop_rx.clone(), metrics, "grpc");
    let mut stop_wait = stop_rx;
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async move {
                stopped(&mut stop_wait).await;
            })
            .await?;
        Ok(())
    });
    RunningServer {
        local_addr,
        kmip_addr: None,
        admin_addr: None,
        stop,
        extra_stop: None,
        task,
        attached: Vec::new(),
        tls: vec![tls_keep],
    }
}

/// One handshake in progress from one address; released on drop.
struct AddressSlot {
    map: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl AddressSlot {
    fn take(
        map: &Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Self> {
        // The map holds counters only: a poisoned lock leaves it usable.
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Self {
            map: Arc::clone(map),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, so a
/// slow or hostile client cannot hold up others.
pub(crate) fn accept_loop(
    listener: TcpListener,
    tls: Arc<TlsServer>,
    mut stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    name: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>> {
    let allowed = tls.allowed_client_cidrs.clone();
    let connections = Arc::new(tokio::sync::Semaphore::new(tls.max_connections));
    let (tx, rx) = mpsc::channel(128);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES));
    let per_address: Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut stop) => return,
            };
            // The network guard: outside the listed networks, the connection
            // is closed before any TLS byte is read.
            let ip = remote.ip().to_canonical();
            if !allowed.is_empty() && !allowed.iter().any(|n| n.contains(&ip)) {
                metrics.connection(name, "refused_network");
                tracing::warn!(%remote, "client address outside tls.allowed_client_cidrs: connection closed");
                continue;
            }
            // Every connection holds a file descriptor and memory until it
            // ends: at most so many at once.
            let Ok(conn_slot) = Arc::clone(&connections).try_acquire_owned() else {
                metrics.connection(name, "refused_cap");
                tracing::warn!(%remote, "connection limit reached ([limits] connections): connection closed");
                continue;
            };
            // Handshakes cost CPU before anyone is identified: a bounded
            // number at once, and a few per address; beyond that the
            // connection is closed at once.
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                metrics.connection(name, "refused_handshakes");
                tracing::warn!(%remote, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let Some(slot) = AddressSlot::take(&per_address, remote.ip()) else {
                metrics.connection(name, "refused_handshakes_per_address");
                tracing::warn!(%remote, "too many TLS handshakes from this address: connection closed");
                continue;
            };
            metrics.connection(name, "accepted");
            let metrics = Arc::clone(&metrics);
            let _ = tcp.set_nodelay(true);
            // The certificates and CAs in force now (a reload swaps them
            // for later handshakes only).
            let tls = tls.current();
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor.accept(tcp)).await;
                drop((permit, slot));
                match handshake {
                    Ok(Ok(stream)) => {
                        let identified = tls.identify(&stream);
                        if let Err(why) = &identified {
                            tracing::warn!(%remote, reason = %why, "client certificate carries no usable identity");
                        }
                        let not_after = identified.as_ref().map_or(0, |(_, t)| *t);
                        let key_exchange = stream
                            .get_ref()
                            .1
                            .negotiated_key_exchange_group()
                            .and_then(|g| g.name().as_str())
                            .unwrap_or("unknown");
                        tracing::debug!(%remote, key_exchange, "TLS handshake done");
                        metrics.connection(name, "handshake_ok");
                        let conn = TlsConn {
                            _open: tls::OpenConnection::new(Arc::clone(&metrics), name),
                            _slot: conn_slot,
                            stream,
                            info: PeerInfo {
                                remote,
                                caller: identified.map(|(c, _)| Arc::new(c)),
                                not_after,
                                key_exchange,
                            },
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => {
                        metrics.handshake_failure(name, handshake_failure(&e));
                        tracing::warn!(%remote, error = %e, "TLS handshake refused")
                    }
                    Err(_) => {
                        metrics.handshake_failure(name, "timeout");
                        tracing::warn!(%remote, "TLS handshake timed out")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Why a TLS handshake failed, as a metric label (the TLS alert it
/// amounts to, where there is one).
fn handshake_failure(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidCertificate(rustls::CertificateError::Revoked)) => "certificate_revoked",
        Some(E::InvalidCertificate(rustls::CertificateError::Expired)) => "certificate_expired",
        Some(E::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => "unknown_ca",
        Some(E::InvalidCertificate(_)) => "bad_certificate",
        Some(E::NoCertificatesPresented) => "certificate_required",
        Some(E::PeerIncompatible(_)) => "protocol_version",
        Some(E::AlertReceived(_)) => "alert_received",
        Some(
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. },
        ) => "decode_error",
        Some(_) => "other",
        None => "io",
    }
}

/// Reports NOT_SERVING, naming the component, while the root of trust
/// fails its per-second health call or the last deep readiness check
/// (root wrap/unwrap, store read, audit append and sync; every
/// `readiness_interval`, and at once when the root comes back) failed or
/// did not finish within `readiness_deadline`.
async fn health_monitor(
    broker: Arc<Broker>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let services = [
        "",
        "sovkms.v1.CryptoService",
        "sovkms.v1.KeyService",
        "sovkms.v1.AuditService",
    ];
    let (interval, deadline) = broker.readiness_schedule();
    let checking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut last: Option<bool> = None;
    let mut root_was_ok = true;
    let mut next_deep = tokio::time::Instant::now();
    loop {
        let b = Arc::clone(&broker);
        let root = tokio::task::spawn_blocking(move || {
            b.flush_suppressed_refusals();
            b.health().err().map(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Some("the health check task failed".into()));
        let now = tokio::time::Instant::now();
        let root_back = root.is_none() && !root_was_ok;
        root_was_ok = root.is_none();
        if (now >= next_deep || root_back)
            && !checking.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            next_deep = now + interval;
            deep_check(&broker, interval, deadline, &checking).await;
        }
        let mut readiness = broker.readiness();
        if let Some(why) = root {
            readiness.ready = false;
            readiness.failing.retain(|(c, _)| *c != "root_of_trust");
            readiness.failing.insert(0, ("root_of_trust", why));
            broker.set_readiness(readiness.clone());
        }
        let ok = readiness.ready;
        if last != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in services {
                health.set_service_status(s, status).await;
            }
            if ok {
                tracing::info!("ready: reporting SERVING");
            } else {
                tracing::error!(failing = %readiness.summary(), "not ready: reporting NOT_SERVING");
            }
            last = Some(ok);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// One deep readiness check, given up on after `deadline` (the blocking
/// call goes on; `checking` stays set until it returns, so checks never
/// pile up behind a hung device).
async fn deep_check(
    broker: &Arc<Broker>,
    fresh: Duration,
    deadline: Duration,
    checking: &Arc<std::sync::atomic::AtomicBool>,
) {
    let at = Arc::new(std::sync::Mutex::new("root_of_trust"));
    let (b, at2, done) = (Arc::clone(broker), Arc::clone(&at), Arc::clone(checking));
    let task = tokio::task::spawn_blocking(move || {
        b.check_readiness(fresh, &at2);
        done.store(false, std::sync::atomic::Ordering::SeqCst);
    });
    if tokio::time::timeout(deadline, task).await.is_err() {
        let component = *at.lock().unwrap_or_else(|p| p.into_inner());
        broker.set_readiness(crate::broker::Readiness {
            ready: false,
            failing: vec![(
                component,
                format!("no answer within {} s", deadline.as_secs()),
            )],
            checked_at: broker.now_unix(),
        });
    }
}

/// Completes destructions whose window has passed (also done lazily on access).
async fn destroy_sweeper(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    loop {
        let b = Arc::clone(&broker);
        match tokio::task::spawn_blocking(move || b.sweep_destroyed()).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(count = n, "scheduled destructions completed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "destroy sweep failed; will retry"),
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once a stop is requested (or the sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
