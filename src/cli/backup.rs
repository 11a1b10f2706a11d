//! `sovkms backup` and `sovkms restore`: a consistent snapshot of a
//! broker's store (sled: with the broker stopped; PostgreSQL: online, one
//! repeatable-read transaction), wrapped material only.

use super::CliError;
use crate::store::backup;
use std::path::PathBuf;

/// `sovkms backup`.
#[derive(clap::Args)]
pub struct BackupArgs {
    /// Broker config file (its `[store]` is read).
    #[arg(long, short)]
    config: PathBuf,
    /// The backup file to write (created; not overwritten).
    #[arg(long)]
    out: PathBuf,
}

/// `sovkms restore`.
#[derive(clap::Args)]
pub struct RestoreArgs {
    /// Broker config file of the (empty) store to restore into.
    #[arg(long, short)]
    config: PathBuf,
    /// The backup file.
    #[arg(long = "in", value_name = "FILE")]
    input: PathBuf,
}

fn open(
    config: &std::path::Path,
) -> Result<
    (
        crate::config::Settings,
        std::sync::Arc<dyn crate::store::Store>,
    ),
    CliError,
> {
    let settings = crate::config::Settings::load(config).map_err(|e| CliError::new(e, ""))?;
    let store = crate::server::open_store(&settings).map_err(|e| {
        CliError::new(
            e.to_string(),
            "a sled store is read with its broker stopped (sled holds it exclusively)",
        )
    })?;
    Ok((settings, store))
}

fn root(
    settings: &crate::config::Settings,
) -> Result<std::sync::Arc<dyn crate::root::RootOfTrust>, CliError> {
    crate::server::open_root(settings).map_err(|e| {
        CliError::new(
            e.to_string(),
            "backups are checked against the region's record key, which the root of trust opens",
        )
    })
}

pub fn backup(a: BackupArgs) -> Result<(), CliError> {
    let (settings, store) = open(&a.config)?;
    // Every record read is checked against its code on the way out.
    let store = crate::server::authenticate(store, root(&settings)?.as_ref())
        .map_err(|e| CliError::new(e.to_string(), ""))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&a.out)
        .map_err(|e| {
            CliError::new(
                format!("cannot create {}: {e}", a.out.display()),
                "choose a new file name",
            )
        })?;
    let mut w = std::io::BufWriter::new(file);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let n = backup::write(store.as_ref(), settings.broker.region.as_str(), now, &mut w).map_err(
        |e| {
            let _ = std::fs::remove_file(&a.out);
            CliError::new(e.to_string(), "no backup was written")
        },
    )?;
    w.into_inner()
        .map_err(|e| CliError::new(format!("{}: {e}", a.out.display()), ""))?
        .sync_all()
        .map_err(|e| CliError::new(format!("{}: {e}", a.out.display()), ""))?;
    outln!(
        "backup of region {}: {} keys, {} break-glass grants in {} (wrapped material only: useless without the region's root of trust)",
        settings.broker.region,
        n.keys,
        n.break_glass,
        a.out.display()
    );
    Ok(())
}

pub fn restore(a: RestoreArgs) -> Result<(), CliError> {
    let (settings, store) = open(&a.config)?;
    let path = a.input.clone();
    let open = move || -> std::io::Result<Box<dyn std::io::BufRead>> {
        Ok(Box::new(std::io::BufReader::new(std::fs::File::open(
            &path,
        )?)))
    };
    let root = root(&settings)?;
    let n = backup::restore(
        store.as_ref(),
        settings.broker.region.as_str(),
        root.as_ref(),
        &open,
    )
    .map_err(|e| CliError::new(format!("{}: {e}", a.input.display()), ""))?;
    outln!(
        "restored {} keys and {} break-glass grants into region {}",
        n.keys,
        n.break_glass,
        settings.broker.region
    );
    Ok(())
}
