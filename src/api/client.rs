//! A client connection to a broker over mTLS, for the CLI, tests and
//! services written in Rust (`sovkms::client`). Every call returns the
//! broker's answer or a [`RemoteError`]: the CLI never sees a tonic type.

use crate::api::proto::{
    audit_service_client::AuditServiceClient, break_glass_service_client::BreakGlassServiceClient,
    broker_service_client::BrokerServiceClient, crypto_service_client::CryptoServiceClient,
    key_service_client::KeyServiceClient,
};
use std::path::Path;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use super::datakeys::{CacheLimits, DataKey, DataKeyCache};
pub use super::regional::{Endpoint, Regional, RegionalError};

/// What a client presents and trusts.
#[derive(Clone)]
pub struct ClientTls {
    /// CA that issued the broker's certificate (PEM).
    pub ca_pem: String,
    /// Client certificate chain (PEM).
    pub cert_pem: Option<String>,
    /// Client private key (PEM). Kept only as long as the config lives.
    pub key_pem: Option<zeroize::Zeroizing<String>>,
    /// Name to verify in the broker's certificate.
    pub server_name: String,
}

/// A broker address that is not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// A URL where host:port belongs.
    #[error("--addr {0:?} is a URL; give host:port, e.g. kms.example:7443")]
    Url(String),
    /// No port, or not a number.
    #[error("--addr {0:?} has no port; give host:port, e.g. kms.example:7443")]
    NoPort(String),
}

/// The host part of a `host:port` address (an IPv6 host without its
/// brackets): the name the broker's certificate is checked against unless
/// another is given.
pub fn addr_host(addr: &str) -> Result<&str, AddrError> {
    if addr.contains("://") {
        return Err(AddrError::Url(addr.to_owned()));
    }
    let (host, port) = addr
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty() && (!h.contains(':') || h.starts_with('[')))
        .ok_or_else(|| AddrError::NoPort(addr.to_owned()))?;
    port.parse::<u16>()
        .map_err(|_| AddrError::NoPort(addr.to_owned()))?;
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// File I/O.
    #[error("cannot read {path}: {err}")]
    Read {
        /// file
        path: String,
        /// cause
        err: std::io::Error,
    },
    /// A file that should hold a certificate holds none.
    #[error("{path} holds no PEM certificate{}", if *.key_instead { " (it holds a private key: are --tls-cert and --tls-key swapped?)" } else { "" })]
    NotCertificate {
        /// file
        path: String,
        /// It holds a private key instead.
        key_instead: bool,
    },
    /// A file that should hold a private key holds none.
    #[error("{path} holds no PEM private key{}", if *.cert_instead { " (it holds a certificate: are --tls-cert and --tls-key swapped?)" } else { "" })]
    NotPrivateKey {
        /// file
        path: String,
        /// It holds a certificate instead.
        cert_instead: bool,
    },
    /// The private key is not the certificate's.
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch {
        /// certificate file
        cert: String,
        /// key file
        key: String,
    },
    /// The broker's certificate does not chain to the CA given.
    #[error("the certificate of the broker at {addr} was not issued by the CA in --ca")]
    BrokerNotTrusted {
        /// address
        addr: String,
    },
    /// The broker's certificate does not name the host dialled.
    #[error("the certificate of the broker at {addr} is not valid for the name {name}")]
    WrongName {
        /// address
        addr: String,
        /// the server name checked
        name: String,
    },
    /// Connection or TLS.
    #[error("cannot connect to {addr}: {err}")]
    Connect {
        /// address
        addr: String,
        /// cause
        err: String,
    },
}

/// What the user should do about a [`ClientError`].
impl ClientError {
    /// One sentence of advice.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::Read { .. } => {
                "check the --ca/--tls-cert/--tls-key paths (or SOVKMS_CA/TLS_CERT/TLS_KEY)"
            }
            Self::NotCertificate { .. } | Self::NotPrivateKey { .. } | Self::KeyMismatch { .. } => {
                "pass your certificate with --tls-cert and its own private key with --tls-key"
            }
            Self::BrokerNotTrusted { .. } => {
                "pass with --ca the CA certificate that issued the broker's certificate"
            }
            Self::WrongName { .. } => {
                "dial the broker by a name its certificate carries, or name it with --server-name"
            }
            Self::Connect { .. } => "is the broker running at that address?",
        }
    }
}

fn pem_kinds(text: &str) -> (bool, bool) {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    let mut cert = false;
    let mut key = false;
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes()).flatten() {
        match item.0 {
            SectionKind::Certificate => cert = true,
            SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                key = true
            }
            _ => {}
        }
    }
    (cert, key)
}

/// Checks the client's PEM files before any connection: a CA certificate,
/// a certificate, a private key, and that the key is the certificate's.
fn check_identity(ca: &Path, cert: &Path, key: &Path, tls: &ClientTls) -> Result<(), ClientError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let shown = |p: &Path| p.display().to_string();
    let (ca_cert, ca_key) = pem_kinds(&tls.ca_pem);
    if !ca_cert {
        return Err(ClientError::NotCertificate {
            path: shown(ca),
            key_instead: ca_key,
        });
    }
    let (Some(cert_pem), Some(key_pem)) = (&tls.cert_pem, &tls.key_pem) else {
        return Ok(());
    };
    let (c_cert, c_key) = pem_kinds(cert_pem);
    if !c_cert {
        return Err(ClientError::NotCertificate {
            path: shown(cert),
            key_instead: c_key,
        });
    }
    let (k_cert, k_key) = pem_kinds(key_pem);
    if !k_key {
        return Err(ClientError::NotPrivateKey {
            path: shown(key),
            cert_instead: k_cert,
        });
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .flatten()
        .collect();
    let private = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        ClientError::NotPrivateKey {
            path: shown(key),
            cert_instead: false,
        }
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|_| {
        ClientError::KeyMismatch {
            cert: shown(cert),
            key: shown(key),
        }
    })?;
    Ok(())
}

fn read(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|err| ClientError::Read {
        path: path.display().to_string(),
        err,
    })
}

impl ClientTls {
    /// Loads PEM files.
    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: &str,
    ) -> Result<Self, ClientError> {
        let tls = Self {
            ca_pem: read(ca)?,
            cert_pem: Some(read(cert)?),
            key_pem: Some(zeroize::Zeroizing::new(read(key)?)),
            server_name: server_name.to_owned(),
        };
        check_identity(ca, cert, key, &tls)?;
        Ok(tls)
    }
}

/// The three service clients over one channel.
#[derive(Clone)]
pub struct Client {
    /// Lifecycle.
    pub keys: KeyServiceClient<Channel>,
    /// Cryptography.
    pub crypto: CryptoServiceClient<Channel>,
    /// Broker info.
    pub broker: BrokerServiceClient<Channel>,
    /// Audit records and aggregates.
    pub audit: AuditServiceClient<Channel>,
    /// Break-glass grants.
    pub break_glass: BreakGlassServiceClient<Channel>,
    /// The raw channel (health checks, reflection).
    pub channel: Channel,
}

/// Connects to `addr` (`host:port`) over mTLS.
pub async fn connect(addr: &str, tls: &ClientTls) -> Result<Client, ClientError> {
    let err = |e: String| ClientError::Connect {
        addr: addr.to_owned(),
        err: e,
    };
    addr_host(addr).map_err(|e| err(e.to_string()))?;
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .domain_name(tls.server_name.clone());
    if let (Some(c), Some(k)) = (&tls.cert_pem, &tls.key_pem) {
        cfg = cfg.identity(Identity::from_pem(c, k.as_bytes()));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| err(e.to_string()))?
        .tls_config(cfg)
        .map_err(|e| err(e.to_string()))?
        .connect()
        .await
        .map_err(|e| {
            let text = error_chain(&e);
            if text.contains("UnknownIssuer") {
                ClientError::BrokerNotTrusted {
                    addr: addr.to_owned(),
                }
            } else if text.contains("NotValidForName") || text.contains("not valid for name") {
                ClientError::WrongName {
                    addr: addr.to_owned(),
                    name: tls.server_name.clone(),
                }
            } else {
                err(text)
            }
        })?;
    let max = crate::broker::MAX_PLAINTEXT_LIMIT + 64 * 1024;
    Ok(Client {
        keys: KeyServiceClient::new(channel.clone()),
        crypto: CryptoServiceClient::new(channel.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        broker: BrokerServiceClient::new(channel.clone()),
        audit: AuditServiceClient::new(channel.clone()),
        break_glass: BreakGlassServiceClient::new(channel.clone()),
        channel,
    })
}

/// An error with its sources, on one line; a source whose text the line
/// already holds is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A gRPC status code, as the broker answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Code {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    /// The canonical gRPC name (`PERMISSION_DENIED`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl From<tonic::Code> for Code {
    fn from(c: tonic::Code) -> Self {
        use tonic::Code as T;
        match c {
            T::Ok => Self::Ok,
            T::Cancelled => Self::Cancelled,
            T::Unknown => Self::Unknown,
            T::InvalidArgument => Self::InvalidArgument,
            T::DeadlineExceeded => Self::DeadlineExceeded,
            T::NotFound => Self::NotFound,
            T::AlreadyExists => Self::AlreadyExists,
            T::PermissionDenied => Self::PermissionDenied,
            T::ResourceExhausted => Self::ResourceExhausted,
            T::FailedPrecondition => Self::FailedPrecondition,
            T::Aborted => Self::Aborted,
            T::OutOfRange => Self::OutOfRange,
            T::Unimplemented => Self::Unimplemented,
            T::Internal => Self::Internal,
            T::Unavailable => Self::Unavailable,
            T::DataLoss => Self::DataLoss,
            T::Unauthenticated => Self::Unauthenticated,
        }
    }
}

/// The response header in which the broker names why a request failed.
pub const REASON_HEADER: &str = "x-sovkms-reason";

/// Why the broker refused or failed a request: the broker's own reasons,
/// so a caller can act on them without parsing sentences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// No usable identity (certificate, SPIFFE id, trust domain).
    Identity,
    /// The caller's role may not do this (an operator decrypting).
    Role,
    /// The region rule: the caller, the broker or the key is of another region.
    Region,
    /// No grant (or break-glass grant) for this key and operation.
    Grant,
    /// The key's or ciphertext's state does not allow it (revoked,
    /// destroyed, another region's ciphertext at this broker).
    State,
    /// Malformed request or ciphertext, or the wrong context.
    Invalid,
    /// No such key, version or grant here.
    NotFound,
    /// A rate or size limit.
    Limit,
    /// The key store is down (retry, possibly at another broker of the region).
    StoreUnavailable,
    /// The HSM or TPM is down.
    RootUnavailable,
    /// The audit log cannot take the record: nothing was released.
    AuditUnavailable,
    /// Another broker changed the key at the same moment: nothing changed, retry.
    Conflict,
    /// Another unavailable component.
    Unavailable,
    /// A bug or corrupt state on the broker.
    Internal,
    /// The request never got an answer (connection, TLS, deadline).
    Transport,
    /// A reason this client does not know (a newer broker), or none given.
    Other,
}

impl Reason {
    fn parse(word: &str) -> Self {
        match word {
            "identity" => Self::Identity,
            "role" => Self::Role,
            "region" => Self::Region,
            "grant" => Self::Grant,
            "state" => Self::State,
            "invalid" => Self::Invalid,
            "not_found" => Self::NotFound,
            "limit" => Self::Limit,
            "store_unavailable" => Self::StoreUnavailable,
            "root_unavailable" => Self::RootUnavailable,
            "audit_unavailable" => Self::AuditUnavailable,
            "conflict" => Self::Conflict,
            "unavailable" => Self::Unavailable,
            "internal" => Self::Internal,
            _ => Self::Other,
        }
    }

    /// Whether the same request may succeed when retried (here or at
    /// another broker of the same region): nothing was done.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::StoreUnavailable
                | Self::RootUnavailable
                | Self::AuditUnavailable
                | Self::Conflict
                | Self::Unavailable
                | Self::Transport
        )
    }
}

/// A call the broker refused or could not answer.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {message}", code.name())]
pub struct RemoteError {
    /// The status code.
    pub code: Code,
    /// The broker's sentence (or the transport's, for a failed connection).
    pub message: String,
    /// Why, as the broker names it.
    pub reason: Reason,
}

impl From<tonic::Status> for RemoteError {
    fn from(s: tonic::Status) -> Self {
        let reason = match s
            .metadata()
            .get(REASON_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            Some(word) => Reason::parse(word),
            // No answer from a broker: the transport failed.
            None if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ) =>
            {
                Reason::Transport
            }
            None => Reason::Other,
        };
        Self {
            code: s.code().into(),
            message: s.message().to_owned(),
            reason,
        }
    }
}

/// Typed unary calls: the request message in, the answer or a
/// [`RemoteError`] out.
macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident: $svc:ident.$rpc:ident($req:ty) -> $resp:ty;)*) => {
        impl Client {$(
            $(#[$doc])*
            pub async fn $name(&mut self, req: $req) -> Result<$resp, RemoteError> {
                Ok(self.$svc.$rpc(req).await?.into_inner())
            }
        )*}
    };
}

use crate::api::proto as pb;

unary! {
    /// KeyService.Create.
    create_key: keys.create(pb::CreateKeyRequest) -> pb::KeyMetadata;
    /// KeyService.Activate.
    activate_key: keys.activate(pb::KeyRef) -> pb::KeyMetadata;
    /// KeyService.Revoke.
    revoke_key: keys.revoke(pb::RevokeRequest) -> pb::KeyMetadata;
    /// KeyService.Destroy.
    destroy_key: keys.destroy(pb::DestroyRequest) -> pb::KeyMetadata;
    /// KeyService.CancelDestroy.
    cancel_destroy: keys.cancel_destroy(pb::KeyRef) -> pb::KeyMetadata;
    /// KeyService.ReKey.
    rekey: keys.re_key(pb::KeyRef) -> pb::KeyMetadata;
    /// KeyService.GetAttributes.
    get_attributes: keys.get_attributes(pb::KeyRef) -> pb::KeyMetadata;
    /// KeyService.Locate.
    locate: keys.locate(pb::LocateRequest) -> pb::LocateResponse;
    /// KeyService.SetGrants.
    set_grants: keys.set_grants(pb::SetGrantsRequest) -> pb::KeyMetadata;
    /// CryptoService.Encrypt.
    encrypt: crypto.encrypt(pb::EncryptRequest) -> pb::EncryptResponse;
    /// CryptoService.Decrypt.
    decrypt: crypto.decrypt(pb::DecryptRequest) -> pb::DecryptResponse;
    /// CryptoService.GenerateDataKey.
    generate_data_key: crypto.generate_data_key(pb::GenerateDataKeyRequest) -> pb::GenerateDataKeyResponse;
    /// CryptoService.GenerateDataKeyWithoutPlaintext.
    generate_data_key_without_plaintext: crypto.generate_data_key_without_plaintext(pb::GenerateDataKeyRequest) -> pb::GenerateDataKeyWithoutPlaintextResponse;
    /// CryptoService.ReEncrypt.
    re_encrypt: crypto.re_encrypt(pb::ReEncryptRequest) -> pb::ReEncryptResponse;
    /// BreakGlassService.Request.
    request_break_glass: break_glass.request(pb::BreakGlassRequest) -> pb::BreakGlassGrant;
    /// BreakGlassService.Approve.
    approve_break_glass: break_glass.approve(pb::BreakGlassRef) -> pb::BreakGlassGrant;
    /// BreakGlassService.Revoke.
    revoke_break_glass: break_glass.revoke(pb::BreakGlassRef) -> pb::BreakGlassGrant;
    /// BreakGlassService.List.
    list_break_glass: break_glass.list(pb::ListBreakGlassRequest) -> pb::ListBreakGlassResponse;
    /// AuditService.GetAggregates.
    aggregates: audit.get_aggregates(pb::AggregatesRequest) -> pb::AggregatesResponse;
    /// AuditService.Attest.
    attest: audit.attest(pb::AttestRequest) -> pb::AttestResponse;
    /// BrokerService.GetInfo.
    info: broker.get_info(pb::GetInfoRequest) -> pb::BrokerInfo;
}

/// The records of an export, as they arrive.
pub struct Records(tonic::Streaming<pb::AuditRecordLine>);

impl Records {
    /// The next record, or `None` at the end.
    pub async fn next(&mut self) -> Result<Option<pb::AuditRecordLine>, RemoteError> {
        Ok(self.0.message().await?)
    }
}

impl Client {
    /// AuditService.ExportRecords.
    pub async fn export_records(
        &mut self,
        req: pb::ExportRecordsRequest,
    ) -> Result<Records, RemoteError> {
        Ok(Records(self.audit.export_records(req).await?.into_inner()))
    }

    /// One gRPC health check of the whole server (""): true when serving.
    pub async fn serving(&self) -> Result<bool, RemoteError> {
        use tonic_health::pb::{
            health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
        };
        let r = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(r.into_inner().status == ServingStatus::Serving as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(addr_host("kms.eu.example:7443"), Ok("kms.eu.example"));
        assert_eq!(addr_host("127.0.0.1:7443"), Ok("127.0.0.1"));
        assert_eq!(addr_host("[::1]:7443"), Ok("::1"));
        for bad in [
            "kms.eu.example",
            "https://kms:7443",
            ":7443",
            "kms:port",
            "::1:7443",
        ] {
            assert!(addr_host(bad).is_err(), "{bad}");
        }
    }
}
