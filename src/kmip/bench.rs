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
