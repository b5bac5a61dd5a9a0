//! The configuration file: where it is looked for, how it is parsed, and how
//! every error is reported as `file:line:col: message`.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The whole file. Unknown keys are errors in every table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the spool and token files live by default. Default:
    /// `$STATE_DIRECTORY` (systemd), else `/var/lib/oauthrelay` when the
    /// system-wide config file is in use, else the per-user data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub server: inbound::ServerConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub delivery: outbound::DeliveryConfig,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<oauth::AccountConfig>,
}

/// `[spool]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Default: `$STATE_DIRECTORY/spool`, else the per-user data directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Free space on the spool's file system that new mail may not use
    /// (`452 4.3.1` below it), kept for recording deliveries, removing
    /// delivered mail and compaction; 0 turns it off. Default: 64 MiB, one
    /// segment (the most one compaction copies).
    pub min_free_space: inbound::ByteSize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: None,
            min_free_space: inbound::ByteSize(64 << 20),
        }
    }
}

/// `[local]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// The local domain: envelope senders in it, and unqualified ones, go
    /// upstream as the account's address. Default: the host's fully
    /// qualified name, else the first account's email domain (see
    /// `local::domain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// An aliases file in /etc/aliases format (local names resolved through
    /// it: `root: you@gmail.com`); optional.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aliases: Option<PathBuf>,
    /// Where `sendmail` run by users other than root leaves mail while the
    /// daemon is stopped. Default: /var/spool/oauthrelay-maildrop with the
    /// system config, else `maildrop` in the state directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maildrop: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address for `/metrics`, `/healthz` and `/readyz`; `""` turns the
    /// listener off.
    #[serde(serialize_with = "ser_opt_addr", deserialize_with = "de_opt_addr")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9925))),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug` or `trace`, or a full filter like
    /// `info,inbound=debug`. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` (one line per event, Postfix style) or `json` (one JSON
    /// object per line, for log shippers). `--log-format` overrides it.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `[log] format` and `--log-format` (defined with the command line, which
/// crates/xtask includes to make the man pages and completions).
pub use crate::cli::LogFormat;

fn ser_opt_addr<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(a) => s.collect_str(a),
        None => s.serialize_str(""),
    }
}

fn de_opt_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    inbound::parse_listen_address(&s)
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("{e}, or \"\" to turn the listener off")))
}

/// A configuration error with its place in the file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(
                f,
                "{}:{}:{}: {}",
                file.display(),
                self.line,
                self.col,
                self.message
            ),
            None => write!(f, "(built-in defaults): {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A problem that only a change to the configuration, or to a file it
/// names, fixes (a secret file others can read, a bad certificate, an
/// address not on this host): `serve` exits 78 so systemd does not restart
/// it in a loop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Misconfigured(pub String);

/// All errors found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A parsed file and what is needed to point into it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// `None` when running on built-in defaults.
    pub path: Option<PathBuf>,
    source: String,
    /// Entries left out because they could not be read (see [`parse_all`]),
    /// in the order they were taken out: [`Loaded::error_at`] takes them out
    /// again so indexes into arrays match `config`.
    pruned: Vec<Vec<Step>>,
    /// How many of the errors found in the file are TOML syntax errors
    /// (they come first).
    pub syntax_errors: usize,
}

impl Loaded {
    /// Built-in defaults, used when no file exists.
    pub fn defaults() -> Loaded {
        Loaded {
            config: Config::default(),
            path: None,
            source: String::new(),
            pruned: Vec::new(),
            syntax_errors: 0,
        }
    }

    /// An error at the value of `key` (a path like `["accounts", 0,
    /// "client_secret_file"]`), or at the nearest table that exists.
    pub fn error_at(&self, key: &[Key<'_>], message: impl Into<String>) -> ConfigError {
        let span = locate(&self.source, &self.pruned, key).unwrap_or(0..0);
        let (line, col) = line_col(&self.source, span.start);
        ConfigError {
            file: self.path.clone(),
            line,
            col,
            message: message.into(),
        }
    }

    /// Whether the file sets anything at all (an empty file, or one of
    /// nothing but comments, runs on built-in defaults).
    pub fn sets_anything(&self) -> bool {
        self.path.is_none()
            || toml::from_str::<toml::Table>(&self.source).map_or(true, |t| !t.is_empty())
    }

    /// The directory relative paths in the file are resolved against.
    pub fn base_dir(&self) -> PathBuf {
        self.path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// One step of a key path.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Name(&'a str),
    Index(usize),
}

impl<'a> From<&'a str> for Key<'a> {
    fn from(s: &'a str) -> Self {
        Key::Name(s)
    }
}

impl From<usize> for Key<'_> {
    fn from(i: usize) -> Self {
        Key::Index(i)
    }
}

/// Where the config file is (`docs/configuration.md`): `--config`, then
/// `$OAUTHRELAY_CONFIG`, then `/etc/oauthrelay/oauthrelay.toml`, then the
/// per-user config dir. `None`: no file, run on defaults.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("OAUTHRELAY_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let system = PathBuf::from("/etc/oauthrelay/oauthrelay.toml");
    if system.exists() {
        return Some(system);
    }
    let user = directories::ProjectDirs::from("", "", "oauthrelay")
        .map(|d| d.config_dir().join("oauthrelay.toml"))?;
    user.exists().then_some(user)
}

/// Read and parse `path` (or the defaults), then check what serde cannot.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    let (loaded, errors) = load_all(path)?;
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Like [`load`], but a file that can be read always gives a
/// configuration (what could be understood of it) with every problem found
/// in it: `check-config` goes on to check the files it names. `Err` only
/// when the file cannot be read at all.
pub fn load_all(path: Option<&Path>) -> Result<(Loaded, Vec<ConfigError>), ConfigErrors> {
    let Some(path) = path else {
        let loaded = Loaded::defaults();
        let errors = validate(&loaded);
        return Ok((loaded, errors));
    };
    let cannot_read = |e: std::io::Error| {
        ConfigErrors(vec![ConfigError {
            file: Some(path.to_path_buf()),
            line: 1,
            col: 1,
            message: format!("cannot read the configuration file: {e}"),
        }])
    };
    let mut file = std::fs::File::open(path).map_err(cannot_read)?;
    let mode = file.metadata().map_err(cannot_read)?.mode();
    let mut source = String::new();
    std::io::Read::read_to_string(&mut file, &mut source).map_err(cannot_read)?;
    let (loaded, mut errors) = parse_all(&source, Some(path));
    errors.extend(check_inline_secrets(&loaded, mode));
    Ok((loaded, errors))
}

/// A file with an inline `client_secret` is a secret file: like
/// `client_secret_file`, group and others must not be able to read it
/// (the rule ssh applies to keys). Refused with the fix, at the secret.
fn check_inline_secrets(l: &Loaded, mode: u32) -> Vec<ConfigError> {
    let mode = mode & 0o7777;
    let Some(path) = &l.path else {
        return Vec::new();
    };
    if mode & 0o044 == 0 {
        return Vec::new();
    }
    l
        .config
        .accounts
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            a.client_secret
                .as_ref()
                .is_some_and(|s| !secrecy::ExposeSecret::expose_secret(s).trim().is_empty())
        })
        .map(|(i, a)| {
            l.error_at(
                &[Key::Name("accounts"), Key::Index(i), Key::Name("client_secret")],
                format!(
                    "account {:?}: the client secret is written in this file, which group or others can read (permissions {mode:04o}); run: chmod 600 {}, or move the secret to client_secret_file or a systemd credential ({}.client_secret)",
                    a.name,
                    oauth::perms::shell_quote(path),
                    a.name
                ),
            )
        })
        .collect()
}

/// Parse a configuration text (`path` is for messages only). Used by the
/// tests and the `config` fuzz target (fuzz/), not by the daemon.
#[cfg_attr(not(test), allow(dead_code))]
pub fn parse(source: &str, path: Option<&Path>) -> Result<Loaded, ConfigErrors> {
    let (loaded, errors) = parse_all(source, path);
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One step of the path to an entry taken out of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Name(String),
    Index(usize),
}

/// Parse a configuration text and report every problem in it: the TOML
/// syntax errors first, then each value that cannot be used (a type error,
/// an unknown key, a bad address...), then the checks across keys. serde
/// stops at the first bad value, so each one is taken out of the document
/// (the entry, or the `[[accounts]]` entry missing a required key) and the
/// rest read again; what is left is the configuration returned.
pub fn parse_all(source: &str, path: Option<&Path>) -> (Loaded, Vec<ConfigError>) {
    let at = |span: Option<Range<usize>>, message: String| {
        let (line, col) = line_col(source, span.unwrap_or(0..0).start);
        ConfigError {
            file: path.map(Path::to_path_buf),
            line,
            col,
            message,
        }
    };
    let (mut doc, syntax) = toml::de::DeTable::parse_recoverable(source);
    let mut errors: Vec<ConfigError> = syntax
        .iter()
        .map(|e| at(e.span(), e.message().trim().to_string()))
        .collect();
    let mut semantic = Vec::new();
    let mut pruned = Vec::new();
    let mut config = Config::default();
    // Each round takes one entry out; a file has far fewer than this.
    for _ in 0..256 {
        let de = toml::de::Deserializer::from(doc.clone());
        match <Config as Deserialize>::deserialize(de) {
            Ok(c) => {
                config = c;
                break;
            }
            Err(e) => {
                let step = e.span().and_then(|s| prune(doc.get_mut(), s.start));
                // A table missing a key only because a bad value was taken
                // out of it has been reported already.
                let consequence = e.message().starts_with("missing field")
                    && step.as_ref().is_some_and(|step| {
                        pruned
                            .iter()
                            .any(|p: &Vec<Step>| p.len() > step.len() && p.starts_with(step))
                    });
                if !consequence {
                    semantic.push(at(e.span(), explain(e.message().trim())));
                }
                let Some(step) = step else { break };
                pruned.push(step);
            }
        }
    }
    let loaded = Loaded {
        config,
        path: path.map(Path::to_path_buf),
        source: source.to_string(),
        pruned,
        syntax_errors: syntax.len(),
    };
    semantic.extend(validate(&loaded));
    semantic.sort_by_key(|e| (e.line, e.col));
    errors.extend(semantic);
    (loaded, errors)
}

/// serde's message, with a "did you mean" for a misspelt key.
fn explain(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((name, rest)) = rest.split_once('`') else {
        return message.to_string();
    };
    let known: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let best = known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, k)) => format!("unknown key `{name}`; did you mean `{k}`?"),
        None if known.is_empty() => format!("unknown key `{name}`: this table takes no keys"),
        None => format!(
            "unknown key `{name}`; the keys here are {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Take the innermost entry (or array element) that holds byte `pos` out
/// of `table`; the path to it, or `None` when nothing holds it.
fn prune(table: &mut toml::de::DeTable<'_>, pos: usize) -> Option<Vec<Step>> {
    use toml::de::DeValue;
    fn in_table(t: &mut toml::de::DeTable<'_>, pos: usize) -> Option<Vec<Step>> {
        let mut hit = None;
        for (k, v) in t.iter_mut() {
            let name = k.get_ref().to_string();
            if let Some(mut inner) = in_value(v.get_mut(), pos) {
                inner.insert(0, Step::Name(name));
                return Some(inner);
            }
            if k.span().contains(&pos) || v.span().contains(&pos) {
                hit = Some(name);
            }
        }
        let name = hit?;
        t.remove(name.as_str());
        Some(vec![Step::Name(name)])
    }
    fn in_value(v: &mut DeValue<'_>, pos: usize) -> Option<Vec<Step>> {
        match v {
            DeValue::Table(t) => in_table(t, pos),
            DeValue::Array(a) => {
                for (i, item) in a.iter_mut().enumerate() {
                    if let Some(mut inner) = in_value(item.get_mut(), pos) {
                        inner.insert(0, Step::Index(i));
                        return Some(inner);
                    }
                }
                let i = a.iter().position(|item| item.span().contains(&pos))?;
                remove_item(a, i);
                Some(vec![Step::Index(i)])
            }
            _ => None,
        }
    }
    in_table(table, pos)
}

/// `DeArray` has no `remove`: rebuild it without item `i`.
fn remove_item(a: &mut toml::de::DeArray<'_>, i: usize) {
    let old = std::mem::replace(a, toml::de::DeArray::new());
    for (j, item) in old.iter().enumerate() {
        if j != i {
            a.push(item.clone());
        }
    }
}

/// Take the entry at `path` out of `table` (again).
fn remove_at(table: &mut toml::de::DeTable<'_>, path: &[Step]) {
    use toml::de::DeValue;
    let Some((Step::Name(first), rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.remove(first.as_str());
        return;
    }
    let Some(mut cur) = table.get_mut(first.as_str()).map(|v| v.get_mut()) else {
        return;
    };
    for (i, step) in rest.iter().enumerate() {
        let last = i + 1 == rest.len();
        cur = match (step, cur) {
            (Step::Name(n), DeValue::Table(t)) if last => {
                t.remove(n.as_str());
                return;
            }
            (Step::Index(n), DeValue::Array(a)) if last => {
                remove_item(a, *n);
                return;
            }
            (Step::Name(n), DeValue::Table(t)) => match t.get_mut(n.as_str()) {
                Some(v) => v.get_mut(),
                None => return,
            },
            (Step::Index(n), DeValue::Array(a)) => match a.get_mut(*n) {
                Some(v) => v.get_mut(),
                None => return,
            },
            _ => return,
        };
    }
}

/// Checks that need more than one value, each reported at its key.
fn validate(l: &Loaded) -> Vec<ConfigError> {
    let c = &l.config;
    let mut errs = Vec::new();
    let s = &c.server;
    if s.listen.is_empty() {
        errs.push(l.error_at(
            &["server".into(), "listen".into()],
            "at least one listen address is needed",
        ));
    }
    if !s.listen_tls.is_empty() && s.tls.is_none() {
        errs.push(l.error_at(
            &["server".into(), "listen_tls".into()],
            "listen_tls needs [server.tls] (cert_file and key_file): implicit TLS has no certificate to offer",
        ));
    }
    if let Some(a) = s
        .listen_tls
        .iter()
        .find(|a| a.port() != 0 && s.listen.contains(a))
    {
        errs.push(l.error_at(
            &["server".into(), "listen_tls".into()],
            format!("{a} is in both listen and listen_tls; one port speaks either plain SMTP or implicit TLS"),
        ));
    }
    for (key, v) in [
        ("max_recipients", s.max_recipients),
        ("max_connections", s.max_connections),
    ] {
        if v > 100_000 {
            errs.push(l.error_at(
                &["server".into(), key.into()],
                format!("{key} = {v} is beyond any sensible limit (at most 100000)"),
            ));
        }
        if v == 0 {
            errs.push(l.error_at(
                &["server".into(), key.into()],
                format!("{key} must be at least 1"),
            ));
        }
    }
    if s.max_line_length < 512 {
        errs.push(l.error_at(
            &["server".into(), "max_line_length".into()],
            "max_line_length must be at least 512 (RFC 5321 4.5.3.1.4)",
        ));
    }
    for (key, v) in [
        ("command_timeout", s.command_timeout),
        ("data_timeout", s.data_timeout),
    ] {
        if v.is_zero() {
            errs.push(l.error_at(
                &["server".into(), key.into()],
                format!("{key} must be longer than 0s"),
            ));
        }
    }
    if s.max_message_size.0 < 1024 {
        errs.push(l.error_at(
            &["server".into(), "max_message_size".into()],
            "max_message_size must be at least 1024 bytes",
        ));
    }
    if let Some(h) = &s.hostname
        && (h.is_empty() || h.len() > 255 || h.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        errs.push(l.error_at(
            &["server".into(), "hostname".into()],
            format!("invalid hostname {h:?}"),
        ));
    }
    let mut users = std::collections::HashSet::new();
    for (i, u) in s.users.iter().enumerate() {
        if u.name.is_empty() || !users.insert(u.name.as_str()) {
            errs.push(l.error_at(
                &["server".into(), "users".into(), i.into(), "name".into()],
                format!("user name {:?} is empty or used twice", u.name),
            ));
        }
    }
    let d = &c.delivery;
    if d.concurrency == 0 {
        errs.push(l.error_at(
            &["delivery".into(), "concurrency".into()],
            "concurrency must be at least 1",
        ));
    }
    if d.retry_initial.is_zero() {
        errs.push(l.error_at(
            &["delivery".into(), "retry_initial".into()],
            "retry_initial must be longer than 0s",
        ));
    }
    if d.retry_max < d.retry_initial {
        errs.push(l.error_at(
            &["delivery".into(), "retry_max".into()],
            "retry_max must not be shorter than retry_initial",
        ));
    }
    if let Some(p) = &d.postmaster
        && !is_address(p)
    {
        errs.push(l.error_at(
            &["delivery".into(), "postmaster".into()],
            format!("postmaster {p:?} is not an email address (local-part@domain)"),
        ));
    }
    if let Some(dom) = &c.local.domain
        && (dom.trim().is_empty()
            || dom.contains('@')
            || dom.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        errs.push(l.error_at(
            &["local".into(), "domain".into()],
            format!("invalid domain {dom:?}: a domain name like \"host.example.org\""),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, a) in c.accounts.iter().enumerate() {
        let at = |key: &'static str| [Key::Name("accounts"), Key::Index(i), Key::Name(key)];
        let valid_name = !a.name.is_empty()
            && a.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !a.name.starts_with('.');
        if !valid_name {
            errs.push(l.error_at(
                &at("name"),
                format!("account name {:?} must be letters, digits, '-', '_' or '.' (it names the token file)", a.name),
            ));
        } else if !names.insert(a.name.as_str()) {
            errs.push(l.error_at(
                &at("name"),
                format!("account name {:?} is used twice", a.name),
            ));
        }
        if !a.email.contains('@') {
            errs.push(l.error_at(
                &at("email"),
                format!("{:?} is not an email address", a.email),
            ));
        }
        if a.service_account_key_file.is_none() {
            if a.client_id.as_deref().is_none_or(str::is_empty) {
                errs.push(l.error_at(
                    &at("name"),
                    format!("account {:?} needs client_id (or service_account_key_file for a Workspace service account)", a.name),
                ));
            }
            if a.client_secret.is_some() && a.client_secret_file.is_some() {
                errs.push(l.error_at(
                    &at("client_secret_file"),
                    "set client_secret or client_secret_file, not both",
                ));
            }
        }
        if let Some(f) = &a.envelope_from
            && !is_address(f)
        {
            errs.push(l.error_at(
                &at("envelope_from"),
                format!("envelope_from {f:?} is not an email address (local-part@domain)"),
            ));
        }
        if let Some(r) = a.max_rate
            && !(r.is_finite() && r > 0.0)
        {
            errs.push(l.error_at(
                &at("max_rate"),
                format!("max_rate must be a positive number of sends per second, not {r}"),
            ));
        }
        if !a.scopes.is_empty()
            && let Some((problem, fix)) = a.scope_problem(&a.scopes)
        {
            errs.push(l.error_at(&at("scopes"), format!("{problem}; {fix}")));
        }
        if let Some(problem) = a.app_only_tenant_problem() {
            let key = if a.tenant.is_some() && source_has_key(l, i, "tenant") {
                "tenant"
            } else {
                "scopes"
            };
            errs.push(l.error_at(&at(key), format!("account {:?}: {problem}", a.name)));
        }
        errs.extend(
            provider_problems(a)
                .into_iter()
                .map(|(key, msg)| l.error_at(&at(key), msg)),
        );
        if a.senders.is_empty() {
            errs.push(l.error_at(
                &at("senders"),
                "senders must list at least one pattern (\"*\" for any sender)",
            ));
        }
    }
    errs
}

/// The keys of one account that do not fit its `provider`, with what to
/// do about each.
fn provider_problems(a: &oauth::AccountConfig) -> Vec<(&'static str, String)> {
    use oauth::{Provider, TransportKind};
    let microsoft = a.provider == Provider::Microsoft;
    let mut out = Vec::new();
    if let Some(t) = &a.tenant {
        if !microsoft {
            out.push((
                "tenant",
                "tenant is a Microsoft setting: add provider = \"microsoft\" (or remove tenant)"
                    .to_string(),
            ));
        } else if !oauth::config::valid_tenant(t) {
            out.push((
                "tenant",
                format!("tenant {t:?} is not a tenant: use \"common\", \"organizations\", \"consumers\" (Outlook.com), the tenant id (a GUID) or its domain"),
            ));
        }
    }
    if microsoft && a.transport != TransportKind::Smtp {
        out.push((
            "transport",
            format!(
                "transport = \"{}\" is Google's Gmail API; a Microsoft account sends over SMTP (remove transport, or set transport = \"smtp\")",
                a.transport
            ),
        ));
    }
    match a.concurrency {
        Some(0) => out.push(("concurrency", "concurrency must be at least 1".to_string())),
        Some(n) if microsoft && n > oauth::config::MICROSOFT_MAX_CONCURRENCY => out.push((
            "concurrency",
            format!(
                "concurrency = {n}: Exchange Online allows {} simultaneous connections per mailbox and refuses more; set at most {0} (or remove it: the default is {0})",
                oauth::config::MICROSOFT_MAX_CONCURRENCY
            ),
        )),
        _ => {}
    }
    match (&a.client_certificate_file, &a.client_certificate_key_file) {
        (Some(_), None) => out.push((
            "client_certificate_file",
            "client_certificate_file needs client_certificate_key_file (the certificate's private key)".to_string(),
        )),
        (None, Some(_)) => out.push((
            "client_certificate_key_file",
            "client_certificate_key_file needs client_certificate_file (the certificate it belongs to)".to_string(),
        )),
        _ => {}
    }
    if !microsoft && a.client_certificate_file.is_some() {
        out.push((
            "client_certificate_file",
            "client_certificate_file is for Microsoft app-only accounts (provider = \"microsoft\")"
                .to_string(),
        ));
    }
    out
}

/// `local-part@domain`, both non-empty, no spaces or angle brackets.
fn is_address(s: &str) -> bool {
    s.rsplit_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>'))
}

/// Whether account `i`'s table in the file spells out `key` (a default
/// filled in by the provider is not in the file). `i` counts the accounts
/// that were read, as [`Loaded::error_at`] does: entries taken out for a
/// bad value are taken out here too.
fn source_has_key(l: &Loaded, i: usize, key: &str) -> bool {
    use toml::de::DeValue;
    let (mut doc, _) = toml::de::DeTable::parse_recoverable(&l.source);
    for path in &l.pruned {
        remove_at(doc.get_mut(), path);
    }
    let Some(accounts) = doc.get_ref().get("accounts") else {
        return false;
    };
    match accounts.get_ref() {
        DeValue::Array(a) => match a.get(i).map(|v| v.get_ref()) {
            Some(DeValue::Table(t)) => t.get(key).is_some(),
            _ => false,
        },
        _ => false,
    }
}

/// Byte span of the value at `key` in `source`, falling back to the
/// deepest part of the path that exists.
fn locate(source: &str, pruned: &[Vec<Step>], key: &[Key<'_>]) -> Option<Range<usize>> {
    use toml::de::DeValue;
    let (mut doc, _) = toml::de::DeTable::parse_recoverable(source);
    for path in pruned {
        remove_at(doc.get_mut(), path);
    }
    let mut best = None;
    let mut cur: Option<&DeValue<'_>> = None; // None: the root table
    for k in key {
        let next = match (k, cur) {
            (Key::Name(n), None) => doc.get_ref().get(*n),
            (Key::Name(n), Some(DeValue::Table(t))) => t.get(*n),
            (Key::Index(i), Some(DeValue::Array(a))) => a.get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span());
        cur = Some(next.get_ref());
    }
    best
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|n| offset - n).unwrap_or(offset + 1);
    (line, col)
}

/// The effective configuration as TOML, secrets redacted (`check-config`).
pub fn render(config: &Config) -> String {
    // The effective scopes and pacing, not "the provider's default".
    let mut config = config.clone();
    for a in &mut config.accounts {
        a.scopes = a.effective_scopes();
        a.max_rate = a.effective_max_rate();
    }
    toml::to_string_pretty(&config).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> String {
        parse(src, Some(Path::new("/etc/oauthrelay/oauthrelay.toml")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_empty_file_means_the_defaults() {
        let l = parse("", None).unwrap();
        assert_eq!(l.config.server.listen[0].to_string(), "127.0.0.1:2525");
        assert_eq!(l.config.delivery.concurrency, 4);
        assert!(l.config.accounts.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors_with_their_place() {
        let e = err("[server]\nlisten = [\"127.0.0.1:25\"]\nlisen = 3\n");
        assert!(
            e.starts_with(
                "/etc/oauthrelay/oauthrelay.toml:3:1: unknown key `lisen`; did you mean `listen`?"
            ),
            "{e}"
        );
        // Nothing close: the keys of the table are listed.
        let e = err("[log]\nzzz = 1\n");
        assert!(
            e.contains("unknown key `zzz`; the keys here are `level`, `format`"),
            "{e}"
        );
    }

    /// serde stops at the first bad value; the file is read again without
    /// it until every one is found, and the checks across keys still run
    /// on what is left, with places that match the file.
    /// Keys that do not fit the account's provider are errors at the key.
    #[test]
    fn provider_keys_that_do_not_fit_are_errors_at_the_key() {
        let src = "\
[[accounts]]
name = \"broken\"
client_id = \"x\"

[[accounts]]
name = \"g\"
email = \"g@example.com\"
client_id = \"x\"
tenant = \"common\"
client_certificate_file = \"/etc/oauthrelay/app.crt\"

[[accounts]]
name = \"m\"
provider = \"microsoft\"
email = \"relay@contoso.com\"
client_id = \"x\"
tenant = \"contoso/x\"
transport = \"gmail-api\"
concurrency = 5
client_certificate_key_file = \"/etc/oauthrelay/app.key\"
max_rate = 0

[[accounts]]
name = \"app\"
provider = \"microsoft\"
email = \"relay@contoso.com\"
client_id = \"x\"
client_secret = \"s\"
scopes = [\"https://outlook.office365.com/.default\"]
senders = [\"*\"]
";
        let e = err(src);
        let has = |at: &str, what: &str| {
            e.lines().any(|l| {
                l.starts_with(&format!("/etc/oauthrelay/oauthrelay.toml:{at}: "))
                    && l.contains(what)
            })
        };
        assert!(has("9:10", "tenant is a Microsoft setting"), "{e}");
        assert!(has("10:27", "for Microsoft app-only accounts"), "{e}");
        assert!(has("17:10", "is not a tenant"), "{e}");
        assert!(has("18:13", "a Microsoft account sends over SMTP"), "{e}");
        assert!(has("19:15", "Exchange Online allows 3"), "{e}");
        assert!(has("20:31", "needs client_certificate_file"), "{e}");
        assert!(has("21:12", "max_rate must be a positive number"), "{e}");
        // No tenant in the file: the problem is placed at the scope.
        assert!(has("29:10", "AADSTS9001023"), "{e}");
        // A Microsoft account within Exchange's limits is fine.
        let ok = "[[accounts]]\nname = \"m\"\nprovider = \"microsoft\"\nemail = \"relay@contoso.com\"\nclient_id = \"x\"\nconcurrency = 3\nmax_rate = 0.25\n";
        let l = parse(ok, None).unwrap();
        assert_eq!(l.config.accounts[0].effective_max_rate(), Some(0.25));
        assert!(render(&l.config).contains("max_rate = 0.25"));
        let d = parse("[[accounts]]\nname = \"m\"\nprovider = \"microsoft\"\nemail = \"relay@contoso.com\"\nclient_id = \"x\"\n", None).unwrap();
        assert!(render(&d.config).contains("max_rate = 0.5"));
    }

    #[test]
    fn every_problem_is_reported_in_one_run() {
        let src = "\
[server]
listen = [\"localhost:25\"]
max_recipients = \"many\"
hostnme = \"relay\"

[delivery]
retry_initial = \"2h\"
retry_max = \"1h\"

[[accounts]]
name = \"first\"
client_id = \"x\"

[[accounts]]
name = \"second\"
email = \"nope\"
client_id = \"x\"
senders = [\"*\"]
";
        let e = err(src);
        let lines: Vec<&str> = e.lines().collect();
        let has = |at: &str, what: &str| {
            lines.iter().any(|l| {
                l.starts_with(&format!("/etc/oauthrelay/oauthrelay.toml:{at}: "))
                    && l.contains(what)
            })
        };
        assert!(has("2:10", "host names are not accepted"), "{e}");
        assert!(has("3:18", "invalid type"), "{e}");
        assert!(has("4:1", "did you mean `hostname`?"), "{e}");
        assert!(has("8:13", "retry_max must not be shorter"), "{e}");
        assert!(has("10:1", "missing field `email`"), "{e}");
        // The second account is index 0 once the first is taken out; its
        // problem is still placed at its own line.
        assert!(has("16:9", "\"nope\" is not an email address"), "{e}");
        assert_eq!(lines.len(), 6, "{e}");
        // In the order of the file.
        let mut sorted = lines.clone();
        sorted.sort_by_key(|l| {
            let n: Vec<usize> = l
                .split(':')
                .skip(1)
                .take(2)
                .filter_map(|x| x.parse().ok())
                .collect();
            (n[0], n[1])
        });
        assert_eq!(sorted, lines);
    }

    #[test]
    fn syntax_errors_come_first_then_the_rest() {
        let e = err(
            "[server]\nmax_recipients = \"many\"\nlisten = [\"127.0.0.1:25\"\n[log]\nlevel = \n",
        );
        let lines: Vec<&str> = e.lines().collect();
        assert!(lines.len() >= 2, "{e}");
        assert!(!lines[0].contains("invalid type"), "syntax first: {e}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":2:") && l.contains("invalid type")),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_line_and_column() {
        let e = err("[server]\nlisten = [\"127.0.0.1:99999\"]\n");
        assert!(e.starts_with("/etc/oauthrelay/oauthrelay.toml:2:"), "{e}");
        let e = err("[server]\nallow_networks = [\"10.0.0.0/40\"]\n");
        assert!(e.contains(":2:") && e.contains("invalid network"), "{e}");
        let e = err("[server]\nmax_message_size = \"12 parsecs\"\n");
        assert!(e.contains(":2:") && e.contains("invalid size"), "{e}");
        let e = err("[delivery]\nretry_max = \"soon\"\n");
        assert!(e.contains(":2:"), "{e}");
        let e = err(
            "[[accounts]]\nname = \"a\"\nemail = \"a@gmail.com\"\nclient_id = \"x\"\ntoken_url = \"http://example.com/token\"\n",
        );
        assert!(e.contains(":5:") && e.contains("loopback"), "{e}");
    }

    #[test]
    fn cross_field_errors_point_at_the_key() {
        let src = "[delivery]\nretry_initial = \"2h\"\nretry_max = \"1h\"\n\n[[accounts]]\nname = \"a\"\nemail = \"a@gmail.com\"\nclient_id = \"x\"\n\n[[accounts]]\nname = \"a\"\nemail = \"nope\"\nclient_id = \"x\"\n";
        let e = err(src);
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":3:") && l.contains("retry_max")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":11:") && l.contains("used twice")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":12:") && l.contains("not an email")),
            "{e}"
        );
    }

    #[test]
    fn postmaster_envelope_from_and_local_domain_are_checked_at_their_key() {
        let e = err(
            "[delivery]\npostmaster = \"root\"\n\n[local]\ndomain = \"a b\"\n\n[[accounts]]\nname = \"a\"\nemail = \"a@gmail.com\"\nclient_id = \"x\"\nenvelope_from = \"<x@example.com>\"\n",
        );
        let lines: Vec<&str> = e.lines().collect();
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":2:")
                    && l.contains("postmaster \"root\" is not an email address")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":5:") && l.contains("invalid domain")),
            "{e}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains(":11:") && l.contains("envelope_from")),
            "{e}"
        );
        let ok = parse(
            "[delivery]\npostmaster = \"admin@example.com\"\n\n[local]\ndomain = \"host.example.org\"\n",
            None,
        )
        .unwrap();
        assert_eq!(
            ok.config.delivery.postmaster.as_deref(),
            Some("admin@example.com")
        );
        assert!(render(&ok.config).contains("postmaster = \"admin@example.com\""));
    }

    #[test]
    fn listen_tls_needs_server_tls() {
        let e = err("[server]\nlisten_tls = [\"0.0.0.0:465\"]\n");
        assert!(
            e.starts_with("/etc/oauthrelay/oauthrelay.toml:2:")
                && e.contains("listen_tls needs [server.tls]"),
            "{e}"
        );
        let e = err(
            "[server]\nlisten = [\"127.0.0.1:465\"]\nlisten_tls = [\"127.0.0.1:465\"]\n\n[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
        );
        assert!(
            e.contains(":3:") && e.contains("both listen and listen_tls"),
            "{e}"
        );
        let l = parse(
            "[server]\nlisten_tls = [\"0.0.0.0:465\"]\n\n[server.tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
            None,
        )
        .unwrap();
        assert_eq!(l.config.server.listen_tls[0].to_string(), "0.0.0.0:465");
    }

    #[test]
    fn bare_lf_end_networks_is_checked_like_allow_networks() {
        let e = err("[server]\nbare_lf_end_networks = [\"10.0.0.0/40\"]\n");
        assert!(e.contains(":2:") && e.contains("invalid network"), "{e}");
        let l = parse("[server]\nbare_lf_end_networks = []\n", None).unwrap();
        assert_eq!(l.config.server.bare_lf_end_networks, Some(Vec::new()));
        let l = parse("", None).unwrap();
        assert_eq!(l.config.server.bare_lf_end_networks, None);
    }

    #[test]
    fn the_local_table() {
        let l = parse(
            "[local]\ndomain = \"host.example.org\"\naliases = \"/etc/aliases\"\n",
            None,
        )
        .unwrap();
        assert_eq!(l.config.local.domain.as_deref(), Some("host.example.org"));
        let e = err("[local]\ndomain = \"bad domain\"\n");
        assert!(e.contains(":2:") && e.contains("invalid domain"), "{e}");
        let e = err("[local]\nalias = \"/etc/aliases\"\n");
        assert!(e.contains("unknown key `alias`"), "{e}");
    }

    #[test]
    fn metrics_listener_can_be_turned_off() {
        let l = parse("[metrics]\nlisten = \"\"\n", None).unwrap();
        assert!(l.config.metrics.listen.is_none());
    }

    #[test]
    fn rendering_redacts_secrets() {
        let l = parse(
            "[[accounts]]\nname = \"a\"\nemail = \"a@gmail.com\"\nclient_id = \"x\"\nclient_secret = \"GOCSPX-supersecret\"\n",
            None,
        )
        .unwrap();
        let out = render(&l.config);
        assert!(!out.contains("supersecret"), "{out}");
        assert!(out.contains("<redacted>"), "{out}");
    }
}
