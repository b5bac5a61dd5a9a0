//! ssh-style permission checks for files holding secrets.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A file holding a secret that group or others may read or write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permissions {mode:04o} for '{}' are too open; run: chmod 600 {}", path.display(), shell_quote(path))]
pub struct TooOpen {
    pub path: PathBuf,
    /// The permission bits found (`0o644`...).
    pub mode: u32,
}

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error(transparent)]
    TooOpen(#[from] TooOpen),
    #[error("cannot read '{}': {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Refuse a file that group or others can access (mode & 0o077), as ssh
/// does for private keys. Symlinks are followed: the target is what counts.
pub fn check_private_file(path: &Path) -> Result<(), PrivateFileError> {
    let meta = std::fs::metadata(path).map_err(|source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    check_mode(path, meta.permissions().mode())?;
    Ok(())
}

pub(crate) fn check_mode(path: &Path, mode: u32) -> Result<(), TooOpen> {
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Quote a path for a shell command suggestion when it needs quoting.
pub(crate) fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b));
    if plain {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_ssh_style() {
        let err = check_mode(Path::new("/x/y"), 0o100644).unwrap_err();
        assert_eq!(
            err.to_string(),
            "permissions 0644 for '/x/y' are too open; run: chmod 600 /x/y"
        );
        assert!(check_mode(Path::new("/x/y"), 0o100600).is_ok());
        assert!(check_mode(Path::new("/x/y"), 0o100400).is_ok());
        assert!(check_mode(Path::new("/x/y"), 0o100620).is_err());
    }

    #[test]
    fn quotes_odd_paths() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
        assert_eq!(shell_quote(Path::new("/etc/x.json")), "/etc/x.json");
    }
}
