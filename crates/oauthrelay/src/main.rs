//! `oauthrelay`: relay plain SMTP to Gmail with OAuth2.
//!
//! The binary's edge: command line, configuration file, logging, and the
//! wiring of the crates (`inbound` -> `spool` -> `outbound`, with `oauth`).

mod cli;
mod commands;
mod config;
mod diagnose;
mod http;
mod local;
mod logging;
mod maildrop;
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
    // Installed setgid oauthrelay-maildrop: give the group up at once.
    maildrop::drop_group();
    process::mark_start();
    // Invoked through a link named `sendmail`, `mailq` or `newaliases`:
    // behave like sendmail in that mode.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = Path::new(&argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_string();
    let mut sendmail_mode = sendmail::args::Mode::Deliver;
    let cli = if let Some(mode) = sendmail::invoked_mode(&invoked_as) {
        sendmail_mode = mode;
        // Arguments that are not UTF-8 are kept (lossily) so that they fail
        // the address checks rather than the program.
        let args: Vec<String> = std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
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
    runtime.block_on(run(cli, sendmail_mode))
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

async fn run(cli: Cli, sendmail_mode: sendmail::args::Mode) -> ExitCode {
    // sendmail's `-C FILE` names the configuration too.
    let explicit = match &cli.command {
        Command::Sendmail { args } if cli.config.is_none() => sendmail::config_option(args),
        _ => cli.config.clone(),
    };
    let path = config::find(explicit.as_deref());
    if let Command::CheckConfig = cli.command {
        return match config::load_all(path.as_deref()) {
            Ok((loaded, errors)) => {
                let paths = Paths::resolve(&loaded);
                commands::check_config(&loaded, errors, &paths)
            }
            Err(errors) => {
                logging::early_error(&errors.to_string());
                ExitCode::FAILURE
            }
        };
    }
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
        Command::CheckConfig => unreachable!("handled above"),
        Command::Sendmail { args } => {
            return sendmail::run(&loaded, &paths, &args, sendmail_mode).await;
        }
        Command::Authorize {
            account,
            no_browser,
            port,
            device,
        } => commands::authorize(&loaded, &paths, &account, no_browser, port, device).await,
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

/// Used by commands that need the resolved accounts: every account's
/// problem, each at its key.
pub(crate) fn resolve_accounts(
    loaded: &Loaded,
    paths: &Paths,
) -> anyhow::Result<Vec<oauth::Account>> {
    let ctx = diagnose::context(loaded, paths);
    let mut accounts = Vec::new();
    let mut errors = Vec::new();
    for (i, a) in loaded.config.accounts.iter().enumerate() {
        match oauth::Account::resolve(a, &ctx) {
            Ok(a) => accounts.push(a),
            Err(e) => errors.push(diagnose::account_error(loaded, paths, i, &e)),
        }
    }
    if !errors.is_empty() {
        return Err(config::ConfigErrors(errors).into());
    }
    // (Names are unique: loading the file checked that.)
    Ok(accounts)
}

/// Point an account error at its key in the config file (the key naming
/// the file it is about, else the account's `name`).
pub(crate) fn account_error(
    loaded: &Loaded,
    paths: &Paths,
    name: &str,
    e: oauth::AccountError,
) -> anyhow::Error {
    let name = match &e {
        oauth::AccountError::Invalid { account, .. } => account.as_str(),
        _ => name,
    };
    match loaded.config.accounts.iter().position(|a| a.name == name) {
        Some(i) => anyhow::Error::new(diagnose::account_error(loaded, paths, i, &e)),
        // The message names the file that is wrong (and the chmod that
        // fixes it); that is where the user has to look.
        None => anyhow::Error::new(config::Misconfigured(e.to_string())),
    }
}
