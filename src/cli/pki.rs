//! `sovkms pki`: development certificates with sovkms SPIFFE ids.

use super::CliError;
use crate::pki::{self, Kind};
use crate::region::{Region, Role};
use std::path::PathBuf;

/// PKI commands.
#[derive(clap::Subcommand)]
pub enum PkiCmd {
    /// A self-signed CA for one region.
    Ca {
        /// Trust domain (e.g. sovkms.example).
        #[arg(long)]
        trust_domain: String,
        /// Region.
        #[arg(long)]
        region: String,
        /// Output directory (writes ca.pem, ca.key).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// A broker, service, operator or auditor certificate signed by a CA.
    Issue {
        /// CA certificate.
        #[arg(long)]
        ca_cert: PathBuf,
        /// CA key.
        #[arg(long)]
        ca_key: PathBuf,
        /// Trust domain.
        #[arg(long)]
        trust_domain: String,
        /// Region of the identity.
        #[arg(long)]
        region: String,
        /// broker, service, operator or auditor.
        #[arg(long)]
        kind: String,
        /// Name (last SPIFFE path segment).
        #[arg(long)]
        name: String,
        /// Extra DNS names (brokers).
        #[arg(long)]
        dns: Vec<String>,
        /// Output directory (writes <kind>-<name>.pem/.key, or broker.pem/.key).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 90)]
        days: u32,
    },
    /// A whole development PKI: per region a CA, a broker and one identity per role.
    Dev {
        /// Trust domain.
        #[arg(long, default_value = "sovkms.example")]
        trust_domain: String,
        /// Regions (repeat).
        #[arg(long = "region", required = true)]
        regions: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn region(s: &str) -> Result<Region, CliError> {
    Region::parse(s).map_err(|e| CliError::new(e.to_string(), "regions look like eu-central"))
}

fn pki_err(e: pki::PkiError) -> CliError {
    CliError::new(e.to_string(), "")
}

pub fn run(c: PkiCmd) -> Result<(), CliError> {
    match c {
        PkiCmd::Ca {
            trust_domain,
            region: r,
            out,
            days,
        } => {
            let ca = pki::new_ca(&trust_domain, &region(&r)?, days).map_err(pki_err)?;
            pki::write(&out, "ca", &ca).map_err(pki_err)?;
            outln!("wrote {}/ca.pem and ca.key", out.display());
        }
        PkiCmd::Issue {
            ca_cert,
            ca_key,
            trust_domain,
            region: r,
            kind,
            name,
            dns,
            out,
            days,
        } => {
            let kind = match kind.as_str() {
                "broker" => Kind::Broker,
                "service" => Kind::Caller(Role::Service),
                "operator" => Kind::Caller(Role::Operator),
                "auditor" => Kind::Caller(Role::Auditor),
                other => {
                    return Err(CliError::new(
                        format!("unknown kind {other:?}"),
                        "use broker, service, operator or auditor",
                    ))
                }
            };
            let r = region(&r)?;
            let ca_cert = pki::read(&ca_cert).map_err(pki_err)?;
            let ca_key = zeroize::Zeroizing::new(pki::read(&ca_key).map_err(pki_err)?);
            let issued = pki::issue(
                &ca_cert,
                &ca_key,
                &trust_domain,
                &r,
                kind,
                &name,
                &dns,
                days,
            )
            .map_err(pki_err)?;
            let stem = match kind {
                Kind::Broker => "broker".to_string(),
                Kind::Caller(role) => format!("{}-{name}", role.as_str()),
            };
            pki::write(&out, &stem, &issued).map_err(pki_err)?;
            outln!(
                "wrote {}/{stem}.pem and {stem}.key for {}",
                out.display(),
                pki::spiffe_id(&trust_domain, &r, kind, &name)
            );
        }
        PkiCmd::Dev {
            trust_domain,
            regions,
            out,
        } => {
            let regions = regions
                .iter()
                .map(|r| region(r))
                .collect::<Result<Vec<_>, _>>()?;
            pki::dev_pki(&out, &trust_domain, &regions, 30).map_err(pki_err)?;
            outln!("development PKI written to {}", out.display());
        }
    }
    Ok(())
}
