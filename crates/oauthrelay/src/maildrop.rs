//! The maildrop: where `sendmail` run by a user other than root leaves a
//! message while the daemon is stopped, and where the daemon picks it up
//! (Postfix's postdrop and pickup are the model; docs/design.md has the
//! privilege boundary).
//!
//! - The directory (`[local] maildrop`, packaged as
//!   /var/spool/oauthrelay-maildrop) is `root:oauthrelay-maildrop`, mode
//!   0770: only root and that group may enter it. Users reach it through
//!   the binary alone, installed setgid `oauthrelay-maildrop`: at start it
//!   drops the group ([`drop_group`]) and takes it back only around
//!   [`write`]; it never reads or lists the directory.
//! - [`write`] creates a hidden temporary file (`O_EXCL`, `O_NOFOLLOW`,
//!   mode 0640, group `oauthrelay-maildrop`), writes and fsyncs it, then
//!   renames it into place: the daemon never sees half a file.
//! - The daemon (a member of the group) imports every file at start and
//!   every second after ([`watch`]). It trusts nothing in a file: regular
//!   files only, one link, size limits, a strict envelope format, every
//!   address checked, then the message goes through a local SMTP session
//!   (the same checks, headers, aliases as any client). Only after that
//!   session's `250` is the file removed. A file the session refuses for
//!   good is renamed `NAME.refused` and logged as an error.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::sendmail::address;
use crate::sendmail::submit::{self, Envelope};

const MAGIC: &[u8] = b"oauthrelay-maildrop 1\n";
/// The envelope part of a file may not be larger than this.
const MAX_ENVELOPE: usize = 1 << 20;
/// How often the daemon looks for new files.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// A file the session answered with a temporary error is tried again after this.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Temporary files of writers that died are removed after this.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// The group `sendmail` ran with when installed setgid, kept to write the
/// maildrop (0: not setgid).
static SAVED_GID: AtomicU32 = AtomicU32::new(0);

/// Called first thing in `main`: when the binary runs setgid, give the
/// group up (effective gid = real gid) and keep it only in the saved set,
/// for [`write`]. Everything else (reading the config a user names,
/// logging, the queue commands) runs with the user's own rights.
pub fn drop_group() {
    // SAFETY: plain syscalls without pointers; called before any thread starts.
    unsafe {
        let (real, effective) = (libc::getgid(), libc::getegid());
        if real != effective {
            if libc::setresgid(u32::MAX, real, u32::MAX) != 0 {
                // Cannot drop it: never run with it.
                eprintln!("oauthrelay: cannot drop the setgid group; exiting");
                std::process::exit(71);
            }
            SAVED_GID.store(effective, Ordering::Relaxed);
        }
    }
}

/// Run `f` with the saved maildrop group as the effective group (when the
/// binary is setgid), then drop it again.
fn with_group<T>(f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let saved = SAVED_GID.load(Ordering::Relaxed);
    if saved == 0 {
        return f();
    }
    // SAFETY: plain syscalls; glibc applies them to every thread.
    unsafe {
        if libc::setresgid(u32::MAX, saved, u32::MAX) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let r = f();
    // SAFETY: as above.
    unsafe {
        if libc::setresgid(u32::MAX, libc::getgid(), u32::MAX) != 0 {
            eprintln!("oauthrelay: cannot drop the setgid group; exiting");
            std::process::exit(71);
        }
    }
    r
}

/// One message in the maildrop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub sender: String,
    pub recipients: Vec<String>,
    pub eight_bit: bool,
    pub message: Vec<u8>,
}

/// The file's bytes.
fn encode(d: &Dropped) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.message.len() + 256);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(format!("sender {}\n", d.sender).as_bytes());
    for r in &d.recipients {
        out.extend_from_slice(format!("rcpt {r}\n").as_bytes());
    }
    if d.eight_bit {
        out.extend_from_slice(b"8bit\n");
    }
    out.push(b'\n');
    out.extend_from_slice(&d.message);
    out
}

/// Parse a file's bytes; every field is checked as untrusted input.
fn decode(bytes: &[u8], max_message: u64, max_recipients: usize) -> Result<Dropped, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("not a maildrop file (bad first line)")?;
    let end = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .filter(|&p| p < MAX_ENVELOPE)
        .ok_or("no end of the envelope within 1 MiB")?;
    let (head, message) = (&rest[..end + 1], &rest[end + 2..]);
    let head = std::str::from_utf8(head).map_err(|_| "the envelope is not UTF-8")?;
    let mut sender = None;
    let mut recipients = Vec::new();
    let mut eight_bit = false;
    for line in head.lines() {
        if line.chars().any(char::is_control) {
            return Err("a control character in the envelope".into());
        }
        if let Some(s) = line.strip_prefix("sender ") {
            if sender.is_some() {
                return Err("two senders".into());
            }
            let s = if s.is_empty() {
                String::new()
            } else {
                address::check(s).map_err(|e| e.to_string())?
            };
            sender = Some(s);
        } else if line == "sender" {
            sender = Some(String::new());
        } else if let Some(r) = line.strip_prefix("rcpt ") {
            recipients.push(address::check(r).map_err(|e| e.to_string())?);
            if recipients.len() > max_recipients {
                return Err(format!("more than {max_recipients} recipients"));
            }
        } else if line == "8bit" {
            eight_bit = true;
        } else {
            return Err(format!("unknown envelope line {}", address::shown(line)));
        }
    }
    let sender = sender.ok_or("no sender line")?;
    if recipients.is_empty() {
        return Err("no recipients".into());
    }
    if message.len() as u64 > max_message {
        return Err(format!("the message is larger than {max_message} bytes"));
    }
    Ok(Dropped {
        sender,
        recipients,
        eight_bit,
        message: message.to_vec(),
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique() -> String {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{}.{:09}.{}.{}",
        now.as_secs(),
        now.subsec_nanos(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Leave `d` in the maildrop `dir`; returns the file's path. Durable when
/// this returns (file fsynced, then renamed; the directory fsynced).
pub fn write(dir: &Path, d: &Dropped) -> std::io::Result<PathBuf> {
    let bytes = encode(d);
    with_group(|| {
        let dir_meta = std::fs::metadata(dir)?;
        if !dir_meta.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let name = unique();
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        let done = (|| {
            // The daemon reads it as a member of the directory's group.
            let _ = std::os::unix::fs::fchown(&f, None, Some(dir_meta.gid()));
            f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            let to = dir.join(&name);
            std::fs::rename(&tmp, &to)?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(to)
        })();
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    })
}

/// A user's login name.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwuid_r writes into our passwd and buffer, both valid for
    // their sizes; the names it points at live in `buf`.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let r = libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out);
        if r != 0 || out.is_null() || pw.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pw.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// What the daemon needs to import.
#[derive(Clone)]
pub struct Importer {
    pub dir: PathBuf,
    pub inbound: inbound::Inbound,
    pub shutdown: CancellationToken,
}

/// Import what is there now, then every second, until shutdown.
pub fn watch(im: Importer) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut later: HashMap<PathBuf, Instant> = HashMap::new();
        let mut missing_told = false;
        loop {
            match std::fs::read_dir(&im.dir) {
                Ok(entries) => {
                    missing_told = false;
                    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                    names.sort();
                    for p in names {
                        if im.shutdown.is_cancelled() {
                            return;
                        }
                        if later.get(&p).is_some_and(|t| *t > Instant::now()) {
                            continue;
                        }
                        later.remove(&p);
                        if let Some(retry) = import_one(&im, &p).await {
                            later.insert(p, Instant::now() + retry);
                        }
                    }
                }
                Err(e) if !missing_told => {
                    missing_told = true;
                    debug!(dir = %im.dir.display(), error = %e, "no maildrop to import from");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = im.shutdown.cancelled() => return,
                _ = tokio::time::sleep(SCAN_EVERY) => {}
            }
        }
    })
}

/// Import one file; `Some(delay)` to try it again later.
async fn import_one(im: &Importer, path: &Path) -> Option<Duration> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    if name.ends_with(".refused") {
        return None;
    }
    if name.starts_with('.') {
        // A writer's temporary file; one left by a writer that died goes.
        if let Ok(m) = std::fs::symlink_metadata(path)
            && m.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP)
        {
            let _ = std::fs::remove_file(path);
        }
        return None;
    }
    let settings = im.inbound.settings();
    let max_message = settings.config().max_message_size.0;
    let max_rcpt = settings.config().max_recipients;
    let read = read_file(path, max_message + MAX_ENVELOPE as u64);
    let (bytes, uid) = match read {
        Ok(x) => x,
        Err(e) => {
            refuse(path, &name, None, &e);
            return None;
        }
    };
    let d = match decode(&bytes, max_message, max_rcpt) {
        Ok(d) => d,
        Err(e) => {
            refuse(path, &name, Some(uid), &e);
            return None;
        }
    };
    let (client, server) = tokio::io::duplex(64 << 10);
    let session = {
        let inbound = im.inbound.clone();
        let stop = im.shutdown.clone();
        tokio::spawn(async move { inbound.handle_local(server, stop).await })
    };
    let env = Envelope {
        sender: d.sender.clone(),
        recipients: d.recipients.clone(),
        eight_bit: d.eight_bit,
    };
    let r = submit::stream_submit(client, &env, &d.message).await;
    let _ = session.await;
    let user = user_name(uid).unwrap_or_else(|| "?".into());
    match r {
        Ok(reply) => {
            if let Err(e) = std::fs::remove_file(path) {
                // Imported twice at worst (at-least-once); say so.
                error!(file = %path.display(), error = %e, "maildrop: imported, but the file cannot be removed; it will be imported again");
                return Some(RETRY_AFTER);
            }
            info!(
                "maildrop: {name} from uid={uid} ({}) sender=<{}> imported: {}",
                outbound::escape_controls(&user),
                outbound::escape_controls(&d.sender),
                outbound::escape_controls(&reply)
            );
            None
        }
        Err(e) if e.is_permanent() => {
            refuse(path, &name, Some(uid), &e.to_string());
            None
        }
        Err(e) => {
            warn!(file = %path.display(), error = %e, "maildrop: cannot import now; trying again in a minute");
            Some(RETRY_AFTER)
        }
    }
}

/// Read a maildrop file as untrusted: a regular file with one link, not
/// larger than `limit` (a FIFO, a symlink or a hard link to something else
/// is refused without reading it).
fn read_file(path: &Path, limit: u64) -> Result<(Vec<u8>, u32), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a regular file".into());
    }
    if m.nlink() != 1 {
        return Err("a file with other links".into());
    }
    if m.len() > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    let mut bytes = Vec::with_capacity(m.len() as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(&f, limit + 1), &mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok((bytes, m.uid()))
}

/// A file that will never be imported: set aside, with an error a person sees.
fn refuse(path: &Path, name: &str, uid: Option<u32>, why: &str) {
    let to = path.with_file_name(format!("{name}.refused"));
    let moved = std::fs::rename(path, &to).is_ok();
    error!(
        file = %path.display(),
        uid = uid.map(|u| u.to_string()).unwrap_or_default(),
        "maildrop: {name} refused: {}; {}",
        outbound::escape_controls(why),
        if moved {
            format!("kept as {}", to.display())
        } else {
            "it could not be renamed and stays".into()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Dropped {
        Dropped {
            sender: "alice@host.example.org".into(),
            recipients: vec!["root".into(), "ops@example.org".into()],
            eight_bit: true,
            message: b"Subject: s\r\n\r\nbody\r\n\r\n".to_vec(),
        }
    }

    #[test]
    fn files_round_trip() {
        let d = sample();
        assert_eq!(decode(&encode(&d), 1 << 20, 100).unwrap(), d);
        let null = Dropped {
            sender: String::new(),
            ..sample()
        };
        assert_eq!(decode(&encode(&null), 1 << 20, 100).unwrap(), null);
    }

    #[test]
    fn hostile_files_are_refused() {
        let good = encode(&sample());
        for (what, bytes) in [
            ("magic", b"hello\n".to_vec()),
            (
                "no end",
                b"oauthrelay-maildrop 1\nsender a@b\nrcpt c@d\n".to_vec(),
            ),
            (
                "injection",
                b"oauthrelay-maildrop 1\nsender a@b>\rRCPT TO:<v@evil.test\nrcpt c@d\n\nx".to_vec(),
            ),
            (
                "bad rcpt",
                b"oauthrelay-maildrop 1\nsender a@b\nrcpt c@d> NOTIFY=NEVER\n\nx".to_vec(),
            ),
            (
                "no rcpt",
                b"oauthrelay-maildrop 1\nsender a@b\n\nx".to_vec(),
            ),
            (
                "two senders",
                b"oauthrelay-maildrop 1\nsender a@b\nsender c@d\nrcpt e@f\n\nx".to_vec(),
            ),
            (
                "unknown",
                b"oauthrelay-maildrop 1\nsender a@b\nrcpt e@f\nexec x\n\nx".to_vec(),
            ),
        ] {
            assert!(decode(&bytes, 1 << 20, 100).is_err(), "{what}");
        }
        assert!(decode(&good, 5, 100).is_err(), "size limit");
        assert!(decode(&good, 1 << 20, 1).is_err(), "recipient limit");
    }

    #[test]
    fn writing_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), &sample()).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
        let (bytes, _) = read_file(&p, 1 << 20).unwrap();
        assert_eq!(decode(&bytes, 1 << 20, 100).unwrap(), sample());
        // Not a regular file, or linked elsewhere: refused unread.
        let link = dir.path().join("hard");
        std::fs::hard_link(&p, &link).unwrap();
        assert!(read_file(&link, 1 << 20).is_err());
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink(&p, &sym).unwrap();
        assert!(read_file(&sym, 1 << 20).is_err());
    }
}
