//! Generated gRPC types, plus the hand-written parts for messages that carry
//! plaintext or data keys: a redacted `Debug` and zeroize-on-drop.
//!
//! Residual copies in tonic's and rustls's buffers are outside our control;
//! SECURITY.md lists them.

#![allow(missing_docs, clippy::all)]

use std::fmt;

tonic::include_proto!("sovkms.v1");

/// Encoded descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sovkms_descriptor");

impl Drop for EncryptRequest {
    fn drop(&mut self) {
        crate::secret::wipe(&mut self.plaintext);
    }
}

impl fmt::Debug for EncryptRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptRequest")
            .field("key_id", &self.key_id)
            .field(
                "plaintext",
                &format_args!("[redacted; {} bytes]", self.plaintext.len()),
            )
            .field("context", &self.context)
            .finish()
    }
}

impl Drop for DecryptResponse {
    fn drop(&mut self) {
        crate::secret::wipe(&mut self.plaintext);
    }
}

impl fmt::Debug for DecryptResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptResponse")
            .field(
                "plaintext",
                &format_args!("[redacted; {} bytes]", self.plaintext.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}

impl Drop for GenerateDataKeyResponse {
    fn drop(&mut self) {
        crate::secret::wipe(&mut self.plaintext_key);
    }
}

impl fmt::Debug for GenerateDataKeyResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateDataKeyResponse")
            .field("plaintext_key", &"[redacted]")
            .field(
                "wrapped_key",
                &format_args!("{} bytes", self.wrapped_key.len()),
            )
            .field("key_id", &self.key_id)
            .field("key_version", &self.key_version)
            .finish()
    }
}
