//! ssh-style permission checks for files holding secrets, and for the
//! directory holding the token files.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A file holding a secret that group or others may access, or a token
/// directory that group or others may write to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TooOpen {
    pub path: PathBuf,
    /// The permission bits found (`0o644`...).
    pub mode: u32,
    /// What was checked, which decides the fix.
    pub kind: TooOpenKind,
}

/// What [`TooOpen`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooOpenKind {
    /// A client secret, key or token file: group and others get nothing.
    SecretFile,
    /// A systemd credential (a file in `$CREDENTIALS_DIRECTORY`) that
    /// others can access.
    Credential,
    /// The directory of a token file, writable by group or others.
    TokenDirectory,
}

impl fmt::Display for TooOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (mode, path, quoted) = (self.mode, self.path.display(), shell_quote(&self.path));
        match self.kind {
            TooOpenKind::SecretFile => write!(
                f,
                "permissions {mode:04o} for '{path}' are too open; run: chmod 600 {quoted}"
            ),
            TooOpenKind::Credential => write!(
                f,
                "permissions {mode:04o} for the credential '{path}' are too open: others can read it; load it with LoadCredential= or SetCredentialEncrypted= (systemd keeps those private), or run: chmod o-rwx {quoted}"
            ),
            TooOpenKind::TokenDirectory => write!(
                f,
                "permissions {mode:04o} for the token directory '{path}' are too open: group or others can write to it and replace the token file; run: chmod go-w {quoted}"
            ),
        }
    }
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
    check_secret_file(path, None)
}

/// Like [`check_private_file`], but a file inside `credentials_dir`
/// (systemd's `$CREDENTIALS_DIRECTORY`) is checked with
/// [`check_credential_mode`].
pub fn check_secret_file(
    path: &Path,
    credentials_dir: Option<&Path>,
) -> Result<(), PrivateFileError> {
    let meta = std::fs::metadata(path).map_err(|source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode();
    if is_credential(path, credentials_dir) {
        check_credential_mode(path, mode)?;
    } else {
        check_mode(path, mode)?;
    }
    Ok(())
}

/// Whether `path` lies in the credentials directory.
pub(crate) fn is_credential(path: &Path, credentials_dir: Option<&Path>) -> bool {
    match credentials_dir {
        Some(dir) => path != dir && path.starts_with(dir),
        None => false,
    }
}

/// The rule for secret files: no access at all for group or others.
pub(crate) fn check_mode(path: &Path, mode: u32) -> Result<(), TooOpen> {
    let mode = mode & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TooOpen {
            path: path.to_path_buf(),
            mode,
            kind: TooOpenKind::SecretFile,
        });
    }
    Ok(())
}

/// The rule for systemd credentials: no access for others; the group bits
/// are not looked at.
///
/// systemd writes credentials (`LoadCredential=`, `SetCredential[Encrypted]=`)
/// into a private, read-only mount only the service can enter, as files
/// owned by root, mode 0400, and grants the service user (a `DynamicUser=`
/// one included) read access with a POSIX ACL entry. On a file with an ACL,
/// `stat` reports the ACL *mask* in the group bits (0440): they say what the
/// named ACL entries may do at most, not what the owning group (root's) may
/// do. So group bits there are not a leak, and the ssh rule would refuse
/// the recommended setup with a `chmod` that cannot even run on the
/// read-only mount. Others' bits keep their meaning: a credential anyone can
/// read is not private, whoever made it (say `$CREDENTIALS_DIRECTORY`
/// pointed at an ordinary directory by hand), so it is still refused.
pub(crate) fn check_credential_mode(path: &Path, mode: u32) -> Result<(), TooOpen> {
    let mode = mode & 0o7777;
    if mode & 0o007 != 0 {
        return Err(TooOpen {
            path: path.to_path_buf(),
            mode,
            kind: TooOpenKind::Credential,
        });
    }
    Ok(())
}

/// The rule for an existing token directory (ssh's StrictModes): group or
/// others must not be able to write to it, or they could delete the token
/// file and put their own in its place (a rename needs write access to the
/// directory only). Read access is fine: the file itself is 0600, so a
/// directory like `/etc/oauthrelay` (0755) can hold token files.
pub(crate) fn check_dir_mode(path: &Path, mode: u32) -> Result<(), TooOpen> {
    let mode = mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TooOpen {
            path: path.to_path_buf(),
            mode,
            kind: TooOpenKind::TokenDirectory,
        });
    }
    Ok(())
}

/// Check the directory that holds (or will hold) `token_file`, if it
/// exists. `Ok(false)`: no such directory yet (it is created 0700).
pub fn check_token_dir(token_file: &Path) -> Result<bool, PrivateFileError> {
    let dir = match token_file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_dir_mode(dir, meta.permissions().mode())?;
            Ok(true)
        }
        // Not a directory: creating the file fails later, with its message.
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(PrivateFileError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Quote a path for a shell command suggestion when it needs quoting.
pub fn shell_quote(path: &Path) -> String {
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
    fn credentials_ignore_the_group_bits_only() {
        let p = Path::new("/run/credentials/oauthrelay.service/default.client_secret");
        // 0440: root-owned, read access for the service user by ACL (mask).
        assert!(check_credential_mode(p, 0o100440).is_ok());
        assert!(check_credential_mode(p, 0o100400).is_ok());
        let err = check_credential_mode(p, 0o100444).unwrap_err();
        assert_eq!(err.kind, TooOpenKind::Credential);
        assert!(err.to_string().contains("chmod o-rwx"), "{err}");
        assert!(check_credential_mode(p, 0o100402).is_err());
    }

    #[test]
    fn token_directories_may_be_readable_not_writable() {
        let d = Path::new("/etc/oauthrelay");
        assert!(check_dir_mode(d, 0o040755).is_ok());
        assert!(check_dir_mode(d, 0o040700).is_ok());
        for mode in [0o040775, 0o040757, 0o041777] {
            let err = check_dir_mode(d, mode).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!(
                    "permissions {:04o} for the token directory '/etc/oauthrelay' are too open: group or others can write to it and replace the token file; run: chmod go-w /etc/oauthrelay",
                    mode & 0o7777
                )
            );
        }
    }

    #[test]
    fn quotes_odd_paths() {
        assert_eq!(shell_quote(Path::new("/a b/c")), "'/a b/c'");
        assert_eq!(shell_quote(Path::new("/it's")), r"'/it'\''s'");
        assert_eq!(shell_quote(Path::new("/etc/x.json")), "/etc/x.json");
    }
}
