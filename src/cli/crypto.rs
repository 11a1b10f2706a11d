//! `sovkms encrypt|decrypt|generate-data-key`: envelope operations through a broker.

use super::{print_json, CliError, ConnArgs};
use crate::api::proto as pb;
use base64::Engine;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use zeroize::Zeroizing;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Arguments of `encrypt`.
#[derive(clap::Args)]
pub struct EncryptArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Key id, or the key's name (`alias/NAME` to say it is a name).
    #[arg(long = "key", alias = "key-id", value_name = "KEY")]
    key_id: String,
    #[command(flatten)]
    io: IoArgs,
}

/// Where the bytes come from and go, and the encryption context.
#[derive(clap::Args)]
pub struct IoArgs {
    /// Input file; `-` or absent for stdin.
    #[arg(long = "in")]
    input: Option<PathBuf>,
    /// Output file (created mode 0600); `-` or absent for stdout.
    #[arg(long = "out")]
    output: Option<PathBuf>,
    /// Encryption context entry KEY=VALUE (repeat); decrypt needs the same as encrypt.
    #[arg(long = "context")]
    context: Vec<String>,
    /// Ciphertext as base64 text (encrypt writes it, decrypt reads it).
    #[arg(long)]
    base64: bool,
}

/// Arguments of `decrypt`.
#[derive(clap::Args)]
pub struct DecryptArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    io: IoArgs,
}

/// Arguments of `generate-data-key`.
#[derive(clap::Args)]
pub struct DataKeyArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Key id, or the key's name (`alias/NAME` to say it is a name).
    #[arg(long = "key", alias = "key-id", value_name = "KEY")]
    key_id: String,
    /// Encryption context entry KEY=VALUE (repeat).
    #[arg(long = "context")]
    context: Vec<String>,
    /// Return only the wrapped key.
    #[arg(long)]
    without_plaintext: bool,
    /// Write the wrapped key to this file (else it is printed in base64).
    #[arg(long)]
    out_wrapped: Option<PathBuf>,
    /// Write the plaintext data key (32 raw bytes) to this file, created
    /// mode 0600, instead of printing it.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(super) fn context(pairs: &[String]) -> Result<HashMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    CliError::new(
                        format!("context entry {p:?} has no '='"),
                        "write --context key=value",
                    )
                })
        })
        .collect()
}

fn read_input(p: &Option<PathBuf>) -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut buf = Zeroizing::new(Vec::new());
    match p {
        Some(path) if path.as_os_str() != "-" => {
            let mut f = std::fs::File::open(path)
                .map_err(|e| CliError::new(format!("cannot open {}: {e}", path.display()), ""))?;
            f.read_to_end(&mut buf)
                .map_err(|e| CliError::new(format!("cannot read {}: {e}", path.display()), ""))?;
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::new(format!("cannot read stdin: {e}"), ""))?;
        }
    }
    Ok(buf)
}

/// True when the output goes to stdout.
fn to_stdout(p: &Option<PathBuf>) -> bool {
    p.as_ref().is_none_or(|p| p.as_os_str() == "-")
}

/// Binary ciphertext is never written to a terminal (it would garble it).
fn refuse_binary_terminal(p: &Option<PathBuf>) -> Result<(), CliError> {
    use std::io::IsTerminal;
    if to_stdout(p) && std::io::stdout().is_terminal() {
        return Err(CliError::new(
            "refusing to write binary ciphertext to a terminal",
            "use --out FILE, --base64, or --json",
        ));
    }
    Ok(())
}

fn write_output(p: &Option<PathBuf>, bytes: &[u8]) -> Result<(), CliError> {
    match p {
        Some(path) if path.as_os_str() != "-" => {
            crate::files::write_file_durably(path, bytes, 0o600)
                .map_err(|e| CliError::new(format!("cannot write {}: {e}", path.display()), ""))
        }
        _ => {
            let mut out = std::io::stdout().lock();
            out.write_all(bytes)
                .and_then(|_| out.flush())
                .map_err(|e| CliError::new(format!("cannot write stdout: {e}"), ""))
        }
    }
}

pub async fn encrypt(a: EncryptArgs) -> Result<(), CliError> {
    let ctx = context(&a.io.context)?;
    let mut pt = read_input(&a.io.input)?;
    let mut c = a.conn.connect().await?;
    let req = pb::EncryptRequest {
        key_id: super::resolve_key(&mut c, &a.key_id).await?,
        plaintext: std::mem::take(&mut *pt),
        context: ctx,
    };
    let r = c.encrypt(req).await?;
    let json = super::json();
    if !to_stdout(&a.io.output) {
        write_output(&a.io.output, &r.ciphertext)?;
    }
    if json {
        let mut v = serde_json::json!({"key_id": r.key_id, "key_version": r.key_version});
        if to_stdout(&a.io.output) {
            v["ciphertext_base64"] = B64.encode(&r.ciphertext).into();
        } else {
            v["out"] = a.io.output.as_ref().map(|p| p.display().to_string()).into();
            v["bytes"] = r.ciphertext.len().into();
        }
        return print_json(&v);
    }
    if to_stdout(&a.io.output) {
        if a.io.base64 {
            outln!("{}", B64.encode(&r.ciphertext));
            return Ok(());
        }
        refuse_binary_terminal(&a.io.output)?;
        write_output(&a.io.output, &r.ciphertext)?;
    }
    Ok(())
}

pub async fn decrypt(a: DecryptArgs) -> Result<(), CliError> {
    let ctx = context(&a.io.context)?;
    let mut ct = read_input(&a.io.input)?;
    if a.io.base64 {
        let text = String::from_utf8_lossy(&ct)
            .split_whitespace()
            .collect::<String>();
        ct = Zeroizing::new(B64.decode(text).map_err(|_| {
            CliError::new(
                "the input is not base64",
                "drop --base64 for a binary ciphertext",
            )
        })?);
    }
    let mut c = a.conn.connect().await?;
    let mut r = c
        .decrypt(pb::DecryptRequest {
            ciphertext: ct.to_vec(),
            context: ctx,
        })
        .await?;
    let pt = Zeroizing::new(std::mem::take(&mut r.plaintext));
    if !to_stdout(&a.io.output) {
        write_output(&a.io.output, &pt)?;
    }
    if super::json() {
        let mut v = serde_json::json!({"key_id": r.key_id, "key_version": r.key_version});
        if to_stdout(&a.io.output) {
            v["plaintext_base64"] = B64.encode(&*pt).into();
        } else {
            v["out"] = a.io.output.as_ref().map(|p| p.display().to_string()).into();
            v["bytes"] = pt.len().into();
        }
        return print_json(&v);
    }
    if to_stdout(&a.io.output) {
        write_output(&a.io.output, &pt)?;
    }
    Ok(())
}

pub async fn data_key(a: DataKeyArgs) -> Result<(), CliError> {
    let ctx = context(&a.context)?;
    let mut c = a.conn.connect().await?;
    let req = pb::GenerateDataKeyRequest {
        key_id: super::resolve_key(&mut c, &a.key_id).await?,
        context: ctx,
    };
    let (plain, wrapped, key_id, version) = if a.without_plaintext {
        let r = c.generate_data_key_without_plaintext(req).await?;
        (None, r.wrapped_key, r.key_id, r.key_version)
    } else {
        let mut r = c.generate_data_key(req).await?;
        let p = Zeroizing::new(std::mem::take(&mut r.plaintext_key));
        (
            Some(p),
            std::mem::take(&mut r.wrapped_key),
            r.key_id.clone(),
            r.key_version,
        )
    };
    if let Some(path) = &a.out_wrapped {
        write_output(&Some(path.clone()), &wrapped)?;
    }
    if let (Some(path), Some(p)) = (&a.out, &plain) {
        write_output(&Some(path.clone()), p)?;
    }
    let plain = if a.out.is_some() { None } else { plain };
    let plain_b64 = plain.as_ref().map(|p| Zeroizing::new(B64.encode(&**p)));
    if super::json() {
        return print_json(&serde_json::json!({
            "plaintext_key_base64": plain_b64.as_deref().map(|s| s.as_str()),
            "wrapped_key_base64": B64.encode(&wrapped), "key_id": key_id, "key_version": version,
        }));
    }
    if let Some(p) = &plain_b64 {
        outln!("plaintext key (base64)  {}", p.as_str());
    }
    if let Some(path) = &a.out {
        outln!(
            "plaintext key           written to {} (mode 0600)",
            path.display()
        );
    }
    if a.out_wrapped.is_none() {
        outln!("wrapped key (base64)    {}", B64.encode(&wrapped));
    }
    outln!("key                     {key_id} version {version}");
    Ok(())
}
