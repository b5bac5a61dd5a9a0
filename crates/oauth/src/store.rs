//! Token files: one JSON file per account.
//!
//! ```json
//! {
//!   "version": 1,
//!   "account": "default",
//!   "email": "me@gmail.com",
//!   "refresh_token": "1//0g...",
//!   "access_token": "ya29....",
//!   "access_token_expires_at": "2025-01-31T12:59:59Z",
//!   "scopes": ["https://mail.google.com/"],
//!   "authorized_at": "2025-01-31T12:00:00Z",
//!   "last_refresh": {"at": "2025-01-31T12:00:00Z", "result": "ok"},
//!   "needs_authorization": false
//! }
//! ```
//!
//! Files are written atomically: a temporary file created with mode 0600 in
//! the same directory, written, fsynced, renamed over the old file, then the
//! directory is fsynced. The directory is created with mode 0700; an
//! existing one that group or others can write to is refused (they could
//! replace the file), one they can only read is fine. Writers
//! (the daemon after a refresh, `authorize`, `token import`) take an
//! exclusive `flock` on the directory for their read-modify-write, so a
//! refresh never overwrites a refresh token another process just stored.
//! When run as root in a directory owned by another user (the service user),
//! the new file is given to that user so the daemon can read it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::perms::{self, TooOpen};

/// Format version written in new files.
pub const FORMAT_VERSION: u32 = 1;

/// The content of a token file. Unknown fields are ignored (forward
/// compatible); missing ones take their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenFile {
    pub version: u32,
    pub account: String,
    pub email: String,
    #[serde(with = "secret_opt", skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<SecretString>,
    #[serde(with = "secret_opt", skip_serializing_if = "Option::is_none")]
    pub access_token: Option<SecretString>,
    #[serde(with = "crate::timefmt::opt", skip_serializing_if = "Option::is_none")]
    pub access_token_expires_at: Option<SystemTime>,
    pub scopes: Vec<String>,
    /// When `authorize` or `token import` last stored a refresh token.
    #[serde(with = "crate::timefmt::opt", skip_serializing_if = "Option::is_none")]
    pub authorized_at: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<RefreshRecord>,
    /// Google refused the credentials for good (`invalid_grant`...): the
    /// account waits for `authorize` / `token import` (or a config fix).
    pub needs_authorization: bool,
    /// A refresh of a rotating refresh token (Microsoft) was sent at this
    /// time and its answer is not stored yet. Written (and fsynced) before
    /// the request, cleared with the new refresh token: still set after a
    /// restart, it means the process stopped in between, so a refusal of
    /// the old refresh token can be explained.
    #[serde(with = "crate::timefmt::opt", skip_serializing_if = "Option::is_none")]
    pub refresh_started_at: Option<SystemTime>,
}

/// Outcome of the latest token refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRecord {
    #[serde(with = "crate::timefmt::required")]
    pub at: SystemTime,
    pub result: RefreshResult,
    /// OAuth error code from Google (`invalid_grant`...), when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// What went wrong, in words (never contains a token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefreshResult {
    Ok,
    Error,
}

impl TokenFile {
    /// The stored access token while it is still valid at `now`.
    pub fn valid_access_token(&self, now: SystemTime) -> Option<crate::AccessToken> {
        match (&self.access_token, self.access_token_expires_at) {
            (Some(t), Some(exp)) if exp > now => Some(crate::AccessToken::new(t.clone(), exp)),
            _ => None,
        }
    }
}

/// Why a token file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} '{}': {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "token file '{}' is not valid ({reason}); fix it, or delete it and run `oauthrelay authorize`",
        path.display()
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    TooOpen(#[from] TooOpen),
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Read a token file. `Ok(None)` when it does not exist. A file that group
/// or others can read, or in a directory they can write to, is refused
/// ([`StoreError::TooOpen`]).
pub fn load(path: &Path) -> Result<Option<TokenFile>, StoreError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    check_dir(&parent_dir(path))?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    perms::check_mode(path, meta.mode())?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut file, &mut bytes).map_err(io_err("read", path))?;
    let parsed: TokenFile = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(Some(parsed))
}

/// Read-modify-write under the directory lock: `f` gets the current content
/// (or a default one for a new file) and the result is written atomically.
/// Returns what was written.
pub fn update<F>(path: &Path, f: F) -> Result<TokenFile, StoreError>
where
    F: FnOnce(&mut TokenFile),
{
    let (written, _) = update_if(path, |c| {
        f(c);
        true
    })?;
    Ok(written.unwrap_or_default())
}

/// Like [`update`], but nothing is written when `f` returns `false`; then
/// the current content (`None`: no file) is returned. The flag says whether
/// the file was written.
pub(crate) fn update_if<F>(path: &Path, f: F) -> Result<(Option<TokenFile>, bool), StoreError>
where
    F: FnOnce(&mut TokenFile) -> bool,
{
    let dir = parent_dir(path);
    ensure_dir(&dir)?;
    let _lock = lock_dir(&dir)?;
    let current = load(path)?;
    let existed = current.is_some();
    let mut content = current.unwrap_or_default();
    if !f(&mut content) {
        return Ok((existed.then_some(content), false));
    }
    content.version = FORMAT_VERSION;
    let mut bytes = serde_json::to_vec_pretty(&content).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    let result = write_atomic(&dir, path, &bytes);
    secrecy::zeroize::Zeroize::zeroize(&mut bytes);
    result?;
    Ok((Some(content), true))
}

/// Replace the file's content entirely (atomically, under the lock).
pub fn save(path: &Path, content: &TokenFile) -> Result<(), StoreError> {
    update(path, |c| *c = content.clone()).map(|_| ())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create `dir` (and missing parents) with mode 0700. Run as root below a
/// directory owned by someone else (the service user's state directory), the
/// new directories are given to that owner, like the files in them.
fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        // Not ours to chmod: refuse it as ssh would, with the fix.
        return check_dir(dir);
    }
    let mut missing = Vec::new();
    let mut existing = dir;
    while !existing.exists() {
        missing.push(existing);
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    let owner = fs::metadata(existing).map_err(io_err("stat", existing))?;
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => continue,
            Err(e) => return Err(io_err("create directory", d)(e)),
        }
        let created = fs::metadata(d).map_err(io_err("stat", d))?;
        if created.uid() == 0 && owner.uid() != 0 {
            std::os::unix::fs::chown(d, Some(owner.uid()), Some(owner.gid()))
                .map_err(io_err("chown", d))?;
        }
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<(), StoreError> {
    let meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
    perms::check_dir_mode(dir, meta.mode())?;
    Ok(())
}

struct DirLock(File);

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn lock_dir(dir: &Path) -> Result<DirLock, StoreError> {
    let f = File::open(dir).map_err(io_err("open directory", dir))?;
    f.lock().map_err(io_err("lock directory", dir))?;
    Ok(DirLock(f))
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "token.json".into());
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        give_to_directory_owner(&f, dir, &tmp)?;
        fs::rename(&tmp, path).map_err(io_err("rename into", path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Root writing into the service user's token directory (`sudo oauthrelay
/// authorize`): hand the file to the directory's owner so the daemon can
/// read it.
fn give_to_directory_owner(f: &File, dir: &Path, tmp: &Path) -> Result<(), StoreError> {
    let ours = f.metadata().map_err(io_err("stat", tmp))?;
    let dir_meta = fs::metadata(dir).map_err(io_err("stat", dir))?;
    if ours.uid() == 0 && dir_meta.uid() != 0 {
        std::os::unix::fs::fchown(f, Some(dir_meta.uid()), Some(dir_meta.gid()))
            .map_err(io_err("chown", tmp))?;
        tracing::debug!(
            path = %tmp.display(),
            uid = dir_meta.uid(),
            "token file handed to the token directory's owner"
        );
    }
    Ok(())
}

/// Identity of a file version: a rename gives a new inode, an edit a new
/// mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

pub(crate) fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = fs::metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

mod secret_opt {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(secret) => s.serialize_str(secret.expose_secret()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
        Ok(Option::<String>::deserialize(d)?
            .filter(|s| !s.trim().is_empty())
            .map(SecretString::from))
    }
}
