//! `oauthrelay`: relay plain SMTP to Gmail with OAuth2.
//!
//! The binary's edge: command line, configuration file, logging, and the
//! wiring of the crates (`inbound` -> `spool` -> `outbound`, with `oauth`).

mod cli;
mod commands;
mod config;
mod http;
mod paths;
mod queue;
mod sendmail;
mod serve;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Loaded;
use crate::paths::Paths;

fn main() -> ExitCode {
    // Invoked through a link named `sendmail` (or `mailq`-less setups that
    // call /usr/sbin/sendmail): behave like sendmail.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let cli = if invoked_as == "sendmail" {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Cli {
            config: None,
            command: Command::Sendmail { args },
        }
    } else {
        Cli::parse()
    };

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .thread_name("oauthrelay")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("oauthrelay: cannot start the async runtime: {e}");
            return ExitCode::from(sendmail::EX_SOFTWARE);
        }
    };
    runtime.block_on(run(cli))
}

/// Two workers suit the small machines we run on; more cores get more.
fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

async fn run(cli: Cli) -> ExitCode {
    let path = config::find(cli.config.as_deref());
    let loaded = match config::load(path.as_deref()) {
        Ok(l) => l,
        Err(errors) => {
            eprintln!("{errors}");
            return match cli.command {
                Command::Sendmail { .. } => ExitCode::from(sendmail::EX_TEMPFAIL),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let level = loaded.config.log.level.clone();
    let quiet = !matches!(cli.command, Command::Serve);
    init_logging(&level, quiet);
    let paths = Paths::resolve(&loaded);

    let result = match cli.command {
        Command::Serve => return serve::run(loaded, paths).await,
        Command::CheckConfig => return commands::check_config(&loaded, &paths),
        Command::Sendmail { args } => return commands::sendmail(&loaded, &paths, &args).await,
        Command::Authorize {
            account,
            no_browser,
            port,
        } => commands::authorize(&loaded, &paths, &account, no_browser, port).await,
        Command::Token { command } => commands::token(&loaded, &paths, command).await,
        Command::SendTest { account, to } => {
            commands::send_test(&loaded, &paths, &account, &to).await
        }
        Command::Queue { command } => commands::queue(&paths, command).await,
        Command::HashPassword => commands::hash_password(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oauthrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Under systemd (`JOURNAL_STREAM` set) the journal adds
/// timestamps, so we do not. One-shot commands only show warnings unless
/// `RUST_LOG` says otherwise.
fn init_logging(level: &str, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn" } else { level };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Used by commands that need the resolved accounts.
pub(crate) fn resolve_accounts(
    loaded: &Loaded,
    paths: &Paths,
) -> anyhow::Result<Vec<oauth::Account>> {
    let ctx = oauth::AccountContext::new(&paths.state_dir)
        .with_config_dir(loaded.base_dir())
        .with_credentials_dir(paths.credentials_dir.clone());
    oauth::resolve_all(&loaded.config.accounts, &ctx).map_err(|e| account_error(loaded, e))
}

/// Point an account error at its place in the config file when it has one.
pub(crate) fn account_error(loaded: &Loaded, e: oauth::AccountError) -> anyhow::Error {
    match account_error_key(loaded, &e) {
        Some(key) => {
            let at = loaded.error_at(&key, e.to_string());
            anyhow::anyhow!("{at}")
        }
        None => anyhow::anyhow!("{e}"),
    }
}

fn account_error_key<'a>(
    loaded: &'a Loaded,
    e: &oauth::AccountError,
) -> Option<Vec<config::Key<'a>>> {
    let oauth::AccountError::Invalid { account, .. } = e else {
        // The other errors name the file that is wrong (and the chmod that
        // fixes it); that is where the user has to look.
        return None;
    };
    let i = loaded
        .config
        .accounts
        .iter()
        .position(|a| &a.name == account)?;
    Some(vec![
        config::Key::Name("accounts"),
        config::Key::Index(i),
        config::Key::Name("name"),
    ])
}
