//! Where oauthrelay keeps its state when the config file does not say.

use std::path::{Path, PathBuf};

use crate::config::Loaded;

/// The system-wide config file and state directory (the packaged layout).
pub const SYSTEM_CONFIG: &str = "/etc/oauthrelay/oauthrelay.toml";
pub const SYSTEM_STATE_DIR: &str = "/var/lib/oauthrelay";

/// Resolved locations.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Spool, tokens and the control socket live under here by default.
    pub state_dir: PathBuf,
    pub spool_dir: PathBuf,
    /// systemd's `$CREDENTIALS_DIRECTORY` (client secrets as credentials).
    pub credentials_dir: Option<PathBuf>,
    /// Unix socket the `queue` commands use to talk to a running daemon.
    pub control_socket: PathBuf,
    /// Where `sendmail` run by other users than root leaves mail while the
    /// daemon is stopped (see crate::maildrop).
    pub maildrop_dir: PathBuf,
}

/// The maildrop of the packaged layout.
pub const SYSTEM_MAILDROP: &str = "/var/spool/oauthrelay-maildrop";

impl Paths {
    pub fn resolve(loaded: &Loaded) -> Paths {
        let base = loaded.base_dir();
        let state_dir = match &loaded.config.state_dir {
            Some(d) => absolute(&base, d),
            None => default_state_dir(loaded.path.as_deref()),
        };
        let spool_dir = match &loaded.config.spool.dir {
            Some(d) => absolute(&base, d),
            None => state_dir.join("spool"),
        };
        let credentials_dir = std::env::var_os("CREDENTIALS_DIRECTORY")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let control_socket = spool_dir.join("control.sock");
        let system = loaded.path.as_deref() == Some(Path::new(SYSTEM_CONFIG))
            || std::env::var_os("STATE_DIRECTORY").is_some_and(|v| !v.is_empty());
        let maildrop_dir = match &loaded.config.local.maildrop {
            Some(d) => absolute(&base, d),
            None if system => PathBuf::from(SYSTEM_MAILDROP),
            None => state_dir.join("maildrop"),
        };
        Paths {
            maildrop_dir,
            state_dir,
            spool_dir,
            credentials_dir,
            control_socket,
        }
    }
}

fn default_state_dir(config_file: Option<&Path>) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        // systemd may pass several, colon-separated; the first is ours.
        let dir = PathBuf::from(dir);
        let first = dir
            .to_str()
            .and_then(|s| s.split(':').next())
            .map(PathBuf::from)
            .unwrap_or(dir);
        return first;
    }
    if config_file == Some(Path::new(SYSTEM_CONFIG)) {
        return PathBuf::from(SYSTEM_STATE_DIR);
    }
    directories::ProjectDirs::from("", "", "oauthrelay")
        .map(|d| d.data_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from(SYSTEM_STATE_DIR))
}

/// `p` relative to the config file's directory, unless already absolute.
pub fn absolute(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// After a command run as root wrote into a spool that belongs to the
/// service user (queue commands or `sendmail` with the daemon stopped),
/// give the files back to the owner of the state directory, or the daemon
/// could not read them.
pub fn hand_over(spool_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Some(owner) = spool_dir.parent().and_then(|p| std::fs::metadata(p).ok()) else {
        return;
    };
    if owner.uid() == 0 {
        return;
    }
    let (uid, gid) = (Some(owner.uid()), Some(owner.gid()));
    let _ = std::os::unix::fs::lchown(spool_dir, uid, gid);
    let mut stack = vec![spool_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            // Only what root itself created here: never a file the service
            // user could have hard-linked in from elsewhere (that would hand
            // it, say, /etc/shadow), never a symlink's target.
            if meta.uid() != 0
                || meta.file_type().is_symlink()
                || (meta.is_file() && meta.nlink() != 1)
            {
                continue;
            }
            let _ = std::os::unix::fs::lchown(&p, uid, gid);
            if meta.is_dir() {
                stack.push(p);
            }
        }
    }
}
