//! Quotes for the region's auditors, and the files `tpm2_checkquote` reads.

use super::*;

/// A quote written as files for `tpm2_checkquote`.
#[derive(Debug, serde::Serialize)]
pub struct AttestReport {
    /// Directory holding the files.
    pub dir: String,
    /// `sha256:7`.
    pub pcrs: String,
    /// Quoted values (hex), in order.
    pub pcr_values: Vec<String>,
    /// The nonce (hex).
    pub nonce: String,
    /// SHA-256 of the attestation key's SubjectPublicKeyInfo (hex): what an
    /// auditor pins.
    pub ak_fingerprint: String,
    /// Milliseconds for the quote (connect, create AK, quote, read PCRs).
    pub quote_ms: f64,
    /// The command that verifies the files.
    pub verify_with: String,
}

/// The attestation files' names, shared by the CLI and the gRPC client.
pub mod files {
    /// TPMS_ATTEST.
    pub const MESSAGE: &str = "quote.msg";
    /// TPMT_SIGNATURE.
    pub const SIGNATURE: &str = "quote.sig";
    /// PCR values, concatenated in selection order.
    pub const PCRS: &str = "pcrs.bin";
    /// Attestation key, TPM2B_PUBLIC.
    pub const AK_PUBLIC: &str = "ak.pub";
    /// Attestation key, SubjectPublicKeyInfo PEM.
    pub const AK_PEM: &str = "ak.pem";
    /// Summary.
    pub const SUMMARY: &str = "attest.json";
}

/// Accepted nonce lengths for a quote, in bytes (the TPM takes up to 64).
pub const NONCE_BYTES: std::ops::RangeInclusive<usize> = 8..=64;

/// Quotes the configured PCRs with `nonce` ([`NONCE_BYTES`]).
pub fn quote(settings: &TpmSettings, nonce: &[u8]) -> Result<(Quote, f64), RootError> {
    if !NONCE_BYTES.contains(&nonce.len()) {
        return Err(RootError::new(
            RootErrorKind::Config,
            "the nonce must be 8 to 64 bytes (16 or more random bytes recommended)",
        ));
    }
    let t = Instant::now();
    let mut tpm = Tpm::connect(&settings.tcti)?;
    let q = tpm.quote(&settings.policy, nonce)?;
    Ok((q, t.elapsed().as_secs_f64() * 1e3))
}

/// The host's TPM as an [`Attestor`](crate::root::Attestor): one quote at
/// a time (a TPM without a resource manager takes one client).
pub struct TpmAttestor {
    settings: TpmSettings,
    one: std::sync::Mutex<()>,
}

impl TpmAttestor {
    /// Quotes through the TPM `settings` name.
    pub fn new(settings: TpmSettings) -> Self {
        Self {
            settings,
            one: std::sync::Mutex::new(()),
        }
    }
}

impl crate::root::Attestor for TpmAttestor {
    fn quote(&self, nonce: &[u8]) -> Result<Quote, RootError> {
        // The guarded value is `()`: a poisoned lock protects no state.
        let _one = self.one.lock().unwrap_or_else(|p| p.into_inner());
        quote(&self.settings, nonce).map(|(q, _)| q)
    }

    fn pcr_selection(&self) -> String {
        self.settings.policy.spec()
    }
}

/// Writes a quote's files into `dir` (created) and returns the summary.
pub fn write_attestation(
    dir: &Path,
    policy_spec: &str,
    nonce: &[u8],
    q: &Quote,
    quote_ms: f64,
) -> Result<AttestReport, crate::files::FileError> {
    use crate::files::FileError;
    let point = &q.ak_sec1;
    let pem = crate::root::p256_spki_pem(point);
    let fingerprint = hex::encode(digest::digest(
        &digest::SHA256,
        &crate::root::p256_spki_der(point),
    ));
    std::fs::create_dir_all(dir).map_err(|e| FileError::at(dir, e))?;
    let pcrs: Vec<u8> = q.pcr_values.concat();
    let n = hex::encode(nonce);
    let report = AttestReport {
        dir: dir.display().to_string(),
        pcrs: policy_spec.to_string(),
        pcr_values: q.pcr_values.iter().map(hex::encode).collect(),
        nonce: n.clone(),
        ak_fingerprint: fingerprint,
        quote_ms,
        verify_with: format!(
            "tpm2_checkquote -u {} -m {} -s {} -f {} -l {policy_spec} -g sha256 -q {n}",
            files::AK_PEM,
            files::MESSAGE,
            files::SIGNATURE,
            files::PCRS
        ),
    };
    let summary = serde_json::to_vec_pretty(&report)
        .map_err(|e| FileError::at(&dir.join(files::SUMMARY), e.into()))?;
    for (name, bytes) in [
        (files::MESSAGE, &q.message[..]),
        (files::SIGNATURE, &q.signature[..]),
        (files::PCRS, &pcrs[..]),
        (files::AK_PUBLIC, &q.ak_public[..]),
        (files::AK_PEM, pem.as_bytes()),
        (files::SUMMARY, &summary[..]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| FileError::at(&p, e))?;
    }
    Ok(report)
}
