//! Which PCRs a sealed secret is bound to.

use super::*;

/// Which PCRs a sealed secret is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcrPolicy {
    /// PCR bank: `sha256` (default), `sha384` or `sha1`.
    pub bank: String,
    /// PCR indices, ascending, no duplicates.
    pub pcrs: Vec<u8>,
}

/// A PCR selection that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PcrPolicyError {
    /// Not sha1, sha256 or sha384.
    #[error("PCR bank {0:?} is not supported; use sha256, sha384 or sha1")]
    Bank(String),
    /// Empty, or an index over 23.
    #[error("tpm.pcrs must list 1 to 24 PCR indices between 0 and 23")]
    Pcrs,
}

impl PcrPolicy {
    /// Validates and normalizes (sorts, dedups) a selection.
    pub fn new(bank: &str, pcrs: &[u8]) -> Result<Self, PcrPolicyError> {
        device::bank_alg(bank).map_err(|_| PcrPolicyError::Bank(bank.to_owned()))?;
        let mut p = pcrs.to_vec();
        p.sort_unstable();
        p.dedup();
        if p.is_empty() || p.iter().any(|&i| i > 23) {
            return Err(PcrPolicyError::Pcrs);
        }
        Ok(Self {
            bank: bank.to_string(),
            pcrs: p,
        })
    }

    /// As `tpm2-tools` writes it: `sha256:7,14`.
    pub fn spec(&self) -> String {
        let list: Vec<String> = self.pcrs.iter().map(|p| p.to_string()).collect();
        format!("{}:{}", self.bank, list.join(","))
    }

    pub(super) fn selection(&self) -> Result<PcrSelectionList, RootError> {
        let slots = self
            .pcrs
            .iter()
            .map(|&i| PcrSlot::try_from(1u32 << i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| error::tpm_err("PCR selection", e))?;
        PcrSelectionListBuilder::new()
            .with_selection(device::bank_alg(&self.bank)?, &slots)
            .build()
            .map_err(|e| error::tpm_err("PCR selection", e))
    }

    /// SHA-256 over the concatenated values: the `pcrDigest` of PolicyPCR
    /// (sessions here use SHA-256) and of a quote signed with ECDSA-SHA256.
    pub(super) fn values_digest(&self, values: &[Vec<u8>]) -> Result<Digest, RootError> {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for v in values {
            ctx.update(v);
        }
        Digest::try_from(ctx.finish().as_ref().to_vec())
            .map_err(|e| error::tpm_err("PCR digest", e))
    }
}
