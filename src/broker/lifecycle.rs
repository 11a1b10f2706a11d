//! Key lifecycle (KMIP vocabulary): operators of the broker's region only.
//! Every change is durable before it returns and invalidates the KEK cache.

use super::{store_err, Broker};
use crate::error::{Error, Result};
use crate::keys::{KeyId, KeyRecord, KeyState, RevocationReason, VersionRecord};
use crate::policy::{self, CryptoOp, Grant, Principal};
use crate::region::Caller;

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
        })
    }

    /// Creates a key in this broker's region.
    pub fn create_key(&self, caller: &Caller, req: CreateKey) -> Result<KeyRecord> {
        self.admit(caller)?;
        policy::require_key_manager(caller, &self.settings.region, "create keys")?;
        check_text("name", &req.name, 128, true)?;
        check_text("tenant", &req.tenant, 128, false)?;
        check_text("description", &req.description, 1024, false)?;
        let grants = self.build_grants(req.grants)?;
        let id = KeyId::generate(&self.rng).map_err(|_| super::rng_err())?;
        let now = self.clock.now_unix();
        let rec = KeyRecord {
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
        };
        self.store.insert(&rec).map_err(store_err)?;
        tracing::info!(key = %rec.id, caller = %caller, "key created");
        Ok(rec)
    }

    /// Read-modify-write of one key under the lifecycle lock.
    fn change(
        &self,
        caller: &Caller,
        id: &KeyId,
        what: &'static str,
        f: impl FnOnce(&mut KeyRecord) -> Result<()>,
    ) -> Result<KeyRecord> {
        self.admit(caller)?;
        policy::require_key_manager(caller, &self.settings.region, what)?;
        let _g = self.lock();
        let mut rec = self.load(id)?;
        if rec.state == KeyState::Destroyed {
            return Err(Error::precondition(format!("key {id} is destroyed")));
        }
        f(&mut rec)?;
        rec.updated_at = self.clock.now_unix();
        self.store.update(&rec).map_err(store_err)?;
        self.cache.invalidate(id);
        tracing::info!(key = %id, caller = %caller, action = what, "key changed");
        Ok(rec)
    }

    /// Pre-active → active.
    pub fn activate(&self, caller: &Caller, id: &KeyId) -> Result<KeyRecord> {
        self.change(caller, id, "activate keys", |rec| {
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
        caller: &Caller,
        id: &KeyId,
        reason: RevocationReason,
        message: String,
    ) -> Result<KeyRecord> {
        check_text("revocation message", &message, 1024, false)?;
        self.change(caller, id, "revoke keys", |rec| {
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
        caller: &Caller,
        id: &KeyId,
        days: Option<u32>,
    ) -> Result<KeyRecord> {
        let days = days.unwrap_or(self.settings.default_destroy_days);
        if !(1..=3650).contains(&days) {
            return Err(Error::invalid(format!(
                "pending window of {days} days; it must be between 1 and 3650"
            )));
        }
        let at = self.clock.now_unix() + i64::from(days) * 86_400;
        self.change(caller, id, "destroy keys", |rec| {
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
    pub fn cancel_destroy(&self, caller: &Caller, id: &KeyId) -> Result<KeyRecord> {
        self.change(caller, id, "cancel key destruction", |rec| {
            if rec.destroy_after.take().is_none() {
                return Err(Error::precondition(format!(
                    "key {} is not scheduled for destruction",
                    rec.id
                )));
            }
            Ok(())
        })
    }

    /// Adds a version and makes it primary.
    pub fn rekey(&self, caller: &Caller, id: &KeyId) -> Result<KeyRecord> {
        self.change(caller, id, "rekey keys", |rec| {
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
        caller: &Caller,
        id: &KeyId,
        grants: Vec<GrantRequest>,
    ) -> Result<KeyRecord> {
        let grants = self.build_grants(grants)?;
        self.change(caller, id, "change key grants", |rec| {
            rec.grants = grants;
            Ok(())
        })
    }

    /// Attributes of one key (operators and auditors of the region).
    pub fn get_attributes(&self, caller: &Caller, id: &KeyId) -> Result<KeyRecord> {
        self.admit(caller)?;
        policy::require_reader(caller, &self.settings.region, "read key attributes")?;
        self.load(id)
    }

    /// One page of keys matching `filter`, after `page_token`.
    pub fn locate(
        &self,
        caller: &Caller,
        filter: &LocateFilter,
        page_size: usize,
        page_token: Option<&KeyId>,
    ) -> Result<(Vec<KeyRecord>, Option<KeyId>)> {
        self.admit(caller)?;
        policy::require_reader(caller, &self.settings.region, "locate keys")?;
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
            if effective_state(r, now) == KeyState::Destroyed && r.state != KeyState::Destroyed {
                *r = self.finish_destroy(&r.id)?;
            }
        }
        let next = if more {
            page.last().map(|r| r.id.clone())
        } else {
            None
        };
        Ok((page, next))
    }

    /// Erases a key's material once its window has passed. Idempotent.
    pub(super) fn finish_destroy(&self, id: &KeyId) -> Result<KeyRecord> {
        let _g = self.lock();
        let mut rec = self.get_record(id)?;
        let due = rec
            .destroy_after
            .is_some_and(|t| self.clock.now_unix() >= t);
        if rec.state == KeyState::Destroyed || !due {
            return Ok(rec);
        }
        rec.state = KeyState::Destroyed;
        for v in &mut rec.versions {
            v.wrapped = None;
        }
        rec.updated_at = self.clock.now_unix();
        self.store.update(&rec).map_err(store_err)?;
        self.cache.invalidate(id);
        tracing::warn!(key = %id, "key destroyed: its material is erased");
        Ok(rec)
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
