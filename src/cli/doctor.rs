//! `sovkms doctor --config FILE`: the broker host's checklist, one line per
//! check with what to do about a failure. Reads and probes; writes nothing.

use super::{print_json, CliError};
use crate::config::{RootSettings, Settings};
use std::path::Path;

/// One check's outcome.
#[derive(serde::Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
    fix: String,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        ok: true,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn fail(check: &'static str, detail: impl std::fmt::Display, fix: &str) -> Check {
    Check {
        check,
        ok: false,
        detail: detail.to_string(),
        fix: fix.to_owned(),
    }
}

/// Validity and names of the broker's certificate, and the clock against it.
fn certificate(path: &Path, out: &mut Vec<Check>) {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::*;
    let Ok(der) = rustls::pki_types::CertificateDer::from_pem_file(path) else {
        out.push(fail(
            "broker certificate",
            format!("{} holds no certificate", path.display()),
            "point [tls] cert at the broker's PEM certificate",
        ));
        return;
    };
    let Ok((_, cert)) = X509Certificate::from_der(&der) else {
        out.push(fail(
            "broker certificate",
            "the certificate does not parse",
            "reissue it",
        ));
        return;
    };
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let (from, until) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                        16 => <[u8; 16]>::try_from(*b)
                            .ok()
                            .map(|a| std::net::Ipv6Addr::from(a).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let when = |t: i64| crate::audit::rfc3339(u64::try_from(t).unwrap_or(0) * 1000);
    if now < from {
        out.push(fail(
            "clock",
            format!(
                "this host's clock ({}) is before the certificate's start ({})",
                when(now),
                when(from)
            ),
            "set the clock (NTP), or reissue the certificate",
        ));
    } else {
        out.push(ok(
            "clock",
            format!("{} (UTC), within the certificate's validity", when(now)),
        ));
    }
    if now > until {
        out.push(fail(
            "broker certificate",
            format!("expired at {}", when(until)),
            "issue a new broker certificate",
        ));
    } else if names.is_empty() {
        out.push(fail(
            "broker certificate",
            "carries no DNS name or IP address",
            "issue it with the names clients dial (SANs)",
        ));
    } else {
        out.push(ok(
            "broker certificate",
            format!(
                "valid until {}; clients may dial {}",
                when(until),
                names.join(", ")
            ),
        ));
    }
}

fn root(s: &Settings, out: &mut Vec<Check>) {
    match &s.root {
        RootSettings::Pkcs11(p) => {
            if p.module.to_string_lossy().contains("softhsm") {
                match std::env::var_os("SOFTHSM2_CONF") {
                    Some(c) if Path::new(&c).is_file() => out.push(ok(
                        "softhsm2",
                        format!("SOFTHSM2_CONF={}", Path::new(&c).display()),
                    )),
                    Some(c) => out.push(fail(
                        "softhsm2",
                        format!("SOFTHSM2_CONF={} does not exist", Path::new(&c).display()),
                        "point SOFTHSM2_CONF at the token directory's softhsm2.conf",
                    )),
                    None if Path::new("/etc/softhsm/softhsm2.conf").is_file() => {
                        out.push(ok("softhsm2", "the system's /etc/softhsm/softhsm2.conf"))
                    }
                    None => out.push(fail(
                        "softhsm2",
                        "SOFTHSM2_CONF is not set and /etc/softhsm/softhsm2.conf does not exist",
                        "set SOFTHSM2_CONF",
                    )),
                }
            }
            if !p.module.is_file() {
                out.push(fail(
                    "pkcs11 module",
                    format!("{} does not exist", p.module.display()),
                    "install the HSM's PKCS#11 library, or set [root] module",
                ));
                return;
            }
            match crate::root::pkcs11::admin::list(&p.module) {
                Err(e) => out.push(fail(
                    "pkcs11 module",
                    format!("{} does not load: {e}", p.module.display()),
                    "check the module path and the vendor library's own config",
                )),
                Ok(slots) => match slots.iter().find(|t| t.label == p.token_label) {
                    Some(t) if t.initialized => out.push(ok(
                        "token",
                        format!(
                            "'{}' ({} {} {})",
                            t.label, t.manufacturer, t.model, t.serial
                        ),
                    )),
                    Some(t) => out.push(fail(
                        "token",
                        format!("'{}' is not initialized", t.label),
                        "initialize it with the vendor's tool (SoftHSM2: sovkms hsm init-token)",
                    )),
                    None => out.push(fail(
                        "token",
                        format!(
                            "no token labelled '{}' ({} tokens seen)",
                            p.token_label,
                            slots.len()
                        ),
                        "check [root] token_label and the HSM's slot configuration",
                    )),
                },
            }
            match p.pin.read() {
                Ok(_) => out.push(ok("hsm pin", "readable")),
                Err(e) => out.push(fail(
                    "hsm pin",
                    e.message,
                    "check [root] pin_file, pin_env or pin_tpm_sealed",
                )),
            }
        }
        RootSettings::Tpm { sealed, .. } => {
            if !sealed.is_file() {
                out.push(fail(
                    "tpm root",
                    format!("{} does not exist", sealed.display()),
                    "run sovkms tpm seal-root --config …",
                ));
            } else {
                out.push(ok("tpm root", format!("sealed root {}", sealed.display())));
            }
        }
        RootSettings::Software { .. } => out.push(fail(
            "root of trust",
            "software root: DEVELOPMENT ONLY",
            "use kind = \"pkcs11\" or \"tpm\" in production",
        )),
    }
    if let Some(t) = &s.tpm {
        match crate::root::tpm::Tpm::connect(&t.tcti) {
            Ok(_) => out.push(ok("tpm", format!("reachable at {}", t.tcti))),
            Err(e) => out.push(fail(
                "tpm",
                e.message,
                "check [tpm] tcti and that the TPM (or its resource manager) is present",
            )),
        }
    }
}

/// Runs every check; fails when one fails.
pub fn run(config: &Path) -> Result<(), CliError> {
    let mut out = Vec::new();
    let s = match Settings::load(config) {
        Ok(s) => {
            out.push(ok("config", config.display().to_string()));
            Some(s)
        }
        Err(e) => {
            out.push(fail(
                "config",
                e,
                "fix the config; deploy/broker.example.toml documents every key",
            ));
            None
        }
    };
    if let Some(s) = &s {
        match crate::api::check_tls(&s.tls) {
            Ok(()) => out.push(ok("tls files", "certificate, key and client CAs load")),
            Err(e) => out.push(fail(
                "tls files",
                e,
                "check [tls] cert, key and client_ca, and that the key matches the certificate",
            )),
        }
        certificate(&s.tls.cert, &mut out);
        let loose = s.readable_secrets();
        if loose.is_empty() {
            out.push(ok(
                "permissions",
                "TLS key, PIN file and data directory are private",
            ));
        }
        for w in loose {
            out.push(fail("permissions", w, "restrict it to the broker's user"));
        }
        match std::net::TcpListener::bind(&s.listen) {
            Ok(_) => out.push(ok("listen", format!("{} is free", s.listen))),
            Err(e) => out.push(fail(
                "listen",
                format!("cannot bind {}: {e}", s.listen),
                "is a broker already running there? stop it or change listen",
            )),
        }
        root(s, &mut out);
    }
    let failed = out.iter().filter(|c| !c.ok).count();
    if super::json() {
        print_json(&serde_json::json!({ "ok": failed == 0, "checks": out }))?;
    } else {
        for c in &out {
            if c.ok {
                outln!("ok    {:<19} {}", c.check, c.detail);
            } else {
                outln!("FAIL  {:<19} {}", c.check, c.detail);
                outln!("      {:<19} → {}", "", c.fix);
            }
        }
    }
    if failed > 0 {
        return Err(CliError::new(
            format!("{failed} of {} checks failed", out.len()),
            "each FAIL line says what to do",
        ));
    }
    Ok(())
}
