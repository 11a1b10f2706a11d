//! Readiness: a real round trip through what a plaintext release needs —
//! the root of trust wraps and unwraps, the store answers a read, the audit
//! log takes a durable record — run periodically (never per probe, so a
//! prober cannot make the HSM work), with the failing component named.

use super::Broker;
use crate::keys::KeyId;
use std::sync::Mutex;
use std::time::Duration;

/// The result of the last readiness check.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// Every component passed.
    pub ready: bool,
    /// Components that failed, with why (one sentence each, no secrets).
    pub failing: Vec<(&'static str, String)>,
    /// When the check finished (unix seconds; 0: never ran).
    pub checked_at: i64,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            ready: false,
            failing: vec![(
                "broker",
                "the first readiness check has not finished".into(),
            )],
            checked_at: 0,
        }
    }
}

impl Readiness {
    /// "component: why; ..." for logs, /readyz and health details.
    pub fn summary(&self) -> String {
        if self.ready {
            return "ready".into();
        }
        self.failing
            .iter()
            .map(|(c, why)| format!("{c}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Why a component failed its readiness check (its sentence goes to
/// `/readyz` and the log).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// A root-of-trust call failed.
    #[error("wrap/unwrap round trip failed: {0}")]
    Root(crate::error::Error),
    /// The root answered, but with other material.
    #[error("unwrap returned other material than was wrapped")]
    Mismatch,
    /// The store did not answer a read.
    #[error("a read failed: {0}")]
    Store(crate::store::StoreError),
    /// The probe's key id does not parse (a constant: never in practice).
    #[error("{0}")]
    Id(crate::id::KeyIdError),
    /// The audit log did not take a durable record.
    #[error("the audit log does not take durable records: {0}")]
    Audit(crate::audit::AuditError),
}

impl Broker {
    /// Runs the deep checks (blocking: HSM, store and disk calls) and keeps
    /// the result for [`Broker::readiness`]. `at` is set to the component
    /// being checked, so a caller that gives up waiting can name it.
    pub fn check_readiness(&self, fresh: Duration, at: &Mutex<&'static str>) -> Readiness {
        let mut failing = Vec::new();
        let mut step = |name: &'static str, r: Result<(), ProbeError>| {
            *at.lock().unwrap_or_else(|p| p.into_inner()) = name;
            if let Err(why) = r {
                failing.push((name, why.to_string()));
            }
        };
        step("root_of_trust", self.probe_root());
        step("store", self.probe_store());
        step("audit", self.audit.probe(fresh).map_err(ProbeError::Audit));
        let r = Readiness {
            ready: failing.is_empty(),
            failing,
            checked_at: self.clock.now_unix(),
        };
        self.metrics.readiness(
            &crate::metrics::COMPONENTS.map(|c| (c, !r.failing.iter().any(|(f, _)| *f == c))),
        );
        self.set_readiness(r.clone());
        r
    }

    /// Records a readiness result found outside [`Broker::check_readiness`]
    /// (a check that did not finish in time).
    pub fn set_readiness(&self, r: Readiness) {
        if !r.ready {
            self.metrics.readiness(
                &crate::metrics::COMPONENTS.map(|c| (c, !r.failing.iter().any(|(f, _)| *f == c))),
            );
        }
        *self.readiness.write().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// How often the deep check runs, and how long it may take.
    pub fn readiness_schedule(&self) -> (Duration, Duration) {
        (
            self.settings.readiness_interval,
            self.settings.readiness_deadline,
        )
    }

    /// The last readiness result.
    pub fn readiness(&self) -> Readiness {
        self.readiness
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fresh material wrapped and unwrapped by the root, compared.
    fn probe_root(&self) -> Result<(), ProbeError> {
        let material = self
            .with_root(|r| r.generate_material())
            .map_err(ProbeError::Root)?;
        let wrapped = self
            .with_root(|r| r.wrap(&material))
            .map_err(ProbeError::Root)?;
        let back = self
            .with_root(|r| r.unwrap(&wrapped))
            .map_err(ProbeError::Root)?;
        // Fresh random material, discarded after: no timing to protect,
        // but compared without an early exit all the same.
        let differ = material
            .expose_secret()
            .iter()
            .zip(back.expose_secret())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if differ != 0 {
            return Err(ProbeError::Mismatch);
        }
        Ok(())
    }

    /// A read of a key id that is never created (ids made by the broker
    /// start with `k-`): the store answers, whatever the answer.
    fn probe_store(&self) -> Result<(), ProbeError> {
        let id = KeyId::parse("readiness-probe").map_err(ProbeError::Id)?;
        self.store.get(&id).map(|_| ()).map_err(ProbeError::Store)
    }
}
