//! Problems with the files a configuration names (secrets, tokens,
//! certificates), each reported at the key that names the file, as
//! `file:line:col: message`. `check-config` prints them all; `serve`
//! refuses to start with the same messages.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use crate::config::{ConfigError, Key, Loaded};
use crate::paths::{self, Paths};

/// Every problem found in the files the configuration names, and by
/// resolving each account and the `[server]` settings as `serve` does.
/// One problem per key; a key already in `reported` is not reported again.
pub fn problems(loaded: &Loaded, paths: &Paths, reported: &[ConfigError]) -> Vec<ConfigError> {
    let mut out: Vec<ConfigError> = Vec::new();
    let push = |e: ConfigError, out: &mut Vec<ConfigError>| {
        let seen = reported
            .iter()
            .chain(out.iter())
            .any(|r| r.line == e.line && r.col == e.col && r.file == e.file);
        if !seen {
            out.push(e);
        }
    };
    let ctx = context(loaded, paths);
    for (i, a) in loaded.config.accounts.iter().enumerate() {
        // What `serve` itself reports first, at its key...
        match oauth::Account::resolve(a, &ctx) {
            Err(e) => push(account_error(loaded, paths, i, &e), &mut out),
            Ok(acct) => {
                // The stored token's granted scope against the transport.
                let scopes = oauth::status(std::slice::from_ref(&acct))
                    .first()
                    .map(|s| s.scopes.clone())
                    .unwrap_or_default();
                if let Some((problem, fix)) = a.scope_problem(&scopes) {
                    push(
                        loaded.error_at(&key_path(i, "transport"), format!("{problem}; {fix}")),
                        &mut out,
                    );
                }
            }
        }
        // ...then each file on its own, so one bad file does not hide the
        // next.
        for (key, path) in files(loaded, paths, i) {
            if let Some(message) = check_file(key, &path, paths) {
                push(loaded.error_at(&key_path(i, key), message), &mut out);
            }
        }
    }
    if let Some(tls) = &loaded.config.server.tls {
        let base = loaded.base_dir();
        let cert = paths::absolute(&base, &tls.cert_file);
        let key = paths::absolute(&base, &tls.key_file);
        if let Err(e) = readable(&cert) {
            push(
                loaded.error_at(
                    &["server".into(), "tls".into(), "cert_file".into()],
                    format!("cannot read TLS certificate file {}: {e}", cert.display()),
                ),
                &mut out,
            );
        }
        let key_problem = match readable(&key) {
            Err(e) => Some(format!("cannot read TLS key file {}: {e}", key.display())),
            Ok(mode) => tls_key_too_open(&key, mode),
        };
        if let Some(message) = key_problem {
            push(
                loaded.error_at(&["server".into(), "tls".into(), "key_file".into()], message),
                &mut out,
            );
        }
    }
    if let Err(e) = crate::serve::inbound_settings(loaded, inbound::accept_all_senders()) {
        match e.downcast::<ConfigError>() {
            Ok(e) => push(e, &mut out),
            Err(e) => push(
                loaded.error_at(&["server".into()], format!("{e:#}")),
                &mut out,
            ),
        }
    }
    out
}

/// The TLS key may be readable by a group (Debian's `ssl-cert` keeps keys
/// 0640 root:ssl-cert), but never by everyone.
fn tls_key_too_open(path: &Path, mode: u32) -> Option<String> {
    let mode = mode & 0o7777;
    (mode & 0o007 != 0).then(|| {
        format!(
            "permissions {mode:04o} for the TLS key '{}' are too open: everyone can read it; run: chmod o-rwx {}",
            path.display(),
            oauth::perms::shell_quote(path)
        )
    })
}

/// How `serve` resolves accounts (relative paths against the config file,
/// `$CREDENTIALS_DIRECTORY` for credentials).
pub fn context(loaded: &Loaded, paths: &Paths) -> oauth::AccountContext {
    oauth::AccountContext::new(&paths.state_dir)
        .with_config_dir(loaded.base_dir())
        .with_credentials_dir(paths.credentials_dir.clone())
}

/// The token file an account uses (its `token_file`, else the default
/// under the state directory).
pub fn token_file(loaded: &Loaded, paths: &Paths, a: &oauth::AccountConfig) -> PathBuf {
    match &a.token_file {
        Some(p) => paths::absolute(&loaded.base_dir(), p),
        None => paths
            .state_dir
            .join("tokens")
            .join(format!("{}.json", a.name)),
    }
}

/// The files account `i` names: (key, absolute path). The default token
/// file has the key `name` (the account names it).
fn files(loaded: &Loaded, paths: &Paths, i: usize) -> Vec<(&'static str, PathBuf)> {
    let a = &loaded.config.accounts[i];
    let base = loaded.base_dir();
    // With a systemd credential for it, `serve` does not read the file.
    let credential = |what: &str| {
        paths
            .credentials_dir
            .as_ref()
            .is_some_and(|d| d.join(format!("{}.{what}", a.name)).exists())
    };
    let mut out = Vec::new();
    for (key, p) in [
        ("client_secret_file", &a.client_secret_file),
        ("service_account_key_file", &a.service_account_key_file),
        ("client_certificate_file", &a.client_certificate_file),
        (
            "client_certificate_key_file",
            &a.client_certificate_key_file,
        ),
        ("ca_file", &a.ca_file),
    ] {
        let what = match key {
            "client_secret_file" => "client_secret",
            "client_certificate_file" => "client_certificate",
            "client_certificate_key_file" => "client_certificate_key",
            _ => "service_account_key",
        };
        if key != "ca_file" && credential(what) {
            continue;
        }
        if let Some(p) = p {
            out.push((key, paths::absolute(&base, p)));
        }
    }
    let token_key = if a.token_file.is_some() {
        "token_file"
    } else {
        "name"
    };
    out.push((token_key, token_file(loaded, paths, a)));
    out
}

fn key_path(i: usize, key: &str) -> Vec<Key<'_>> {
    vec![Key::Name("accounts"), Key::Index(i), Key::Name(key)]
}

/// What is wrong with one file, in the words `serve` uses.
fn check_file(key: &str, path: &Path, paths: &Paths) -> Option<String> {
    match key {
        "client_secret_file" | "service_account_key_file" | "client_certificate_key_file" => {
            if let Err(e) = oauth::perms::check_secret_file(path, paths.credentials_dir.as_deref())
            {
                return Some(e.to_string());
            }
            readable(path)
                .err()
                .map(|e| format!("cannot read '{}': {e}", path.display()))
        }
        "ca_file" | "client_certificate_file" => readable(path)
            .err()
            .map(|e| format!("{key} '{}': {e}", path.display())),
        // The token file: its directory must not be writable by others,
        // and the file (once it exists) private.
        _ => match oauth::perms::check_token_dir(path) {
            Err(e) => Some(e.to_string()),
            Ok(false) => None,
            Ok(true) => match oauth::perms::check_private_file(path) {
                Ok(()) => None,
                Err(oauth::perms::PrivateFileError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => Some(e.to_string()),
            },
        },
    }
}

/// Open `path` and read from it (an empty file is fine); its mode when
/// that works.
fn readable(path: &Path) -> std::io::Result<u32> {
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "it is a directory",
        ));
    }
    let mut byte = [0u8; 1];
    let _bytes_read: usize = f.read(&mut byte)?;
    Ok(meta.permissions().mode())
}

/// An account error at its key: the key that names the file it is about,
/// else the account's `name`.
pub fn account_error(
    loaded: &Loaded,
    paths: &Paths,
    i: usize,
    e: &oauth::AccountError,
) -> ConfigError {
    use oauth::AccountError as E;
    let about: Option<&Path> = match e {
        E::TooOpen(t) => Some(&t.path),
        E::Read { path, .. } | E::Unreadable { path, .. } | E::CaFile { path, .. } => Some(path),
        E::ServiceAccountKey(k) => Some(&k.path),
        E::ClientCertificate(c) => Some(&c.path),
        E::Invalid { .. } => None,
    };
    let key = about
        .and_then(|p| {
            files(loaded, paths, i)
                .into_iter()
                .find(|(_, f)| f == p || f.parent() == Some(p))
                .map(|(k, _)| k)
        })
        .or_else(|| {
            // A systemd credential stands for client_secret_file or
            // service_account_key_file.
            let a = &loaded.config.accounts[i];
            let credential = about.is_some_and(|p| {
                paths
                    .credentials_dir
                    .as_deref()
                    .is_some_and(|d| p.starts_with(d))
            });
            match () {
                _ if credential && a.service_account_key_file.is_some() => {
                    Some("service_account_key_file")
                }
                _ if credential && a.client_secret_file.is_some() => Some("client_secret_file"),
                _ => None,
            }
        })
        .unwrap_or("name");
    loaded.error_at(&key_path(i, key), e.to_string())
}
