//! Key lifecycle (KMIP vocabulary): operators of the broker's region only.
//! Every change is durable before it returns and invalidates the KEK cache.

use super::{store_err, Broker, CallCtx, Note};
use crate::error::{Error, Result};
use crate::keys::provenance::Provenance;
use crate::keys::{KeyId, KeyRecord, KeyState, RevocationReason, VersionRecord};
use crate::policy::{self, CryptoOp, Grant, Principal};

/// A grant as requested, before the broker checks it can take effect.
#[derive(Clone, Debug)]
pub struct GrantRequest {
    /// Who.
    pub principal: Principal,
    /// What.
    pub operations: Vec<CryptoOp>,
}

/// Create request.
#[derive(Clone, Debug, Default)]
pub struct CreateKey {
    /// Name (1-128 chars).
    pub name: String,
    /// Tenant (may be empty).
    pub tenant: String,
    /// Free text (<= 1024 chars).
    pub description: String,
    /// Initial grants.
    pub grants: Vec<GrantRequest>,
    /// Create active instead of pre-active.
    pub activate: bool,
}

/// Locate filter; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct LocateFilter {
    /// Exact name.
    pub name: Option<String>,
    /// State.
    pub state: Option<KeyState>,
    /// Exact tenant.
    pub tenant: Option<String>,
}

const MAX_GRANTS: usize = 256;

fn check_text(field: &str, s: &str, max: usize, required: bool) -> Result<()> {
    if required && s.is_empty() {
        return Err(Error::invalid(format!("{field} must not be empty")));
    }
    if s.chars().count() > max {
        return Err(Error::invalid(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(())
}

impl Broker {
    fn build_grants(&self, reqs: Vec<GrantRequest>) -> Result<Vec<Grant>> {
        if reqs.len() > MAX_GRANTS {
            return Err(Error::ResourceExhausted(format!(
                "{} grants; a key holds at most {MAX_GRANTS}",
                reqs.len()
            )));
        }
        reqs.into_iter()
            .map(|g| {
                Grant::new(g.principal, g.operations, &self.settings.region)
                    .map_err(Error::InvalidArgument)
            })
            .collect()
    }

    pub(super) fn lock_lifecycle(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded value is `()`: a poisoned lock protects no broken state.
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_version(&self, version: u32) -> Result<VersionRecord> {
        let material = self.with_root(|r| r.generate_material())?;
        let wrapped = self.with_root(|r| r.wrap(&material))?;
        Ok(VersionRecord {
            version,
            created_at: self.clock.now_unix(),
            wrapped: Some(wrapped),
            provenance: None,
        })
    }

    /// Signs the provenance of every version of `rec` that has none yet.
    fn attach_provenance(&self, rec: &mut KeyRecord, creator: &str, audit_seq: u64) -> Result<()> {
        let info = self.root.info();
        for v in rec.versions.iter_mut().filter(|v| v.provenance.is_none()) {
            let Some(w) = &v.wrapped else { continue };
            let mut p = Provenance {
                key_id: rec.id.to_string(),
                version: v.version,
                region: self.settings.region.to_string(),
                broker_id: self.settings.broker_id.clone(),
                creator: creator.to_owned(),
                created_at_unix: v.created_at,
                root_kind: info.kind.to_owned(),
                root_description: info.description.clone(),
                root_key_id: w.root_key_id.clone(),
                mechanism: info.mechanism.clone(),
                audit_seq,
                signature: String::new(),
            };
            let msg = p.canonical();
            p.signature = hex::encode(self.with_root(|r| r.sign(&msg))?);
            v.provenance = Some(p);
        }
        Ok(())
    }

    /// A lifecycle change, audited before it takes effect: `prepare` checks
    /// and builds the change; its record is made durable; then `commit`
    /// applies it (with the record's sequence number). A commit that fails
    /// after the record gets a second record saying so.
    pub(super) fn audit_first<P, T>(
        &self,
        cx: Option<&CallCtx>,
        operation: &'static str,
        prepare: impl FnOnce(&mut Note) -> Result<P>,
        commit: impl FnOnce(P, u64) -> Result<T>,
    ) -> Result<T> {
        let mut note = Note::default();
        let p = match prepare(&mut note) {
            Ok(p) => p,
            Err(e) => {
                self.audit
                    .append(self.event(cx, operation, None, &note, Some(&e)));
                return Err(e);
            }
        };
        let seq = self
            .audit
            .append_durable(self.event(cx, operation, None, &note, None))
            .map_err(super::audit_err)?;
        commit(p, seq).inspect_err(|e| {
            let mut ev = self.event(cx, operation, None, &note, Some(e));
            ev.reason = format!(
                "the change recorded at audit sequence {seq} was not committed: {}",
                ev.reason
            );
            self.audit.append(ev);
        })
    }

    /// Creates a key in this broker's region.
    pub fn create_key(&self, cx: &CallCtx, req: CreateKey) -> Result<KeyRecord> {
        let caller = &cx.caller;
        self.audit_first(
            Some(cx),
            "create-key",
            |note| {
                self.admit(caller)?;
                policy::require_key_manager(caller, &self.settings.region, "create keys")?;
                check_text("name", &req.name, 128, true)?;
                check_text("tenant", &req.tenant, 128, false)?;
                check_text("description", &req.description, 1024, false)?;
                let grants = self.build_grants(req.grants)?;
                let id = KeyId::generate(&self.rng).map_err(|_| super::rng_err())?;
                note.key(&id, 1);
                let now = self.clock.now_unix();
                Ok(KeyRecord {
                    id,
                    name: req.name,
                    tenant: req.tenant,
                    description: req.description,
                    home_region: self.settings.region.clone(),
                    state: if req.activate {
                        KeyState::Active
                    } else {
                        KeyState::PreActive
                    },
                    revocation_reason: None,
                    revocation_message: String::new(),
                    created_at: now,
                    updated_at: now,
                    destroy_after: None,
                    primary_version: 1,
                    versions: vec![self.new_version(1)?],
                    grants,
                    created_by: caller.spiffe_id(),
                })
            },
            |mut rec, seq| {
                self.attach_provenance(&mut rec, &caller.spiffe_id(), seq)?;
                self.store.insert(&rec).map_err(store_err)?;
                tracing::info!(key = %rec.id, caller = %caller, "key created");
                Ok(rec)
            },
        )
    }

    /// Read-modify-write of one key under the lifecycle lock, audited first.
    fn change(
        &self,
        cx: &CallCtx,
        operation: &'static str,
        what: &'static str,
        id: &KeyId,
        f: impl FnOnce(&mut KeyRecord) -> Result<()>,
    ) -> Result<KeyRecord> {
        let caller = &cx.caller;
        self.audit_first(
            Some(cx),
            operation,
            |note| {
                note.key(id, 0);
                self.admit(caller)?;
                policy::require_key_manager(caller, &self.settings.region, what)?;
                let g = self.lock();
                let mut rec = self.load(id)?;
                if rec.state == KeyState::Destroyed {
                    return Err(Error::precondition(format!("key {id} is destroyed")));
                }
                f(&mut rec)?;
                note.key(id, rec.primary_version);
                rec.updated_at = self.clock.now_unix();
                Ok((g, rec))
            },
            |(g, mut rec), seq| {
                self.attach_provenance(&mut rec, &caller.spiffe_id(), seq)?;
                self.store.update(&rec).map_err(store_err)?;
                self.forget(id);
                drop(g);
                tracing::info!(key = %id, caller = %caller, action = what, "key changed");
                Ok(rec)
            },
        )
    }

    /// Pre-active → active.
    pub fn activate(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.change(cx, "activate-key", "activate keys", id, |rec| {
            if rec.state != KeyState::PreActive {
                return Err(Error::precondition(format!(
                    "key {} is {}; only a pre-active key can be activated",
                    rec.id,
                    rec.state.as_str()
                )));
            }
            rec.state = KeyState::Active;
            Ok(())
        })
    }

    /// Revokes: deactivated, or compromised for `KeyCompromise`.
    pub fn revoke(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        reason: RevocationReason,
        message: String,
    ) -> Result<KeyRecord> {
        self.change(cx, "revoke-key", "revoke keys", id, |rec| {
            check_text("revocation message", &message, 1024, false)?;
            rec.state = match (reason, rec.state) {
                (_, KeyState::Compromised) | (RevocationReason::KeyCompromise, _) => {
                    KeyState::Compromised
                }
                _ => KeyState::Deactivated,
            };
            rec.revocation_reason = Some(reason);
            rec.revocation_message = message;
            Ok(())
        })
    }

    /// Schedules destruction `days` from now (default from settings, min 1).
    pub fn schedule_destroy(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        days: Option<u32>,
    ) -> Result<KeyRecord> {
        let days = days.unwrap_or(self.settings.default_destroy_days);
        let at = self.clock.now_unix() + i64::from(days) * 86_400;
        self.change(cx, "schedule-key-destruction", "destroy keys", id, |rec| {
            if !(1..=3650).contains(&days) {
                return Err(Error::invalid(format!(
                    "pending window of {days} days; it must be between 1 and 3650"
                )));
            }
            if let Some(t) = rec.destroy_after {
                return Err(Error::precondition(format!(
                    "key {} is already scheduled for destruction at unix time {t}",
                    rec.id
                )));
            }
            rec.destroy_after = Some(at);
            Ok(())
        })
    }

    /// Cancels a scheduled destruction.
    pub fn cancel_destroy(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.change(
            cx,
            "cancel-key-destruction",
            "cancel key destruction",
            id,
            |rec| {
                if rec.destroy_after.take().is_none() {
                    return Err(Error::precondition(format!(
                        "key {} is not scheduled for destruction",
                        rec.id
                    )));
                }
                Ok(())
            },
        )
    }

    /// Adds a version and makes it primary.
    pub fn rekey(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.change(cx, "rekey", "rekey keys", id, |rec| {
            if rec.state != KeyState::Active || rec.destroy_after.is_some() {
                return Err(Error::precondition(format!(
                    "key {} is {}{}; only an active key can be rekeyed",
                    rec.id,
                    rec.state.as_str(),
                    if rec.destroy_after.is_some() {
                        " and scheduled for destruction"
                    } else {
                        ""
                    }
                )));
            }
            let next = u32::try_from(rec.versions.len() + 1)
                .map_err(|_| Error::ResourceExhausted("too many versions".into()))?;
            rec.versions.push(self.new_version(next)?);
            rec.primary_version = next;
            Ok(())
        })
    }

    /// Replaces the key's grants.
    pub fn set_grants(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        grants: Vec<GrantRequest>,
    ) -> Result<KeyRecord> {
        self.change(cx, "set-grants", "change key grants", id, |rec| {
            rec.grants = self.build_grants(grants)?;
            Ok(())
        })
    }

    /// Attributes of one key (operators and auditors of the region).
    pub fn get_attributes(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.audited(cx, "get-attributes", None, false, |note| {
            note.key(id, 0);
            self.admit(&cx.caller)?;
            policy::require_reader(&cx.caller, &self.settings.region, "read key attributes")?;
            self.load(id)
        })
    }

    /// One page of keys matching `filter`, after `page_token`.
    pub fn locate(
        &self,
        cx: &CallCtx,
        filter: &LocateFilter,
        page_size: usize,
        page_token: Option<&KeyId>,
    ) -> Result<(Vec<KeyRecord>, Option<KeyId>)> {
        self.audited(cx, "locate", None, false, |_| {
            self.admit(&cx.caller)?;
            policy::require_reader(&cx.caller, &self.settings.region, "locate keys")?;
            let page_size = match page_size {
                0 => 100,
                n if n > 1000 => {
                    return Err(Error::invalid(format!(
                        "page size {n}; the maximum is 1000"
                    )));
                }
                n => n,
            };
            let now = self.clock.now_unix();
            let matches = |r: &KeyRecord| {
                let state = effective_state(r, now);
                filter.name.as_ref().is_none_or(|n| *n == r.name)
                    && filter.tenant.as_ref().is_none_or(|t| *t == r.tenant)
                    && filter.state.is_none_or(|s| s == state)
            };
            let (mut page, more) = self
                .store
                .scan(page_token, page_size, &matches)
                .map_err(store_err)?;
            for r in &mut page {
                if effective_state(r, now) == KeyState::Destroyed && r.state != KeyState::Destroyed
                {
                    *r = self.finish_destroy(&r.id)?;
                }
            }
            let next = if more {
                page.last().map(|r| r.id.clone())
            } else {
                None
            };
            Ok((page, next))
        })
    }

    /// Erases a key's material once its window has passed. Idempotent.
    pub(super) fn finish_destroy(&self, id: &KeyId) -> Result<KeyRecord> {
        let g = self.lock();
        let rec = self.get_record(id)?;
        let due = rec
            .destroy_after
            .is_some_and(|t| self.clock.now_unix() >= t);
        if rec.state == KeyState::Destroyed || !due {
            return Ok(rec);
        }
        self.audit_first(
            None,
            "destroy-key",
            |note| {
                note.key(id, rec.primary_version);
                Ok(rec)
            },
            |mut rec, _| {
                rec.state = KeyState::Destroyed;
                for v in &mut rec.versions {
                    v.wrapped = None;
                }
                rec.updated_at = self.clock.now_unix();
                self.store.update(&rec).map_err(store_err)?;
                self.forget(id);
                drop(g);
                tracing::warn!(key = %id, "key destroyed: its material is erased");
                Ok(rec)
            },
        )
    }

    /// Destroys every key whose window has passed; returns how many.
    pub fn sweep_destroyed(&self) -> Result<usize> {
        let now = self.clock.now_unix();
        let due = |r: &KeyRecord| {
            r.state != KeyState::Destroyed && r.destroy_after.is_some_and(|t| now >= t)
        };
        let mut n = 0;
        let mut after: Option<KeyId> = None;
        loop {
            let (page, more) = self
                .store
                .scan(after.as_ref(), 500, &due)
                .map_err(store_err)?;
            for r in &page {
                self.finish_destroy(&r.id)?;
                n += 1;
            }
            if !more {
                return Ok(n);
            }
            after = page.last().map(|r| r.id.clone());
        }
    }
}

/// The state a key has now, counting a passed destroy window as destroyed.
pub fn effective_state(r: &KeyRecord, now: i64) -> KeyState {
    match r.destroy_after {
        Some(t) if now >= t => KeyState::Destroyed,
        _ => r.state,
    }
}
