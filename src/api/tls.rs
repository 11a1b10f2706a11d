//! mTLS at the socket: TLS 1.3 only, client certificate mandatory, and the
//! caller's identity parsed once per connection.
//!
//! Each client CA is bound to the regions it may vouch for. A certificate
//! that chains to the `us-east` CA but claims `eu-central` is refused: a
//! region's CA cannot mint identities of another region.

use crate::config::TlsSettings;
use crate::region::{Caller, IdentityError, Region};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// A TLS setup problem, with the file it concerns.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsError(pub String);

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            TlsError(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // aws-lc-rs with `prefer-post-quantum`: X25519MLKEM768 first, then
    // X25519, P-256, P-384 for clients that offer no hybrid group.
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

struct CaBinding {
    verifier: Arc<dyn ClientCertVerifier>,
    regions: Vec<Region>,
}

/// What a handshake uses now: swapped whole by [`TlsServer::reload`].
pub(crate) struct TlsState {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    cas: Vec<CaBinding>,
}

/// Everything the accept loop needs.
pub struct TlsServer {
    state: std::sync::RwLock<Arc<TlsState>>,
    listener: Listener,
    /// The network guard (empty: any address).
    pub(crate) allowed_client_cidrs: Vec<ipnet::IpNet>,
    /// Established connections at once.
    pub(crate) max_connections: usize,
}

fn verifier(
    roots: RootCertStore,
    crls: &[CertificateRevocationListDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    verifier_for(roots, crls, false)
}

/// A client verifier; `optional`: a client without a certificate still
/// completes the handshake (and is no identity), one with a certificate
/// must present a valid one.
fn verifier_for(
    roots: RootCertStore,
    crls: &[CertificateRevocationListDer<'static>],
    optional: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if optional {
        b = b.allow_unauthenticated();
    }
    if !crls.is_empty() {
        // A CA without a CRL in the list keeps working; a certificate its
        // CA's CRL lists is refused.
        b = b
            .with_crls(crls.iter().cloned())
            .allow_unknown_revocation_status();
    }
    b.build()
        .map_err(|e| TlsError(format!("client verifier: {e}")))
}

fn read_crls(
    paths: &[std::path::PathBuf],
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for p in paths {
        let before = out.len();
        for c in CertificateRevocationListDer::pem_file_iter(p)
            .map_err(|e| TlsError(format!("cannot read CRL {}: {e}", p.display())))?
        {
            out.push(c.map_err(|e| TlsError(format!("{}: bad PEM CRL: {e}", p.display())))?);
        }
        if out.len() == before {
            return Err(TlsError(format!("{} holds no CRL", p.display())));
        }
    }
    Ok(out)
}

/// What a listener speaks over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// gRPC: TLS 1.3 only, ALPN h2.
    Grpc,
    /// KMIP: TLS 1.3, and TLS 1.2 (rustls offers only AEAD suites with
    /// forward secrecy there) because several KMIP clients still ship it.
    Kmip,
    /// The admin listener off loopback: TLS 1.3 only, ALPN http/1.1.
    Admin,
}

impl TlsServer {
    /// Builds the gRPC server side from settings.
    pub fn new(s: &TlsSettings) -> Result<Self, TlsError> {
        Self::for_listener(s, Listener::Grpc)
    }

    /// Builds the server side of `listener` from settings.
    pub fn for_listener(s: &TlsSettings, listener: Listener) -> Result<Self, TlsError> {
        Ok(Self {
            state: std::sync::RwLock::new(Arc::new(Self::load(s, listener)?)),
            listener,
            allowed_client_cidrs: s.allowed_client_cidrs.clone(),
            max_connections: 4096,
        })
    }

    /// Reads the certificate, key, client CAs and CRLs again; on success
    /// new handshakes use them (established connections keep theirs), on
    /// failure the ones in force stay and the error says why.
    pub fn reload(&self, s: &TlsSettings) -> Result<(), TlsError> {
        let fresh = Arc::new(Self::load(s, self.listener)?);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// What this listener speaks.
    pub fn listener(&self) -> Listener {
        self.listener
    }

    /// The state new handshakes use.
    pub(crate) fn current(&self) -> Arc<TlsState> {
        // Replaced whole under the lock: a poisoned lock still holds a
        // complete state.
        Arc::clone(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn load(s: &TlsSettings, listener: Listener) -> Result<TlsState, TlsError> {
        let chain = read_certs(&s.cert)?;
        let key = PrivateKeyDer::from_pem_file(&s.key)
            .map_err(|e| TlsError(format!("cannot read private key {}: {e}", s.key.display())))?;
        let crls = read_crls(&s.crls)?;
        let mut all = RootCertStore::empty();
        let mut cas = Vec::new();
        for ca in &s.client_cas {
            let mut one = RootCertStore::empty();
            for c in read_certs(&ca.cert)? {
                all.add(c.clone()).and_then(|_| one.add(c)).map_err(|e| {
                    TlsError(format!(
                        "{}: not a usable CA certificate: {e}",
                        ca.cert.display()
                    ))
                })?;
            }
            cas.push(CaBinding {
                verifier: verifier(one, &crls)?,
                regions: ca.regions.clone(),
            });
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match listener {
            Listener::Grpc | Listener::Admin => &[&rustls::version::TLS13],
            Listener::Kmip => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| TlsError(e.to_string()))?
            // The admin listener lets certificate-less probes (a kubelet)
            // see liveness and readiness; everything else needs an identity.
            .with_client_cert_verifier(verifier_for(all, &crls, listener == Listener::Admin)?)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError(format!("broker certificate/key: {e}")))?;
        match listener {
            Listener::Grpc => config.alpn_protocols = vec![b"h2".to_vec()],
            Listener::Admin => config.alpn_protocols = vec![b"http/1.1".to_vec()],
            // Several KMIP clients open a connection per operation: resume
            // sessions (stateful cache and TLS 1.3 tickets) so that costs
            // no full handshake.
            Listener::Kmip => {
                config.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
                config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
                    .map_err(|e| TlsError(format!("session tickets: {e}")))?;
            }
        }
        Ok(TlsState {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            cas,
        })
    }
}

impl TlsState {
    /// The caller behind a completed handshake, or why there is none.
    pub(crate) fn identify(
        &self,
        tls: &TlsStream<TcpStream>,
    ) -> Result<(Caller, i64), IdentityError> {
        let (_, conn) = tls.get_ref();
        let certs = conn
            .peer_certificates()
            .ok_or(IdentityError::NoCertificate)?;
        let (ee, intermediates) = certs.split_first().ok_or(IdentityError::NoCertificate)?;
        let (caller, not_after) = caller_and_expiry(ee)?;
        let now = UnixTime::now();
        let vouched = self.cas.iter().any(|ca| {
            ca.regions.contains(&caller.region)
                && ca
                    .verifier
                    .verify_client_cert(ee, intermediates, now)
                    .is_ok()
        });
        if !vouched {
            return Err(IdentityError::UntrustedForRegion {
                caller: caller.spiffe_id(),
                region: caller.region,
            });
        }
        Ok((caller, not_after))
    }
}

/// Extracts the one sovkms SPIFFE id from a certificate's URI SANs.
pub fn caller_from_cert(der: &CertificateDer<'_>) -> Result<Caller, IdentityError> {
    caller_and_expiry(der).map(|(c, _)| c)
}

/// The caller and the certificate's `notAfter` (unix seconds): a connection
/// opened before that moment is refused every request after it.
fn caller_and_expiry(der: &CertificateDer<'_>) -> Result<(Caller, i64), IdentityError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparseable)?;
    let not_after = cert.validity().not_after.timestamp();
    let san = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::MalformedSan)?
        .ok_or(IdentityError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    if uris.iter().any(|u| !u.starts_with("spiffe://")) {
        return Err(IdentityError::OtherUri);
    }
    // webpki checks an EKU only when there is one; a client identity must
    // say it is one.
    let for_clients = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.client_auth || e.value.any);
    if !for_clients {
        return Err(IdentityError::NotForClients);
    }
    match uris.as_slice() {
        [one] => Ok((Caller::parse_spiffe(one)?, not_after)),
        [] => Err(IdentityError::NoSpiffeId),
        _ => Err(IdentityError::SeveralSpiffeIds),
    }
}

/// Per-connection facts, put into every request's extensions by tonic.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// Client address.
    pub remote: SocketAddr,
    /// The identity, or why the certificate carries none usable.
    /// Shared: every request of the connection, and its audit records,
    /// point at it instead of copying its strings.
    pub caller: Result<Arc<Caller>, IdentityError>,
    /// The client certificate's `notAfter`, unix seconds.
    pub not_after: i64,
    /// The negotiated key exchange group (e.g. `X25519MLKEM768`).
    pub key_exchange: &'static str,
}

/// A server-side TLS connection with its peer's identity.
pub struct TlsConn {
    pub(crate) stream: TlsStream<TcpStream>,
    pub(crate) info: PeerInfo,
    /// This connection's place under the connection cap, given back when
    /// the connection ends.
    pub(crate) _slot: tokio::sync::OwnedSemaphorePermit,
    /// Counts the connection as open until it ends.
    pub(crate) _open: OpenConnection,
}

/// One established connection in `sovkms_open_connections`.
pub(crate) struct OpenConnection {
    metrics: Arc<crate::metrics::Metrics>,
    listener: &'static str,
}

impl OpenConnection {
    pub(crate) fn new(metrics: Arc<crate::metrics::Metrics>, listener: &'static str) -> Self {
        metrics.open_connection(listener, 1);
        Self { metrics, listener }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open_connection(self.listener, -1);
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
