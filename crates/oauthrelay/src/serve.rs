//! `serve`: wire the crates together, run until SIGTERM/SIGINT, reload on
//! SIGHUP.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use prometheus_client::registry::Registry;
use spool::Spool;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Loaded};
use crate::http::{self, Problem, QueueGauges};
use crate::paths::{self, Paths};

/// Run the daemon; the exit code is what systemd sees.
pub async fn run(loaded: Loaded, paths: Paths) -> ExitCode {
    match serve(loaded, paths).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One log line per configuration problem, each with its place.
            match e.downcast_ref::<config::ConfigErrors>() {
                Some(all) => all.0.iter().for_each(|c| error!("{c}")),
                None => error!("{e:#}"),
            }
            crate::exit_code(&e)
        }
    }
}

pub(crate) fn hostname(loaded: &Loaded) -> String {
    loaded
        .config
        .server
        .hostname
        .clone()
        .unwrap_or_else(inbound::system_hostname)
}

/// `[delivery]` with the local domain (`[local] domain`, else its default)
/// filled in.
pub(crate) fn delivery(loaded: &Loaded) -> outbound::DeliveryConfig {
    let mut d = loaded.config.delivery.clone();
    d.local_domain = crate::local::domain(&loaded.config);
    d
}

/// Accounts with relative paths resolved against the config file.
fn accounts(loaded: &Loaded) -> Vec<oauth::AccountConfig> {
    let base = loaded.base_dir();
    loaded
        .config
        .accounts
        .iter()
        .cloned()
        .map(|mut a| {
            for p in [
                &mut a.ca_file,
                &mut a.token_file,
                &mut a.client_secret_file,
                &mut a.service_account_key_file,
            ]
            .into_iter()
            .flatten()
            {
                *p = paths::absolute(&base, p);
            }
            a
        })
        .collect()
}

/// The inbound side's check that some account takes a sender (`550 5.7.1`
/// otherwise); with no accounts configured every sender is accepted and
/// the mail waits.
fn sender_policy(accounts: Arc<RwLock<Vec<oauth::AccountConfig>>>) -> inbound::SenderPolicy {
    Arc::new(move |sender: &str| {
        let a = accounts.read().unwrap_or_else(|p| p.into_inner());
        a.is_empty() || a.iter().any(|acc| acc.matches_sender(sender))
    })
}

pub(crate) fn inbound_settings(
    loaded: &Loaded,
    policy: inbound::SenderPolicy,
) -> anyhow::Result<inbound::Settings> {
    let mut server = loaded.config.server.clone();
    let base = loaded.base_dir();
    if let Some(tls) = &mut server.tls {
        tls.cert_file = paths::absolute(&base, &tls.cert_file);
        tls.key_file = paths::absolute(&base, &tls.key_file);
    }
    let local = crate::local::LocalNames::load(&loaded.config, &base, &hostname(loaded))
        .map_err(|e| anyhow::Error::new(config::Misconfigured(e.to_string())))?;
    let settings = inbound::Settings::new(server, hostname(loaded), policy).map_err(|e| {
        let key: Vec<config::Key<'_>> = match &e {
            inbound::SettingsError::Certificate { .. } => {
                vec!["server".into(), "tls".into(), "cert_file".into()]
            }
            inbound::SettingsError::Key { .. } | inbound::SettingsError::CertificateKey { .. } => {
                vec!["server".into(), "tls".into(), "key_file".into()]
            }
            inbound::SettingsError::Limit { key, .. } => vec!["server".into(), (*key).into()],
            inbound::SettingsError::Hostname(_) => vec!["server".into(), "hostname".into()],
            inbound::SettingsError::ListenTlsWithoutTls => {
                vec!["server".into(), "listen_tls".into()]
            }
            inbound::SettingsError::PasswordHash { name } => user_key(loaded, name, false),
            inbound::SettingsError::DuplicateUser(name) => user_key(loaded, name, true),
        };
        anyhow::Error::new(loaded.error_at(&key, e.to_string()))
    })?;
    Ok(settings.with_local_names(Arc::new(local)))
}

/// The place of `[[server.users]]` entry `name` (its last one when
/// `last`, for a name used twice): its `name`, or its `password_hash`.
fn user_key<'a>(loaded: &Loaded, name: &str, last: bool) -> Vec<config::Key<'a>> {
    let users = &loaded.config.server.users;
    let at = if last {
        users.iter().rposition(|u| u.name == name)
    } else {
        users.iter().position(|u| u.name == name)
    };
    match at {
        Some(i) => vec![
            "server".into(),
            "users".into(),
            i.into(),
            if last { "name" } else { "password_hash" }.into(),
        ],
        None => vec!["server".into(), "users".into()],
    }
}

async fn open_spool(loaded: &Loaded, paths: &Paths) -> anyhow::Result<(Spool, spool::Recovery)> {
    let dir = paths.spool_dir.clone();
    let options = spool::Options {
        min_free_space: loaded.config.spool.min_free_space.0,
        ..spool::Options::default()
    };
    let opened = tokio::task::spawn_blocking(move || Spool::open_with(&dir, options)).await?;
    opened.with_context(|| format!("cannot open the spool in {}", paths.spool_dir.display()))
}

/// SMTP listeners: the sockets systemd passed (socket activation), else the
/// configured addresses (`listen`, then `listen_tls`). A passed socket
/// named `smtps` or `submissions` (`FileDescriptorName=` of its .socket
/// unit) speaks implicit TLS; every other one plain SMTP.
fn bind_smtp(loaded: &Loaded) -> anyhow::Result<Vec<inbound::Listener>> {
    use std::os::fd::FromRawFd;
    let fds: Vec<(i32, String)> = sd_notify::listen_fds_with_names()
        .map(|f| f.collect())
        .or_else(|_| {
            // LISTEN_FDNAMES that does not match LISTEN_FDS: plain SMTP.
            sd_notify::listen_fds().map(|f| f.map(|fd| (fd, String::new())).collect())
        })
        .unwrap_or_default();
    if !fds.is_empty() {
        info!(
            sockets = fds.len(),
            "using the sockets systemd passed (socket activation); [server] listen and listen_tls are not used"
        );
        let mut out = Vec::new();
        for (fd, name) in fds {
            // SAFETY: systemd hands these descriptors to us, once.
            let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            std.set_nonblocking(true)?;
            let socket = TcpListener::from_std(std)?;
            out.push(if matches!(name.as_str(), "smtps" | "submissions") {
                if loaded.config.server.tls.is_none() {
                    return Err(anyhow::Error::new(loaded.error_at(
                        &["server".into()],
                        format!("systemd passed the implicit-TLS socket {name:?} (FileDescriptorName={name}), but [server.tls] is not set: add cert_file and key_file"),
                    )));
                }
                inbound::Listener::tls(socket)
            } else {
                inbound::Listener::from(socket)
            });
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for addr in &loaded.config.server.listen {
        let l = std_listener(*addr).map_err(|e| bind_error(e, *addr, "[server] listen"))?;
        out.push(inbound::Listener::from(TcpListener::from_std(l)?));
    }
    for addr in &loaded.config.server.listen_tls {
        let l = std_listener(*addr).map_err(|e| bind_error(e, *addr, "[server] listen_tls"))?;
        out.push(inbound::Listener::tls(TcpListener::from_std(l)?));
    }
    Ok(out)
}

/// A listener that cannot be opened. An address not on this host, or a
/// port below 1024 without the capability, is a configuration problem
/// (exit 78: restarting cannot help); a port in use may free up.
fn bind_error(e: std::io::Error, addr: SocketAddr, key: &str) -> anyhow::Error {
    use std::io::ErrorKind::{AddrNotAvailable, PermissionDenied};
    let text = format!("cannot listen on {addr} ({key}): {e}");
    match e.kind() {
        AddrNotAvailable | PermissionDenied => anyhow::Error::new(config::Misconfigured(text)),
        _ => anyhow::anyhow!(text),
    }
}

fn std_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn serve(mut loaded: Loaded, paths: Paths) -> anyhow::Result<()> {
    // Take over the signals before anything else: from the moment the
    // listener accepts (and systemd or a supervisor is told we are ready),
    // a SIGTERM or SIGHUP must reach the loop below, not the default action
    // (which kills the process). One that arrives while we start up waits
    // in its stream and is handled as soon as the loop runs.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %loaded.path.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "none (built-in defaults)".into()),
        "oauthrelay starting"
    );
    let (spool, recovery) = open_spool(&loaded, &paths).await?;
    info!(
        "spool {}: {} queued message(s) recovered from {} segment(s){}{}",
        paths.spool_dir.display(),
        recovery.messages,
        recovery.segments,
        if recovery.torn_bytes > 0 {
            format!(
                ", {} bytes of unacknowledged partial write dropped",
                recovery.torn_bytes
            )
        } else {
            String::new()
        },
        if recovery.moved_aside > 0 {
            format!(
                ", {} damaged record(s) moved to corrupt/",
                recovery.moved_aside
            )
        } else {
            String::new()
        },
    );
    if recovery.lost > 0 || recovery.damaged_segments > 0 {
        let ids: Vec<String> = recovery.lost_ids.iter().map(|i| i.to_string()).collect();
        tracing::error!(
            lost_messages = recovery.lost,
            lost_ids = %ids.join(","),
            corrupt = %paths.spool_dir.join("corrupt").display(),
            damaged_segments = recovery.damaged_segments,
            "the spool lost {} acknowledged message(s){} to damage on disk; what is left is in corrupt/ (see the errors above)",
            recovery.lost,
            if recovery.damaged_segments > 0 { format!(" and {} damaged segment(s)", recovery.damaged_segments) } else { String::new() }
        );
    }

    let mut registry = Registry::default();
    let inbound_metrics = inbound::Metrics::new(&mut registry);
    let oauth_metrics = oauth::OAuthMetrics::register(&mut registry);
    let outbound_metrics = outbound::Metrics::new(&mut registry);
    let gauges = QueueGauges::register(&mut registry);
    crate::process::register(&mut registry);

    // Every problem with the files the configuration names (secrets,
    // tokens, certificates), in the words `check-config` uses.
    let problems = crate::diagnose::problems(&loaded, &paths, &[]);
    if !problems.is_empty() {
        return Err(config::ConfigErrors(problems).into());
    }
    let resolved = crate::resolve_accounts(&loaded, &paths)?;
    let tokens = oauth::TokenManager::new(
        resolved,
        oauth::ManagerOptions {
            metrics: Some(oauth_metrics),
            // Refusals that may be temporary are asked again on the
            // delivery retry schedule (capped at an hour).
            probe_initial: loaded.config.delivery.retry_initial,
            probe_max: loaded.config.delivery.retry_max,
            ..Default::default()
        },
    )
    .context("cannot start the token manager")?;
    if loaded.config.accounts.is_empty() {
        warn!(
            "no [[accounts]] configured: mail is accepted and kept in the queue until an account is set up and authorized (see docs/gmail-setup.md)"
        );
    }

    let route_accounts = Arc::new(RwLock::new(accounts(&loaded)));
    let settings = inbound_settings(&loaded, sender_policy(route_accounts.clone()))?;
    let listeners = bind_smtp(&loaded)?;
    let smtp_addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter(|l| l.kind == inbound::ListenerKind::Smtp)
        .filter_map(|l| l.socket.local_addr().ok())
        .collect();
    let smtps = listeners
        .iter()
        .any(|l| l.kind == inbound::ListenerKind::Smtps);
    for l in &listeners {
        if let Ok(a) = l.socket.local_addr() {
            match l.kind {
                inbound::ListenerKind::Smtp => info!("SMTP listening on {a}"),
                inbound::ListenerKind::Smtps => {
                    info!("SMTP with implicit TLS (smtps) listening on {a}")
                }
            }
        }
    }
    let metrics_listener = match loaded.config.metrics.listen {
        Some(addr) => {
            let l = std_listener(addr).map_err(|e| {
                bind_error(
                    e,
                    addr,
                    "[metrics] listen; set listen = \"\" to turn it off",
                )
            })?;
            let l = TcpListener::from_std(l)?;
            if let Ok(a) = l.local_addr() {
                info!("metrics listening on http://{a}/metrics");
            }
            Some(l)
        }
        None => None,
    };

    let shutdown = CancellationToken::new();
    let delivery_stop = CancellationToken::new();
    let inbound = Arc::new(inbound::Inbound::new(
        settings,
        spool.clone(),
        inbound_metrics,
    ));
    let delivery_config = delivery(&loaded);
    info!(
        "local domain: {} (senders in it, and unqualified ones, go upstream as their account's address); postmaster: {}",
        delivery_config.local_domain.as_deref().unwrap_or("none"),
        delivery_config
            .postmaster
            .clone()
            .or_else(|| loaded.config.accounts.first().map(|a| a.email.clone()))
            .unwrap_or_else(|| "none (no account)".into())
    );
    let outbound = outbound::Outbound::start(
        spool.clone(),
        tokens.clone(),
        accounts(&loaded),
        delivery_config,
        hostname(&loaded),
        outbound_metrics,
        delivery_stop.clone(),
    );

    if let Err(e) = crate::queue::serve_control(
        &paths.control_socket,
        spool.clone(),
        outbound.clone(),
        smtp_addrs.clone(),
        shutdown.clone(),
    )
    .await
    {
        warn!(socket = %paths.control_socket.display(), error = %e, "queue commands will not reach this daemon");
    }

    let maildrop = crate::maildrop::watch(crate::maildrop::Importer {
        dir: paths.maildrop_dir.clone(),
        inbound: (*inbound).clone(),
        shutdown: shutdown.clone(),
    });

    let http_task = metrics_listener.map(|l| {
        let readiness = readiness(tokens.clone(), outbound.clone());
        tokio::spawn(http::serve(
            l,
            registry,
            spool.clone(),
            outbound.clone(),
            gauges,
            readiness,
            crate::status::Sources {
                spool: spool.clone(),
                outbound: outbound.clone(),
                tokens: tokens.clone(),
                hostname: hostname(&loaded),
            },
            shutdown.clone(),
        ))
    });

    let smtp_running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let smtp_task = {
        let inbound = inbound.clone();
        let stop = shutdown.clone();
        let running = smtp_running.clone();
        tokio::spawn(async move {
            inbound.serve(listeners, stop).await;
            running.store(false, std::sync::atomic::Ordering::Release);
        })
    };

    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("accepting mail"),
    ]);
    info!("ready");
    let watchdog = crate::watchdog::start(
        crate::watchdog::Parts {
            smtp_running,
            spool: spool.clone(),
            outbound: outbound.clone(),
        },
        shutdown.clone(),
    );

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                notify_reloading();
                match reload(&loaded, &paths) {
                    Ok(new) if smtps && new.config.server.tls.is_none() => error!(
                        "configuration not reloaded, keeping the running one: [server.tls] is gone but implicit-TLS (smtps) listeners are open; restore it, or remove those sockets and restart"
                    ),
                    Ok(new) => {
                        apply_reload(
                            &new, &route_accounts, &inbound, &tokens, &outbound, &spool, &paths).await;
                        loaded = new;
                    }
                    Err(e) => error!("configuration not reloaded, keeping the running one: {e:#}"),
                }
                let _ = sd_notify::notify(&[
                    sd_notify::NotifyState::Ready,
                    sd_notify::NotifyState::Status("accepting mail"),
                ]);
            }
        }
    }

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // Stop taking mail first; sessions in DATA may finish. Delivery stops
    // starting new attempts at the same time; running ones may finish.
    shutdown.cancel();
    delivery_stop.cancel();
    let grace = loaded
        .config
        .server
        .shutdown_grace
        .max(loaded.config.delivery.shutdown_grace)
        + Duration::from_secs(5);
    if tokio::time::timeout(grace, smtp_task).await.is_err() {
        warn!("SMTP sessions did not end within the shutdown grace period");
    }
    if tokio::time::timeout(grace, outbound.join()).await.is_err() {
        warn!("deliveries did not end within the shutdown grace period; they stay queued");
    }
    if let Some(w) = watchdog {
        let _ = w.await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), maildrop).await;
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    spool.close().await.context("cannot flush the spool")?;
    info!("stopped");
    Ok(())
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` that `Type=notify-reload`
/// (systemd 253+) requires in the same message; older systemd ignores it.
fn notify_reloading() {
    let mut states = vec![
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::Status("reloading the configuration"),
    ];
    if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    let _ = sd_notify::notify(&states);
}

fn readiness(tokens: oauth::TokenManager, outbound: outbound::Outbound) -> http::Readiness {
    Arc::new(move || {
        let mut problems = Vec::new();
        let status = tokens.status();
        if status.is_empty() {
            // Mail is taken and kept, but nothing will ever send it.
            problems.push(Problem {
                component: "account".into(),
                account: None,
                problem: "no account configured; mail is held".into(),
                fix: Some(
                    "add an [[accounts]] section (docs/gmail-setup.md), reload, then oauthrelay authorize --account NAME"
                        .into(),
                ),
            });
        }
        for s in status {
            if !s.auth.is_authorized() {
                problems.push(Problem {
                    component: "account".into(),
                    account: Some(s.account.clone()),
                    problem: s
                        .auth
                        .problem()
                        .unwrap_or("cannot get an access token")
                        .to_string(),
                    fix: s.auth.fix().map(str::to_string),
                });
            }
        }
        for a in outbound.account_states() {
            if let Some(h) = a.held
                && !problems
                    .iter()
                    .any(|p| p.account.as_deref() == Some(a.name.as_str()))
            {
                problems.push(Problem {
                    component: "account".into(),
                    account: Some(a.name.clone()),
                    problem: format!("mail is held: {h}"),
                    fix: None,
                });
            }
        }
        problems
    })
}

fn reload(current: &Loaded, paths: &Paths) -> anyhow::Result<Loaded> {
    let new = config::load(current.path.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    refuse_emptied(current, &new)?;
    let new_paths = Paths::resolve(&new);
    if new_paths.spool_dir != paths.spool_dir {
        warn!("[spool] dir changed; the new directory is used after a restart");
    }
    if new.config.server.listen != current.config.server.listen {
        warn!("[server] listen changed; the new addresses are used after a restart");
    }
    if new.config.server.listen_tls != current.config.server.listen_tls {
        warn!("[server] listen_tls changed; the new addresses are used after a restart");
    }
    if new.config.metrics.listen != current.config.metrics.listen {
        warn!("[metrics] listen changed; the new address is used after a restart");
    }
    Ok(new)
}

/// A reload must not quietly drop everything: a file emptied by a
/// half-finished edit, or one that lost its `[[accounts]]`, is refused like
/// an invalid file (the running configuration stays). Removing every
/// account on purpose takes a restart.
fn refuse_emptied(current: &Loaded, new: &Loaded) -> anyhow::Result<()> {
    if !new.sets_anything() {
        anyhow::bail!(
            "{}",
            new.error_at(
                &[],
                "the configuration file is empty; reloading it would drop every account and setting (restart oauthrelay to run on the built-in defaults)"
            )
        );
    }
    if new.config.accounts.is_empty() && !current.config.accounts.is_empty() {
        let names: Vec<&str> = current
            .config
            .accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect();
        anyhow::bail!(
            "{}",
            new.error_at(
                &["accounts".into()],
                format!(
                    "the configuration has no [[accounts]] any more; reloading it would leave no account to deliver mail (running: {}). Restart oauthrelay to remove every account",
                    names.join(", ")
                )
            )
        );
    }
    Ok(())
}

async fn apply_reload(
    new: &Loaded,
    route_accounts: &Arc<RwLock<Vec<oauth::AccountConfig>>>,
    inbound: &inbound::Inbound,
    tokens: &oauth::TokenManager,
    outbound: &outbound::Outbound,
    spool: &Spool,
    paths: &Paths,
) {
    let resolved = match crate::resolve_accounts(new, paths) {
        Ok(r) => r,
        Err(e) => {
            error!("configuration not reloaded, keeping the running one: {e:#}");
            return;
        }
    };
    let policy = sender_policy(route_accounts.clone());
    let settings = match inbound_settings(new, policy) {
        Ok(s) => s,
        Err(e) => {
            error!("configuration not reloaded, keeping the running one: {e:#}");
            return;
        }
    };
    // The delivery side first: when the token manager's reload lifts a
    // hold (a token whose scope fits the account's new `transport`), the
    // mail it releases must go through the new transport, not the old one
    // (a `gmail.send` token offered to SMTP). The scheduler takes commands
    // before token events, so this reload is in place before the
    // "authorized again" event is handled; `tokens_reloaded` then releases
    // the accounts the token manager has just learned of.
    outbound.reload(accounts(new), delivery(new));
    let reloaded = tokens.reload(Some(resolved)).await;
    outbound.tokens_reloaded();
    if let Err(e) = reloaded {
        error!("accounts not reloaded: {e}");
        return;
    }
    *route_accounts.write().unwrap_or_else(|p| p.into_inner()) = accounts(new);
    inbound.reload(settings);
    spool.set_min_free_space(new.config.spool.min_free_space.0);
    info!("configuration reloaded");
}

/// The spool opened here, with an SMTP listener object on it, for
/// `sendmail` when no daemon runs (root, or the service user).
async fn offline_inbound(
    loaded: &Loaded,
    paths: &Paths,
) -> anyhow::Result<(Spool, inbound::Inbound)> {
    let (spool, _) = open_spool(loaded, paths).await?;
    let mut registry = Registry::default();
    let settings = match inbound_settings(loaded, inbound::accept_all_senders()) {
        Ok(s) => s,
        Err(e) => {
            let _ = spool.close().await;
            return Err(e);
        }
    };
    let server = inbound::Inbound::new(
        settings,
        spool.clone(),
        inbound::Metrics::new(&mut registry),
    );
    Ok((spool, server))
}

/// `sendmail` with no daemon running: open the spool here and store the
/// message through an in-process local session, so it gets the same
/// headers, checks and aliases as any other; it is delivered when the
/// daemon starts.
pub async fn submit_offline(
    loaded: &Loaded,
    paths: &Paths,
    env: &crate::sendmail::submit::Envelope,
    message: &[u8],
) -> anyhow::Result<()> {
    let (spool, server) = offline_inbound(loaded, paths).await?;
    let (client, ours) = tokio::io::duplex(64 << 10);
    let stop = CancellationToken::new();
    let task = {
        let server = server.clone();
        let stop = stop.clone();
        tokio::spawn(async move { server.handle_local(ours, stop).await })
    };
    let result = crate::sendmail::submit::stream_submit(client, env, message).await;
    let _ = task.await;
    spool.close().await?;
    crate::paths::hand_over(&paths.spool_dir);
    result.map(|_| ()).map_err(anyhow::Error::new)
}

/// `sendmail -bs` with no daemon running: the session runs here, on the
/// spool, over `stdio`. `Err` gives `stdio` back when the spool cannot be
/// opened (not root).
pub async fn smtp_offline<S>(
    loaded: &Loaded,
    paths: &Paths,
    stdio: S,
) -> Result<(), (S, anyhow::Error)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (spool, server) = match offline_inbound(loaded, paths).await {
        Ok(x) => x,
        Err(e) => return Err((stdio, e)),
    };
    server.handle_local(stdio, CancellationToken::new()).await;
    if let Err(e) = spool.close().await {
        error!("cannot flush the spool: {e}");
    }
    crate::paths::hand_over(&paths.spool_dir);
    Ok(())
}

/// `send-test`: one message now, every step printed.
pub async fn send_test(
    loaded: &Loaded,
    account: oauth::Account,
    to: &str,
) -> anyhow::Result<ExitCode> {
    let name = account.name.clone();
    let tokens = oauth::TokenManager::new(
        vec![account],
        oauth::ManagerOptions {
            watch_interval: None,
            ..Default::default()
        },
    )?;
    let cfg = accounts(loaded)
        .into_iter()
        .find(|a| a.name == name)
        .context("account not in the configuration")?;
    let mut progress = |step: &str| crate::out::outln!("{step}");
    match outbound::send_test(
        &tokens,
        &cfg,
        &loaded.config.delivery,
        &hostname(loaded),
        to,
        &mut progress,
    )
    .await
    {
        Ok(report) => {
            crate::out::outln!(
                "OK: {} accepted the message (Message-ID {}): {}",
                report.relay,
                report.message_id,
                report.reply
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            crate::out::outln!("FAILED: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "[[accounts]]\nname = \"default\"\nemail = \"me@example.com\"\nclient_id = \"id\"\nclient_secret_file = \"secret\"\n";

    fn write(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// A reload that would leave nothing (an empty file, or one without its
    /// accounts) is refused like an invalid file, naming the file.
    #[test]
    fn a_reload_that_drops_everything_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("oauthrelay.toml");
        write(
            &path,
            &format!("[server]\nmax_recipients = 50\n\n{ACCOUNT}"),
        );
        let current = config::load(Some(&path)).unwrap();
        let paths = Paths::resolve(&current);

        for empty in ["", "\n  \n", "# everything commented out\n# [server]\n"] {
            write(&path, empty);
            let e = reload(&current, &paths).unwrap_err().to_string();
            assert!(e.contains("oauthrelay.toml:1:1: "), "{e}");
            assert!(e.contains("the configuration file is empty"), "{e}");
        }

        write(&path, "[server]\nmax_recipients = 50\n");
        let e = reload(&current, &paths).unwrap_err().to_string();
        assert!(e.contains("oauthrelay.toml:"), "{e}");
        assert!(
            e.contains("no [[accounts]] any more") && e.contains("(running: default)"),
            "{e}"
        );

        // Other changes are fine.
        write(
            &path,
            &format!("[server]\nmax_recipients = 10\n\n{ACCOUNT}"),
        );
        let new = reload(&current, &paths).unwrap();
        assert_eq!(new.config.server.max_recipients, 10);

        // A daemon that runs without accounts may reload without them.
        write(&path, "[server]\nmax_recipients = 50\n");
        let none = config::load(Some(&path)).unwrap();
        write(&path, "[server]\nmax_recipients = 20\n");
        assert!(reload(&none, &paths).is_ok());
    }
}
