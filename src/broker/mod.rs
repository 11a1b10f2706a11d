//! The core: request → identity → region rule → policy → crypto → store.
//!
//! Knows nothing of gRPC or of any particular root of trust. Every public
//! method takes the call context (authenticated [`Caller`], request id)
//! first and checks, in this order: trust domain, role, the region rule, the
//! key's grants, the key's state; then it audits the outcome.
//! Methods block (store flushes, root-of-trust calls); the API layer runs
//! them off the async runtime.

mod audit_read;
mod breakglass;
mod lifecycle;

pub use breakglass::BreakGlassAsk;
pub use lifecycle::{CreateKey, GrantRequest, LocateFilter};

use crate::audit::{AuditError, AuditSink, Event, Kind, Outcome};
use crate::clock::Clock;
use crate::envelope::{self, EncryptionContext, Envelope};
use crate::error::{Error, Result};
use crate::keys::{CacheStats, KekCache, KeyId, KeyRecord, KeyState};
use crate::policy::{self, CryptoOp};
use crate::region::{check_residency, Caller, Refusal, Region};
use crate::root::{RootError, RootErrorKind, RootInfo, RootOfTrust};
use crate::secret::{KeyMaterial, Plaintext, KEY_LEN};
use crate::store::{Store, StoreError};
use ring::rand::{SecureRandom, SystemRandom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Hard upper bound for `max_plaintext_bytes` (the gRPC message limit is set above it).
pub const MAX_PLAINTEXT_LIMIT: usize = 1024 * 1024;

/// The broker's own settings (already validated).
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// This broker's region.
    pub region: Region,
    /// Name of this broker instance.
    pub broker_id: String,
    /// SPIFFE trust domain callers must belong to.
    pub trust_domain: String,
    /// Largest plaintext accepted by Encrypt.
    pub max_plaintext_bytes: usize,
    /// KEK cache bound.
    pub cache_max_entries: usize,
    /// KEK cache lifetime.
    pub cache_ttl: Duration,
    /// Destroy window when the request gives none.
    pub default_destroy_days: u32,
    /// The audit log file (read for exports and aggregates).
    pub audit_path: std::path::PathBuf,
    /// Aggregate cells below this count are suppressed.
    pub aggregate_min_group: u64,
    /// Who, besides the region's auditors, may read aggregates.
    pub aggregate_readers: Vec<crate::policy::Principal>,
    /// Approvals (by operators other than the requester) a break-glass grant needs.
    pub break_glass_quorum: u32,
    /// Longest a break-glass grant may last, in minutes.
    pub break_glass_max_minutes: u32,
    /// How long a break-glass request waits for its quorum, in minutes.
    pub break_glass_approval_minutes: u32,
    /// The host's TPM, for attestation quotes (None: no TPM configured).
    pub tpm: Option<crate::root::tpm::TpmSettings>,
}

/// Result of Encrypt.
pub struct Sealed {
    /// The envelope.
    pub ciphertext: Vec<u8>,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of Decrypt.
pub struct Opened {
    /// The plaintext.
    pub plaintext: Plaintext,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of GenerateDataKey.
pub struct DataKey {
    /// The data key in the clear (absent for the without-plaintext variant).
    pub plaintext: Option<KeyMaterial>,
    /// The data key as an envelope under the key.
    pub wrapped: Vec<u8>,
    /// Key used.
    pub key_id: KeyId,
    /// Version used.
    pub key_version: u32,
}

/// Result of ReEncrypt.
pub struct ReEncrypted {
    /// New envelope.
    pub ciphertext: Vec<u8>,
    /// Key and version that opened the source.
    pub source: (KeyId, u32),
    /// Key and version that sealed the result.
    pub destination: (KeyId, u32),
}

/// Broker facts for `GetInfo`.
#[derive(Clone, Debug)]
pub struct BrokerStatus {
    /// Region.
    pub region: Region,
    /// Instance name.
    pub broker_id: String,
    /// Root of trust.
    pub root: RootInfo,
    /// KEK cache counters.
    pub cache: CacheStats,
    /// Calls made to the root of trust since start.
    pub root_calls: u64,
}

/// The broker core.
pub struct Broker {
    settings: BrokerSettings,
    root: Arc<dyn RootOfTrust>,
    store: Arc<dyn Store>,
    cache: KekCache,
    clock: Arc<dyn Clock>,
    rng: SystemRandom,
    /// Serializes read-modify-write of key records on this node.
    lifecycle: Mutex<()>,
    root_calls: AtomicU64,
    audit: Arc<dyn AuditSink>,
    break_glass: std::sync::RwLock<Vec<crate::policy::breakglass::BreakGlass>>,
    /// One lock per version being unwrapped right now (single flight).
    unwrapping: Mutex<std::collections::HashMap<(KeyId, u32), UnwrapSlot>>,
    /// Decoded key records for the hot path.
    records: Mutex<std::collections::HashMap<KeyId, Arc<KeyRecord>>>,
    /// One TPM conversation at a time (attestation).
    tpm_lock: Mutex<()>,
}

fn store_err(e: StoreError) -> Error {
    match e {
        StoreError::Unavailable(m) => {
            tracing::error!(error = %m, "store unavailable");
            Error::Unavailable("the key store is unavailable; retry later".into())
        }
        other => Error::Internal(other.to_string()),
    }
}

fn root_err(e: RootError) -> Error {
    match e.kind {
        RootErrorKind::Unavailable | RootErrorKind::Auth | RootErrorKind::Config => {
            Error::Unavailable(format!("the root of trust is unavailable: {}", e.message))
        }
        RootErrorKind::Integrity | RootErrorKind::UnknownRootKey => Error::Internal(e.message),
    }
}

fn rng_err() -> Error {
    Error::Unavailable("the random number generator failed".into())
}

fn seal_err(e: envelope::SealError) -> Error {
    match e {
        envelope::SealError::Random => rng_err(),
        envelope::SealError::TooLarge => Error::ResourceExhausted(e.to_string()),
        envelope::SealError::Derive => Error::Internal(e.to_string()),
    }
}

impl Broker {
    /// Assembles a broker.
    pub fn new(
        settings: BrokerSettings,
        root: Arc<dyn RootOfTrust>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        let cache = KekCache::new(settings.cache_max_entries, settings.cache_ttl);
        Self {
            settings,
            root,
            store,
            cache,
            clock,
            rng: SystemRandom::new(),
            lifecycle: Mutex::new(()),
            root_calls: AtomicU64::new(0),
            audit,
            break_glass: std::sync::RwLock::new(Vec::new()),
            unwrapping: Mutex::new(std::collections::HashMap::new()),
            records: Mutex::new(std::collections::HashMap::new()),
            tpm_lock: Mutex::new(()),
        }
    }

    /// This broker's region.
    pub fn region(&self) -> &Region {
        &self.settings.region
    }

    /// `GetInfo`: the status, audited like every request.
    pub fn info(&self, cx: &CallCtx) -> Result<(BrokerStatus, String)> {
        self.audited(cx, "get-info", None, false, |_| {
            self.admit(&cx.caller)?;
            Ok((
                self.status(),
                self.signing_public_key_pem().unwrap_or_default(),
            ))
        })
    }

    /// Status for `GetInfo` and benchmarks.
    pub fn status(&self) -> BrokerStatus {
        BrokerStatus {
            region: self.settings.region.clone(),
            broker_id: self.settings.broker_id.clone(),
            root: self.root.info(),
            cache: self.cache.stats(),
            root_calls: self.root_calls.load(Ordering::Relaxed),
        }
    }

    /// The root's signing public key as SubjectPublicKeyInfo PEM.
    pub fn signing_public_key_pem(&self) -> Result<String> {
        let point = self.with_root(|r| r.signing_public_key())?;
        Ok(crate::root::pkcs11::admin::p256_spki_pem(&point))
    }

    /// Flushes the audit log and signs a final checkpoint (at shutdown).
    pub fn close_audit(&self) {
        self.audit.close();
    }

    /// Health of what requests depend on (root of trust).
    pub fn health(&self) -> Result<()> {
        self.root.health().map_err(root_err)
    }

    fn admit(&self, caller: &Caller) -> Result<()> {
        if caller.trust_domain != self.settings.trust_domain {
            return Err(Refusal::TrustDomain {
                caller: caller.trust_domain.clone(),
                broker: self.settings.trust_domain.clone(),
            }
            .into());
        }
        Ok(())
    }

    fn with_root<T>(
        &self,
        f: impl FnOnce(&dyn RootOfTrust) -> std::result::Result<T, RootError>,
    ) -> Result<T> {
        self.root_calls.fetch_add(1, Ordering::Relaxed);
        f(self.root.as_ref()).map_err(root_err)
    }

    /// Reads a key, completing its destruction if the window has passed.
    fn load(&self, id: &KeyId) -> Result<KeyRecord> {
        let rec = self.get_record(id)?;
        match rec.destroy_after {
            Some(t) if rec.state != KeyState::Destroyed && self.clock.now_unix() >= t => {
                self.finish_destroy(id)
            }
            _ => Ok(rec),
        }
    }

    /// A key for a crypto request: from the in-memory record cache (every
    /// lifecycle change replaces its entry), else from the store.
    fn load_shared(&self, id: &KeyId) -> Result<Arc<KeyRecord>> {
        let cached = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        let rec = match cached {
            Some(r) => r,
            None => {
                must_not_block()?;
                let r = Arc::new(self.get_record(id)?);
                let mut m = self.records.lock().unwrap_or_else(|p| p.into_inner());
                if m.len() >= self.settings.cache_max_entries {
                    m.clear();
                }
                m.insert(id.clone(), Arc::clone(&r));
                r
            }
        };
        match rec.destroy_after {
            Some(t) if rec.state != KeyState::Destroyed && self.clock.now_unix() >= t => {
                must_not_block()?;
                Ok(Arc::new(self.finish_destroy(id)?))
            }
            _ => Ok(rec),
        }
    }

    /// Drops every cached form of a key after a change.
    fn forget(&self, id: &KeyId) {
        self.cache.invalidate(id);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn get_record(&self, id: &KeyId) -> Result<KeyRecord> {
        self.store.get(id).map_err(store_err)?.ok_or_else(|| {
            Error::NotFound(format!(
                "key {id} not found in region {}",
                self.settings.region
            ))
        })
    }

    /// The unwrapped material of one version, from the cache or the root.
    /// Concurrent first uses of a version share one unwrap (single flight):
    /// the first caller unwraps, the others wait for it and hit the cache.
    fn kek(&self, rec: &KeyRecord, version: u32) -> Result<Arc<envelope::Kek>> {
        if let Ok(k) = self.cache.get(&rec.id, version) {
            return Ok(k);
        }
        must_not_block()?;
        let slot = {
            let mut f = self.unwrapping.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(f.entry((rec.id.clone(), version)).or_default())
        };
        let result = {
            let _one = slot.lock().unwrap_or_else(|p| p.into_inner());
            self.kek_locked(rec, version)
        };
        let mut f = self.unwrapping.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&slot) == 2 {
            f.remove(&(rec.id.clone(), version));
        }
        result
    }

    fn kek_locked(&self, rec: &KeyRecord, version: u32) -> Result<Arc<envelope::Kek>> {
        let epoch = match self.cache.peek(&rec.id, version) {
            Ok(k) => return Ok(k),
            Err(epoch) => epoch,
        };
        let wrapped = rec
            .version(version)
            .and_then(|v| v.wrapped.as_ref())
            .ok_or_else(|| {
                Error::precondition(format!(
                    "version {version} of key {} has no key material (destroyed)",
                    rec.id
                ))
            })?;
        let material = self.with_root(|r| r.unwrap(wrapped))?;
        let material = Arc::new(envelope::Kek::new(material).map_err(seal_err)?);
        self.cache
            .insert(&rec.id, version, Arc::clone(&material), epoch);
        Ok(material)
    }

    /// The key's grants, or failing those an active break-glass grant
    /// (named in the audit record).
    fn authorize(
        &self,
        cx: &CallCtx,
        rec: &KeyRecord,
        op: CryptoOp,
        note: &mut Note,
    ) -> Result<()> {
        match policy::check_grant(&rec.grants, &cx.caller, op, &rec.id) {
            Ok(()) => Ok(()),
            Err(refusal) => match self.break_glass_allowing(cx, &rec.id, op) {
                Some(id) => {
                    note.via = format!("allowed by break-glass grant {id}");
                    Ok(())
                }
                None => Err(refusal.into()),
            },
        }
    }

    fn check_state(&self, rec: &KeyRecord, op: CryptoOp, as_source: bool) -> Result<()> {
        if let Some(t) = rec.destroy_after {
            if rec.state != KeyState::Destroyed {
                return Err(Error::precondition(format!(
                    "key {} is scheduled for destruction at unix time {t} and cannot be used; an operator can cancel the destruction",
                    rec.id
                )));
            }
        }
        let ok = match rec.state {
            KeyState::Active => true,
            KeyState::Deactivated => as_source,
            KeyState::Compromised => as_source && op == CryptoOp::ReEncrypt,
            KeyState::PreActive | KeyState::Destroyed => false,
        };
        if ok {
            return Ok(());
        }
        let hint = match rec.state {
            KeyState::PreActive => "; an operator must activate it first",
            KeyState::Compromised => "; use ReEncrypt to move data under another key",
            KeyState::Deactivated => "; it can only decrypt",
            _ => "",
        };
        Err(Error::precondition(format!(
            "key {} is {} and cannot {}{hint}",
            rec.id,
            rec.state.as_str(),
            op.verb().trim_end_matches(" of"),
        )))
    }

    fn check_plaintext_len(&self, n: usize) -> Result<()> {
        if n > self.settings.max_plaintext_bytes {
            return Err(Error::ResourceExhausted(format!(
                "plaintext is {n} bytes; this broker accepts at most {} per request (use GenerateDataKey for larger data)",
                self.settings.max_plaintext_bytes
            )));
        }
        Ok(())
    }

    fn parse_ciphertext<'a>(&self, bytes: &'a [u8]) -> Result<Envelope<'a>> {
        if bytes.is_empty() {
            return Err(Error::invalid("ciphertext is empty"));
        }
        let env = Envelope::parse(bytes).map_err(|e| Error::invalid(e.to_string()))?;
        if env.header.region != self.settings.region {
            return Err(Error::precondition(format!(
                "ciphertext belongs to region {}; this broker serves region {} (send it to the {} broker)",
                env.header.region, self.settings.region, env.header.region
            )));
        }
        Ok(env)
    }

    fn seal(&self, rec: &KeyRecord, ctx: &EncryptionContext, pt: &Plaintext) -> Result<Sealed> {
        let version = rec.primary_version;
        let kek = self.kek(rec, version)?;
        let ciphertext = envelope::seal(
            &crate::envelope::BatchedRandom,
            &kek,
            &self.settings.region,
            &rec.id,
            version,
            ctx,
            pt,
        )
        .map_err(seal_err)?;
        Ok(Sealed {
            ciphertext,
            key_id: rec.id.clone(),
            key_version: version,
        })
    }

    /// Opens an envelope whose region, key grant and state were checked.
    fn open_checked(
        &self,
        rec: &KeyRecord,
        env: Envelope<'_>,
        ctx: &EncryptionContext,
    ) -> Result<Plaintext> {
        let v = env.header.key_version;
        if rec.version(v).is_none() {
            return Err(Error::invalid(format!(
                "ciphertext names version {v} of key {}, which does not exist",
                rec.id
            )));
        }
        let kek = self.kek(rec, v)?;
        envelope::open(&kek, &env, ctx).map_err(|e| Error::invalid(e.to_string()))
    }

    /// Runs a request and audits its outcome. With `durable`, a success is
    /// answered only once its record is on disk; if the log cannot be
    /// written the result (plaintext included) is dropped and the caller
    /// gets `UNAVAILABLE`.
    fn audited<T>(
        &self,
        cx: &CallCtx,
        operation: &'static str,
        context: Option<&EncryptionContext>,
        durable: bool,
        f: impl FnOnce(&mut Note) -> Result<T>,
    ) -> Result<T> {
        let r = self.audited_release(cx, operation, context, durable, f)?;
        r.released_blocking()
    }

    /// Like [`audited`](Self::audited), but hands back the result sealed
    /// until its record is durable: the value is only reachable through
    /// [`AfterAudit::released`] (async) or `released_blocking`.
    fn audited_release<T>(
        &self,
        cx: &CallCtx,
        operation: &'static str,
        context: Option<&EncryptionContext>,
        durable: bool,
        f: impl FnOnce(&mut Note) -> Result<T>,
    ) -> Result<AfterAudit<T>> {
        let mut note = Note::default();
        let r = f(&mut note);
        if matches!(r, Err(Error::WouldBlock)) {
            // Not a request outcome: the caller retries off the async runtime.
            return Err(Error::WouldBlock);
        }
        let ev = self.event(Some(cx), operation, context, &note, r.as_ref().err());
        let value = match r {
            Ok(v) => v,
            Err(e) => {
                self.audit.append(ev);
                return Err(e);
            }
        };
        let ticket = if durable {
            Some(self.audit.append_ticket(ev).map_err(audit_err)?)
        } else {
            self.audit.append(ev);
            None
        };
        Ok(AfterAudit { value, ticket })
    }

    fn event(
        &self,
        cx: Option<&CallCtx>,
        operation: &'static str,
        context: Option<&EncryptionContext>,
        note: &Note,
        err: Option<&Error>,
    ) -> Event {
        let (outcome, code, reason) = match err {
            None => (Outcome::Allowed, "OK", note.via.clone()),
            Some(e) => (e.outcome(), e.code_name(), e.to_string()),
        };
        Event {
            kind: Kind::Request,
            request_id: cx.map(|c| c.request_id.clone()).unwrap_or_default(),
            caller: cx.map(|c| c.caller.clone()),
            operation,
            key_id: note.key_id.clone(),
            key_version: note.key_version,
            context_sha256: context
                .map(EncryptionContext::digest_hex)
                .unwrap_or_default(),
            outcome,
            code,
            reason,
        }
    }

    /// Audits a request refused before it reached the core (no identity).
    pub fn audit_unauthenticated(&self, request_id: &str, operation: &'static str, reason: &str) {
        self.audit.append(Event {
            kind: Kind::Request,
            request_id: request_id.to_owned(),
            caller: None,
            operation,
            key_id: String::new(),
            key_version: 0,
            context_sha256: String::new(),
            outcome: Outcome::Refused,
            code: "PERMISSION_DENIED",
            reason: reason.to_owned(),
        });
    }

    /// Encrypt: any region's service, where the key's grants name it.
    pub fn encrypt(
        &self,
        cx: &CallCtx,
        key_id: &KeyId,
        plaintext: &Plaintext,
        ctx: &EncryptionContext,
    ) -> Result<Sealed> {
        self.audited(cx, "encrypt", Some(ctx), false, |note| {
            let caller = &cx.caller;
            note.key(key_id, 0);
            self.admit(caller)?;
            policy::require_service(caller, CryptoOp::Encrypt)?;
            self.check_plaintext_len(plaintext.len())?;
            let rec = self.load_shared(key_id)?;
            self.authorize(cx, &rec, CryptoOp::Encrypt, note)?;
            self.check_state(&rec, CryptoOp::Encrypt, false)?;
            note.key(key_id, rec.primary_version);
            self.seal(&rec, ctx, plaintext)
        })
    }

    /// Decrypt: in-region services with a grant only. The plaintext is
    /// released only once the request's audit record is durable.
    pub fn decrypt(
        &self,
        cx: &CallCtx,
        ciphertext: &[u8],
        ctx: &EncryptionContext,
    ) -> Result<AfterAudit<Opened>> {
        self.audited_release(cx, "decrypt", Some(ctx), true, |note| {
            let caller = &cx.caller;
            self.admit(caller)?;
            policy::require_service(caller, CryptoOp::Decrypt)?;
            let here = &self.settings.region;
            // The residency rule comes before the ciphertext is even parsed.
            check_residency(&caller.region, here, here, CryptoOp::Decrypt.verb())?;
            let env = self.parse_ciphertext(ciphertext)?;
            note.key(&env.header.key_id, env.header.key_version);
            let rec = self.load_shared(&env.header.key_id)?;
            check_residency(
                &caller.region,
                here,
                &rec.home_region,
                CryptoOp::Decrypt.verb(),
            )?;
            self.authorize(cx, &rec, CryptoOp::Decrypt, note)?;
            self.check_state(&rec, CryptoOp::Decrypt, true)?;
            let key_version = env.header.key_version;
            let plaintext = self.open_checked(&rec, env, ctx)?;
            Ok(Opened {
                plaintext,
                key_id: rec.id.clone(),
                key_version,
            })
        })
    }

    /// GenerateDataKey: with plaintext, in-region only (released once
    /// audited durably); without, like Encrypt.
    pub fn generate_data_key(
        &self,
        cx: &CallCtx,
        key_id: &KeyId,
        ctx: &EncryptionContext,
        with_plaintext: bool,
    ) -> Result<AfterAudit<DataKey>> {
        let (op, name) = if with_plaintext {
            (CryptoOp::GenerateDataKey, "generate-data-key")
        } else {
            (
                CryptoOp::GenerateDataKeyWithoutPlaintext,
                "generate-data-key-without-plaintext",
            )
        };
        self.audited_release(cx, name, Some(ctx), with_plaintext, |note| {
            let caller = &cx.caller;
            note.key(key_id, 0);
            self.admit(caller)?;
            policy::require_service(caller, op)?;
            let here = &self.settings.region;
            if with_plaintext {
                check_residency(&caller.region, here, here, op.verb())?;
            }
            let rec = self.load_shared(key_id)?;
            if with_plaintext {
                check_residency(&caller.region, here, &rec.home_region, op.verb())?;
            }
            self.authorize(cx, &rec, op, note)?;
            self.check_state(&rec, op, false)?;
            note.key(key_id, rec.primary_version);
            // Data keys come straight from the kernel, never from the batched
            // buffer that holds future salts and nonces.
            let mut raw = [0u8; KEY_LEN];
            self.rng.fill(&mut raw).map_err(|_| rng_err())?;
            let dk = KeyMaterial::from_array(&mut raw);
            let sealed = self.seal(&rec, ctx, &Plaintext::new(dk.expose_secret().to_vec()))?;
            Ok(DataKey {
                plaintext: with_plaintext.then_some(dk),
                wrapped: sealed.ciphertext,
                key_id: sealed.key_id,
                key_version: sealed.key_version,
            })
        })
    }

    /// ReEncrypt: in-region only; the plaintext never leaves the broker.
    pub fn re_encrypt(
        &self,
        cx: &CallCtx,
        ciphertext: &[u8],
        source_ctx: &EncryptionContext,
        destination: Option<&KeyId>,
        destination_ctx: &EncryptionContext,
    ) -> Result<AfterAudit<ReEncrypted>> {
        let op = CryptoOp::ReEncrypt;
        self.audited_release(cx, "re-encrypt", Some(source_ctx), true, |note| {
            let caller = &cx.caller;
            self.admit(caller)?;
            policy::require_service(caller, op)?;
            let here = &self.settings.region;
            check_residency(&caller.region, here, here, op.verb())?;
            let env = self.parse_ciphertext(ciphertext)?;
            note.key(&env.header.key_id, env.header.key_version);
            let src = self.load_shared(&env.header.key_id)?;
            check_residency(&caller.region, here, &src.home_region, op.verb())?;
            self.authorize(cx, &src, op, note)?;
            self.check_state(&src, op, true)?;
            let dst = match destination {
                Some(d) if *d != src.id => {
                    let dst = self.load_shared(d)?;
                    self.authorize(cx, &dst, op, note)?;
                    dst
                }
                _ => Arc::clone(&src),
            };
            self.check_state(&dst, CryptoOp::Encrypt, false)?;
            let src_version = env.header.key_version;
            let plaintext = self.open_checked(&src, env, source_ctx)?;
            let sealed = self.seal(&dst, destination_ctx, &plaintext)?;
            Ok(ReEncrypted {
                ciphertext: sealed.ciphertext,
                source: (src.id.clone(), src_version),
                destination: (sealed.key_id, sealed.key_version),
            })
        })
    }

    /// Runs `f` on the calling (async) thread, refusing anything that would
    /// block (a root-of-trust call, a store read, a durable-audit wait):
    /// those return `Error::WouldBlock` and the caller retries off the
    /// runtime. Steady-state crypto on hot keys never blocks.
    pub fn without_blocking<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        INLINE.with(|c| c.set(true));
        let r = f();
        INLINE.with(|c| c.set(false));
        r
    }
}

thread_local! {
    static INLINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn must_not_block() -> Result<()> {
    if INLINE.with(|c| c.get()) {
        Err(Error::WouldBlock)
    } else {
        Ok(())
    }
}

/// Held while one request unwraps a version; others wait on it.
type UnwrapSlot = Arc<Mutex<()>>;

/// A result that may be released only once its audit record is durable.
pub struct AfterAudit<T> {
    value: T,
    ticket: Option<crate::audit::Ticket>,
}

impl<T> AfterAudit<T> {
    /// Waits (asynchronously) for the audit record, then releases the value.
    /// If the record could not be written the value is dropped (zeroized).
    pub async fn released(self) -> Result<T> {
        if let Some(t) = self.ticket {
            t.wait_async().await.map_err(audit_err)?;
        }
        Ok(self.value)
    }

    /// Blocking form of [`released`](Self::released), for non-async callers.
    pub fn released_blocking(self) -> Result<T> {
        if let Some(t) = self.ticket {
            t.wait().map_err(audit_err)?;
        }
        Ok(self.value)
    }
}

/// What a request reached, filled in as the core learns it (for the audit record).
#[derive(Default)]
pub(crate) struct Note {
    key_id: String,
    key_version: u32,
    via: String,
}

impl Note {
    fn key(&mut self, id: &KeyId, version: u32) {
        self.key_id = id.to_string();
        self.key_version = version;
    }
}

/// Who is asking, and the request's id (in audit records and responses).
#[derive(Clone, Debug)]
pub struct CallCtx {
    /// Authenticated caller (shared with the connection).
    pub caller: Arc<Caller>,
    /// Request id.
    pub request_id: String,
}

fn audit_err(e: AuditError) -> Error {
    tracing::error!(error = %e, "audit record not durable: refusing the request");
    Error::Unavailable(
        "the audit log cannot be written; the request was not carried out and nothing was released"
            .into(),
    )
}
