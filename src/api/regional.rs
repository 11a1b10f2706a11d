//! A client of several regions (`sovkms::client::Regional`): each
//! ciphertext goes to a broker of the region its header names, never to
//! another region; a region without endpoints is refused here, before any
//! request leaves. Within a region, calls fail over across its brokers on
//! `UNAVAILABLE` or a connection failure, with backoff and jitter.
//!
//! ```no_run
//! # async fn demo(tls: sovkms::client::ClientTls) -> Result<(), sovkms::client::RegionalError> {
//! use sovkms::client::{Endpoint, Regional};
//! let client = Regional::new(vec![
//!     Endpoint::new("eu-central", "kms-eu-1.example:7443", tls.clone()),
//!     Endpoint::new("eu-central", "kms-eu-2.example:7443", tls),
//! ])?;
//! let ct = client.encrypt("eu-central", "alias/records", b"hello", Default::default()).await?;
//! let pt = client.decrypt(&ct, Default::default()).await?; // routed by the header
//! # let _ = pt; Ok(()) }
//! ```

use super::client::{connect, Client, ClientError, ClientTls, Code, RemoteError};
use crate::api::proto as pb;
use crate::region::Region;
use std::collections::HashMap;
use std::time::Duration;
use zeroize::Zeroizing;

/// One broker of one region.
#[derive(Clone)]
pub struct Endpoint {
    region: String,
    addr: String,
    tls: ClientTls,
}

impl Endpoint {
    /// A broker of `region` at `addr` (host:port), reached with `tls`.
    pub fn new(region: &str, addr: &str, tls: ClientTls) -> Self {
        Self {
            region: region.to_owned(),
            addr: addr.to_owned(),
            tls,
        }
    }
}

/// Why a regional call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionalError {
    /// A region name that is not one.
    #[error("{0}")]
    Region(String),
    /// The ciphertext's region has no endpoint here: nothing was sent.
    #[error("the ciphertext belongs to region {region}, and this client has no broker of {region} (it has: {known}); nothing was sent")]
    NoEndpoint {
        /// The ciphertext's region.
        region: String,
        /// The regions this client knows.
        known: String,
    },
    /// A request id that is not one (nothing was sent).
    #[error("request id {0:?}: use 1-64 letters, digits or '-'")]
    RequestId(String),
    /// The ciphertext does not parse (no region to route by).
    #[error("not a sovkms ciphertext: {0}")]
    Ciphertext(String),
    /// The broker answered with a refusal or an error (not retried).
    #[error("{0}")]
    Remote(#[from] RemoteError),
    /// Every broker of the region was unavailable or unreachable.
    #[error("no broker of region {region} answered ({tries} tries): {last}")]
    Unavailable {
        /// The region.
        region: String,
        /// Attempts made.
        tries: u32,
        /// The last failure.
        last: String,
    },
}

/// Clients of several regions, routed by region.
pub struct Regional {
    regions: HashMap<Region, Vec<Endpoint>>,
    connections: tokio::sync::Mutex<HashMap<String, Client>>,
    /// Rounds over a region's endpoints before giving up.
    rounds: u32,
    /// Deadline of each call.
    deadline: Duration,
}

impl Regional {
    /// A client of the endpoints' regions (connections made on first use).
    pub fn new(endpoints: Vec<Endpoint>) -> Result<Self, RegionalError> {
        let mut regions: HashMap<Region, Vec<Endpoint>> = HashMap::new();
        for e in endpoints {
            let r = Region::parse(&e.region).map_err(|x| RegionalError::Region(x.to_string()))?;
            regions.entry(r).or_default().push(e);
        }
        Ok(Self {
            regions,
            connections: tokio::sync::Mutex::default(),
            rounds: 3,
            deadline: Duration::from_secs(10),
        })
    }

    /// The region a ciphertext names in its header.
    pub fn region_of(ciphertext: &[u8]) -> Result<Region, RegionalError> {
        crate::envelope::Envelope::parse(ciphertext)
            .map(|e| e.header.region.clone())
            .map_err(|e| RegionalError::Ciphertext(e.to_string()))
    }

    fn endpoints(&self, region: &Region) -> Result<&[Endpoint], RegionalError> {
        self.regions
            .get(region)
            .map(Vec::as_slice)
            .filter(|e| !e.is_empty())
            .ok_or_else(|| {
                let mut known: Vec<String> = self.regions.keys().map(ToString::to_string).collect();
                known.sort();
                RegionalError::NoEndpoint {
                    region: region.to_string(),
                    known: known.join(", "),
                }
            })
    }

    /// Runs `call` on a broker of `region`, failing over to the region's
    /// other brokers on `UNAVAILABLE` or a failed connection (with
    /// backoff and jitter between rounds); any other answer returns.
    async fn in_region<T, F, Fut>(&self, region: &Region, call: F) -> Result<T, RegionalError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, RemoteError>>,
    {
        let endpoints = self.endpoints(region)?;
        let start = jitter(endpoints.len() as u64) as usize;
        let (mut tries, mut last) = (0u32, String::new());
        for round in 0..self.rounds {
            if round > 0 {
                let base = 100u64 << round.min(5);
                tokio::time::sleep(Duration::from_millis(base + jitter(base))).await;
            }
            for i in 0..endpoints.len() {
                let e = &endpoints[(start + i) % endpoints.len()];
                tries += 1;
                let client = match self.client(e).await {
                    Ok(c) => c,
                    Err(why) => {
                        last = format!("{}: {why}", e.addr);
                        continue;
                    }
                };
                match tokio::time::timeout(self.deadline, call(client)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(r)) if r.code == Code::Unavailable && r.reason.retryable() => {
                        self.connections.lock().await.remove(&e.addr);
                        last = format!("{}: {}", e.addr, r.message);
                    }
                    Ok(Err(r)) => return Err(r.into()),
                    Err(_) => {
                        self.connections.lock().await.remove(&e.addr);
                        last = format!("{}: no answer within {:?}", e.addr, self.deadline);
                    }
                }
            }
        }
        Err(RegionalError::Unavailable {
            region: region.to_string(),
            tries,
            last,
        })
    }

    /// A connection to `e`, made once and reused (TLS sessions resume).
    async fn client(&self, e: &Endpoint) -> Result<Client, Unreached> {
        if let Some(c) = self.connections.lock().await.get(&e.addr) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.deadline, connect(&e.addr, &e.tls))
            .await
            .map_err(|_| Unreached::Timeout(self.deadline))?
            .map_err(Unreached::Connect)?;
        self.connections
            .lock()
            .await
            .insert(e.addr.clone(), c.clone());
        Ok(c)
    }

    /// Encrypt under `key_id` at a broker of `region`.
    pub async fn encrypt(
        &self,
        region: &str,
        key_id: &str,
        plaintext: &[u8],
        context: HashMap<String, String>,
    ) -> Result<Vec<u8>, RegionalError> {
        let region = Region::parse(region).map_err(|x| RegionalError::Region(x.to_string()))?;
        self.in_region(&region, |mut c| {
            let req = pb::EncryptRequest {
                key_id: key_id.to_owned(),
                plaintext: plaintext.to_vec(),
                context: context.clone(),
            };
            async move {
                c.encrypt(req)
                    .await
                    .map(|mut r| std::mem::take(&mut r.ciphertext))
            }
        })
        .await
    }

    /// Decrypt at a broker of the region the ciphertext names; refused here,
    /// with nothing sent, when this client has no broker of that region.
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        context: HashMap<String, String>,
    ) -> Result<Zeroizing<Vec<u8>>, RegionalError> {
        let region = Self::region_of(ciphertext)?;
        self.in_region(&region, |mut c| {
            let req = pb::DecryptRequest {
                ciphertext: ciphertext.to_vec(),
                context: context.clone(),
            };
            async move {
                c.decrypt(req)
                    .await
                    .map(|mut r| Zeroizing::new(std::mem::take(&mut r.plaintext)))
            }
        })
        .await
    }
}

impl Regional {
    /// A fresh data key under `key_id` at a broker of `region`: its
    /// plaintext (for sealing here, zeroized on drop) and its wrapped form.
    pub async fn generate_data_key(
        &self,
        region: &str,
        key_id: &str,
        context: HashMap<String, String>,
    ) -> Result<super::datakeys::DataKey, RegionalError> {
        let region = Region::parse(region).map_err(|x| RegionalError::Region(x.to_string()))?;
        let mut r = self
            .in_region(&region, |mut c| {
                let req = pb::GenerateDataKeyRequest {
                    key_id: key_id.to_owned(),
                    context: context.clone(),
                };
                async move { c.generate_data_key(req).await }
            })
            .await?;
        let plaintext = crate::secret::KeyMaterial::from_slice(&r.plaintext_key);
        zeroize::Zeroize::zeroize(&mut r.plaintext_key);
        Ok(super::datakeys::DataKey {
            plaintext: plaintext.ok_or_else(|| {
                RegionalError::Ciphertext("the broker's data key is not 32 bytes".into())
            })?,
            wrapped: std::mem::take(&mut r.wrapped_key),
        })
    }
}

impl Regional {
    /// Creates a key at a broker of `region` (an operator's client) under
    /// the client's own `request_id` (1-64 letters, digits or '-'): tried
    /// again on the region's brokers after `UNAVAILABLE` or a lost
    /// connection, the request creates one key, never two; a later call
    /// with the same id answers with that key.
    pub async fn create_key(
        &self,
        region: &str,
        request_id: &str,
        req: pb::CreateKeyRequest,
    ) -> Result<pb::KeyMetadata, RegionalError> {
        self.keys_with_id(region, request_id, req, |mut k, r| async move {
            k.create(r).await
        })
        .await
    }

    /// Adds a version to `key_id` at a broker of `region` under the
    /// client's own `request_id`: tried again on the region's brokers after
    /// `UNAVAILABLE` or a lost connection, the request adds one version,
    /// never two; a later call with the same id answers with the key as it
    /// is, the version that request added among its versions.
    pub async fn rekey(
        &self,
        region: &str,
        request_id: &str,
        key_id: &str,
    ) -> Result<pb::KeyMetadata, RegionalError> {
        let req = pb::KeyRef {
            key_id: key_id.to_owned(),
        };
        self.keys_with_id(region, request_id, req, |mut k, r| async move {
            k.re_key(r).await
        })
        .await
    }

    /// A KeyService call carrying the client's own request id, tried on
    /// the brokers of `region` only.
    async fn keys_with_id<Req, F, Fut>(
        &self,
        region: &str,
        request_id: &str,
        req: Req,
        call: F,
    ) -> Result<pb::KeyMetadata, RegionalError>
    where
        Req: Clone,
        F: Fn(
            pb::key_service_client::KeyServiceClient<tonic::transport::Channel>,
            tonic::Request<Req>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<pb::KeyMetadata>, tonic::Status>>,
    {
        let region = Region::parse(region).map_err(|x| RegionalError::Region(x.to_string()))?;
        let id = request_id_value(request_id)?;
        self.in_region(&region, |c| {
            let mut r = tonic::Request::new(req.clone());
            r.metadata_mut()
                .insert(super::service::REQUEST_ID, id.clone());
            let fut = call(c.keys.clone(), r);
            async move {
                fut.await
                    .map(tonic::Response::into_inner)
                    .map_err(RemoteError::from)
            }
        })
        .await
    }
}

/// A client's request id as metadata: 1-64 letters, digits or '-'.
fn request_id_value(
    request_id: &str,
) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, RegionalError> {
    request_id
        .parse()
        .ok()
        .filter(|_| {
            (1..=64).contains(&request_id.len())
                && request_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        .ok_or_else(|| RegionalError::RequestId(request_id.to_owned()))
}

impl RegionalError {
    /// Why, in the broker's terms: a refusal's reason, `Transport` when
    /// no broker of the region answered, `Region` for a ciphertext of a
    /// region this client has no broker of (refused here).
    pub fn reason(&self) -> super::client::Reason {
        use super::client::Reason;
        match self {
            Self::Remote(r) => r.reason,
            Self::Unavailable { .. } => Reason::Transport,
            Self::NoEndpoint { .. } => Reason::Region,
            Self::Region(_) | Self::Ciphertext(_) | Self::RequestId(_) => Reason::Invalid,
        }
    }
}

/// Why a broker could not be reached (the next one of the region is tried).
#[derive(Debug, thiserror::Error)]
enum Unreached {
    /// No connection within the deadline.
    #[error("no connection within {0:?}")]
    Timeout(Duration),
    /// The connection failed.
    #[error("{0}")]
    Connect(ClientError),
}

/// A number in 0..n from the system's randomness (0 if it fails): spreads
/// first choices and retries so that clients do not move in step.
fn jitter(n: u64) -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if n == 0 || ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0;
    }
    u64::from_le_bytes(b) % n
}
