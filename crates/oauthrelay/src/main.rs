//! `oauthrelay`: relay plain SMTP to Gmail with OAuth2.
//!
//! The binary's edge: command line, configuration file, logging, and the
//! wiring of the crates (`inbound` -> `spool` -> `outbound`, with `oauth`).

mod cli;
mod commands;
mod config;
mod http;
mod logging;
mod out;
mod paths;
mod process;
mod queue;
mod sendmail;
mod serve;
mod status;
mod watchdog;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::config::Loaded;
use crate::paths::Paths;

fn main() -> ExitCode {
    process::mark_start();
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
            log_format: None,
            command: Command::Sendmail { args },
        }
    } else {
        Cli::parse()
    };
    if let Command::Completions { shell } = cli.command {
        return commands::completions(shell);
    }

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

/// sysexits(3) `EX_CONFIG`: the configuration is wrong, so restarting
/// cannot help (the unit's `RestartPreventExitStatus=78`).
pub(crate) const EX_CONFIG: u8 = 78;

async fn run(cli: Cli) -> ExitCode {
    let path = config::find(cli.config.as_deref());
    let loaded = match config::load(path.as_deref()) {
        Ok(l) => l,
        Err(errors) => {
            logging::early_error(&errors.to_string());
            return match cli.command {
                Command::Sendmail { .. } => ExitCode::from(sendmail::EX_TEMPFAIL),
                // Documented as "exit 0 or 1" (it is the validator).
                Command::CheckConfig => ExitCode::FAILURE,
                _ => ExitCode::from(EX_CONFIG),
            };
        }
    };
    let quiet = !matches!(cli.command, Command::Serve);
    let log = &loaded.config.log;
    logging::init(&log.level, cli.log_format.unwrap_or(log.format), quiet);
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
        Command::Completions { shell } => return commands::completions(shell),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("oauthrelay: {e:#}");
            exit_code(&e)
        }
    }
}

/// 78 when the error is in the configuration (or a file it names), else 1.
pub(crate) fn exit_code(e: &anyhow::Error) -> ExitCode {
    if is_config_error(e) {
        ExitCode::from(EX_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

fn is_config_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<config::ConfigError>()
            || c.is::<config::ConfigErrors>()
            || c.is::<config::Misconfigured>()
    })
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
        Some(key) => anyhow::Error::new(loaded.error_at(&key, e.to_string())),
        // The message already names the file (and the chmod that fixes it).
        None => anyhow::Error::new(config::Misconfigured(e.to_string())),
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
