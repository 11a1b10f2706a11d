//! Client profiles: named connections (address, CA, certificate, key,
//! server name) in one file, so an operator switches roles and regions with
//! `--profile NAME` instead of four exported variables.
//!
//! The file is `$SOVKMS_CONFIG`, else `$XDG_CONFIG_HOME/sovkms/config.toml`,
//! else `~/.config/sovkms/config.toml`; relative paths in it are relative to
//! its directory. Flags and variables override the profile's values.

use super::CliError;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One named connection.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Broker address, host:port.
    pub addr: Option<String>,
    /// CA that issued the broker's certificate.
    pub ca: Option<PathBuf>,
    /// Client certificate.
    pub tls_cert: Option<PathBuf>,
    /// Client private key (the path; the key is read when connecting).
    pub tls_key: Option<PathBuf>,
    /// Name to check in the broker's certificate.
    pub server_name: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The profile used when none is named.
    default: Option<String>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
}

/// The profile file's path.
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SOVKMS_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("sovkms").join("config.toml"))
}

/// The profile named `name` (or the file's default), with its paths made
/// absolute; an empty profile when no file exists and none is named.
pub fn load(name: Option<&str>) -> Result<Profile, CliError> {
    let Some(file) = path() else {
        return match name {
            Some(n) => Err(CliError::new(
                format!("profile {n:?} asked for, but there is no profile file (HOME is not set)"),
                "set SOVKMS_CONFIG to the profile file",
            )),
            None => Ok(Profile::default()),
        };
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && name.is_none() => {
            return Ok(Profile::default())
        }
        Err(e) => {
            return Err(CliError::new(
                format!("cannot read the profile file {}: {e}", file.display()),
                "create it (see README, \"Client profiles\") or set SOVKMS_CONFIG",
            ))
        }
    };
    let parsed: File = toml::from_str(&text).map_err(|e| {
        CliError::new(
            format!("profile file {}: {e}", file.display()),
            "each profile is [profiles.NAME] with addr, ca, tls_cert, tls_key, server_name",
        )
    })?;
    let Some(name) = name.map(str::to_owned).or(parsed.default) else {
        return Ok(Profile::default());
    };
    let mut p = parsed.profiles.get(&name).cloned().ok_or_else(|| {
        let known: Vec<_> = parsed.profiles.keys().cloned().collect();
        CliError::new(
            format!("profile {name:?} is not in {}", file.display()),
            format!("known profiles: {}", known.join(", ")),
        )
    })?;
    let dir = file.parent().unwrap_or(Path::new("."));
    for f in [&mut p.ca, &mut p.tls_cert, &mut p.tls_key]
        .into_iter()
        .flatten()
    {
        if f.is_relative() {
            *f = dir.join(&*f);
        }
    }
    Ok(p)
}
