//! A minimal KMIP client over mutual TLS: builds request messages with the
//! crate's own encoder and reads whole responses. Used by `sovkms bench
//! kmip` and the tests (beside a real third-party client, PyKMIP).

use super::message::Version;
use super::tag;
use super::ttlv::{self, Item, Limits, Value};
use crate::api::client::ClientTls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum KmipClientError {
    /// TLS material.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Network.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server's bytes.
    #[error("response: {0}")]
    Decode(#[from] ttlv::DecodeError),
}

/// The TLS client configuration for `tls` (resumption on: a config shared
/// by several connections resumes sessions).
pub fn client_config(
    tls: &ClientTls,
    tls12_only: bool,
) -> Result<Arc<rustls::ClientConfig>, KmipClientError> {
    let e = |m: String| KmipClientError::Tls(m);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|x| e(x.to_string()))?)
            .map_err(|x| e(x.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|x| e(x.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert_pem, &tls.key_pem) {
        (Some(c), Some(k)) => {
            let chain = CertificateDer::pem_slice_iter(c.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|x| e(x.to_string()))?;
            let key = PrivateKeyDer::from_pem_slice(k.as_bytes()).map_err(|x| e(x.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|x| e(x.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// One connection.
pub struct KmipClient {
    stream: TlsStream<TcpStream>,
    limits: Limits,
}

impl KmipClient {
    /// Connects to `addr` with `config`, verifying `server_name`.
    pub async fn connect(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        server_name: &str,
    ) -> Result<Self, KmipClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|x| KmipClientError::Tls(x.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Ok(Self {
            stream,
            limits: Limits::default(),
        })
    }

    /// True when the handshake resumed a session.
    pub fn resumed(&self) -> bool {
        matches!(
            self.stream.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        )
    }

    /// The negotiated TLS version's name.
    pub fn tls_version(&self) -> &'static str {
        match self.stream.get_ref().1.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
            _ => "other",
        }
    }

    /// Sends raw bytes and reads one framed response (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<Vec<u8>, KmipClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        self.read_response().await
    }

    /// Reads one whole response message's bytes.
    pub async fn read_response(&mut self) -> Result<Vec<u8>, KmipClientError> {
        let mut header = [0u8; 8];
        self.stream.read_exact(&mut header).await?;
        let len = ttlv::framed_len(&header, &self.limits)?;
        let mut buf = vec![0u8; len];
        buf[..8].copy_from_slice(&header);
        self.stream.read_exact(&mut buf[8..]).await?;
        Ok(buf)
    }

    /// Sends a request message and decodes the response.
    pub async fn call(&mut self, request: &Item) -> Result<Item, KmipClientError> {
        let bytes = self.send_raw(&request.encode()).await?;
        Ok(ttlv::decode(&bytes, &self.limits)?)
    }
}

/// A request message of `version` with one batch item per
/// `(operation, payload)`; batch item ids are 1, 2, … when there are several.
pub fn request(version: Version, items: Vec<(u32, Vec<Item>)>) -> Item {
    let n = items.len();
    let mut out = vec![Item::structure(
        tag::REQUEST_HEADER,
        vec![
            version.item(),
            Item::integer(tag::BATCH_COUNT, i32::try_from(n).unwrap_or(i32::MAX)),
        ],
    )];
    for (i, (op, payload)) in items.into_iter().enumerate() {
        let mut b = vec![Item::enumeration(tag::OPERATION, op)];
        if n > 1 {
            b.push(Item::bytes(
                tag::UNIQUE_BATCH_ITEM_ID,
                u32::try_from(i + 1).unwrap_or(0).to_be_bytes().to_vec(),
            ));
        }
        b.push(Item::structure(tag::REQUEST_PAYLOAD, payload));
        out.push(Item::structure(tag::BATCH_ITEM, b));
    }
    Item::structure(tag::REQUEST_MESSAGE, out)
}

/// A Register payload for an AES key in Raw format (bench and scenario).
pub fn register_aes_payload(key: &[u8]) -> Vec<Item> {
    let bits = i32::try_from(key.len() * 8).unwrap_or(0);
    vec![
        Item::enumeration(tag::OBJECT_TYPE, tag::object_type::SYMMETRIC_KEY),
        Item::structure(
            tag::SYMMETRIC_KEY,
            vec![Item::structure(
                tag::KEY_BLOCK,
                vec![
                    Item::enumeration(tag::KEY_FORMAT_TYPE, tag::format::RAW),
                    Item::structure(
                        tag::KEY_VALUE,
                        vec![Item::bytes(tag::KEY_MATERIAL, key.to_vec())],
                    ),
                    Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, tag::alg::AES),
                    Item::integer(tag::CRYPTOGRAPHIC_LENGTH, bits),
                ],
            )],
        ),
    ]
}

/// One batch item of a response.
#[derive(Debug)]
pub struct Outcome {
    /// Result Status (0 success).
    pub status: u32,
    /// Result Reason, if failed.
    pub reason: Option<u32>,
    /// Result Message, if any.
    pub message: Option<String>,
    /// The payload's items.
    pub payload: Vec<Item>,
}

impl Outcome {
    /// The first payload field with `tag`.
    pub fn field(&self, t: u32) -> Option<&Item> {
        self.payload.iter().find(|i| i.tag == t)
    }

    /// The first text field with `tag`.
    pub fn text(&self, t: u32) -> Option<&str> {
        match self.field(t).map(|i| &i.value) {
            Some(Value::Text(s)) => Some(s),
            _ => None,
        }
    }

    /// The first byte-string field with `tag`.
    pub fn bytes(&self, t: u32) -> Option<&[u8]> {
        match self.field(t).map(|i| &i.value) {
            Some(Value::Bytes(b)) => Some(b),
            _ => None,
        }
    }
}

/// The batch items of a response message.
pub fn outcomes(response: &Item) -> Vec<Outcome> {
    response
        .children()
        .iter()
        .filter(|i| i.tag == tag::BATCH_ITEM)
        .map(|b| {
            let f = |t: u32| b.children().iter().find(|i| i.tag == t);
            let e = |t: u32| match f(t).map(|i| &i.value) {
                Some(Value::Enumeration(v)) => Some(*v),
                _ => None,
            };
            Outcome {
                status: e(tag::RESULT_STATUS).unwrap_or(u32::MAX),
                reason: e(tag::RESULT_REASON),
                message: match f(tag::RESULT_MESSAGE).map(|i| &i.value) {
                    Some(Value::Text(s)) => Some(s.clone()),
                    _ => None,
                },
                payload: f(tag::RESPONSE_PAYLOAD)
                    .map(|p| p.children().to_vec())
                    .unwrap_or_default(),
            }
        })
        .collect()
}
