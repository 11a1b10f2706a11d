//! Wall-clock time for lifecycle decisions (destroy windows), behind a trait
//! so tests can move time instead of waiting days.

use std::sync::atomic::{AtomicI64, Ordering};

/// Current time in unix seconds.
pub trait Clock: Send + Sync {
    /// Seconds since the unix epoch.
    fn now_unix(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

/// A clock that tests move by hand. Never used by `sovkms serve`.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// Starts at the system time.
    pub fn new() -> Self {
        Self(AtomicI64::new(SystemClock.now_unix()))
    }

    /// The current reading (same as `now_unix`, without importing the trait).
    pub fn now_unix_for_tests(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Moves time forward.
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
