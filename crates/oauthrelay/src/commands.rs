//! The one-shot commands (everything but `serve`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::bail;

use crate::cli::{QueueCommand, TokenCommand};
use crate::config::{self, Loaded};
use crate::out::{Stdout, out, outln};
use crate::paths::Paths;
use crate::queue::{self, Request};

/// `check-config`: everything `serve` would check before starting, every
/// problem at once (`errors`: what loading the file found), else the
/// effective settings.
pub fn check_config(loaded: &Loaded, errors: Vec<config::ConfigError>, paths: &Paths) -> ExitCode {
    let mut errors = errors;
    let syntax = loaded.syntax_errors.min(errors.len());
    let more = crate::diagnose::problems(loaded, paths, &errors);
    errors.extend(more);
    errors[syntax..].sort_by_key(|e| (e.line, e.col));
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        eprintln!(
            "{} problem{} found",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" }
        );
        return ExitCode::FAILURE;
    }
    match &loaded.path {
        Some(p) => outln!("# {}: OK", p.display()),
        None => outln!("# no configuration file found: built-in defaults"),
    }
    // Every setting as it takes effect, the defaults the file leaves out
    // included.
    let mut effective = loaded.config.clone();
    effective.state_dir = Some(paths.state_dir.clone());
    effective.spool.dir = Some(paths.spool_dir.clone());
    effective.server.hostname = Some(crate::serve::hostname(loaded));
    for a in &mut effective.accounts {
        a.token_file = Some(crate::diagnose::token_file(loaded, paths, a));
    }
    // The local domain and the postmaster in effect (their defaults come
    // from the host and the first account).
    effective.local.domain = crate::local::domain(&loaded.config);
    effective.delivery.postmaster = loaded
        .config
        .delivery
        .postmaster
        .clone()
        .or_else(|| loaded.config.accounts.first().map(|a| a.email.clone()));
    // Each account's transport and the scope its stored token was granted.
    let ctx = account_context(paths, loaded, Secrets::Skip);
    for a in &loaded.config.accounts {
        if let Ok(acct) = oauth::Account::resolve(a, &ctx) {
            let scopes = oauth::status(std::slice::from_ref(&acct))
                .first()
                .map(|s| s.scopes.clone())
                .unwrap_or_default();
            outln!(
                "# account {}: transport {}, token scope {}",
                a.name,
                a.transport,
                if scopes.is_empty() {
                    "unknown (not authorized yet)".to_string()
                } else {
                    outbound::escape_controls(&scopes.join(" "))
                }
            );
        }
    }
    outln!("# maildrop directory: {}", paths.maildrop_dir.display());
    match crate::local::LocalNames::load(
        &loaded.config,
        &loaded.base_dir(),
        &crate::serve::hostname(loaded),
    ) {
        Ok(local) => {
            outln!(
                "# local names: no domain, or {} (domain from {})",
                local.local_domains.join(", "),
                local.source.as_str()
            );
            match &local.aliases.file {
                Some(f) => outln!(
                    "# aliases: {}: {} alias(es)",
                    f.display(),
                    local.aliases.len()
                ),
                None => outln!("# aliases: none ([local] aliases not set)"),
            }
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("1 problem found");
            return ExitCode::FAILURE;
        }
    }
    out!("{}", config::render(&effective));
    ExitCode::SUCCESS
}

/// `hash-password`.
pub fn hash_password() -> anyhow::Result<ExitCode> {
    let password = if std::io::stdin().is_terminal() {
        let first = read_hidden("Password: ")?;
        let again = read_hidden("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("an empty password cannot be used");
    }
    outln!("{}", inbound::hash_password(&password));
    Ok(ExitCode::SUCCESS)
}

/// Read one line from stdin: from a terminal without echoing it (after
/// `prompt` on stderr), else as it comes (scripts, pipes).
fn read_secret_line(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        return read_hidden(prompt);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Read a line from the terminal without echoing it.
fn read_hidden(prompt: &str) -> anyhow::Result<String> {
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr/tcsetattr on stdin, which is
    // a terminal (checked by the caller).
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    let have_tty = unsafe { libc::tcgetattr(fd, &mut saved) } == 0;
    if have_tty {
        let mut quiet = saved;
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let r = std::io::stdin().read_line(&mut line);
    if have_tty {
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
    r?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Whether a command needs the client secret (or service account key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrets {
    /// `authorize`, `send-test`, `check-config`: they talk to Google.
    Read,
    /// `token status`, `token import`: token files only. Run as root
    /// outside the unit, where a secret given only as a systemd credential
    /// is out of reach, they still work.
    Skip,
}

/// How the commands resolve accounts: like `serve` (relative paths against
/// the config file, `$CREDENTIALS_DIRECTORY` for credentials).
fn account_context(paths: &Paths, loaded: &Loaded, secrets: Secrets) -> oauth::AccountContext {
    let ctx = oauth::AccountContext::new(&paths.state_dir)
        .with_config_dir(loaded.base_dir())
        .with_credentials_dir(paths.credentials_dir.clone());
    match secrets {
        Secrets::Read => ctx,
        Secrets::Skip => ctx.without_secrets(),
    }
}

/// Resolve the account `name` only: another account's problem (say its
/// secret file) does not stop a command for this one.
fn find_account(
    loaded: &Loaded,
    paths: &Paths,
    name: &str,
    secrets: Secrets,
) -> anyhow::Result<oauth::Account> {
    let Some(config) = loaded.config.accounts.iter().find(|a| a.name == name) else {
        let known: Vec<&str> = loaded
            .config
            .accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        match &loaded.path {
            Some(p) if known.is_empty() => bail!(
                "{} has no [[accounts]]; add one (see config/oauthrelay.example.toml)",
                p.display()
            ),
            Some(p) => bail!(
                "no account named {name:?} in {} (accounts: {})",
                p.display(),
                known.join(", ")
            ),
            None => bail!(
                "no configuration file found, so there is no account {name:?}; create /etc/oauthrelay/oauthrelay.toml or pass --config"
            ),
        }
    };
    oauth::Account::resolve(config, &account_context(paths, loaded, secrets))
        .map_err(|e| crate::account_error(loaded, paths, name, e))
}

/// `authorize --account NAME`.
pub async fn authorize(
    loaded: &Loaded,
    paths: &Paths,
    name: &str,
    no_browser: bool,
    port: Option<u16>,
    device: bool,
) -> anyhow::Result<ExitCode> {
    let account = find_account(loaded, paths, name, Secrets::Read)?;
    if account.is_app_only() {
        bail!(
            "account {name:?} sends app-only (scope https://outlook.office365.com/.default): it needs no authorize step; an administrator grants the application SMTP.SendAsApp and registers its Exchange service principal (docs/microsoft-setup.md)"
        );
    }
    if device {
        let mut out = Stdout::new();
        let summary =
            oauth::device::run(&account, &oauth::device::Options::default(), &mut out).await?;
        outln!("{summary}");
        return Ok(ExitCode::SUCCESS);
    }
    if account.is_service_account() {
        bail!(
            "account {name:?} uses a service account (service_account_key_file): it needs no authorize step"
        );
    }
    let opts = oauth::authorize::Options {
        no_browser,
        port: port.unwrap_or(0),
        ..Default::default()
    };
    let stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut out = Stdout::new();
    let summary = oauth::authorize::run(&account, &opts, &mut out, Some(stdin)).await?;
    outln!("{summary}");
    Ok(ExitCode::SUCCESS)
}

/// How long `token import` waits for the token endpoint.
const IMPORT_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// `token import` / `token status`.
pub async fn token(loaded: &Loaded, paths: &Paths, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Import { account: name } => {
            let account = find_account(loaded, paths, &name, Secrets::Skip)?;
            if account.is_app_only() {
                bail!(
                    "account {:?} sends app-only (scope https://outlook.office365.com/.default); it has no refresh token to import",
                    account.name
                );
            }
            if account.is_service_account() {
                bail!(
                    "account {:?} uses a service account (service_account_key_file); it has no refresh token to import",
                    account.name
                );
            }
            let token = secrecy::SecretString::from(read_secret_line(
                "Paste the refresh token (it is not shown) and press Enter: ",
            )?);
            let raw = secrecy::ExposeSecret::expose_secret(&token);
            // One refresh first: a revoked or mistyped token is refused
            // here, not stored and found dead by the daemon a moment later.
            // (A token import_refresh_token refuses anyway is not sent.)
            let plausible = !raw.trim().is_empty()
                && !raw.trim().starts_with("ya29.")
                && !raw
                    .trim()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control());
            // Microsoft answers a refresh with a new refresh token, and a
            // provider may retire the one used: trying the token here
            // would use it up (the new one would have to be stored
            // instead). The daemon's first refresh tries it.
            let rotates = account.config.provider == oauth::Provider::Microsoft;
            let check = if plausible && !rotates {
                match find_account(loaded, paths, &name, Secrets::Read) {
                    Ok(with_secret) => {
                        oauth::check::check_refresh_token(&with_secret, raw, IMPORT_CHECK_TIMEOUT)
                            .await
                    }
                    Err(e) => oauth::check::TokenCheck::NotTried(format!("{e:#}")),
                }
            } else {
                oauth::check::TokenCheck::NotTried(String::new())
            };
            use oauth::check::TokenCheck;
            let detail = |code: &str, d: &Option<String>| match d {
                Some(d) => format!("{code}: {}", outbound::escape_controls(d)),
                None => code.to_string(),
            };
            let warning = match &check {
                TokenCheck::Refused { code, description } => bail!(
                    "the token endpoint refused this refresh token ({}): it is revoked, expired, or was issued to another OAuth client than account '{}' uses; nothing was stored. Get a new one with: oauthrelay authorize --account {}",
                    detail(code, description),
                    account.name,
                    account.name
                ),
                TokenCheck::Works => None,
                TokenCheck::ClientRefused { code, description } => Some(format!(
                    "the token endpoint refused the OAuth client ({}), so the token could not be tried; stored it anyway: fix client_id / the client secret, then check with `oauthrelay token status`",
                    detail(code, description)
                )),
                TokenCheck::Unreachable(e) => Some(format!(
                    "could not reach the token endpoint to try the token ({}); stored it untried: check with `oauthrelay token status` once the daemon has used it",
                    outbound::escape_controls(e)
                )),
                TokenCheck::NotTried(why) if !why.is_empty() => Some(format!(
                    "the token could not be tried here ({}); stored it untried: check with `oauthrelay token status` once the daemon has used it",
                    outbound::escape_controls(why)
                )),
                TokenCheck::NotTried(_) => None,
            };
            oauth::import_refresh_token(&account, raw)?;
            if let Some(w) = warning {
                eprintln!("oauthrelay: warning: {w}");
            }
            outln!(
                "Stored the refresh token for account '{}' in {}{}.\nA running oauthrelay picks it up within seconds; check with `oauthrelay token status`.",
                account.name,
                account.token_file.display(),
                if check == TokenCheck::Works {
                    " (tried it: the token endpoint issued an access token)"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Status { account, json } => {
            let mut resolved_all = true;
            let accounts = match &account {
                Some(name) => vec![find_account(loaded, paths, name, Secrets::Skip)?],
                None => {
                    let ctx = account_context(paths, loaded, Secrets::Skip);
                    let mut accounts = Vec::new();
                    for a in &loaded.config.accounts {
                        match oauth::Account::resolve(a, &ctx) {
                            Ok(a) => accounts.push(a),
                            Err(e) => {
                                eprintln!(
                                    "oauthrelay: {}",
                                    crate::account_error(loaded, paths, &a.name, e)
                                );
                                resolved_all = false;
                            }
                        }
                    }
                    accounts
                }
            };
            let status = oauth::status(&accounts);
            if json {
                outln!("{}", serde_json::to_string_pretty(&status)?);
            } else if status.is_empty() {
                outln!("No accounts configured.");
            } else {
                for s in &status {
                    print_status(s);
                }
            }
            let all_ok = resolved_all && status.iter().all(|s| s.auth.is_authorized());
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn print_status(s: &oauth::AccountStatus) {
    use outbound::escape_controls as safe;
    let fmt = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    outln!("{} <{}>", safe(&s.account), safe(&s.email));
    outln!(
        "  authorized:        {}",
        if s.auth.is_authorized() { "yes" } else { "NO" }
    );
    outln!(
        "  refresh token:     {}",
        if s.refresh_token_stored {
            "stored"
        } else {
            "none"
        }
    );
    outln!("  token file:        {}", s.token_file.display());
    outln!("  transport:         {}", s.transport);
    outln!(
        "  token scope:       {}",
        if s.scopes.is_empty() {
            "unknown (no token stored yet)".to_string()
        } else {
            safe(&s.scopes.join(" "))
        }
    );
    match s.access_token_expires_at {
        Some(t) => outln!("  access token:      valid until {}", fmt(t)),
        None => outln!("  access token:      none cached"),
    }
    if let Some(r) = &s.last_refresh {
        let outcome = match r.result {
            oauth::store::RefreshResult::Ok => "ok".to_string(),
            oauth::store::RefreshResult::Error => {
                let mut text = "failed".to_string();
                if let Some(code) = &r.error_code {
                    text.push_str(&format!(" ({})", safe(code)));
                }
                if let Some(e) = &r.error {
                    text.push_str(&format!(": {}", safe(e)));
                }
                text
            }
        };
        outln!("  last refresh:      {}, {outcome}", fmt(r.at));
    }
    if let Some(p) = s.auth.problem() {
        outln!("  problem:           {}", safe(p));
    }
    if let Some(f) = s.auth.fix() {
        outln!("  fix:               {}", safe(f));
    }
    if let Some(at) = s.auth.refusal().and_then(|r| r.retry_at) {
        outln!("  retried by itself: {}", fmt(at));
    }
}

/// `queue ...`.
pub async fn queue(paths: &Paths, cmd: QueueCommand) -> anyhow::Result<ExitCode> {
    let (req, json) = match cmd {
        QueueCommand::List { json } => (Request::List, json),
        QueueCommand::Show { id, json } => (Request::Show { id }, json),
        QueueCommand::Retry { id: Some(id), .. } => (Request::Retry { id }, false),
        QueueCommand::Retry { id: None, .. } => (Request::RetryAll, false),
        QueueCommand::Delete { id } => (Request::Delete { id }, false),
    };
    let v = queue::request(&paths.control_socket, &paths.spool_dir, req.clone()).await?;
    let mut out = Stdout::new();
    if json {
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    match req {
        Request::List => {
            queue::print_list(&serde_json::from_value::<Vec<queue::Entry>>(v)?, &mut out)?
        }
        Request::Show { .. } => queue::print_detail(&serde_json::from_value(v)?, &mut out)?,
        Request::Retry { id } => writeln!(out, "{id}: due now")?,
        Request::RetryAll => writeln!(out, "{} message(s) due now", v["retried"])?,
        Request::Delete { id } => writeln!(out, "{id}: deleted")?,
        Request::Info => writeln!(out, "{v}")?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `completions SHELL`: needs no configuration.
pub fn completions(shell: crate::cli::Shell) -> ExitCode {
    let mut out = Stdout::new();
    crate::cli::write_completions(shell, &mut out);
    let _ = out.flush();
    ExitCode::SUCCESS
}

/// `send-test --account NAME --to ADDR`.
pub async fn send_test(
    loaded: &Loaded,
    paths: &Paths,
    name: &str,
    to: &str,
) -> anyhow::Result<ExitCode> {
    let account = find_account(loaded, paths, name, Secrets::Read)?;
    crate::serve::send_test(loaded, account, to).await
}
