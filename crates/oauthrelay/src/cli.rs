//! The command line (names fixed by interface.md).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "oauthrelay",
    version,
    about = "Relay plain SMTP to Gmail with OAuth2: a durable queue, retries, metrics",
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
    pub log_format: Option<crate::config::LogFormat>,

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
    /// First consent for an account: opens Google's consent page, receives
    /// the answer on a loopback port (PKCE), stores the refresh token.
    Authorize {
        #[arg(long)]
        account: String,
        /// Do not try to open a browser; just print the URL.
        #[arg(long)]
        no_browser: bool,
        /// Loopback port for the redirect (default: a free one). Fix it to
        /// forward it with `ssh -L PORT:127.0.0.1:PORT`.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Manage stored tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Send one message now, synchronously, printing each step.
    SendTest {
        #[arg(long)]
        account: String,
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
    /// sendmail-compatible submission from stdin:
    /// `sendmail [-t] [-i] [-oi] [-f ADDR] [-F NAME] [RCPT...]`.
    #[command(disable_help_flag = true)]
    Sendmail {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Read a refresh token from stdin and store it for the account.
    Import {
        #[arg(long)]
        account: String,
    },
    /// Per account: authorized or not, access-token expiry, last refresh.
    Status {
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Queued messages.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One message: envelope, attempts, last reply, headers.
    Show { id: String },
    /// Make deferred messages due now.
    Retry {
        /// Queue id (from `queue list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Remove one message from the queue (no bounce).
    Delete { id: String },
}
