//! A client connection to a broker over mTLS, for the CLI, tests and
//! services written in Rust.

use crate::api::proto::{
    audit_service_client::AuditServiceClient, break_glass_service_client::BreakGlassServiceClient,
    broker_service_client::BrokerServiceClient, crypto_service_client::CryptoServiceClient,
    key_service_client::KeyServiceClient,
};
use std::path::Path;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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
    /// Connection or TLS.
    #[error("cannot connect to {addr}: {err}")]
    Connect {
        /// address
        addr: String,
        /// cause
        err: String,
    },
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
        Ok(Self {
            ca_pem: read(ca)?,
            cert_pem: Some(read(cert)?),
            key_pem: Some(zeroize::Zeroizing::new(read(key)?)),
            server_name: server_name.to_owned(),
        })
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
        .map_err(|e| err(error_chain(&e)))?;
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

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
