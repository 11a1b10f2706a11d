//! One connection to a TPM 2.0 and the few commands sovkms uses.
//!
//! Every transient object and session is flushed before the function that
//! made it returns, on error paths too: swtpm (and a TPM reached without a
//! resource manager) has room for three objects, and a leaked handle fills
//! it for every later process.

use super::error::{tpm_err, unavailable};
use super::PcrPolicy;
use crate::root::{RootError, RootErrorKind};
use std::str::FromStr;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::{CapabilityType, PropertyTag, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Attest, AttestInfo, Auth, CapabilityData, Data, Digest, DigestValues, EccPoint, EccScheme,
    HashScheme, KeyedHashScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, Signature, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::Context;
use zeroize::Zeroizing;

/// An open TPM. Not shared between threads: open one per operation.
pub struct Tpm {
    ctx: Context,
    tcti: String,
}

/// Facts about the TPM for `sovkms tpm info` and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TpmFacts {
    /// TCG vendor id as text (e.g. `IBM`, `INTC`, `MSFT`).
    pub manufacturer: String,
    /// Vendor strings joined.
    pub vendor: String,
    /// Firmware version: TPM_PT_FIRMWARE_VERSION_1 and _2 in hex.
    pub firmware: String,
    /// PCR banks with at least one PCR allocated (e.g. `sha256`).
    pub pcr_banks: Vec<String>,
}

/// A sealed object as stored on disk: the TPM's public and private parts.
pub struct SealedParts {
    /// TPMT_PUBLIC (marshalled).
    pub public: Vec<u8>,
    /// TPM2B_PRIVATE contents (encrypted by the TPM under its storage key).
    pub private: Vec<u8>,
}

/// A quote and everything an auditor needs to check it.
pub struct Quote {
    /// TPMS_ATTEST, the signed message (`tpm2_checkquote -m`).
    pub message: Vec<u8>,
    /// TPMT_SIGNATURE (`tpm2_checkquote -s`).
    pub signature: Vec<u8>,
    /// The attestation key's public area, TPM2B_PUBLIC (`tpm2_checkquote -u`).
    pub ak_public: Vec<u8>,
    /// The attestation key's point, uncompressed SEC1 (65 bytes).
    pub ak_sec1: Vec<u8>,
    /// The quoted PCR values in selection order (`tpm2_checkquote -f`).
    pub pcr_values: Vec<Vec<u8>>,
}

fn hash_alg(bank: &str) -> Result<HashingAlgorithm, RootError> {
    match bank {
        "sha256" => Ok(HashingAlgorithm::Sha256),
        "sha384" => Ok(HashingAlgorithm::Sha384),
        "sha1" => Ok(HashingAlgorithm::Sha1),
        other => Err(RootError::new(
            RootErrorKind::Config,
            format!("tpm.pcr_bank {other:?} is not supported; use sha256, sha384 or sha1"),
        )),
    }
}

impl Tpm {
    /// Connects through a TCTI such as `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321`.
    pub fn connect(tcti: &str) -> Result<Self, RootError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|_| {
            RootError::new(
                RootErrorKind::Config,
                format!(
                    "tpm.tcti {tcti:?} is not a TCTI: use device:/dev/tpmrm0, \
                     swtpm:host=HOST,port=PORT, mssim:... or tabrmd:..."
                ),
            )
        })?;
        let ctx = Context::new(conf)
            .map_err(|e| unavailable(format!("cannot reach the TPM through {tcti}: {e}")))?;
        Ok(Self {
            ctx,
            tcti: tcti.to_string(),
        })
    }

    /// The TCTI this connection uses.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    /// `n` random bytes from the TPM's generator.
    pub fn random(&mut self, n: usize) -> Result<Zeroizing<Vec<u8>>, RootError> {
        let mut out = Zeroizing::new(Vec::with_capacity(n));
        while out.len() < n {
            let d = self
                .ctx
                .get_random(n - out.len())
                .map_err(|e| tpm_err("TPM2_GetRandom", e))?;
            if d.is_empty() {
                return Err(unavailable("TPM2_GetRandom returned no bytes".into()));
            }
            out.extend_from_slice(d.value());
        }
        Ok(out)
    }

    /// Manufacturer, firmware and PCR banks.
    pub fn facts(&mut self) -> Result<TpmFacts, RootError> {
        let (props, _) = self
            .ctx
            .get_capability(
                CapabilityType::TpmProperties,
                PropertyTag::Manufacturer.into(),
                80,
            )
            .map_err(|e| tpm_err("TPM2_GetCapability(properties)", e))?;
        let CapabilityData::TpmProperties(props) = props else {
            return Err(unavailable("TPM returned no properties".into()));
        };
        let get = |t: PropertyTag| props.find(t).map(|p| p.value()).unwrap_or(0);
        let text = |v: u32| -> String {
            v.to_be_bytes()
                .iter()
                .filter(|b| b.is_ascii_graphic() || **b == b' ')
                .map(|b| char::from(*b))
                .collect::<String>()
                .trim()
                .to_string()
        };
        let vendor = [
            PropertyTag::VendorString1,
            PropertyTag::VendorString2,
            PropertyTag::VendorString3,
            PropertyTag::VendorString4,
        ]
        .iter()
        .map(|t| text(get(*t)))
        .collect::<String>();
        let (f1, f2) = (
            get(PropertyTag::FirmwareVersion1),
            get(PropertyTag::FirmwareVersion2),
        );
        // Vendor-defined words; printed as tpm2_getcap shows them (hex).
        let firmware = format!("{f1:08x}.{f2:08x}");
        let (pcrs, _) = self
            .ctx
            .get_capability(CapabilityType::AssignedPcr, 0, 16)
            .map_err(|e| tpm_err("TPM2_GetCapability(PCRs)", e))?;
        let mut pcr_banks = Vec::new();
        if let CapabilityData::AssignedPcr(list) = pcrs {
            for sel in list.get_selections() {
                if !sel.is_empty() {
                    pcr_banks.push(format!("{:?}", sel.hashing_algorithm()).to_lowercase());
                }
            }
        }
        Ok(TpmFacts {
            manufacturer: text(get(PropertyTag::Manufacturer)),
            vendor,
            firmware,
            pcr_banks,
        })
    }

    /// Current values of the policy's PCRs, in selection order.
    pub fn pcr_values(&mut self, policy: &PcrPolicy) -> Result<Vec<Vec<u8>>, RootError> {
        let selection = policy.selection()?;
        let (_, read, digests) = self
            .ctx
            .pcr_read(selection.clone())
            .map_err(|e| tpm_err("TPM2_PCR_Read", e))?;
        if read != selection || digests.value().len() != policy.pcrs.len() {
            return Err(RootError::new(
                RootErrorKind::Config,
                format!(
                    "the TPM has no {} bank with PCRs {:?} allocated",
                    policy.bank, policy.pcrs
                ),
            ));
        }
        Ok(digests.value().iter().map(|d| d.value().to_vec()).collect())
    }

    /// Extends one PCR of the policy's bank with `digest` (tests and demos
    /// use it to simulate a changed boot state).
    pub fn extend_pcr(&mut self, bank: &str, pcr: u8, digest: &[u8]) -> Result<(), RootError> {
        let alg = hash_alg(bank)?;
        let handle = PcrHandle::try_from(u32::from(pcr))
            .map_err(|_| RootError::new(RootErrorKind::Config, format!("no PCR {pcr}")))?;
        let mut values = DigestValues::new();
        values.set(
            alg,
            Digest::try_from(digest.to_vec())
                .map_err(|_| RootError::new(RootErrorKind::Config, "bad digest size"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.pcr_extend(handle, values)
            })
            .map_err(|e| tpm_err("TPM2_PCR_Extend", e))
    }

    /// Runs `f` with the storage primary key loaded, then flushes it.
    fn with_srk<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle) -> Result<T, RootError>,
    ) -> Result<T, RootError> {
        let srk = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
            })
            .map_err(|e| tpm_err("TPM2_CreatePrimary(storage key)", e))?
            .key_handle;
        let out = f(&mut self.ctx, srk);
        flush(&mut self.ctx, srk.into());
        out
    }

    /// Policy digest of PolicyPCR(selection, H(values)) [+ PolicyAuthValue],
    /// computed by the TPM in a trial session.
    fn policy_digest(
        &mut self,
        policy: &PcrPolicy,
        values: &[Vec<u8>],
        with_auth: bool,
    ) -> Result<Digest, RootError> {
        let selection = policy.selection()?;
        let pcr_digest = policy.values_digest(values)?;
        let ctx = &mut self.ctx;
        let session = start_session(ctx, SessionType::Trial)?;
        let out = (|| {
            let ps = PolicySession::try_from(session).map_err(|e| tpm_err("policy session", e))?;
            ctx.policy_pcr(ps, pcr_digest, selection)
                .map_err(|e| tpm_err("TPM2_PolicyPCR (trial)", e))?;
            if with_auth {
                ctx.policy_auth_value(ps)
                    .map_err(|e| tpm_err("TPM2_PolicyAuthValue (trial)", e))?;
            }
            ctx.policy_get_digest(ps)
                .map_err(|e| tpm_err("TPM2_PolicyGetDigest", e))
        })();
        flush_session(ctx, session);
        out
    }

    /// Seals `secret` under the storage key with a policy on the given PCR
    /// values (the current ones when sealing, predicted ones when resealing
    /// ahead of a planned change) and an optional auth value.
    pub fn seal(
        &mut self,
        policy: &PcrPolicy,
        values: &[Vec<u8>],
        auth: Option<&[u8]>,
        secret: &[u8],
    ) -> Result<SealedParts, RootError> {
        let digest = self.policy_digest(policy, values, auth.is_some())?;
        let attrs = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_user_with_auth(false)
            .build()
            .map_err(|e| tpm_err("sealed object attributes", e))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attrs)
            .with_auth_policy(digest)
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(|e| tpm_err("sealed object template", e))?;
        let data = SensitiveData::try_from(secret.to_vec())
            .map_err(|_| RootError::new(RootErrorKind::Config, "secret too long to seal"))?;
        let auth = auth.map(tpm_auth).transpose()?;
        let created = self.with_srk(|ctx, srk| {
            ctx.execute_with_nullauth_session(|c| {
                c.create(srk, public, auth, Some(data), None, None)
            })
            .map_err(|e| tpm_err("TPM2_Create(sealed object)", e))
        })?;
        use tss_esapi::traits::Marshall;
        Ok(SealedParts {
            public: created
                .out_public
                .marshall()
                .map_err(|e| tpm_err("marshal public area", e))?,
            private: created.out_private.value().to_vec(),
        })
    }

    /// Loads a sealed object and unseals it in a policy session that
    /// replays the PCR policy against the TPM's current PCR values.
    pub fn unseal(
        &mut self,
        policy: &PcrPolicy,
        parts: &SealedParts,
        auth: Option<&[u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, RootError> {
        use tss_esapi::traits::UnMarshall;
        let bad_blob = || {
            RootError::new(
                RootErrorKind::Integrity,
                "the sealed blob is malformed (not written by sovkms tpm seal-*)",
            )
        };
        let public = Public::unmarshall(&parts.public).map_err(|_| bad_blob())?;
        let private = Private::try_from(parts.private.clone()).map_err(|_| bad_blob())?;
        let selection = policy.selection()?;
        let auth = auth.map(tpm_auth).transpose()?;
        self.with_srk(|ctx, srk| {
            let obj = ctx
                .execute_with_nullauth_session(|c| c.load(srk, private, public))
                .map_err(|e| tpm_err("TPM2_Load(sealed object)", e))?;
            let out = (|| {
                let with_auth = auth.is_some();
                if let Some(a) = auth {
                    ctx.tr_set_auth(obj.into(), a)
                        .map_err(|e| tpm_err("set auth value", e))?;
                }
                let session = start_session(ctx, SessionType::Policy)?;
                let r = (|| {
                    let ps = PolicySession::try_from(session)
                        .map_err(|e| tpm_err("policy session", e))?;
                    ctx.policy_pcr(ps, Digest::default(), selection)
                        .map_err(|e| tpm_err("TPM2_PolicyPCR", e))?;
                    if with_auth {
                        ctx.policy_auth_value(ps)
                            .map_err(|e| tpm_err("TPM2_PolicyAuthValue", e))?;
                    }
                    ctx.execute_with_session(Some(session), |c| c.unseal(obj.into()))
                        .map_err(|e| tpm_err("TPM2_Unseal", e))
                })();
                flush_session(ctx, session);
                r.map(|d| Zeroizing::new(d.value().to_vec()))
            })();
            flush(ctx, obj.into());
            out
        })
    }

    /// Quotes the policy's PCRs with `nonce` as qualifying data, signed by
    /// the attestation key: a restricted ECDSA P-256 signing key created as
    /// a primary in the owner hierarchy from a fixed template, so the same
    /// TPM always yields the same key (until its owner seed is cleared).
    pub fn quote(&mut self, policy: &PcrPolicy, nonce: &[u8]) -> Result<Quote, RootError> {
        use tss_esapi::traits::Marshall;
        let selection = policy.selection()?;
        let qualifying = Data::try_from(nonce.to_vec())
            .map_err(|_| RootError::new(RootErrorKind::Config, "nonce too long (max 64 bytes)"))?;
        let ak = self
            .ctx
            .execute_with_nullauth_session(|c| {
                c.create_primary(Hierarchy::Owner, ak_template()?, None, None, None, None)
            })
            .map_err(|e| tpm_err("TPM2_CreatePrimary(attestation key)", e))?;
        let ctx = &mut self.ctx;
        let out = (|| {
            let (attest, signature): (Attest, Signature) = ctx
                .execute_with_nullauth_session(|c| {
                    c.quote(
                        ak.key_handle,
                        qualifying,
                        SignatureScheme::EcDsa {
                            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
                        },
                        selection.clone(),
                    )
                })
                .map_err(|e| tpm_err("TPM2_Quote", e))?;
            Ok::<_, RootError>((attest, signature))
        })();
        flush(ctx, ak.key_handle.into());
        let (attest, signature) = out?;
        let values = self.pcr_values(policy)?;
        let AttestInfo::Quote { info } = attest.attested() else {
            return Err(unavailable("TPM2_Quote returned no quote".into()));
        };
        // The values are read after the quote; if a PCR moved in between,
        // the digest tells, and the caller gets an error rather than files
        // that would not verify.
        if info.pcr_digest().value() != policy.values_digest(&values)?.value() {
            return Err(unavailable(
                "a quoted PCR changed while it was being read; ask again".into(),
            ));
        }
        let tss_esapi::structures::Public::Ecc { unique, .. } = &ak.out_public else {
            return Err(unavailable("attestation key is not an ECC key".into()));
        };
        let (x, y) = (unique.x().value(), unique.y().value());
        if x.len() > 32 || y.len() > 32 {
            return Err(unavailable("attestation key is not a P-256 key".into()));
        }
        let mut ak_sec1 = vec![4u8; 65];
        ak_sec1[1..33].fill(0);
        ak_sec1[33 - x.len()..33].copy_from_slice(x);
        ak_sec1[33..65].fill(0);
        ak_sec1[65 - y.len()..].copy_from_slice(y);
        let ak_public = tss_esapi::structures::PublicBuffer::try_from(ak.out_public.clone())
            .map_err(|e| tpm_err("attestation key public area", e))?
            .marshall()
            .map_err(|e| tpm_err("marshal attestation key", e))?;
        Ok(Quote {
            message: attest.marshall().map_err(|e| tpm_err("marshal quote", e))?,
            signature: signature
                .marshall()
                .map_err(|e| tpm_err("marshal signature", e))?,
            ak_public,
            ak_sec1,
            pcr_values: values,
        })
    }

    /// Transient objects plus sessions loaded in the TPM right now (tests
    /// check that sovkms leaves none behind).
    pub fn loaded_transients(&mut self) -> Result<usize, RootError> {
        let mut n = 0;
        // Transient objects (0x80…), loaded HMAC sessions (0x02…) and policy
        // sessions (0x03…).
        for first in [0x8000_0000u32, 0x0200_0000, 0x0300_0000] {
            let (data, _) = self
                .ctx
                .get_capability(CapabilityType::Handles, first, 64)
                .map_err(|e| tpm_err("TPM2_GetCapability(handles)", e))?;
            if let CapabilityData::Handles(h) = data {
                n += h
                    .iter()
                    .filter(|t| (u32::from(**t) >> 24) == (first >> 24))
                    .count();
            }
        }
        Ok(n)
    }
}

fn tpm_auth(a: &[u8]) -> Result<Auth, RootError> {
    Auth::try_from(a.to_vec()).map_err(|_| {
        RootError::new(
            RootErrorKind::Config,
            "TPM auth value too long (max 32 bytes)",
        )
    })
}

fn start_session(ctx: &mut Context, kind: SessionType) -> Result<AuthSession, RootError> {
    ctx.start_auth_session(
        None,
        None,
        None,
        kind,
        SymmetricDefinition::AES_128_CFB,
        HashingAlgorithm::Sha256,
    )
    .map_err(|e| tpm_err("TPM2_StartAuthSession", e))?
    .ok_or_else(|| unavailable("TPM2_StartAuthSession returned no session".into()))
}

fn flush(ctx: &mut Context, h: ObjectHandle) {
    if let Err(e) = ctx.flush_context(h) {
        tracing::warn!(error = %e, "could not flush a transient TPM object");
    }
}

fn flush_session(ctx: &mut Context, s: AuthSession) {
    // A session used by a successful command with continueSession clear is
    // already gone; flushing it again fails harmlessly.
    let h: SessionHandle = s.into();
    let _ = ctx.flush_context(h.into());
}

/// Attributes both primaries share: bound to this TPM, generated inside
/// it, usable without a password, restricted, exempt from lockout.
fn primary_attributes() -> ObjectAttributesBuilder {
    ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
}

fn ecc_primary(attrs: tss_esapi::attributes::ObjectAttributes) -> PublicBuilder {
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
}

/// The storage primary key: ECC P-256 restricted decryption key with
/// AES-128-CFB, the TCG's standard SRK template, so it is re-created
/// identically from the owner seed on every start (nothing to persist).
fn srk_template() -> tss_esapi::Result<Public> {
    ecc_primary(primary_attributes().with_decrypt(true).build()?)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The attestation key: restricted ECDSA-SHA256 P-256 signing key.
fn ak_template() -> tss_esapi::Result<Public> {
    ecc_primary(primary_attributes().with_sign_encrypt(true).build()?)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(
                    tss_esapi::structures::KeyDerivationFunctionScheme::Null,
                )
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

pub(super) fn bank_alg(bank: &str) -> Result<HashingAlgorithm, RootError> {
    hash_alg(bank)
}
