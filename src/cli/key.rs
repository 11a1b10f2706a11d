//! `sovkms key`: key lifecycle over gRPC.

use super::{print_json, CliError, ConnArgs};
use crate::api::proto as pb;
use crate::client::Code;
use crate::policy::CryptoOp;

/// Key commands.
#[derive(clap::Subcommand)]
pub enum KeyCmd {
    /// Create an AES-256 key in the broker's region.
    Create {
        #[command(flatten)]
        conn: ConnArgs,
        /// Name.
        #[arg(long)]
        name: String,
        /// Tenant.
        #[arg(long, default_value = "")]
        tenant: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Grant, as PRINCIPAL=op[,op...]; ops: encrypt, decrypt, generate-data-key,
        /// generate-data-key-without-plaintext, re-encrypt. Repeat for several.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Create pre-active instead of active.
        #[arg(long)]
        pre_active: bool,
    },
    /// List keys (paginated).
    List {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only this name.
        #[arg(long)]
        name: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this state: pre-active, active, deactivated, compromised, destroyed.
        #[arg(long)]
        state: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Continue after this page token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Show one key's attributes.
    Show(KeyArg),
    /// Show (and verify) the signed provenance of each version, and the
    /// key's lifecycle events from the audit chain (auditors).
    Provenance {
        #[command(flatten)]
        key: KeyArg,
        /// Verify the signatures (needs --pubkey).
        #[arg(long, requires = "pubkey")]
        verify: bool,
        /// The broker's signing public key (PEM or hex); implies --verify.
        #[arg(long)]
        pubkey: Option<std::path::PathBuf>,
    },
    /// Activate a pre-active key.
    Activate(KeyArg),
    /// Revoke a key.
    Revoke {
        #[command(flatten)]
        key: KeyArg,
        /// superseded, cessation-of-operation, affiliation-changed, key-compromise.
        #[arg(long, default_value = "cessation-of-operation")]
        reason: String,
        /// Free text.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Add a new version (encryption uses it from now on).
    Rekey(KeyArg),
    /// Schedule destruction after a pending window.
    Destroy {
        #[command(flatten)]
        key: KeyArg,
        /// Pending window in days, 1 to 3650 (default: the broker's, 30).
        #[arg(long)]
        days: Option<u32>,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Cancel a scheduled destruction.
    CancelDestroy(KeyArg),
    /// Replace a key's grants.
    Grant {
        #[command(flatten)]
        key: KeyArg,
        /// Grant, as PRINCIPAL=op[,op...]. Repeat for several; none clears all grants.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
}

/// A connection and a key.
#[derive(clap::Args)]
pub struct KeyArg {
    #[command(flatten)]
    conn: ConnArgs,
    /// Key id, or the key's name (`alias/NAME` to say it is a name).
    #[arg(value_name = "KEY")]
    key_id: String,
}

impl KeyArg {
    /// Connects and resolves the key to its id.
    async fn open(&self) -> Result<(crate::client::Client, pb::KeyRef), CliError> {
        let mut c = self.conn.connect().await?;
        let key_id = super::resolve_key(&mut c, &self.key_id).await?;
        Ok((c, pb::KeyRef { key_id }))
    }
}

fn parse_grants(allow: &[String]) -> Result<Vec<pb::Grant>, CliError> {
    allow
        .iter()
        .map(|a| {
            let (principal, ops) = a.rsplit_once('=').ok_or_else(|| {
                CliError::new(format!("grant {a:?} has no '='"), "write --allow spiffe://td/region/r/service/name=encrypt,decrypt")
            })?;
            let operations = ops
                .split(',')
                .map(|o| {
                    let op = CryptoOp::parse(o.trim()).ok_or_else(|| {
                        CliError::new(format!("unknown operation {o:?}"), "use encrypt, decrypt, generate-data-key, generate-data-key-without-plaintext, re-encrypt")
                    })?;
                    Ok(op_pb(op) as i32)
                })
                .collect::<Result<_, CliError>>()?;
            Ok(pb::Grant { principal: principal.to_owned(), operations })
        })
        .collect()
}

pub(super) fn op_pb(o: CryptoOp) -> pb::Operation {
    crate::api::convert::op_to_pb(o)
}

fn state_name(v: i32) -> &'static str {
    match pb::KeyState::try_from(v) {
        Ok(pb::KeyState::PreActive) => "pre-active",
        Ok(pb::KeyState::Active) => "active",
        Ok(pb::KeyState::Deactivated) => "deactivated",
        Ok(pb::KeyState::Compromised) => "compromised",
        Ok(pb::KeyState::Destroyed) => "destroyed",
        _ => "unspecified",
    }
}

fn op_name(v: i32) -> &'static str {
    match pb::Operation::try_from(v) {
        Ok(pb::Operation::Encrypt) => "encrypt",
        Ok(pb::Operation::Decrypt) => "decrypt",
        Ok(pb::Operation::GenerateDataKey) => "generate-data-key",
        Ok(pb::Operation::GenerateDataKeyWithoutPlaintext) => "generate-data-key-without-plaintext",
        Ok(pb::Operation::ReEncrypt) => "re-encrypt",
        Ok(pb::Operation::Export) => "export",
        Ok(pb::Operation::Manage) => "manage",
        _ => "unspecified",
    }
}

/// A key's metadata as JSON.
pub fn meta_json(m: &pb::KeyMetadata) -> serde_json::Value {
    serde_json::json!({
        "key_id": m.key_id, "name": m.name, "tenant": m.tenant, "description": m.description,
        "home_region": m.home_region, "state": state_name(m.state),
        "created_at_unix": m.created_at_unix, "updated_at_unix": m.updated_at_unix,
        "destroy_after_unix": (m.destroy_after_unix != 0).then_some(m.destroy_after_unix),
        "primary_version": m.primary_version,
        "versions": m.versions.iter().map(|v| serde_json::json!({"version": v.version, "created_at_unix": v.created_at_unix, "root_key_id": v.root_key_id})).collect::<Vec<_>>(),
        "grants": m.grants.iter().map(|g| serde_json::json!({"principal": g.principal, "operations": g.operations.iter().map(|o| op_name(*o)).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "created_by": m.created_by,
        "revocation_message": m.revocation_message,
    })
}

fn show(m: &pb::KeyMetadata, json: bool) -> Result<(), CliError> {
    if json {
        return print_json(&meta_json(m));
    }
    outln!("key        {}", m.key_id);
    outln!(
        "name       {}{}",
        m.name,
        if m.tenant.is_empty() {
            String::new()
        } else {
            format!(" (tenant {})", m.tenant)
        }
    );
    outln!("region     {}", m.home_region);
    if m.destroy_after_unix != 0 && m.state != pb::KeyState::Destroyed as i32 {
        outln!(
            "state      {}, scheduled for destruction at {} (unusable until cancelled)",
            state_name(m.state),
            rfc3339_s(m.destroy_after_unix)
        );
    } else {
        outln!("state      {}", state_name(m.state));
    }
    outln!(
        "created    {} by {}",
        rfc3339_s(m.created_at_unix),
        m.created_by
    );
    outln!("version    {} of {}", m.primary_version, m.versions.len());
    for g in &m.grants {
        let ops: Vec<_> = g.operations.iter().map(|o| op_name(*o)).collect();
        outln!("grant      {} → {}", g.principal, ops.join(", "));
    }
    Ok(())
}

/// Asks on the terminal before scheduling a destruction; refuses without
/// `--yes` when there is no terminal to ask on.
fn confirm_destroy(key_id: &str) -> Result<(), CliError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            format!("destroying key {key_id} needs confirmation"),
            "add --yes to schedule the destruction from a script",
        ));
    }
    eprint!("Schedule key {key_id} for destruction? Everything encrypted under it becomes unrecoverable when the window ends. Type the key id to confirm: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::new(format!("cannot read the confirmation: {e}"), ""))?;
    if line.trim() == key_id {
        Ok(())
    } else {
        Err(CliError::new(
            "not confirmed; nothing was scheduled",
            "type the key id exactly, or pass --yes",
        ))
    }
}

/// Unix seconds as RFC 3339 UTC, for people.
fn rfc3339_s(unix: i64) -> String {
    crate::audit::rfc3339(u64::try_from(unix).unwrap_or(0).saturating_mul(1000))
}

fn reason(s: &str) -> Result<pb::RevocationReason, CliError> {
    Ok(match s {
        "superseded" => pb::RevocationReason::Superseded,
        "cessation-of-operation" => pb::RevocationReason::CessationOfOperation,
        "affiliation-changed" => pb::RevocationReason::AffiliationChanged,
        "key-compromise" => pb::RevocationReason::KeyCompromise,
        "unspecified" => pb::RevocationReason::Unspecified,
        _ => {
            return Err(CliError::new(
                format!("unknown reason {s:?}"),
                "use superseded, cessation-of-operation, affiliation-changed or key-compromise",
            ))
        }
    })
}

fn state(s: &str) -> Result<pb::KeyState, CliError> {
    Ok(match s {
        "pre-active" => pb::KeyState::PreActive,
        "active" => pb::KeyState::Active,
        "deactivated" => pb::KeyState::Deactivated,
        "compromised" => pb::KeyState::Compromised,
        "destroyed" => pb::KeyState::Destroyed,
        _ => {
            return Err(CliError::new(
                format!("unknown state {s:?}"),
                "use pre-active, active, deactivated, compromised or destroyed",
            ))
        }
    })
}

pub async fn run(c: KeyCmd) -> Result<(), CliError> {
    match c {
        KeyCmd::Create {
            conn,
            name,
            tenant,
            description,
            allow,
            pre_active,
        } => {
            let grants = parse_grants(&allow)?;
            let mut cl = conn.connect().await?;
            let m = cl
                .create_key(pb::CreateKeyRequest {
                    name,
                    tenant,
                    description,
                    grants,
                    activate: !pre_active,
                })
                .await?;
            show(&m, super::json())
        }
        KeyCmd::List {
            conn,
            name,
            tenant,
            state: st,
            page_size,
            page_token,
        } => {
            let st = st
                .as_deref()
                .map(state)
                .transpose()?
                .map_or(0, |s| s as i32);
            let mut cl = conn.connect().await?;
            let r = cl
                .locate(pb::LocateRequest {
                    name: name.unwrap_or_default(),
                    state: st,
                    tenant: tenant.unwrap_or_default(),
                    page_size,
                    page_token,
                })
                .await?;
            if super::json() {
                return print_json(&serde_json::json!({
                    "keys": r.keys.iter().map(meta_json).collect::<Vec<_>>(),
                    "next_page_token": r.next_page_token,
                }));
            }
            outln!("{:<36} {:<12} {:<8} NAME", "KEY", "STATE", "VERSION");
            for k in &r.keys {
                outln!(
                    "{:<36} {:<12} {:<8} {}",
                    k.key_id,
                    state_name(k.state),
                    k.primary_version,
                    k.name
                );
            }
            if !r.next_page_token.is_empty() {
                outln!("(more: --page-token {})", r.next_page_token);
            }
            Ok(())
        }
        KeyCmd::Show(k) => {
            let (mut c, r) = k.open().await?;
            let m = c.get_attributes(r).await?;
            show(&m, super::json())
        }
        KeyCmd::Provenance {
            key,
            pubkey,
            verify: _,
        } => provenance(key, pubkey).await,
        KeyCmd::Activate(k) => {
            let (mut c, r) = k.open().await?;
            let m = c.activate_key(r).await?;
            show(&m, super::json())
        }
        KeyCmd::Revoke {
            key,
            reason: r,
            message,
        } => {
            let reason = reason(&r)? as i32;
            let (mut c, r) = key.open().await?;
            let req = pb::RevokeRequest {
                key_id: r.key_id,
                reason,
                message,
            };
            let m = c.revoke_key(req).await?;
            show(&m, super::json())
        }
        KeyCmd::Rekey(k) => {
            let (mut c, r) = k.open().await?;
            let m = c.rekey(r).await?;
            show(&m, super::json())
        }
        KeyCmd::Destroy { key, days, yes } => {
            if days == Some(0) {
                return Err(CliError::new(
                    "--days 0 is not a pending window",
                    "give 1 to 3650 days, or leave --days out for the broker's default",
                ));
            }
            let (mut c, r) = key.open().await?;
            if !yes {
                confirm_destroy(&r.key_id)?;
            }
            let req = pb::DestroyRequest {
                key_id: r.key_id,
                pending_window_days: days.unwrap_or(0),
            };
            let m = c.destroy_key(req).await?;
            show(&m, super::json())
        }
        KeyCmd::CancelDestroy(k) => {
            let (mut c, r) = k.open().await?;
            let m = c.cancel_destroy(r).await?;
            show(&m, super::json())
        }
        KeyCmd::Grant { key, allow } => {
            let grants = parse_grants(&allow)?;
            let (mut c, r) = key.open().await?;
            let req = pb::SetGrantsRequest {
                key_id: r.key_id,
                grants,
            };
            let m = c.set_grants(req).await?;
            show(&m, super::json())
        }
    }
}

async fn provenance(k: KeyArg, pubkey: Option<std::path::PathBuf>) -> Result<(), CliError> {
    use crate::keys::provenance::Provenance;
    let pk = match &pubkey {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| CliError::new(format!("cannot read {}: {e}", p.display()), ""))?;
            Some(crate::audit::parse_public_key(&text).map_err(|e| CliError::new(e, ""))?)
        }
        None => None,
    };
    let (mut c, r) = k.open().await?;
    let m = c.get_attributes(r).await?;
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for v in &m.versions {
        if v.provenance_json.is_empty() {
            bad.push(format!("version {} has no provenance record", v.version));
            continue;
        }
        let p: Provenance = serde_json::from_str(&v.provenance_json).map_err(|e| {
            CliError::new(
                format!("version {}: provenance does not parse: {e}", v.version),
                "",
            )
        })?;
        let verified = match &pk {
            Some(pk) => match p.verify(pk) {
                Ok(()) => Some(true),
                Err(e) => {
                    bad.push(e.to_string());
                    Some(false)
                }
            },
            None => None,
        };
        out.push((p, verified));
    }
    let events: Vec<serde_json::Value> = match c
        .export_records(pb::ExportRecordsRequest {
            key_id: m.key_id.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(mut records) => {
            let mut ev = Vec::new();
            while let Some(l) = records.next().await? {
                if let Ok(r) = serde_json::from_str::<crate::audit::Record>(&l.line) {
                    if !matches!(
                        r.operation.as_str(),
                        "encrypt"
                            | "decrypt"
                            | "generate-data-key"
                            | "generate-data-key-without-plaintext"
                            | "re-encrypt"
                            | "get-attributes"
                    ) {
                        ev.push(serde_json::json!({"seq": r.seq, "time": crate::audit::rfc3339(r.time_unix_ms), "operation": r.operation, "outcome": r.outcome, "caller": r.caller, "key_version": r.key_version}));
                    }
                }
            }
            ev
        }
        Err(e) if e.code == Code::PermissionDenied => Vec::new(),
        Err(s) => return Err(s.into()),
    };
    if super::json() {
        print_json(&serde_json::json!({
            "key_id": m.key_id,
            "versions": out.iter().map(|(p, v)| serde_json::json!({"provenance": p, "signature_verified": v})).collect::<Vec<_>>(),
            "lifecycle_events": events,
        }))?;
    } else {
        for (p, v) in &out {
            outln!("version {} of {}", p.version, p.key_id);
            outln!(
                "  created     {} by {}",
                crate::audit::rfc3339(p.created_at_unix.max(0) as u64 * 1000),
                p.creator
            );
            outln!("  region      {} (broker {})", p.region, p.broker_id);
            outln!("  root        {}: {}", p.root_kind, p.root_description);
            outln!("  root key    {}", p.root_key_id);
            outln!("  mechanism   {}", p.mechanism);
            outln!("  audit seq   {}", p.audit_seq);
            match v {
                Some(true) => outln!("  signature   verified"),
                Some(false) => outln!("  signature   DOES NOT VERIFY"),
                None => outln!("  signature   {} (pass --pubkey to verify)", p.signature),
            }
        }
        if events.is_empty() {
            outln!("lifecycle events: none readable (auditors of the region may read them)");
        } else {
            outln!("lifecycle events (audit chain):");
            for e in &events {
                outln!(
                    "  seq {:<6} {} {} {} by {}",
                    e["seq"],
                    e["time"].as_str().unwrap_or(""),
                    e["operation"].as_str().unwrap_or(""),
                    e["outcome"].as_str().unwrap_or(""),
                    e["caller"].as_str().unwrap_or("broker")
                );
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::new(
            bad.join("; "),
            "the provenance was altered or signed by another key",
        ))
    }
}
