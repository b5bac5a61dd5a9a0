//! Everything a session needs to know, resolved once from the `[server]`
//! section: host name, TLS acceptor, users, and where senders may go.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;

/// Decides at MAIL whether some account will take mail from this envelope
/// sender (`""` is the null sender). `false` gets `550 5.7.1`.
pub type SenderPolicy = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Local names (Postfix's `myorigin`, `mydestination` and aliases): how a
/// trusted client's unqualified addresses are completed, and where mail
/// for local recipients goes. The binary implements it from its `[local]`
/// table; without one, unqualified addresses are refused (`501`).
pub trait LocalNames: Send + Sync {
    /// `name@domain` for a name without a domain (`root`).
    fn qualify(&self, name: &str) -> String;
    /// Where mail for `rcpt` (qualified, or a bare name) goes: local names
    /// through the aliases, unknown local names to the postmaster, every
    /// other address unchanged. Never empty.
    fn expand(&self, rcpt: &str) -> Vec<String>;
}

/// A `[server]` section that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read TLS certificate file {path}: {reason}")]
    Certificate { path: PathBuf, reason: String },
    #[error("cannot read TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("TLS certificate {cert} and key {key} cannot be used together: {reason}")]
    CertificateKey {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("invalid host name {0:?}: it must be non-empty, without spaces or control characters")]
    Hostname(String),
    #[error(
        "[[server.users]] {name:?}: password_hash is not a PHC string; create one with `oauthrelay hash-password`"
    )]
    PasswordHash { name: String },
    #[error("[[server.users]]: user name {0:?} appears more than once")]
    DuplicateUser(String),
    #[error(
        "[server] listen_tls: implicit-TLS listeners need [server.tls] (cert_file and key_file)"
    )]
    ListenTlsWithoutTls,
    #[error("[server] {key}: {reason}")]
    Limit {
        key: &'static str,
        reason: &'static str,
    },
}

/// Resolved listener settings. Build them again and call
/// [`Inbound::reload`](crate::Inbound::reload) on SIGHUP.
pub struct Settings {
    pub(crate) config: ServerConfig,
    pub(crate) hostname: Arc<str>,
    pub(crate) sender_allowed: SenderPolicy,
    pub(crate) tls: Option<TlsAcceptor>,
    /// (name, PHC hash)
    pub(crate) users: Vec<(String, String)>,
    pub(crate) local: Option<Arc<dyn LocalNames>>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("config", &self.config)
            .field("hostname", &self.hostname)
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.len())
            .field("local_names", &self.local.is_some())
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// Check `config`, load the TLS certificate and key when `[server.tls]`
    /// is set (blocking file reads), and keep `hostname` (see
    /// [`system_hostname`]) and the sender policy.
    pub fn new(
        config: ServerConfig,
        hostname: impl Into<String>,
        sender_allowed: SenderPolicy,
    ) -> Result<Settings, SettingsError> {
        let hostname: String = hostname.into();
        if hostname.is_empty()
            || hostname.len() > 255
            || hostname
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(SettingsError::Hostname(hostname));
        }
        if config.max_line_length < 512 {
            return Err(SettingsError::Limit {
                key: "max_line_length",
                reason: "must be at least 512 (RFC 5321 4.5.3.1.4)",
            });
        }
        if config.max_recipients == 0 {
            return Err(SettingsError::Limit {
                key: "max_recipients",
                reason: "must be at least 1",
            });
        }
        if config.max_connections == 0 {
            return Err(SettingsError::Limit {
                key: "max_connections",
                reason: "must be at least 1",
            });
        }
        if config.max_connections_per_client == 0 {
            return Err(SettingsError::Limit {
                key: "max_connections_per_client",
                reason: "must be at least 1",
            });
        }
        if config
            .reserved_connections
            .is_some_and(|r| r >= config.max_connections)
        {
            return Err(SettingsError::Limit {
                key: "reserved_connections",
                reason: "must be less than max_connections (clients outside allow_networks need a slot to authenticate)",
            });
        }
        if config.untrusted_command_timeout.is_zero() {
            return Err(SettingsError::Limit {
                key: "untrusted_command_timeout",
                reason: "must be longer than zero",
            });
        }
        if !(1..=64).contains(&config.max_password_checks) {
            return Err(SettingsError::Limit {
                key: "max_password_checks",
                reason: "must be 1 to 64 (each check takes about 19 MiB while it runs)",
            });
        }
        if config.command_timeout.is_zero() {
            return Err(SettingsError::Limit {
                key: "command_timeout",
                reason: "must be longer than zero",
            });
        }
        if config.data_timeout.is_zero() {
            return Err(SettingsError::Limit {
                key: "data_timeout",
                reason: "must be longer than zero",
            });
        }
        if !config.listen_tls.is_empty() && config.tls.is_none() {
            return Err(SettingsError::ListenTlsWithoutTls);
        }
        let mut users: Vec<(String, String)> = Vec::with_capacity(config.users.len());
        for u in &config.users {
            if argon2::PasswordHash::new(&u.password_hash).is_err() {
                return Err(SettingsError::PasswordHash {
                    name: u.name.clone(),
                });
            }
            if users.iter().any(|(n, _)| *n == u.name) {
                return Err(SettingsError::DuplicateUser(u.name.clone()));
            }
            users.push((u.name.clone(), u.password_hash.clone()));
        }
        let tls = match &config.tls {
            Some(t) => Some(load_tls(&t.cert_file, &t.key_file)?),
            None => None,
        };
        Ok(Settings {
            config,
            hostname: hostname.into(),
            sender_allowed,
            tls,
            users,
            local: None,
        })
    }

    /// Qualify trusted clients' bare names and expand local recipients
    /// with `local` (see [`LocalNames`]).
    pub fn with_local_names(mut self, local: Arc<dyn LocalNames>) -> Settings {
        self.local = Some(local);
        self
    }

    /// The `[server]` section these settings came from.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The name in the greeting and `Received:` headers.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Whether `ip` is in `allow_networks` (may relay without AUTH).
    pub(crate) fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.config.allow_networks.iter().any(|n| n.contains(ip))
    }

    /// How DATA from `ip` may end: a lone dot next to a bare LF too, from
    /// `bare_lf_end_networks` (default: `allow_networks`); else only
    /// `CRLF.CRLF`.
    pub(crate) fn end_of_data(&self, ip: std::net::IpAddr) -> crate::dot::EndOfData {
        let networks = self
            .config
            .bare_lf_end_networks
            .as_ref()
            .unwrap_or(&self.config.allow_networks);
        if networks.iter().any(|n| n.contains(ip)) {
            crate::dot::EndOfData::AnyLineEnding
        } else {
            crate::dot::EndOfData::CrlfDotCrlf
        }
    }

    /// The connection limits of [`crate::slots`].
    pub(crate) fn slot_limits(&self) -> crate::slots::Limits {
        let c = &self.config;
        crate::slots::Limits {
            total: c.max_connections,
            reserved: c.reserved_connections.unwrap_or(c.max_connections / 5),
            per_client: c.max_connections_per_client,
        }
    }

    /// Whether STARTTLS is offered.
    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }
}

/// A sender policy that accepts every sender (no accounts configured yet).
pub fn accept_all_senders() -> SenderPolicy {
    Arc::new(|_| true)
}

/// The system's host name (`gethostname`), or `localhost` if it has none.
pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most
    // that many bytes.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "localhost".into();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(buf.get(..len).unwrap_or_default()) {
        Ok(s) if !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            s.into()
        }
        _ => "localhost".into(),
    }
}

/// A TLS 1.2+ acceptor (ring provider) from PEM files.
fn load_tls(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, SettingsError> {
    let cert_err = |reason: String| SettingsError::Certificate {
        path: cert_file.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| cert_err(pem_reason(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(pem_reason(e)))?;
    if certs.is_empty() {
        return Err(cert_err("no CERTIFICATE section found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| SettingsError::Key {
        path: key_file.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY section found".into(),
            e => pem_reason(e),
        },
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| SettingsError::CertificateKey {
            cert: cert_file.to_path_buf(),
            key: key_file.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM section found".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}
