//! The ceiling of `sovkms bench kmip`: a TTLV echo on the very same
//! listener code (mTLS, framing, one blocking task per message) that
//! decodes each request and sends it back re-encoded. Never served by
//! `serve`.

use super::server::Handler;
use super::ttlv::{self, Limits};
use std::sync::Arc;

/// The echo handler.
pub fn echo_handler() -> Handler {
    let limits = Limits::default();
    Arc::new(
        move |_caller, bytes: &[u8]| match ttlv::decode(bytes, &limits) {
            Ok(item) => item.encode(),
            Err(_) => Vec::new(),
        },
    )
}

/// The durable ceiling: the same echo, but each request first appends a
/// record of a Get's size through the audit log's group-commit writer and
/// is answered only once its batch is synced (what "audited, then
/// released" costs on this disk, with nothing else of the broker).
pub fn durable_echo_handler(log: Arc<dyn crate::audit::AuditSink>) -> Handler {
    use crate::audit::{Event, Kind};
    let limits = Limits::default();
    Arc::new(move |caller, bytes: &[u8]| {
        let Ok(item) = ttlv::decode(bytes, &limits) else {
            return Vec::new();
        };
        let mut ev = Event::system(Kind::Request, "Get", "");
        ev.caller = caller.ok();
        ev.key_id = "k-0123456789abcdef0123456789abcdef".into();
        ev.key_version = 1;
        ev.request_id = "0123456789abcdef01234567-0".into();
        ev.protocol = "kmip";
        match log.append_ticket(ev).map(|t| t.wait()) {
            Ok(Ok(_)) => item.encode(),
            _ => Vec::new(),
        }
    })
}
