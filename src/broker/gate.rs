//! The one gate. Every operation passes it, with its row of the table
//! (`policy/table.rs`): trust domain, role, the caller's region, and — once
//! the key is known — the data's region (the residency rule), the grant
//! (or an active break-glass grant) and the key's state, in that order.

use super::limits::Exceeded;
use super::{Broker, CallCtx, Note};
use crate::error::{Error, Limit, Precondition, Result};
use crate::keys::{KeyRecord, KeyState};
use crate::policy::{Operation, Reach, Refusal};
use crate::region::{check_residency, Breach, Role};

/// The key a request acts on, and in which capacity.
#[derive(Clone, Copy)]
pub(super) enum On<'a> {
    /// The key the operation names or the ciphertext was sealed under.
    Key(&'a KeyRecord),
    /// ReEncrypt's destination: sealed to, so it needs an active key.
    Destination(&'a KeyRecord),
}

impl Broker {
    /// Checks `op` for this caller; with `on`, also against that key. Call
    /// it without a key before anything is read on the caller's behalf
    /// (the residency rule comes before a ciphertext is even parsed), and
    /// again with the key once it is loaded.
    pub(super) fn gate(
        &self,
        cx: &CallCtx,
        op: Operation,
        on: Option<On<'_>>,
        note: &mut Note,
    ) -> Result<()> {
        let caller = &cx.caller;
        let here = &self.settings.region;
        let rule = op.rule();
        if caller.trust_domain != self.settings.trust_domain {
            return Err(Refusal::TrustDomain {
                caller: caller.trust_domain.clone(),
                broker: self.settings.trust_domain.clone(),
            }
            .into());
        }
        // Once per request (the first pass, before any key is read).
        if on.is_none() {
            self.limits.admit(caller).map_err(|e| match e {
                Exceeded::Caller(per_second) => Limit::CallerRate {
                    principal: caller.spiffe_id(),
                    per_second,
                },
                Exceeded::Region(per_second) => Limit::RegionRate {
                    region: caller.region.clone(),
                    per_second,
                },
            })?;
        }
        if rule.named_readers
            && self
                .settings
                .aggregate_readers
                .iter()
                .any(|p| p.matches(caller))
        {
            return Ok(());
        }
        // A service may call an operator's operation on a key it owns (the
        // row's service grant, checked once the key is known).
        let by_grant = rule
            .service_grant
            .filter(|_| caller.role == Role::Service && !rule.roles.contains(&caller.role));
        if !rule.roles.contains(&caller.role) && by_grant.is_none() {
            return Err(if rule.named_readers {
                Refusal::NotAggregateReader {
                    principal: caller.spiffe_id(),
                    region: here.clone(),
                }
            } else {
                Refusal::Role {
                    role: caller.role,
                    op,
                }
            }
            .into());
        }
        if rule.reach != Reach::Anywhere && caller.region != *here {
            return Err(if rule.named_readers {
                Refusal::NotAggregateReader {
                    principal: caller.spiffe_id(),
                    region: here.clone(),
                }
            } else {
                Refusal::OutsideRegion {
                    op,
                    caller: caller.region.clone(),
                    broker: here.clone(),
                }
            }
            .into());
        }
        if rule.creators_only && !self.settings.key_creators.iter().any(|p| p.matches(caller)) {
            return Err(Refusal::NotKeyCreator {
                principal: caller.spiffe_id(),
                region: here.clone(),
            }
            .into());
        }
        let Some(on) = on else { return Ok(()) };
        let (rec, states) = match on {
            On::Key(r) => (r, rule.states),
            On::Destination(r) => (r, Operation::Encrypt.rule().states),
        };
        if rule.reach == Reach::Resident {
            if let Err(b) = check_residency(&caller.region, here, &rec.home_region) {
                // The caller's region was checked above; what is left is data
                // (a key) of another region.
                debug_assert_eq!(b, Breach::DataElsewhere);
                return Err(Refusal::Residency {
                    op,
                    caller: caller.region.clone(),
                    data: rec.home_region.clone(),
                }
                .into());
            }
        }
        if let Some(grant) = by_grant {
            // Ownership is a grant an operator can see and withdraw; no
            // break-glass stands in for it.
            if !rec.grants.iter().any(|g| g.allows(caller, grant)) {
                return Err(Refusal::NoGrant {
                    op,
                    principal: caller.spiffe_id(),
                    key: rec.id.clone(),
                }
                .into());
            }
        }
        if let Some(grant) = rule.grant {
            if !rec.grants.iter().any(|g| g.allows(caller, grant)) {
                match self.break_glass_allowing(cx, &rec.id, grant) {
                    Some(id) => note.via = format!("allowed by break-glass grant {id}"),
                    None => {
                        return Err(Refusal::NoGrant {
                            op,
                            principal: caller.spiffe_id(),
                            key: rec.id.clone(),
                        }
                        .into())
                    }
                }
            }
            // A key scheduled for destruction does no cryptography.
            if let (Some(at), false) = (rec.destroy_after, rec.state == KeyState::Destroyed) {
                return Err(Precondition::ScheduledForDestruction {
                    key: rec.id.clone(),
                    at,
                }
                .into());
            }
        }
        if !states.contains(&rec.state) {
            return Err(state_refusal(rec, op));
        }
        Ok(())
    }
}

fn state_refusal(rec: &KeyRecord, op: Operation) -> Error {
    if op.rule().grant.is_none() && rec.state == KeyState::Destroyed {
        return Precondition::KeyDestroyed(rec.id.clone()).into();
    }
    Precondition::KeyState {
        key: rec.id.clone(),
        state: rec.state,
        op,
    }
    .into()
}

#[cfg(test)]
mod tests {
    //! Walks the whole table: every operation × role × caller region × key
    //! home region, against the rules restated here by operation name (not
    //! read from the table), so a wrong row fails.
    use super::*;
    use crate::audit::{AuditError, AuditSink, Event, Ticket};
    use crate::broker::BrokerSettings;
    use crate::policy::{CryptoOp, Grant, Principal};
    use crate::region::{Caller, Region, Role};
    use std::sync::Arc;

    struct NoAudit;
    impl AuditSink for NoAudit {
        fn append(&self, _: Event) {}
        fn append_ticket(&self, _: Event) -> std::result::Result<Ticket, AuditError> {
            Err(AuditError::Stopped)
        }
        fn close(&self) {}
    }

    fn region(s: &str) -> Region {
        Region::parse(s).unwrap()
    }

    fn broker(dir: &std::path::Path) -> Broker {
        let settings = BrokerSettings {
            region: region("eu-central"),
            broker_id: "eu-1".into(),
            trust_domain: "td".into(),
            max_plaintext_bytes: 1024,
            cache_max_entries: 10,
            cache_ttl: std::time::Duration::from_secs(60),
            default_destroy_days: 30,
            audit_path: dir.join("audit.log"),
            aggregate_min_group: 1,
            aggregate_readers: Vec::new(),
            key_creators: Vec::new(),
            exportable_creators: Vec::new(),
            break_glass_quorum: 2,
            break_glass_max_minutes: 60,
            break_glass_approval_minutes: 60,
            limits: Default::default(),
            readiness_interval: std::time::Duration::from_secs(10),
            readiness_deadline: std::time::Duration::from_secs(5),
            record_ttl: None,
        };
        let root = crate::root::software::SoftwareRoot::open_or_create(&dir.join("root")).unwrap();
        let store = crate::store::SledStore::open(&dir.join("store")).unwrap();
        Broker::new(
            settings,
            Arc::new(root),
            Arc::new(store),
            Arc::new(crate::clock::SystemClock),
            Arc::new(NoAudit),
        )
    }

    fn key(home: &str, state: KeyState, grant_to: &Caller) -> KeyRecord {
        let principal = Principal::parse(&grant_to.spiffe_id()).unwrap();
        KeyRecord {
            // Built directly: `Grant::new` would refuse the cross-region
            // grants this test needs to show the gate refuses them too.
            grants: vec![Grant {
                principal,
                operations: CryptoOp::ALL.to_vec(),
            }],
            ..KeyRecord::example("k", home, state)
        }
    }

    fn cx(region_name: &str, role: Role) -> CallCtx {
        CallCtx {
            caller: Arc::new(Caller {
                trust_domain: "td".into(),
                region: region(region_name),
                role,
                name: "x".into(),
            }),
            request_id: "r".into(),
            front: Default::default(),
        }
    }

    /// Who may call what, by name.
    fn role_allowed(op: Operation, role: Role) -> bool {
        use Operation as O;
        match op {
            O::Encrypt
            | O::Decrypt
            | O::GenerateDataKey
            | O::GenerateDataKeyWithoutPlaintext
            | O::ReEncrypt
            | O::ExportKey => role == Role::Service,
            // The test key grants its caller everything, `manage` included:
            // a service owns it.
            O::GetAttributes => true,
            O::ActivateKey
            | O::RevokeKey
            | O::ScheduleKeyDestruction
            | O::CancelKeyDestruction
            | O::Rekey
            | O::SetAttributes => role != Role::Auditor,
            // No service is a key creator in this broker's settings.
            O::CreateOwnKey => false,
            O::ListBreakGlass => role != Role::Service,
            O::GetInfo | O::Locate => true,
            O::ExportAuditRecords | O::ReadAuditAggregates | O::Attest => role == Role::Auditor,
            O::DestroyKey => false,
            _ => role == Role::Operator,
        }
    }

    #[test]
    fn every_operation_role_and_region() {
        use Operation as O;
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let regions = ["eu-central", "us-east"];
        let mut checked = 0;
        for op in Operation::ALL {
            for role in [Role::Service, Role::Operator, Role::Auditor] {
                for caller_region in regions {
                    for home in regions {
                        let c = cx(caller_region, role);
                        let rec = key(home, KeyState::Active, &c.caller);
                        let got = b.gate(&c, op, Some(On::Key(&rec)), &mut Note::default());
                        let caller_here = caller_region == "eu-central";
                        let (anywhere, resident) = match op {
                            O::Encrypt | O::GenerateDataKeyWithoutPlaintext | O::GetInfo => {
                                (true, false)
                            }
                            O::Decrypt | O::GenerateDataKey | O::ReEncrypt | O::ExportKey => {
                                (false, true)
                            }
                            _ => (false, false),
                        };
                        let want_ok = role_allowed(op, role)
                            && (anywhere || caller_here)
                            && (!resident || home == caller_region);
                        let what = format!("{op:?} {role:?} caller {caller_region} key {home}");
                        assert_eq!(got.is_ok(), want_ok, "{what}: {got:?}");
                        match got {
                            Err(Error::Refused(Refusal::Role { .. })) => {
                                assert!(!role_allowed(op, role), "{what}")
                            }
                            Err(Error::Refused(Refusal::OutsideRegion { .. })) => {
                                assert!(!caller_here && !anywhere, "{what}")
                            }
                            Err(Error::Refused(Refusal::Residency { caller, data, .. })) => {
                                assert!(resident && caller.as_str() == caller_region);
                                assert_eq!(data.as_str(), home, "{what}");
                            }
                            Err(Error::Refused(Refusal::NotAggregateReader { .. })) => {
                                assert_eq!(op, O::ReadAuditAggregates, "{what}")
                            }
                            Err(Error::Refused(Refusal::NotKeyCreator { .. })) => {
                                assert_eq!((op, role), (O::CreateOwnKey, Role::Service), "{what}")
                            }
                            Ok(()) => {}
                            other => panic!("{what}: unexpected {other:?}"),
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, Operation::ALL.len() * 3 * 2 * 2);
    }

    #[test]
    fn grants_and_states() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let svc = cx("eu-central", Role::Service);
        let other = cx("eu-central", Role::Service);
        let other = CallCtx {
            caller: Arc::new(Caller {
                name: "other".into(),
                ..(*other.caller).clone()
            }),
            ..other
        };
        let rec = key("eu-central", KeyState::Active, &svc.caller);
        let e = b
            .gate(
                &other,
                Operation::Decrypt,
                Some(On::Key(&rec)),
                &mut Note::default(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Refused(Refusal::NoGrant { .. })), "{e}");
        for (state, op, ok) in [
            (KeyState::Deactivated, Operation::Decrypt, true),
            (KeyState::Deactivated, Operation::Encrypt, false),
            (KeyState::Compromised, Operation::ReEncrypt, true),
            (KeyState::Compromised, Operation::Decrypt, false),
            (KeyState::PreActive, Operation::GenerateDataKey, false),
        ] {
            let rec = key("eu-central", state, &svc.caller);
            let r = b.gate(&svc, op, Some(On::Key(&rec)), &mut Note::default());
            assert_eq!(r.is_ok(), ok, "{state:?} {op:?}: {r:?}");
            if let Err(e) = r {
                assert!(
                    matches!(e, Error::Precondition(Precondition::KeyState { .. })),
                    "{e}"
                );
            }
        }
        // ReEncrypt's destination must be active even when the source may be compromised.
        let rec = key("eu-central", KeyState::Compromised, &svc.caller);
        assert!(b
            .gate(
                &svc,
                Operation::ReEncrypt,
                Some(On::Destination(&rec)),
                &mut Note::default()
            )
            .is_err());
        let mut scheduled = key("eu-central", KeyState::Active, &svc.caller);
        scheduled.destroy_after = Some(i64::MAX);
        let e = b
            .gate(
                &svc,
                Operation::Encrypt,
                Some(On::Key(&scheduled)),
                &mut Note::default(),
            )
            .unwrap_err();
        assert!(matches!(
            e,
            Error::Precondition(Precondition::ScheduledForDestruction { .. })
        ));
    }

    #[test]
    fn services_manage_only_keys_they_own() {
        let dir = tempfile::tempdir().unwrap();
        let b = broker(dir.path());
        let svc = cx("eu-central", Role::Service);
        let mut rec = key("eu-central", KeyState::Active, &svc.caller);
        rec.grants[0].operations = vec![CryptoOp::Encrypt, CryptoOp::Decrypt];
        for op in [
            Operation::RevokeKey,
            Operation::GetAttributes,
            Operation::SetAttributes,
            Operation::ExportKey,
        ] {
            let e = b
                .gate(&svc, op, Some(On::Key(&rec)), &mut Note::default())
                .unwrap_err();
            assert!(
                matches!(e, Error::Refused(Refusal::NoGrant { .. })),
                "{op:?}: {e}"
            );
        }
        // Grants stay with operators, owner or not.
        rec.grants[0].operations = CryptoOp::ALL.to_vec();
        let e = b
            .gate(
                &svc,
                Operation::SetGrants,
                Some(On::Key(&rec)),
                &mut Note::default(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::Refused(Refusal::Role { .. })), "{e}");
    }
}
