//! Brokers sharing a store: what another broker commits reaches this one's
//! caches by push (the store's change notifications) and, whatever is
//! lost, within the staleness bound (records are read again once older;
//! break-glass grants are reloaded twice per bound, and dropped when they
//! cannot be confirmed for longer).

use crate::keys::Keyring;
use crate::policy::breakglass::BreakGlass;
use crate::store::{Change, Store};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Subscribes this broker's caches to the store's changes.
pub(super) fn follow(
    store: &Arc<dyn Store>,
    keyring: &Arc<Keyring>,
    break_glass: &Arc<RwLock<Vec<BreakGlass>>>,
    bound: Duration,
) {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let ring = Arc::downgrade(keyring);
    store.on_change(Box::new(move |change| {
        let Some(ring) = ring.upgrade() else { return };
        match change {
            Change::Key(id) => ring.forget(&id),
            Change::BreakGlass => {
                let _ = tx.send(());
            }
            Change::All => {
                ring.forget_all();
                let _ = tx.send(());
            }
        }
    }));
    let store = Arc::downgrade(store);
    let grants = Arc::downgrade(break_glass);
    let spawned = std::thread::Builder::new()
        .name("sovkms-follow".into())
        .spawn(move || {
            let mut confirmed = Instant::now();
            loop {
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    rx.recv_timeout(bound / 2)
                {
                    return;
                }
                let (Some(store), Some(grants)) = (store.upgrade(), grants.upgrade()) else {
                    return;
                };
                match store.list_break_glass() {
                    Ok(all) => {
                        *grants.write().unwrap_or_else(|p| p.into_inner()) = all;
                        confirmed = Instant::now();
                    }
                    Err(e) if confirmed.elapsed() >= bound => {
                        tracing::error!(error = %e, "break-glass grants cannot be confirmed within the staleness bound: none are honoured until they can");
                        grants.write().unwrap_or_else(|p| p.into_inner()).clear();
                    }
                    Err(e) => tracing::warn!(error = %e, "break-glass grants not reloaded"),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "change follower not started: changes by other brokers reach this one only through the record bound");
    }
}
