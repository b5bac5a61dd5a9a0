//! `sendmail`: submission from stdin, as cron, mail(1), PHP and Symfony
//! expect; also `mailq` and `newaliases`.
//!
//! A message goes to the running daemon over SMTP on its loopback listener,
//! so it gets exactly the same treatment as any SMTP client's (bare names
//! qualified, aliases applied). With no daemon, root opens the spool and
//! stores it through an in-process session; other users leave it in the
//! maildrop ([`crate::maildrop`]), which the daemon imports when it starts.
//! Only when neither works does sendmail exit 75.

pub mod address;
pub mod args;
pub mod message;
pub mod submit;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;

use crate::config::Loaded;
use crate::local::{LocalNames, Via};
use crate::out::outln;
use crate::paths::Paths;
use crate::queue::{self, Request};
use args::{Args, Mode};
use submit::{Envelope, SubmitError};

/// sysexits.h codes callers may act on.
pub const EX_USAGE: u8 = 64;
pub const EX_DATAERR: u8 = 65;
pub const EX_SOFTWARE: u8 = 70;
pub const EX_TEMPFAIL: u8 = 75;

/// What the program was called as (argv[0]'s file name).
pub fn invoked_mode(name: &str) -> Option<Mode> {
    match name {
        "sendmail" => Some(Mode::Deliver),
        "mailq" => Some(Mode::ListQueue),
        "newaliases" => Some(Mode::Aliases),
        _ => None,
    }
}

/// `-C FILE` in sendmail arguments (read before the configuration is).
pub fn config_option(args: &[String]) -> Option<std::path::PathBuf> {
    args::parse(args, Mode::Deliver)
        .ok()?
        .config
        .map(std::path::PathBuf::from)
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("sendmail: {msg}");
    ExitCode::from(code)
}

/// Run sendmail with `raw` arguments, starting in `mode`.
pub async fn run(loaded: &Loaded, paths: &Paths, raw: &[String], mode: Mode) -> ExitCode {
    let a = match args::parse(raw, mode) {
        Ok(a) => a,
        Err(e) => return fail(EX_USAGE, e),
    };
    for w in &a.warnings {
        eprintln!("sendmail: warning: {w}");
    }
    if a.verbose {
        for i in &a.ignored {
            eprintln!("sendmail: {i}: no effect here, ignored");
        }
    }
    if a.extract && !matches!(a.mode, Mode::Deliver | Mode::Verify) {
        return fail(
            EX_USAGE,
            "-t can be used only when sending mail (-bm) or with -bv",
        );
    }
    let local = match LocalNames::load(
        &loaded.config,
        &loaded.base_dir(),
        &crate::serve::hostname(loaded),
    ) {
        Ok(l) => l,
        Err(e) if !matches!(a.mode, Mode::Aliases) => {
            return fail(crate::EX_CONFIG, e);
        }
        Err(e) => {
            eprintln!("newaliases: {e}");
            return ExitCode::from(crate::EX_CONFIG);
        }
    };
    match a.mode {
        Mode::Deliver => deliver(loaded, paths, &a, &local).await,
        Mode::Verify => verify(loaded, &a, &local),
        Mode::Aliases => aliases(&local),
        Mode::ListQueue => list_queue(paths).await,
        Mode::FlushQueue => flush_queue(paths, &a).await,
        Mode::Smtp => smtp(loaded, paths).await,
        Mode::Daemon => fail(
            EX_USAGE,
            "daemon mode (-bd) is `oauthrelay serve` (systemctl start oauthrelay)",
        ),
        Mode::Nothing => ExitCode::SUCCESS,
    }
}

/// The login name of the user running sendmail (from the uid, not the
/// environment).
fn login_name() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    crate::maildrop::user_name(uid)
        .filter(|n| address::check(n).is_ok_and(|c| &c == n))
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// The checked envelope and message of a `-bm` submission.
struct Submission {
    env: Envelope,
    message: Vec<u8>,
}

fn read_stdin(limit: u64) -> std::io::Result<Result<Vec<u8>, u64>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Ok(Err(limit));
    }
    Ok(Ok(buf))
}

/// Read stdin and check everything the caller gave; `Err` is the exit.
fn prepare(loaded: &Loaded, a: &Args, local: &LocalNames) -> Result<Submission, ExitCode> {
    let sender = match &a.from {
        Some(f) => address::sender(f).map_err(|e| fail(EX_DATAERR, e))?,
        None => login_name(),
    };
    // The sender is qualified here (for the From: header); recipients stay
    // bare, so the daemon knows they are local names.
    let sender = if !sender.is_empty() && !sender.contains('@') {
        local.qualify(&sender)
    } else {
        sender
    };
    let display = match &a.full_name {
        Some(n) => Some(address::display_name(n).map_err(|e| fail(EX_DATAERR, e))?),
        None => None,
    };
    let mut rcpts = Vec::new();
    for r in &a.recipients {
        rcpts.extend(address::list(r).map_err(|e| fail(EX_DATAERR, e))?);
    }
    let limit = loaded.config.server.max_message_size.0;
    let input = match read_stdin(limit) {
        Ok(Ok(b)) => b,
        Ok(Err(limit)) => {
            return Err(fail(
                EX_DATAERR,
                format!("message larger than the {limit}-byte limit ([server] max_message_size)"),
            ));
        }
        Err(e) => {
            return Err(fail(EX_TEMPFAIL, format!("cannot read the message: {e}")));
        }
    };
    let user = local.qualify(&login_name());
    let p = message::prepare(
        &input,
        &message::Options {
            extract: a.extract,
            ignore_dots: a.ignore_dots,
            sender: &sender,
            display_name: display.as_deref(),
            user: &user,
        },
    )
    .map_err(|e| fail(EX_DATAERR, format!("{e}; nothing was sent")))?;
    for r in p.header_recipients {
        if !rcpts.contains(&r) {
            rcpts.push(r);
        }
    }
    if rcpts.is_empty() {
        return Err(fail(
            EX_USAGE,
            "no recipients (name them, or use -t to read To:/Cc:/Bcc:)",
        ));
    }
    let max = loaded.config.server.max_recipients;
    if rcpts.len() > max {
        return Err(fail(
            EX_DATAERR,
            format!(
                "{} recipients; at most {max} ([server] max_recipients)",
                rcpts.len()
            ),
        ));
    }
    let eight_bit = p.eight_bit || a.body == Some(args::Body::EightBitMime);
    Ok(Submission {
        env: Envelope {
            sender,
            recipients: rcpts,
            eight_bit,
        },
        message: p.message,
    })
}

/// Where the daemon listens: what it says on its control socket (the
/// configured port may be 0, or the sockets may come from systemd), else
/// the configured address; on loopback when it listens on every address.
async fn daemon_address(loaded: &Loaded, paths: &Paths) -> Option<SocketAddr> {
    let listening: Vec<SocketAddr> =
        match queue::ask_daemon(&paths.control_socket, &Request::Info).await {
            Some(Ok(v)) => serde_json::from_value(v["smtp"].clone()).unwrap_or_default(),
            _ => loaded.config.server.listen.clone(),
        };
    let a = *listening.first()?;
    let ip = match a.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(SocketAddr::new(ip, a.port()))
}

/// `-bm`.
async fn deliver(loaded: &Loaded, paths: &Paths, a: &Args, local: &LocalNames) -> ExitCode {
    let s = match prepare(loaded, a, local) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let daemon_err = match daemon_address(loaded, paths).await {
        Some(addr) => match submit::tcp(addr, &s.env, &s.message).await {
            Ok(reply) => {
                if a.verbose {
                    eprintln!("sendmail: {}", outbound::escape_controls(&reply));
                }
                return ExitCode::SUCCESS;
            }
            Err(e) if e.is_permanent() => return fail(EX_DATAERR, e),
            Err(e) => e.to_string(),
        },
        None => "[server] listen is empty".to_string(),
    };
    // No daemon (or it cannot take mail now): the spool directly (root, or
    // the service user), else the maildrop.
    let spool_err = match crate::serve::submit_offline(loaded, paths, &s.env, &s.message).await {
        Ok(()) => {
            if a.verbose {
                eprintln!(
                    "sendmail: oauthrelay is not running ({daemon_err}); queued in the spool"
                );
            }
            return ExitCode::SUCCESS;
        }
        Err(e)
            if e.downcast_ref::<SubmitError>()
                .is_some_and(SubmitError::is_permanent) =>
        {
            return fail(EX_DATAERR, e);
        }
        Err(e) => format!("{e:#}"),
    };
    let dropped = crate::maildrop::Dropped {
        sender: s.env.sender.clone(),
        recipients: s.env.recipients.clone(),
        eight_bit: s.env.eight_bit,
        message: s.message,
    };
    match crate::maildrop::write(&paths.maildrop_dir, &dropped) {
        Ok(p) => {
            if a.verbose {
                eprintln!(
                    "sendmail: oauthrelay is not running ({daemon_err}); left in the maildrop as {}",
                    p.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(
            EX_TEMPFAIL,
            format!(
                "nothing was queued: oauthrelay is not running ({daemon_err}), the spool cannot be written ({spool_err}), and neither can the maildrop {} ({e}; is this program installed setgid oauthrelay-maildrop?)",
                paths.maildrop_dir.display()
            ),
        ),
    }
}

/// `-bv`: where each recipient goes, and which account sends for the sender.
fn verify(loaded: &Loaded, a: &Args, local: &LocalNames) -> ExitCode {
    let mut rcpts = Vec::new();
    for r in &a.recipients {
        match address::list(r) {
            Ok(l) => rcpts.extend(l),
            Err(e) => return fail(EX_DATAERR, e),
        }
    }
    if a.extract {
        let input = match read_stdin(loaded.config.server.max_message_size.0) {
            Ok(Ok(b)) => b,
            _ => return fail(EX_DATAERR, "cannot read the message"),
        };
        let user = local.qualify(&login_name());
        match message::prepare(
            &input,
            &message::Options {
                extract: true,
                ignore_dots: a.ignore_dots,
                sender: &user,
                display_name: None,
                user: &user,
            },
        ) {
            Ok(p) => rcpts.extend(p.header_recipients),
            Err(e) => return fail(EX_DATAERR, e),
        }
    }
    if rcpts.is_empty() {
        return fail(EX_USAGE, "-bv: no recipients");
    }
    let sender = match &a.from {
        Some(f) => match address::sender(f) {
            Ok(s) => s,
            Err(e) => return fail(EX_DATAERR, e),
        },
        None => login_name(),
    };
    let sender = if !sender.is_empty() && !sender.contains('@') {
        local.qualify(&sender)
    } else {
        sender
    };
    let account = loaded
        .config
        .accounts
        .iter()
        .find(|acc| acc.matches_sender(&sender))
        .map(|acc| format!("account {} ({})", acc.name, acc.email))
        .unwrap_or_else(|| {
            if loaded.config.accounts.is_empty() {
                "no account configured: mail would wait in the queue".into()
            } else {
                "no account takes this sender: mail would be refused".into()
            }
        });
    outln!("sender <{}>: {account}", outbound::escape_controls(&sender));
    for r in rcpts {
        for res in local.resolve(&r) {
            let how = match &res.via {
                Via::Direct => "deliverable".to_string(),
                Via::Alias(chain) => format!("via alias {}", chain.join(" -> ")),
                Via::Postmaster(_) => "no alias: to the postmaster".to_string(),
                Via::Loop(chain) => format!("alias loop {}: to the postmaster", chain.join(" -> ")),
                Via::Unresolved => "no alias and no postmaster: sent as it is".to_string(),
            };
            outln!(
                "{} -> <{}> ({how})",
                outbound::escape_controls(&r),
                outbound::escape_controls(&res.address)
            );
        }
    }
    ExitCode::SUCCESS
}

/// `-bi`, `newaliases`: check the aliases file and say what it maps.
fn aliases(local: &LocalNames) -> ExitCode {
    let pm = local.postmaster.as_deref().unwrap_or("(none: no account)");
    let Some(file) = &local.aliases.file else {
        outln!(
            "newaliases: no aliases file ([local] aliases); local names (name@{}) go to the postmaster <{pm}>",
            local.domain
        );
        return ExitCode::SUCCESS;
    };
    outln!(
        "{}: {} alias(es); local domain {}, postmaster <{pm}>",
        file.display(),
        local.aliases.len(),
        local.domain
    );
    for name in local.aliases.map.keys() {
        let targets: Vec<String> = local
            .resolve(name)
            .into_iter()
            .map(|r| format!("<{}>", outbound::escape_controls(&r.address)))
            .collect();
        outln!("{name} -> {}", targets.join(", "));
    }
    outln!(
        "newaliases: oauthrelay reads this file itself; the running daemon re-reads it on reload (systemctl reload oauthrelay)"
    );
    ExitCode::SUCCESS
}

/// `-bp`, `mailq`.
async fn list_queue(paths: &Paths) -> ExitCode {
    match crate::commands::queue(paths, crate::cli::QueueCommand::List { json: false }).await {
        Ok(c) => c,
        Err(e) => fail(EX_TEMPFAIL, format!("{e:#}")),
    }
}

/// `-q`, `-qIID`.
async fn flush_queue(paths: &Paths, a: &Args) -> ExitCode {
    let cmd = crate::cli::QueueCommand::Retry {
        id: a.flush_id.clone(),
        all: a.flush_id.is_none(),
    };
    match crate::commands::queue(paths, cmd).await {
        Ok(c) => c,
        Err(e) => fail(EX_TEMPFAIL, format!("{e:#}")),
    }
}

/// `-bs`: an SMTP session on stdin and stdout. With the daemon running it
/// is the daemon's own session, over its loopback listener; without it,
/// root gets an in-process session on the spool. Anyone else is told to
/// try later (`421`), so the client keeps its mail.
async fn smtp(loaded: &Loaded, paths: &Paths) -> ExitCode {
    use tokio::io::AsyncWriteExt;
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    if let Some(addr) = daemon_address(loaded, paths).await
        && let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await
    {
        let mut stdio = stdio;
        let _ = tokio::io::copy_bidirectional(&mut stdio, &mut tcp).await;
        let _ = stdio.shutdown().await;
        return ExitCode::SUCCESS;
    }
    match crate::serve::smtp_offline(loaded, paths, stdio).await {
        Ok(()) => ExitCode::SUCCESS,
        Err((mut stdio, e)) => {
            let host = crate::serve::hostname(loaded);
            let _ = stdio
                .write_all(
                    format!("421 4.3.2 {host} oauthrelay is not running and its queue cannot be written by this user; try again later\r\n").as_bytes(),
                )
                .await;
            let _ = stdio.flush().await;
            fail(
                EX_TEMPFAIL,
                format!("oauthrelay is not running and the queue cannot be opened: {e:#}"),
            )
        }
    }
}
