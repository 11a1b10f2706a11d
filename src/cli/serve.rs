//! `sovkms serve`: run a broker until SIGINT/SIGTERM.

use super::CliError;
use crate::clock::SystemClock;
use crate::config::Settings;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Broker config file (TOML); see deploy/broker.example.toml.
    #[arg(long, short)]
    config: PathBuf,
}

pub async fn run(a: ServeArgs) -> Result<(), CliError> {
    // Before any key material exists in this process.
    crate::hardening::harden_process().map_err(|e| {
        CliError::new(
            format!("cannot disable core dumps and ptrace for the broker: {e}"),
            "the broker refuses to run where its memory could be dumped",
        )
    })?;
    match crate::hardening::raise_fd_limit() {
        Ok(n) => tracing::debug!(open_files = n, "file descriptor limit raised"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    let settings = Settings::load(&a.config).map_err(|e| {
        CliError::new(
            e.to_string(),
            "fix the config; deploy/broker.example.toml documents every key",
        )
    })?;
    let (broker, server) = crate::server::start(&settings, Arc::new(SystemClock))
        .await
        .map_err(|e| CliError::new(e.to_string(), "see the message; the broker did not start"))?;
    // One machine-readable line on stdout, for supervisors and tests.
    // One line: supervisors read it once and may close the pipe.
    let mut line = format!("listening on {}", server.local_addr);
    if let Some(k) = server.kmip_addr {
        line.push_str(&format!("; KMIP on {k}"));
    }
    if let Some(a) = server.admin_addr {
        line.push_str(&format!("; admin on {a}"));
    }
    outln!("{line}");
    // SIGHUP, or a change to one of the files: certificates, client CAs
    // and CRLs are read again from the files the config names; a bad file
    // leaves the ones in force.
    let config = a.config.clone();
    let reload = |why: &str| match Settings::load(&config) {
        Err(e) => {
            tracing::error!(error = %e, "{why}: config not reloaded; the TLS files in force stay")
        }
        Ok(s) => match server.reload_tls(&s.tls) {
            Ok(()) => tracing::info!("{why}: TLS certificate, client CAs and CRLs reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "{why}: TLS files not reloaded; the ones in force stay")
            }
        },
    };
    let reloads = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut seen = tls_files_state(&settings.tls);
        let mut tick = tokio::time::interval(TLS_FILES_POLL);
        loop {
            tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    reload("SIGHUP");
                    seen = tls_files_state(&settings.tls);
                }
                _ = tick.tick() => {
                    let now = tls_files_state(&settings.tls);
                    if now != seen {
                        seen = now;
                        reload("TLS files changed");
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = reloads => {}
    }
    server
        .shutdown()
        .await
        .map_err(|e| CliError::new(e.to_string(), "the server stopped with an error"))?;
    broker.close_audit();
    tracing::info!("broker stopped");
    Ok(())
}

/// How often the TLS files are checked for changes (a stat each: cheap).
const TLS_FILES_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// Size and modification time of every TLS file the config names, to see
/// a rotation without a signal.
fn tls_files_state(tls: &crate::config::TlsSettings) -> Vec<Option<(u64, std::time::SystemTime)>> {
    let mut paths = vec![&tls.cert, &tls.key];
    paths.extend(tls.client_cas.iter().map(|c| &c.cert));
    paths.extend(tls.crls.iter());
    paths
        .into_iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
