//! Key lifecycle (KMIP vocabulary): operators of the broker's region only.
//! Every change is durable before it returns and invalidates the KEK cache.

use super::gate::On;
use super::{store_err, Broker, CallCtx};
use crate::error::{Error, Invalid, Limit, Precondition, Result};
use crate::keys::provenance::Provenance;
use crate::keys::{KeyId, KeyRecord, KeyState, RevocationReason, VersionRecord};
use crate::policy::{CryptoOp, Grant, Operation, Principal};
use crate::store::StoreError;

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
    /// The client's own request id, when it gave one: a retry with the
    /// same id (at any broker of the region) answers with the key the
    /// first attempt created instead of creating another.
    pub request_id: Option<String>,
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

pub(super) fn check_text(field: &'static str, s: &str, max: usize, required: bool) -> Result<()> {
    if required && s.is_empty() {
        return Err(Invalid::Empty { field }.into());
    }
    if s.chars().count() > max {
        return Err(Invalid::TooLong { field, max }.into());
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::ControlCharacters { field }.into());
    }
    Ok(())
}

impl Broker {
    fn build_grants(&self, reqs: Vec<GrantRequest>) -> Result<Vec<Grant>> {
        if reqs.len() > MAX_GRANTS {
            return Err(Limit::Grants {
                len: reqs.len(),
                max: MAX_GRANTS,
            }
            .into());
        }
        reqs.into_iter()
            .map(|g| {
                Grant::new(g.principal, g.operations, &self.settings.region)
                    .map_err(|e| Invalid::Grant(e).into())
            })
            .collect()
    }

    pub(super) fn lock_lifecycle(&self) -> Result<LifecycleGuard<'_>> {
        self.lock()
    }

    /// One lifecycle change at a time: on this broker (its mutex), then
    /// across the region's brokers (the store's lock).
    fn lock(&self) -> Result<LifecycleGuard<'_>> {
        // The guarded value is `()`: a poisoned lock protects no broken state.
        let node = self.lifecycle.lock().unwrap_or_else(|p| p.into_inner());
        let region = self.store.lifecycle_lock().map_err(super::store_err)?;
        Ok(LifecycleGuard {
            _region: region,
            _node: node,
        })
    }

    fn new_version(&self, version: u32) -> Result<VersionRecord> {
        Ok(self.new_version_and_material(version)?.0)
    }

    /// A new version, and its material for the caller to use once.
    pub(super) fn new_version_and_material(
        &self,
        version: u32,
    ) -> Result<(VersionRecord, crate::secret::KeyMaterial)> {
        let material = self.with_root(|r| r.generate_material())?;
        let wrapped = self.with_root(|r| r.wrap(&material))?;
        Ok((
            VersionRecord {
                version,
                created_at: self.clock.now_unix(),
                wrapped: Some(wrapped),
                provenance: None,
                sealed_object: None,
                request: None,
            },
            material,
        ))
    }

    /// Signs the provenance of every version of `rec` that has none yet.
    pub(super) fn attach_provenance(
        &self,
        rec: &mut KeyRecord,
        creator: &str,
        audit_seq: u64,
    ) -> Result<()> {
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

    /// Creates a key in this broker's region.
    pub fn create_key(&self, cx: &CallCtx, req: CreateKey) -> Result<KeyRecord> {
        let caller = &cx.caller;
        let op = Operation::CreateKey;
        let request_id = req.request_id.clone();
        self.audit_first(
            Some(cx),
            op,
            |note| {
                self.gate(cx, op, None, note)?;
                check_text("name", &req.name, 128, true)?;
                check_text("tenant", &req.tenant, 128, false)?;
                check_text("description", &req.description, 1024, false)?;
                let grants = self.build_grants(req.grants)?;
                let id = match &request_id {
                    Some(r) => {
                        KeyId::for_request(self.settings.region.as_str(), &caller.spiffe_id(), r)
                    }
                    None => KeyId::generate(&self.rng).map_err(|_| super::rng_err())?,
                };
                if request_id.is_some() {
                    if let Some(done) = self.store.get(&id).map_err(store_err)? {
                        // A retry of a create that was carried out.
                        note.key(&id, done.primary_version);
                        note.via = "retried request: the key its first attempt created".into();
                        return Ok(Err(done));
                    }
                }
                note.key(&id, 1);
                let now = self.clock.now_unix();
                Ok(Ok(KeyRecord {
                    name: req.name,
                    tenant: req.tenant,
                    description: req.description,
                    grants,
                    ..KeyRecord::new(
                        id,
                        self.settings.region.clone(),
                        self.new_version(1)?,
                        req.activate,
                        now,
                        caller.spiffe_id(),
                    )
                }))
            },
            |made, seq| {
                let mut rec = match made {
                    Ok(rec) => rec,
                    Err(done) => return Ok(done),
                };
                self.attach_provenance(&mut rec, &caller.spiffe_id(), seq)?;
                match self.store.insert(&rec) {
                    Ok(()) => {}
                    // A retry racing its first attempt at another broker:
                    // the first one's key is the answer.
                    Err(StoreError::AlreadyExists(id)) if request_id.is_some() => {
                        return self.get_record(&id);
                    }
                    Err(e) => return Err(store_err(e)),
                }
                tracing::info!(key = %rec.id, caller = %caller, "key created");
                Ok(rec)
            },
        )
    }

    /// Read-modify-write of one key under the lifecycle lock, audited first.
    pub(super) fn change(
        &self,
        cx: &CallCtx,
        op: Operation,
        id: &KeyId,
        f: impl FnOnce(&mut KeyRecord) -> Result<()>,
    ) -> Result<KeyRecord> {
        self.change_unless_done(cx, op, id, |rec, _| f(rec).map(|()| true))
    }

    /// `change`, where `f` may find the change already made (a retried
    /// request) and answer `false`: the key is then returned as stored.
    fn change_unless_done(
        &self,
        cx: &CallCtx,
        op: Operation,
        id: &KeyId,
        f: impl FnOnce(&mut KeyRecord, &mut super::Note) -> Result<bool>,
    ) -> Result<KeyRecord> {
        let caller = &cx.caller;
        self.audit_first(
            Some(cx),
            op,
            |note| {
                note.key(id, 0);
                self.gate(cx, op, None, note)?;
                let g = self.lock()?;
                let mut rec = self.load(id)?;
                self.gate(cx, op, Some(On::Key(&rec)), note)?;
                if !f(&mut rec, note)? {
                    return Ok((g, rec, false));
                }
                note.key(id, rec.primary_version);
                rec.updated_at = self.clock.now_unix();
                Ok((g, rec, true))
            },
            |(g, mut rec, changed), seq| {
                if !changed {
                    return Ok(rec);
                }
                self.attach_provenance(&mut rec, &caller.spiffe_id(), seq)?;
                self.store.update(&rec).map_err(store_err)?;
                self.keyring.forget(id);
                drop(g);
                tracing::info!(key = %id, caller = %caller, operation = op.name(), "key changed");
                Ok(rec)
            },
        )
    }

    /// Pre-active → active.
    pub fn activate(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.change(cx, Operation::ActivateKey, id, |rec| {
            if rec.destroy_after.is_some() {
                return Err(Precondition::ActivateScheduled(rec.id.clone()).into());
            }
            if rec.state != KeyState::PreActive {
                return Err(Precondition::NotPreActive {
                    key: rec.id.clone(),
                    state: rec.state,
                }
                .into());
            }
            rec.state = KeyState::Active;
            rec.activated_at = Some(self.clock.now_unix());
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
        self.change(cx, Operation::RevokeKey, id, |rec| {
            check_text("revocation message", &message, 1024, false)?;
            rec.state = match (reason, rec.state) {
                (_, KeyState::Compromised) | (RevocationReason::KeyCompromise, _) => {
                    KeyState::Compromised
                }
                _ => KeyState::Deactivated,
            };
            rec.revocation_reason = Some(reason);
            rec.revocation_message = message;
            rec.deactivated_at.get_or_insert(self.clock.now_unix());
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
        self.change(cx, Operation::ScheduleKeyDestruction, id, |rec| {
            if !(1..=3650).contains(&days) {
                return Err(Invalid::DestroyWindow(days).into());
            }
            if let Some(at) = rec.destroy_after {
                return Err(Precondition::AlreadyScheduled {
                    key: rec.id.clone(),
                    at,
                }
                .into());
            }
            rec.destroy_after = Some(at);
            Ok(())
        })
    }

    /// Cancels a scheduled destruction.
    pub fn cancel_destroy(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        self.change(cx, Operation::CancelKeyDestruction, id, |rec| {
            if rec.destroy_after.take().is_none() {
                return Err(Precondition::NotScheduled(rec.id.clone()).into());
            }
            Ok(())
        })
    }

    /// Adds a version and makes it primary. With the client's own
    /// `request_id`, a retry (at any broker of the region) answers with the
    /// version its first attempt added instead of adding another.
    pub fn rekey(&self, cx: &CallCtx, id: &KeyId, request_id: Option<&str>) -> Result<KeyRecord> {
        let request = request_id.map(|r| {
            crate::id::request_digest(&[
                "sovkms/v1/rekey",
                self.settings.region.as_str(),
                &cx.caller.spiffe_id(),
                r,
            ])
        });
        self.change_unless_done(cx, Operation::Rekey, id, |rec, note| {
            if let Some(done) = rec
                .versions
                .iter()
                .find(|v| request.is_some() && v.request == request)
            {
                note.key(id, done.version);
                note.via = "retried request: the version its first attempt added".into();
                return Ok(false);
            }
            if rec.state != KeyState::Active {
                return Err(Precondition::NotRekeyable {
                    key: rec.id.clone(),
                    state: rec.state,
                }
                .into());
            }
            if rec.destroy_after.is_some() {
                return Err(Precondition::RekeyScheduled(rec.id.clone()).into());
            }
            let next = u32::try_from(rec.versions.len() + 1)
                .map_err(|_| Error::from(Limit::Versions(rec.id.clone())))?;
            rec.versions.push(VersionRecord {
                request,
                ..self.new_version(next)?
            });
            rec.primary_version = next;
            Ok(true)
        })
    }

    /// Replaces the key's grants.
    pub fn set_grants(
        &self,
        cx: &CallCtx,
        id: &KeyId,
        grants: Vec<GrantRequest>,
    ) -> Result<KeyRecord> {
        self.change(cx, Operation::SetGrants, id, |rec| {
            rec.grants = self.build_grants(grants)?;
            Ok(())
        })
    }

    /// Attributes of one key (operators and auditors of the region).
    pub fn get_attributes(&self, cx: &CallCtx, id: &KeyId) -> Result<KeyRecord> {
        let op = Operation::GetAttributes;
        self.audited(cx, op, None, |note| {
            note.key(id, 0);
            self.gate(cx, op, None, note)?;
            let rec = self.load(id)?;
            self.gate(cx, op, Some(On::Key(&rec)), note)?;
            Ok(rec)
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
        let op = Operation::Locate;
        self.audited(cx, op, None, |note| {
            self.gate(cx, op, None, note)?;
            let page_size = match page_size {
                0 => 100,
                n if n > 1000 => return Err(Invalid::PageSize(n).into()),
                n => n,
            };
            let now = self.clock.now_unix();
            let caller = &cx.caller;
            // A service sees only the keys it holds a grant on: names and ids
            // of other keys are not its business.
            let visible = |r: &KeyRecord| {
                caller.role != crate::region::Role::Service
                    || r.grants.iter().any(|g| g.principal.matches(caller))
            };
            let matches = |r: &KeyRecord| {
                let state = effective_state(r, now);
                visible(r)
                    && filter.name.as_ref().is_none_or(|n| *n == r.name)
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
        let g = self.lock()?;
        let rec = self.get_record(id)?;
        let due = rec
            .destroy_after
            .is_some_and(|t| self.clock.now_unix() >= t);
        if rec.state == KeyState::Destroyed || !due {
            return Ok(rec);
        }
        self.audit_first(
            None,
            Operation::DestroyKey,
            |note| {
                note.key(id, rec.primary_version);
                Ok(rec)
            },
            |mut rec, _| {
                rec.state = KeyState::Destroyed;
                for v in &mut rec.versions {
                    v.wrapped = None;
                    v.sealed_object = None;
                }
                rec.updated_at = self.clock.now_unix();
                self.store.update(&rec).map_err(store_err)?;
                self.keyring.forget(id);
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

/// Held for one lifecycle change; the region's lock is released first.
pub(super) struct LifecycleGuard<'a> {
    _region: crate::store::LifecycleLock,
    _node: std::sync::MutexGuard<'a, ()>,
}

/// The state a key has now, counting a passed destroy window as destroyed.
pub fn effective_state(r: &KeyRecord, now: i64) -> KeyState {
    match r.destroy_after {
        Some(t) if now >= t => KeyState::Destroyed,
        _ => r.state,
    }
}
