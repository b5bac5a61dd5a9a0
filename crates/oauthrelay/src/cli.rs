//! The command line. Its names are a stable interface (scripts, unit
//! files and the man pages generated from this file rely on them).
//!
//! This file depends on `clap`, `clap_complete`, `serde` and `std` only,
//! never on `crate::`: `crates/xtask` includes it (`#[path]`) to generate
//! the man pages and completion scripts on the build host, so they come
//! from the same definition even when the binary is cross-compiled. Every
//! argument carries a help text (a unit test below checks it): the man
//! pages and `--help` are made from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "oauthrelay",
    version,
    about = "Relay plain SMTP to Gmail or Microsoft 365 with OAuth2: a durable queue, retries, metrics",
    long_about = "oauthrelay accepts mail over plain SMTP (printers, scanners, cron, legacy apps), \
                  stores it durably, and relays it to smtp.gmail.com authenticating with OAuth2 \
                  (XOAUTH2). Run `oauthrelay serve` to start the relay; see `oauthrelay help <command>`."
)]
pub struct Cli {
    /// Configuration file. Default: $OAUTHRELAY_CONFIG, then
    /// /etc/oauthrelay/oauthrelay.toml, then ~/.config/oauthrelay/oauthrelay.toml;
    /// with none found, built-in defaults.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log format: `text` (Postfix-style lines) or `json` (one object per
    /// line). Default: `[log] format`.
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay in the foreground (what systemd runs); logs to stderr.
    Serve,
    /// Validate the configuration and print the effective settings
    /// (secrets redacted). Exit 1 with `file:line:col: message` on errors.
    CheckConfig,
    /// First consent for an account: opens the provider's consent page,
    /// receives the answer on a loopback port (PKCE), stores the refresh
    /// token. With --device: device-code sign-in (RFC 8628).
    Authorize {
        /// The account to authorize (its `name` in [[accounts]]).
        #[arg(long, value_name = "NAME")]
        account: String,
        /// Do not try to open a browser; just print the URL.
        #[arg(long)]
        no_browser: bool,
        /// Loopback port for the redirect (default: a free one). Fix it to
        /// forward it with `ssh -L PORT:127.0.0.1:PORT`.
        #[arg(long, value_name = "PORT", conflicts_with = "device")]
        port: Option<u16>,
        /// Device-code sign-in (RFC 8628) for machines without a browser:
        /// prints a code and an address to enter it at on any device, and
        /// waits for the sign-in.
        #[arg(long)]
        device: bool,
    },
    /// Manage stored tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Send one message now, synchronously, printing each step.
    SendTest {
        /// The account to send through (its `name` in [[accounts]]).
        #[arg(long, value_name = "NAME")]
        account: String,
        /// Recipient of the test message.
        #[arg(long, value_name = "ADDR")]
        to: String,
    },
    /// Inspect and manage the queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Read a password on stdin and print a hash for [[server.users]].
    HashPassword,
    /// sendmail-compatible submission from stdin, with Postfix's
    /// options and modes (-bs, -bp, -bi, -bv, -q); see
    /// oauthrelay-sendmail(8).
    #[command(disable_help_flag = true)]
    Sendmail {
        /// sendmail options and recipients, as Postfix's sendmail(1) takes them.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Print a completion script for SHELL on stdout. The packages install
    /// them; by hand, e.g. `oauthrelay completions bash >
    /// /etc/bash_completion.d/oauthrelay`.
    Completions {
        /// The shell to complete for.
        shell: Shell,
    },
}

/// `[log] format` and `--log-format` (config.rs re-exports it).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The shells `completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Write the completion script for `shell` (what `oauthrelay completions
/// SHELL` prints, and what the packages ship).
pub fn write_completions(shell: Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory;
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(generator, &mut Cli::command(), "oauthrelay", out);
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Read a refresh token from stdin and store it for the account.
    Import {
        /// The account the token belongs to (its `name` in [[accounts]]).
        #[arg(long, value_name = "NAME")]
        account: String,
    },
    /// Per account: authorized or not, access-token expiry, last refresh.
    Status {
        /// Only this account (default: every account).
        #[arg(long, value_name = "NAME")]
        account: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Queued messages.
    List {
        /// Print one JSON array instead of the `mailq`-style table.
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, attempts, last reply, headers.
    Show {
        /// Queue id (from `queue list`).
        id: String,
        /// Print one JSON object (`entry` as in `queue list --json`,
        /// `envelope`, `delivery`, `headers`) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make deferred messages due now and probe held accounts' logins at
    /// once: one (ID) or all (--all).
    #[command(override_usage = "oauthrelay queue retry <ID>\n       oauthrelay queue retry --all")]
    Retry {
        /// Queue id (from `queue list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Every deferred message.
        #[arg(long)]
        all: bool,
    },
    /// Remove one message from the queue (no bounce).
    Delete {
        /// Queue id (from `queue list`).
        id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `--help`, the man pages and the completion scripts show these
    /// texts: a flag without one is a flag nobody can find out about.
    #[test]
    fn every_command_and_every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() && cmd.get_long_about().is_none() {
                missing.push(format!("`{path}` (the command itself)"));
            }
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("`{path}` argument `{}`", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "oauthrelay", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        // The walk did see the nested arguments (a guard against a walk
        // that checks nothing).
        let retry = cmd
            .find_subcommand("queue")
            .and_then(|q| q.find_subcommand("retry"))
            .expect("queue retry");
        assert!(retry.get_arguments().any(|a| a.get_id() == "all"));
    }
}
