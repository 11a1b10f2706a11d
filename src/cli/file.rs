//! `sovkms file encrypt|decrypt|inspect`: files of any size sealed locally
//! under a data key the broker generates (one GenerateDataKey per file) and
//! unwraps (one Decrypt per file, in the key's home region only), in
//! constant memory; the plaintext never travels to the broker.

use super::{print_json, CliError, ConnArgs};
use crate::api::proto as pb;
use crate::file::{self, FileError, Header};
use crate::secret::KeyMaterial;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroize;

/// `sovkms file …`.
#[derive(clap::Subcommand)]
pub enum FileCmd {
    /// Encrypt a file (or stdin) under a new data key of KEY.
    Encrypt(EncryptArgs),
    /// Decrypt a file (or stdin) at a broker of the file's region.
    Decrypt(DecryptArgs),
    /// Print a file's header (region, key, format, segments); no broker.
    Inspect {
        /// The encrypted file; `-` or absent for stdin.
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
}

/// Input, output and context of `file encrypt|decrypt`.
#[derive(clap::Args)]
pub struct FileIo {
    /// Input file; `-` or absent for stdin.
    #[arg(long = "in")]
    input: Option<PathBuf>,
    /// Output file (written to a temporary file, synced, then renamed:
    /// never half a file); `-` or absent for stdout.
    #[arg(long = "out")]
    output: Option<PathBuf>,
    /// Encryption context entry KEY=VALUE (repeat); decrypt needs the same.
    #[arg(long = "context")]
    context: Vec<String>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Threads sealing or opening segments (default: the cores, at most 4).
    #[arg(long)]
    threads: Option<usize>,
}

impl FileIo {
    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(file::default_threads).max(1)
    }
}

/// Arguments of `file encrypt`.
#[derive(clap::Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Key id, or the key's name (`alias/NAME` to say it is a name).
    #[arg(long = "key", alias = "key-id", value_name = "KEY")]
    key_id: String,
    #[command(flatten)]
    io: FileIo,
}

/// Arguments of `file decrypt`.
#[derive(clap::Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    io: FileIo,
}

pub async fn run(c: FileCmd) -> Result<(), CliError> {
    match c {
        FileCmd::Encrypt(a) => encrypt(a).await,
        FileCmd::Decrypt(a) => decrypt(a).await,
        FileCmd::Inspect { input } => inspect(input.as_deref()),
    }
}

fn is_stdio(p: Option<&Path>) -> bool {
    p.is_none_or(|p| p.as_os_str() == "-")
}

fn open_input(p: Option<&Path>) -> Result<(Box<dyn Read + Send>, Option<u64>), CliError> {
    match p {
        Some(path) if !is_stdio(Some(path)) => {
            let f = std::fs::File::open(path)
                .map_err(|e| CliError::new(format!("cannot open {}: {e}", path.display()), ""))?;
            let len = f.metadata().ok().map(|m| m.len());
            Ok((Box::new(f), len))
        }
        _ => Ok((Box::new(std::io::stdin()), None)),
    }
}

/// Where the output goes: a temporary file beside the target, renamed over
/// it only when everything was written and synced (dropped: removed), or
/// stdout.
enum Output {
    File(tempfile::NamedTempFile, PathBuf),
    Stdout,
}

impl Output {
    fn create(p: Option<&Path>) -> Result<Self, CliError> {
        use std::os::unix::fs::PermissionsExt;
        let Some(path) = p.filter(|p| !is_stdio(Some(p))) else {
            return Ok(Self::Stdout);
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".sovkms-")
            .suffix(".part")
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)
            .map_err(|e| {
                CliError::new(
                    format!("cannot create a file in {}: {e}", dir.display()),
                    "",
                )
            })?;
        Ok(Self::File(tmp, path.to_owned()))
    }

    fn writer(&mut self) -> Box<dyn Write + '_> {
        match self {
            Self::File(tmp, _) => Box::new(BufWriter::with_capacity(1 << 20, tmp.as_file_mut())),
            Self::Stdout => Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock())),
        }
    }

    /// Syncs and renames the file into place (stdout: nothing to do).
    fn finish(self) -> Result<(), CliError> {
        let Self::File(tmp, path) = self else {
            return Ok(());
        };
        let io =
            |e: std::io::Error| CliError::new(format!("cannot write {}: {e}", path.display()), "");
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// A progress bar on stderr when it is a terminal and neither --quiet nor
/// --json was given; hidden otherwise.
fn progress(quiet: bool, total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if quiet || super::json() || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::no_length(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Runs `work` (a seal or an open) into the output `io` names, with a
/// progress bar when wanted, off the async runtime; the output file takes
/// its place only once everything was written and synced.
fn stream(
    io: &FileIo,
    len: Option<u64>,
    what: &str,
    work: impl FnOnce(&mut Box<dyn Write + '_>, file::Progress<'_>, usize) -> Result<u64, FileError>,
) -> Result<u64, CliError> {
    let mut out = Output::create(io.output.as_deref())?;
    let bar = progress(io.quiet, len, what);
    let total = tokio::task::block_in_place(|| {
        let mut w = out.writer();
        let n = work(&mut w, &mut |done| bar.set_position(done), io.threads())?;
        w.flush()?;
        Ok::<_, FileError>(n)
    })
    .map_err(file_err)?;
    bar.finish_and_clear();
    out.finish()?;
    Ok(total)
}

fn file_err(e: FileError) -> CliError {
    let hint = match e {
        FileError::NotAFile | FileError::Version(_) => {
            "is this a file `sovkms file encrypt` wrote?"
        }
        FileError::Io(_) => "",
        _ => "no plaintext was kept: the output file was not created",
    };
    CliError::new(e, hint)
}

async fn encrypt(a: EncryptArgs) -> Result<(), CliError> {
    let ctx = super::crypto::context(&a.io.context)?;
    let (mut input, len) = open_input(a.io.input.as_deref())?;
    if is_stdio(a.io.output.as_deref()) {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            return Err(CliError::new(
                "refusing to write an encrypted file to a terminal",
                "use --out FILE or a pipe",
            ));
        }
    }
    let mut c = a.conn.connect().await?;
    let key_id = super::resolve_key(&mut c, &a.key_id).await?;
    let mut r = c
        .generate_data_key(pb::GenerateDataKeyRequest {
            key_id,
            context: ctx,
        })
        .await?;
    let data_key = KeyMaterial::from_slice(&r.plaintext_key);
    r.plaintext_key.zeroize();
    let data_key =
        data_key.ok_or_else(|| CliError::new("the broker's data key is not 32 bytes", ""))?;
    let env = crate::envelope::Envelope::parse(&r.wrapped_key)
        .map_err(|e| CliError::new(format!("the broker's wrapped key: {e}"), ""))?;
    let header = Header::new(
        env.header.region.as_str(),
        env.header.key_id.as_str(),
        r.wrapped_key.clone(),
    )
    .map_err(file_err)?;
    let total = stream(&a.io, len, "encrypting", |w, progress, threads| {
        file::seal(
            &header,
            &data_key,
            &mut BufReader::with_capacity(1 << 20, &mut input),
            w,
            progress,
            threads,
        )
    })?;
    if super::json() {
        return print_json(&serde_json::json!({
            "region": header.region, "key_id": header.key_id,
            "key_version": env.header.key_version, "bytes": total,
        }));
    }
    if !is_stdio(a.io.output.as_deref()) && !a.io.quiet {
        eprintln!(
            "encrypted {total} bytes under a data key of {} version {} (region {})",
            header.key_id, env.header.key_version, header.region
        );
    }
    Ok(())
}

async fn decrypt(a: DecryptArgs) -> Result<(), CliError> {
    let ctx = super::crypto::context(&a.io.context)?;
    let (input, len) = open_input(a.io.input.as_deref())?;
    let mut input = BufReader::with_capacity(1 << 20, input);
    let header = Header::read(&mut input).map_err(file_err)?;
    let mut c = a.conn.connect().await?;
    let mut r = c
        .decrypt(pb::DecryptRequest {
            ciphertext: header.wrapped_key.clone(),
            context: ctx,
        })
        .await?;
    let data_key = KeyMaterial::from_slice(&r.plaintext);
    r.plaintext.zeroize();
    let data_key =
        data_key.ok_or_else(|| CliError::new("the wrapped data key is not 32 bytes", ""))?;
    let total = stream(&a.io, len, "decrypting", |w, progress, threads| {
        file::open(&header, &data_key, &mut input, w, progress, threads)
    })?;
    if super::json() {
        return print_json(&serde_json::json!({
            "region": header.region, "key_id": header.key_id, "bytes": total,
        }));
    }
    Ok(())
}

fn inspect(input: Option<&Path>) -> Result<(), CliError> {
    let (input, len) = open_input(input)?;
    let mut input = BufReader::new(input);
    let header = Header::read(&mut input).map_err(file_err)?;
    let body = match len {
        Some(n) => n.saturating_sub(header.to_bytes().len() as u64),
        None => std::io::copy(&mut input, &mut std::io::sink())
            .map_err(|e| CliError::new(format!("cannot read the input: {e}"), ""))?,
    };
    let version = crate::envelope::Envelope::parse(&header.wrapped_key)
        .map(|e| e.header.key_version)
        .ok();
    let segments = file::segments(&header, body);
    if super::json() {
        return print_json(&serde_json::json!({
            "format": file::VERSION, "region": header.region, "key_id": header.key_id,
            "key_version": version, "segment_bytes": header.segment_size(),
            "segments": segments, "wrapped_key_bytes": header.wrapped_key.len(),
        }));
    }
    outln!("format        sovkms file v{}", file::VERSION);
    outln!("region        {}", header.region);
    outln!("key           {}", header.key_id);
    match version {
        Some(v) => outln!("key version   {v}"),
        None => outln!("key version   (the wrapped key does not parse)"),
    }
    outln!(
        "segments      {segments} of {} bytes",
        header.segment_size()
    );
    Ok(())
}
