//! Writing files so that a crash leaves either the old file or the new one,
//! never a half-written one, and never a stray copy of the contents.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Writes a file atomically and durably: a uniquely named temporary file in
/// the target's directory, created with `mode`, synced, renamed over the
/// target, then the directory synced. On any failure the temporary file is
/// removed (it may hold plaintext), and nothing else in the directory is
/// touched.
pub fn write_file_durably(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    // A bare file name has an empty parent: that is the current directory.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".sovkms-")
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Creates a directory (and its missing parents) readable by its owner only
/// (0700); an existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Files and directories that others than the owner can read: a PIN, a
/// private key, a data directory. Each entry is one sentence for the log or
/// the CLI; a path that does not exist is not reported here.
pub fn readable_by_others(paths: &[(&str, &Path)]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    paths
        .iter()
        .filter_map(|(what, p)| {
            let mode = std::fs::metadata(p).ok()?.mode() & 0o777;
            (mode & 0o077 != 0).then(|| {
                format!(
                    "{what} {} is accessible to group or others (mode {mode:o}); chmod {} it",
                    p.display(),
                    if std::fs::metadata(p).is_ok_and(|m| m.is_dir()) {
                        "700"
                    } else {
                        "600"
                    }
                )
            })
        })
        .collect()
}

/// A file operation that failed, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct FileError {
    /// The file or directory.
    pub path: String,
    /// The cause.
    pub source: std::io::Error,
}

impl FileError {
    /// Wraps `source`, naming `path`.
    pub fn at(path: &Path, source: std::io::Error) -> Self {
        Self {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn bare_name_unrelated_tmp_and_mode() {
        let d = tempfile::tempdir().unwrap();
        // An unrelated file the old helper used as its temporary file.
        std::fs::write(d.path().join("notes.tmp"), b"keep me").unwrap();
        let target = d.path().join("notes.txt");
        write_file_durably(&target, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read(d.path().join("notes.tmp")).unwrap(),
            b"keep me"
        );
        // Writing over a directory fails and leaves no temporary file behind.
        std::fs::create_dir(d.path().join("sub")).unwrap();
        assert!(write_file_durably(&d.path().join("sub"), b"secret", 0o600).is_err());
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(".sovkms-")),
            "{names:?}"
        );
    }
}
