//! Limits per caller and per caller region, and the coalescing of repeated
//! refusals, so that another region (or one busy identity) can neither
//! starve the region's own services nor fill the audit log's disk with
//! refusal records.

use crate::region::{Caller, Region};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Configured limits (0 is never valid: config refuses it).
#[derive(Clone, Debug)]
pub struct LimitSettings {
    /// Requests per second one identity may make (burst: one second's worth).
    pub per_caller: u32,
    /// Requests per second all identities of one region may make together
    /// (a region's CA: the central plane or another region as a whole).
    pub per_region: u32,
    /// Refusals per second of one identity recorded one by one; beyond, they
    /// are counted and recorded as one summary record per second.
    pub refusal_records_per_caller: u32,
    /// Established connections at once; beyond, new ones are closed.
    pub connections: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            per_caller: 20_000,
            per_region: 50_000,
            refusal_records_per_caller: 20,
            connections: 4096,
        }
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One identity's refusal records in the current second.
struct Window {
    start: Instant,
    recorded: u32,
    suppressed: u64,
}

/// What to do with a refusal's audit record.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RefusalRecord {
    /// Write it.
    Write,
    /// Count it instead; a summary record says how many.
    Suppress,
}

/// Refusals counted and not recorded one by one, per identity.
pub(super) struct Suppressed {
    pub caller: Caller,
    pub count: u64,
}

/// Above this many tracked identities the maps start over: they hold
/// counters only, and an attacker minting identities cannot grow them.
const MAX_TRACKED: usize = 100_000;

/// The limiter.
pub(super) struct Limiter {
    settings: LimitSettings,
    callers: Mutex<HashMap<Caller, Bucket>>,
    regions: Mutex<HashMap<Region, Bucket>>,
    refusals: Mutex<HashMap<Caller, Window>>,
}

// The maps hold counters only: a poisoned lock leaves them usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which limit a request exceeded.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Exceeded {
    /// The identity's own.
    Caller(u32),
    /// Its region's, all identities together.
    Region(u32),
}

impl Limiter {
    pub(super) fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            callers: Mutex::default(),
            regions: Mutex::default(),
            refusals: Mutex::default(),
        }
    }

    /// Takes one request's token from the caller's and its region's bucket.
    pub(super) fn admit(&self, caller: &Caller) -> Result<(), Exceeded> {
        let now = Instant::now();
        let s = &self.settings;
        {
            let mut m = lock(&self.regions);
            if m.len() >= MAX_TRACKED {
                m.clear();
            }
            // Looked up before inserting: no key is cloned per request.
            let b = match m.get_mut(&caller.region) {
                Some(b) => b,
                None => m.entry(caller.region.clone()).or_insert(Bucket {
                    tokens: f64::from(s.per_region),
                    last: now,
                }),
            };
            if !b.take(s.per_region, now) {
                return Err(Exceeded::Region(s.per_region));
            }
        }
        let mut m = lock(&self.callers);
        if m.len() >= MAX_TRACKED {
            m.clear();
        }
        let b = match m.get_mut(caller) {
            Some(b) => b,
            None => m.entry(caller.clone()).or_insert(Bucket {
                tokens: f64::from(s.per_caller),
                last: now,
            }),
        };
        if b.take(s.per_caller, now) {
            Ok(())
        } else {
            Err(Exceeded::Caller(s.per_caller))
        }
    }

    /// Whether this refusal gets its own record, and the summary of the
    /// caller's previous second when it had suppressed refusals.
    pub(super) fn refusal(&self, caller: &Caller) -> (RefusalRecord, Option<Suppressed>) {
        let now = Instant::now();
        let mut m = lock(&self.refusals);
        if m.len() >= MAX_TRACKED {
            m.clear();
        }
        let w = m.entry(caller.clone()).or_insert(Window {
            start: now,
            recorded: 0,
            suppressed: 0,
        });
        let mut summary = None;
        if now.duration_since(w.start) >= Duration::from_secs(1) {
            if w.suppressed > 0 {
                summary = Some(Suppressed {
                    caller: caller.clone(),
                    count: w.suppressed,
                });
            }
            *w = Window {
                start: now,
                recorded: 0,
                suppressed: 0,
            };
        }
        if w.recorded < self.settings.refusal_records_per_caller {
            w.recorded += 1;
            (RefusalRecord::Write, summary)
        } else {
            w.suppressed += 1;
            (RefusalRecord::Suppress, summary)
        }
    }

    /// Summaries of every second that has ended with suppressed refusals
    /// (called periodically, so a flood that stops is still accounted for).
    pub(super) fn ended_windows(&self) -> Vec<Suppressed> {
        let now = Instant::now();
        let mut m = lock(&self.refusals);
        let mut out = Vec::new();
        m.retain(|caller, w| {
            if now.duration_since(w.start) < Duration::from_secs(1) {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed {
                    caller: caller.clone(),
                    count: w.suppressed,
                });
            }
            false
        });
        out
    }

    /// The refusal-record budget (for the summary's sentence).
    pub(super) fn refusal_budget(&self) -> u32 {
        self.settings.refusal_records_per_caller
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(region: &str, name: &str) -> Caller {
        Caller::parse_spiffe(&format!("spiffe://td/region/{region}/service/{name}")).unwrap()
    }

    #[test]
    fn buckets_per_caller_and_per_region() {
        let l = Limiter::new(LimitSettings {
            per_caller: 5,
            per_region: 8,
            refusal_records_per_caller: 2,
            ..Default::default()
        });
        let (a, b) = (caller("us-east", "a"), caller("us-east", "b"));
        for _ in 0..5 {
            assert!(l.admit(&a).is_ok());
        }
        assert_eq!(l.admit(&a), Err(Exceeded::Caller(5)));
        for _ in 0..2 {
            assert!(l.admit(&b).is_ok());
        }
        // a's refused request took a region token too: the region's 8 are spent.
        assert_eq!(l.admit(&b), Err(Exceeded::Region(8)));
        assert!(l.admit(&caller("eu-central", "c")).is_ok());
    }

    #[test]
    fn refusals_beyond_the_budget_are_counted() {
        let l = Limiter::new(LimitSettings {
            per_caller: 100,
            per_region: 100,
            refusal_records_per_caller: 2,
            ..Default::default()
        });
        let a = caller("us-east", "a");
        let got: Vec<_> = (0..5).map(|_| l.refusal(&a).0).collect();
        assert_eq!(got[..2], [RefusalRecord::Write, RefusalRecord::Write]);
        assert!(got[2..].iter().all(|r| *r == RefusalRecord::Suppress));
        assert!(l.ended_windows().is_empty(), "the second is not over");
    }
}
