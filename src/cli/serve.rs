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
    // SIGHUP: certificates, client CAs and CRLs are read again from the
    // files the config names; a bad file leaves the ones in force.
    let config = a.config.clone();
    let reloads = async {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return std::future::pending().await;
        };
        while hup.recv().await.is_some() {
            match Settings::load(&config) {
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: config not reloaded; the TLS files in force stay")
                }
                Ok(s) => match server.reload_tls(&s.tls) {
                    Ok(()) => {
                        tracing::info!("SIGHUP: TLS certificate, client CAs and CRLs reloaded")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; the ones in force stay")
                    }
                },
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
