//! The KMIP listener: mutual TLS (same identities, CAs and limits as gRPC),
//! one request message at a time per connection, each answered in one
//! write. Unframeable bytes get one Invalid Message response and the
//! connection is closed; everything else gets a KMIP answer and the
//! connection stays open.

use super::tag;
use super::ttlv::{self, Limits};
use crate::api::tls::{Listener, TlsServer};
use crate::broker::Broker;
use crate::region::{Caller, IdentityError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// A connection idle this long between messages is closed.
const IDLE: Duration = Duration::from_secs(120);
/// A message must arrive whole within this once its header has.
const BODY: Duration = Duration::from_secs(30);

/// A bound KMIP listener (TLS loaded), not yet serving.
pub struct Bound {
    listener: TcpListener,
    /// The bound address.
    pub local_addr: SocketAddr,
    tls: Arc<TlsServer>,
}

/// Failure to start the KMIP listener.
#[derive(Debug, thiserror::Error)]
pub enum KmipServeError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] crate::api::tls::TlsError),
    /// Listen socket.
    #[error("cannot listen for KMIP on {addr}: {err}")]
    Bind {
        /// address
        addr: String,
        /// cause
        err: std::io::Error,
    },
}

/// Loads TLS for KMIP and binds `addr`.
pub async fn bind(
    addr: &str,
    tls: &crate::config::TlsSettings,
    max_connections: usize,
) -> Result<Bound, KmipServeError> {
    let mut server = TlsServer::for_listener(tls, Listener::Kmip)?;
    server.max_connections = max_connections;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| KmipServeError::Bind {
            addr: addr.to_owned(),
            err,
        })?;
    let local_addr = listener.local_addr().map_err(|err| KmipServeError::Bind {
        addr: addr.to_owned(),
        err,
    })?;
    Ok(Bound {
        listener,
        local_addr,
        tls: Arc::new(server),
    })
}

/// A running KMIP listener.
pub struct Running {
    /// The bound address.
    pub local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    tls: Arc<TlsServer>,
}

impl Running {
    /// Stops accepting and closes connections between messages.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// The stop switch, the task and the TLS setup, to stop and reload it
    /// with another server.
    pub fn into_parts(
        self,
    ) -> (
        SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
        Arc<TlsServer>,
    ) {
        (self.local_addr, self.stop, self.task, self.tls)
    }
}

/// What answers one framed request message for the connection's caller
/// (blocking; run off the async runtime).
pub type Handler = Arc<dyn Fn(Result<Arc<Caller>, IdentityError>, &[u8]) -> Vec<u8> + Send + Sync>;

/// Serves KMIP for `broker` on a bound listener.
pub fn start(bound: Bound, broker: Arc<Broker>) -> Running {
    let limits = Limits::default();
    let metrics = Arc::clone(broker.metrics());
    start_with(
        bound,
        Arc::new(move |caller, bytes: &[u8]| super::handle(&broker, caller, bytes, &limits)),
        metrics,
    )
}

/// Serves `handler` on a bound listener: the broker, or a benchmark's
/// ceiling on the very same connection code.
pub fn start_with(
    bound: Bound,
    handler: Handler,
    metrics: Arc<crate::metrics::Metrics>,
) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let Bound {
        listener,
        local_addr,
        tls,
    } = bound;
    let tls_keep = Arc::clone(&tls);
    let mut incoming = crate::api::accept_loop(listener, tls, stop_rx.clone(), metrics, "kmip");
    let task = tokio::spawn(async move {
        let mut stop = stop_rx;
        loop {
            let conn = tokio::select! {
                c = incoming.next() => match c {
                    Some(Ok(c)) => c,
                    Some(Err(_)) => continue,
                    None => return,
                },
                _ = crate::api::stopped(&mut stop) => return,
            };
            tokio::spawn(connection(conn, Arc::clone(&handler), stop.clone()));
        }
    });
    Running {
        local_addr,
        stop,
        task,
        tls: tls_keep,
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn connection(
    conn: crate::api::tls::TlsConn,
    handler: Handler,
    mut stop: watch::Receiver<bool>,
) {
    let limits = Limits::default();
    let info = conn.info.clone();
    let mut stream = conn.stream;
    // Held for the connection's life (the connection cap).
    let _slot = conn._slot;
    loop {
        let mut header = [0u8; 8];
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE, stream.read_exact(&mut header)) => r,
            _ = crate::api::stopped(&mut stop) => return,
        };
        if !matches!(read, Ok(Ok(_))) {
            return; // closed, failed or idle
        }
        let framing = if header[..4] != [0x42, 0x00, 0x78, 0x01] {
            Err(format!(
                "the bytes received do not start a Request Message (tag 420078, type Structure) but {}",
                hex::encode(&header[..4])
            ))
        } else {
            ttlv::framed_len(&header, &limits).map_err(|e| e.to_string())
        };
        let len = match framing {
            Ok(n) => n,
            Err(msg) => {
                // The length cannot be trusted: answer once and close.
                tracing::warn!(remote = %info.remote, reason = %msg, "KMIP: unframeable request; connection closed");
                let resp = super::message::response(
                    super::message::Version::V1_0,
                    now_unix(),
                    vec![super::message::ResponseItem {
                        operation: None,
                        id: None,
                        result: Err(super::Failure::new(tag::reason::INVALID_MESSAGE, msg)),
                    }],
                )
                .encode();
                let _ = stream.write_all(&resp).await;
                let _ = stream.shutdown().await;
                return;
            }
        };
        let mut buf = vec![0u8; len];
        buf[..8].copy_from_slice(&header);
        match tokio::time::timeout(BODY, stream.read_exact(&mut buf[8..])).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        // Identity is fixed per connection; the certificate's end is
        // checked per message, as gRPC does per request.
        let caller = match &info.caller {
            Ok(_) if now_unix() > info.not_after => Err(IdentityError::Expired {
                at: crate::audit::rfc3339(u64::try_from(info.not_after).unwrap_or(0) * 1000),
            }),
            other => other.clone(),
        };
        let h = Arc::clone(&handler);
        let resp = match tokio::task::spawn_blocking(move || h(caller, &buf)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "KMIP handler task failed");
                return;
            }
        };
        // One write: clients that read a response with a single read get
        // it whole.
        if stream.write_all(&resp).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}
