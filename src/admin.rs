//! The admin listener (`[admin] listen`): Prometheus metrics (`/metrics`),
//! liveness (`/livez`) and readiness (`/readyz`) over HTTP/1.1.
//!
//! On a loopback address it is plain HTTP: only the host reaches it (a
//! scraper or probe beside the broker). Anywhere else it is TLS with the
//! broker's certificate and client CAs: metrics and the reasons behind
//! "not ready" go to operators and auditors of the broker's own region
//! only (the central plane and other regions never read a region's
//! operational data); any other caller, with or without a certificate (a
//! kubelet's probe), learns only live/ready or not.

use crate::api::tls::{Listener, TlsServer};
use crate::broker::Broker;
use crate::region::{Caller, Role};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Concurrent plain (loopback) connections at most.
const LOOPBACK_CONNECTIONS: usize = 64;
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin listener cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address cannot be bound.
    #[error("admin listener: cannot listen on {addr}: {err}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        err: std::io::Error,
    },
    /// The TLS material (for a non-loopback address).
    #[error("admin listener: {0}")]
    Tls(#[from] crate::api::tls::TlsError),
}

/// A bound admin listener, not serving yet.
pub struct Bound {
    listener: TcpListener,
    /// The bound address.
    pub local_addr: SocketAddr,
    /// mTLS, for an address other than loopback.
    tls: Option<Arc<TlsServer>>,
}

/// Binds `addr`; loads the TLS material unless it is a loopback address.
pub async fn bind(addr: &str, tls: &crate::config::TlsSettings) -> Result<Bound, AdminError> {
    let bind_err = |err| AdminError::Bind {
        addr: addr.to_owned(),
        err,
    };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let local_addr = listener.local_addr().map_err(bind_err)?;
    let tls = if local_addr.ip().is_loopback() {
        None
    } else {
        let mut t = TlsServer::for_listener(tls, Listener::Admin)?;
        t.max_connections = LOOPBACK_CONNECTIONS;
        Some(Arc::new(t))
    };
    Ok(Bound {
        listener,
        local_addr,
        tls,
    })
}

/// A serving admin listener.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// Ends it.
    pub stop: watch::Sender<bool>,
    /// Finishes once it has stopped.
    pub task: tokio::task::JoinHandle<()>,
    /// Its TLS setup (reloaded with the other listeners), if any.
    pub tls: Option<Arc<TlsServer>>,
}

/// Serves the admin endpoints of `broker`.
pub fn start(bound: Bound, broker: Arc<Broker>) -> Running {
    let (stop, stop_rx) = watch::channel(false);
    let Bound {
        listener,
        local_addr,
        tls,
    } = bound;
    let region = broker.region().clone();
    let task = match &tls {
        Some(tls) => {
            let mut incoming = crate::api::accept_loop(
                listener,
                Arc::clone(tls),
                stop_rx.clone(),
                Arc::clone(broker.metrics()),
                "admin",
            );
            let mut stop = stop_rx;
            tokio::spawn(async move {
                use tokio_stream::StreamExt;
                loop {
                    let conn = tokio::select! {
                        c = incoming.next() => match c {
                            Some(Ok(c)) => c,
                            Some(Err(_)) => continue,
                            None => return,
                        },
                        _ = stop.changed() => return,
                    };
                    // Operators and auditors of this region see everything;
                    // anyone else only whether the broker is live and ready.
                    let allowed = conn.info.caller.as_deref().is_ok_and(|c: &Caller| {
                        c.region == region && matches!(c.role, Role::Operator | Role::Auditor)
                    });
                    let allowed = if allowed {
                        Access::Full
                    } else {
                        Access::Probes
                    };
                    tokio::spawn(serve_connection(
                        hyper_util::rt::TokioIo::new(conn.stream),
                        Arc::clone(&broker),
                        allowed,
                    ));
                }
            })
        }
        None => {
            let slots = Arc::new(tokio::sync::Semaphore::new(LOOPBACK_CONNECTIONS));
            let mut stop = stop_rx;
            tokio::spawn(async move {
                loop {
                    let tcp = tokio::select! {
                        r = listener.accept() => match r {
                            Ok((tcp, _)) => tcp,
                            Err(e) => {
                                tracing::warn!(error = %e, "admin accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                        _ = stop.changed() => return,
                    };
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        continue;
                    };
                    let b = Arc::clone(&broker);
                    tokio::spawn(async move {
                        serve_connection(hyper_util::rt::TokioIo::new(tcp), b, Access::Full).await;
                        drop(slot);
                    });
                }
            })
        }
    };
    Running {
        addr: local_addr,
        stop,
        task,
        tls,
    }
}

/// What a connection may read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Metrics and readiness details.
    Full,
    /// Live and ready or not, nothing more.
    Probes,
}

async fn serve_connection<I>(io: I, broker: Arc<Broker>, allowed: Access)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let b = Arc::clone(&broker);
        async move { Ok::<_, std::convert::Infallible>(answer(&b, allowed, &req)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, svc)
        .await;
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn answer<B>(broker: &Broker, access: Access, req: &Request<B>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if access == Access::Probes && !matches!(req.uri().path(), "/livez" | "/readyz") {
        return text(
            StatusCode::FORBIDDEN,
            PLAIN,
            format!(
                "only operators and auditors of region {} may read {}; others may read /livez and /readyz\n",
                broker.region(),
                req.uri().path().chars().take(100).collect::<String>()
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            broker.metrics().encode(),
        ),
        "/livez" => text(StatusCode::OK, PLAIN, "live\n".into()),
        "/readyz" => {
            let r = broker.readiness();
            if r.ready {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            } else if access == Access::Probes {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    format!("not ready: {}\n", r.summary()),
                )
            }
        }
        other => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            format!(
                "{} is not served here; try /metrics, /livez or /readyz\n",
                other.chars().take(100).collect::<String>()
            ),
        ),
    }
}
