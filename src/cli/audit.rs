//! `sovkms audit`: verify, export and aggregate the audit log offline (with
//! public keys only), or fetch records and aggregates from a broker.

use super::{print_json, CliError, ConnArgs};
use crate::api::proto as pb;
use crate::audit::{self, ExportFormat};
use std::io::{BufReader, Write};
use std::path::PathBuf;

/// Where the records are: a log file, or every broker's chain in the
/// region's database.
#[derive(clap::Args)]
pub struct Source {
    /// Exported log (JSON lines) or a stopped broker's audit.log.
    #[arg(long, conflicts_with = "database")]
    log: Option<PathBuf>,
    /// A broker config whose `[store]` is the region's PostgreSQL: every
    /// broker's chain there, one after another (read only).
    #[arg(long, value_name = "CONFIG")]
    database: Option<PathBuf>,
}

/// Audit commands.
#[derive(clap::Subcommand)]
pub enum AuditCmd {
    /// Check every link and every checkpoint signature of a log file, or
    /// of every broker's chain in the region's database.
    Verify {
        #[command(flatten)]
        source: Source,
        /// The broker's signing public key (PEM from `hsm init`/`info`, or hex).
        #[arg(long)]
        pubkey: PathBuf,
        /// Fail unless the log ends with a signed checkpoint (detects a cut-off tail).
        #[arg(long)]
        require_checkpoint: bool,
        /// A record you kept, SEQ:HASH (what verify printed last time):
        /// the log must still hold exactly that record. Repeat for several.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<audit::Anchor>,
        /// A witness file (`[audit] witness`): every checkpoint in it must
        /// be in the log.
        #[arg(long)]
        witness: Option<PathBuf>,
    },
    /// Export a log file, or the chains in the region's database, as JSON
    /// lines or RFC 5424 syslog.
    Export {
        #[command(flatten)]
        source: Source,
        /// jsonl or syslog.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// From this sequence number.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// From this time (RFC 3339, or unix milliseconds).
        #[arg(long)]
        since: Option<String>,
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fetch records from a broker (auditors of its region).
    Fetch {
        #[command(flatten)]
        conn: ConnArgs,
        /// jsonl or syslog.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// From this sequence number.
        #[arg(long, default_value_t = 0)]
        from_seq: u64,
        /// Only records about this key.
        #[arg(long)]
        key_id: Option<String>,
        /// Output file (default stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Aggregates (counts per day × key × operation × outcome; small cells
    /// suppressed) from a broker, or offline from a log file or every
    /// chain in the region's database (`--log`/`--database`).
    Aggregates {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        source: Source,
        /// Offline: cells below this count are suppressed.
        #[arg(long, default_value_t = 1)]
        min_group: u64,
    },
    /// Ask a broker for a TPM quote of its host (auditors of its region);
    /// writes files that `tpm2_checkquote` verifies.
    Attest {
        #[command(flatten)]
        conn: ConnArgs,
        /// Your nonce, hex (8 to 64 bytes), e.g. `$(openssl rand -hex 16)`.
        #[arg(long)]
        nonce: String,
        /// Directory for the files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a running broker's signing public key (PEM), as GetInfo reports it.
    FetchPubkey {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the signing public key of a broker's root of trust (PEM), from its config.
    Pubkey {
        /// Broker config.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn format(s: &str) -> Result<ExportFormat, CliError> {
    match s {
        "jsonl" => Ok(ExportFormat::JsonLines),
        "syslog" => Ok(ExportFormat::Syslog),
        _ => Err(CliError::new(
            format!("unknown format {s:?}"),
            "use jsonl or syslog",
        )),
    }
}

/// A log file with the closed segments beside it (`<log>.<first seq>`),
/// oldest first, as one chain; an export file is read alone.
fn open(p: &std::path::Path) -> Result<BufReader<audit::segments::Chain>, CliError> {
    if !p.exists() {
        return Err(CliError::new(
            format!("cannot open {}: no such file", p.display()),
            "",
        ));
    }
    audit::segments::open(p)
        .map(BufReader::new)
        .map_err(|e| CliError::new(format!("cannot open {}: {e}", p.display()), ""))
}

/// One chain's records as JSON lines.
type Chain = Box<dyn std::io::BufRead>;

/// The chains to read, by name: the log file (with its closed segments),
/// or each broker's chain in the database of a broker config.
fn chains(source: &Source) -> Result<Vec<(String, Chain)>, CliError> {
    let Source { log, database } = source;
    if let Some(p) = log {
        return Ok(vec![(p.display().to_string(), Box::new(open(p)?))]);
    }
    let Some(config) = database else {
        return Err(CliError::new("give --log or --database", ""));
    };
    let settings = crate::config::Settings::load(config).map_err(|e| CliError::new(e, ""))?;
    let crate::config::StoreSettings::Postgres(pg) = settings.store else {
        return Err(CliError::new(
            format!("{}: its [store] is not PostgreSQL", config.display()),
            "give a sled broker's audit log with --log",
        ));
    };
    let store = std::sync::Arc::new(
        crate::store::PgStore::open_for_reading(pg)
            .map_err(|e| CliError::new(format!("the database: {e}"), ""))?,
    );
    let table: std::sync::Arc<dyn audit::table::ChainTable> = store;
    let brokers = table
        .brokers()
        .map_err(|e| CliError::new(format!("the database: {e}"), ""))?;
    if brokers.is_empty() {
        return Err(CliError::new("the database holds no audit chain", ""));
    }
    Ok(brokers
        .into_iter()
        .map(|b| {
            let r = audit::table::ChainReader::new(std::sync::Arc::clone(&table), &b, 0);
            let chain: Box<dyn std::io::BufRead> = Box::new(BufReader::new(r));
            (format!("broker {b}"), chain)
        })
        .collect())
}

/// A failed write of records: a closed pipe (`| head`) ends quietly, as
/// standard tools do; anything else is an error.
fn write_err(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    CliError::new(format!("cannot write the records: {e}"), "")
}

fn out(p: &Option<PathBuf>) -> Result<Box<dyn Write>, CliError> {
    Ok(match p {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| CliError::new(format!("cannot create {}: {e}", p.display()), ""))?,
        ),
        None => Box::new(std::io::stdout()),
    })
}

fn since_ms(s: &Option<String>) -> Result<u64, CliError> {
    let Some(s) = s else { return Ok(0) };
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            CliError::new(
                format!("--since {s:?}: {e}"),
                "use RFC 3339 (2026-11-22T00:00:00Z) or unix milliseconds",
            )
        })?;
    Ok((t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
}

pub async fn run(c: AuditCmd) -> Result<(), CliError> {
    match c {
        AuditCmd::Verify {
            source,
            pubkey,
            require_checkpoint,
            mut anchors,
            witness,
        } => {
            if let Some(w) = &witness {
                anchors.extend(
                    audit::witness_anchors(w)
                        .map_err(|e| CliError::new(format!("witness {}: {e}", w.display()), ""))?,
                );
            }
            let pk_text = std::fs::read_to_string(&pubkey)
                .map_err(|e| CliError::new(format!("cannot read {}: {e}", pubkey.display()), ""))?;
            let pk = audit::parse_public_key(&pk_text)
                .map_err(|e| CliError::new(e, "pass the PEM `sovkms hsm init` printed"))?;
            let chains = chains(&source)?;
            if chains.len() > 1 && !anchors.is_empty() {
                return Err(CliError::new(
                    "anchors and witnesses belong to one broker's chain",
                    "export that broker's chain (`sovkms audit fetch` from it) and verify the file with --log",
                ));
            }
            let several = source.database.is_some();
            let mut reports = Vec::new();
            for (name, chain) in chains {
                match audit::verify_anchored(chain, &pk, require_checkpoint, &anchors) {
                    Ok(rep) => reports.push((name, rep)),
                    Err(f) => {
                        if super::json() {
                            print_json(
                                &serde_json::json!({"ok": false, "chain": name, "line": f.line, "seq": f.seq, "why": f.why}),
                            )?;
                        }
                        let hint = if f.why.contains("anchor") {
                            "the log no longer holds a record that was kept outside it: it was rewritten or cut after that record"
                        } else if f.why.contains("does not end with a signed checkpoint") {
                            "a running broker signs checkpoints as it goes and at shutdown: wait for its next checkpoint or stop it; otherwise the tail was cut off"
                        } else {
                            "the log was altered, truncated or signed by another key"
                        };
                        let msg = if several {
                            format!("{name}: {f}")
                        } else {
                            f.to_string()
                        };
                        return Err(CliError::new(msg, hint));
                    }
                }
            }
            if super::json() {
                let all: Vec<_> = reports
                    .iter()
                    .map(|(n, r)| serde_json::json!({"chain": n, "report": r}))
                    .collect();
                return match (several, reports.first()) {
                    (false, Some((_, rep))) => {
                        print_json(&serde_json::json!({"ok": true, "report": rep}))
                    }
                    _ => print_json(&serde_json::json!({"ok": true, "chains": all})),
                };
            }
            for (name, rep) in &reports {
                let who = if several {
                    format!("{name}: ")
                } else {
                    String::new()
                };
                outln!(
                    "{who}OK: {} records, {} signed checkpoints; last sequence {}, signed up to {}",
                    rep.records,
                    rep.checkpoints,
                    rep.last_seq,
                    rep.last_checkpoint_head
                );
                if !anchors.is_empty() {
                    outln!("every anchor given ({}) is in the log", anchors.len());
                }
                outln!(
                    "{who}keep this head to check the next export: --anchor {}:{}",
                    rep.last_seq,
                    rep.last_hash
                );
            }
            Ok(())
        }
        AuditCmd::Export {
            source,
            format: f,
            from_seq,
            since,
            out: o,
        } => {
            let mut w = out(&o)?;
            let mut n = 0;
            for (name, chain) in chains(&source)? {
                n += audit::export(chain, &mut *w, format(&f)?, from_seq, since_ms(&since)?)
                    .map_err(|e| match e {
                        audit::ReadError::Write(w) => write_err(w),
                        other => CliError::new(format!("{name}: {other}"), ""),
                    })?;
            }
            eprintln!("{n} records exported");
            Ok(())
        }
        AuditCmd::Fetch {
            conn,
            format: f,
            from_seq,
            key_id,
            out: o,
        } => {
            let mut c = conn.connect().await?;
            let mut stream = c
                .export_records(pb::ExportRecordsRequest {
                    from_seq,
                    since_unix_ms: 0,
                    key_id: key_id.unwrap_or_default(),
                    format: f,
                })
                .await?;
            let mut w = out(&o)?;
            let mut n = 0;
            while let Some(line) = stream.next().await? {
                writeln!(w, "{}", line.line).map_err(write_err)?;
                n += 1;
            }
            eprintln!("{n} records fetched");
            Ok(())
        }
        AuditCmd::Aggregates {
            conn,
            source,
            min_group,
        } => {
            let r = if source.log.is_some() || source.database.is_some() {
                let mut agg = audit::Aggregator::default();
                for (name, chain) in chains(&source)? {
                    for line in audit::complete_lines(chain) {
                        let line = line.map_err(|e| CliError::new(format!("{name}: {e}"), ""))?;
                        let rec = serde_json::from_str(&line).map_err(|e| {
                            CliError::new(
                                format!("{name}: a record does not parse: {e}"),
                                "run `sovkms audit verify`",
                            )
                        })?;
                        agg.add(rec);
                    }
                }
                pb::AggregatesResponse {
                    cells: agg
                        .rows(0, u64::MAX, min_group.max(1))
                        .into_iter()
                        .map(|r| pb::AggregateCell {
                            day: r.day,
                            key_id: r.key_id,
                            operation: r.operation,
                            outcome: r.outcome,
                            count: r.count,
                        })
                        .collect(),
                    min_group_size: min_group.max(1),
                }
            } else {
                let mut c = conn.connect().await?;
                c.aggregates(pb::AggregatesRequest::default()).await?
            };
            if super::json() {
                return print_json(&serde_json::json!({
                    "min_group_size": r.min_group_size,
                    "cells": r.cells.iter().map(|c| serde_json::json!({
                        "day": c.day, "key_id": c.key_id, "operation": c.operation, "outcome": c.outcome, "count": c.count,
                    })).collect::<Vec<_>>(),
                }));
            }
            outln!(
                "{:<10} {:<36} {:<36} {:<8} COUNT (cells < {} suppressed)",
                "DAY",
                "KEY",
                "OPERATION",
                "OUTCOME",
                r.min_group_size
            );
            for c in &r.cells {
                outln!(
                    "{:<10} {:<36} {:<36} {:<8} {}",
                    c.day,
                    c.key_id,
                    c.operation,
                    c.outcome,
                    c.count
                );
            }
            Ok(())
        }
        AuditCmd::Attest { conn, nonce, out } => {
            let nonce = hex::decode(nonce.trim()).map_err(|_| {
                CliError::new("--nonce is not hex", "e.g. --nonce $(openssl rand -hex 16)")
            })?;
            let mut c = conn.connect().await?;
            let t = std::time::Instant::now();
            let r = c
                .attest(pb::AttestRequest {
                    nonce: nonce.clone(),
                })
                .await?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let width = match r.pcr_selection.split(':').next() {
                Some("sha384") => 48,
                Some("sha1") => 20,
                _ => 32,
            };
            let q = crate::root::tpm::Quote {
                message: r.quote_message,
                signature: r.quote_signature,
                ak_public: r.ak_public,
                ak_sec1: audit::parse_public_key(&r.ak_public_pem)
                    .map_err(|e| CliError::new(format!("attestation key: {e}"), ""))?,
                pcr_values: r.pcr_values.chunks(width).map(<[u8]>::to_vec).collect(),
            };
            let rep = crate::root::tpm::write_attestation(&out, &r.pcr_selection, &nonce, &q, ms)
                .map_err(|e| CliError::new(e, ""))?;
            super::tpm::print_attestation(&rep, super::json())
        }
        AuditCmd::FetchPubkey { conn } => {
            let mut c = conn.connect().await?;
            let i = c.info(pb::GetInfoRequest {}).await?;
            if i.signing_public_key_pem.is_empty() {
                return Err(CliError::new(
                    "the broker reported no signing key",
                    "is its root of trust provisioned?",
                ));
            }
            out!("{}", i.signing_public_key_pem);
            Ok(())
        }
        AuditCmd::Pubkey { config } => {
            let s = crate::config::Settings::load(&config)
                .map_err(|e| CliError::new(e.to_string(), "fix the config"))?;
            let root =
                crate::server::open_root(&s).map_err(|e| CliError::new(e.to_string(), ""))?;
            let point = root
                .signing_public_key()
                .map_err(|e| CliError::new(e.message, ""))?;
            out!("{}", crate::root::p256_spki_pem(&point));
            Ok(())
        }
    }
}
