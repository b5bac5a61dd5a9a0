//! The accept loop: who gets a session ([`crate::slots`]), one task per
//! session, shutdown. A client refused at connect is told why and the
//! connection closed at once: it holds no slot.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool::Spool;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, Refusal};
use crate::password::{VERIFY_WAIT, Verifier};
use crate::ratelimit::AuthLimiter;
use crate::refusals::RefusalLog;
use crate::session::reply::{Reply, ReplyCtx};
use crate::session::{Session, Shared};
use crate::settings::Settings;
use crate::slots::{Full, Slot, Slots};

/// How long the reply to a connection refused at connect may take to write.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause after an accept error (out of file descriptors...).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one "refusing connections" warning per this many seconds.
const LIMIT_WARN_EVERY_SECS: u64 = 10;

/// What a listening socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain SMTP; STARTTLS is offered when `[server.tls]` is set
    /// (`[server] listen`).
    Smtp,
    /// Implicit TLS: the TLS handshake comes first, then SMTP (RFC 8314,
    /// port 465; `[server] listen_tls`).
    Smtps,
}

impl ListenerKind {
    /// The name in log lines and the `listener` metric label.
    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Smtps => "smtps",
        }
    }
}

/// A listening socket and what it speaks. A plain [`TcpListener`] converts
/// into an SMTP one.
#[derive(Debug)]
pub struct Listener {
    pub socket: TcpListener,
    pub kind: ListenerKind,
}

impl Listener {
    /// An implicit-TLS listener (needs `[server.tls]`).
    pub fn tls(socket: TcpListener) -> Listener {
        Listener {
            socket,
            kind: ListenerKind::Smtps,
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(socket: TcpListener) -> Listener {
        Listener {
            socket,
            kind: ListenerKind::Smtp,
        }
    }
}

/// The SMTP listener. Cheap to clone; clones share sessions and settings.
#[derive(Clone)]
pub struct Inbound {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RwLock<Arc<Settings>>,
    shared: Arc<Shared>,
    slots: Arc<Slots>,
    last_limit_warning: AtomicU64,
}

/// An open session: its slot, and the sessions gauge, until dropped.
struct SessionGuard {
    _slot: Slot,
    metrics: Metrics,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics.session_ended();
    }
}

impl Inbound {
    /// A listener that queues accepted mail into `spool`.
    pub fn new(settings: Settings, spool: Spool, metrics: Metrics) -> Inbound {
        let checks = settings.config.max_password_checks;
        Inbound {
            inner: Arc::new(Inner {
                settings: RwLock::new(Arc::new(settings)),
                shared: Arc::new(Shared {
                    spool,
                    metrics,
                    limiter: AuthLimiter::default(),
                    verifier: Verifier::new(checks, VERIFY_WAIT),
                    refusals: RefusalLog::default(),
                }),
                slots: Arc::new(Slots::default()),
                last_limit_warning: AtomicU64::new(0),
            }),
        }
    }

    /// Use new settings (SIGHUP): sessions that start from now on get them;
    /// open sessions keep theirs, and listeners are not changed. A new
    /// `max_password_checks` applies to checks that start from now on.
    pub fn reload(&self, settings: Settings) {
        self.inner
            .shared
            .verifier
            .resize(settings.config.max_password_checks);
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        info!("SMTP settings reloaded; new sessions use them");
    }

    /// The settings new sessions get.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner.current()
    }

    /// Sessions now open.
    pub fn active_sessions(&self) -> usize {
        self.inner.slots.open()
    }

    /// Accept SMTP connections on every listener until `shutdown` is
    /// cancelled; then stop accepting, let sessions finish (those waiting
    /// for a command get `421 4.3.2` at once, those inside DATA/BDAT get up
    /// to `shutdown_grace`), and return when the last one has ended.
    /// Implicit-TLS listeners ([`Listener::tls`]) hand every connection to
    /// a TLS handshake first.
    pub async fn serve<L: Into<Listener>>(&self, listeners: Vec<L>, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        for listener in listeners {
            let listener: Listener = listener.into();
            if let Ok(addr) = listener.socket.local_addr() {
                info!(listen = %addr, listener = listener.kind.label(), "SMTP listener ready");
            }
            let inner = self.inner.clone();
            let t = tracker.clone();
            let stop = shutdown.clone();
            tracker.spawn(async move { inner.accept_loop(listener, stop, t).await });
        }
        tracker.close();
        tracker.wait().await;
        debug!("SMTP listener stopped; every session has ended");
    }

    /// Run one session over any stream (a test's in-memory pipe, an inetd
    /// socket...). `peer` decides whether the client is trusted. Returns when
    /// the session ends.
    pub async fn handle<S>(&self, stream: S, peer: SocketAddr, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let guard = self.inner.open_session(self.inner.slots.force());
        let settings = self.inner.current();
        Session::new(
            stream,
            peer,
            ListenerKind::Smtp,
            settings,
            self.inner.shared.clone(),
            shutdown,
        )
        .run()
        .await;
        drop(guard);
    }

    /// Run one session for a local submitter (`sendmail -bs` on stdin and
    /// stdout, a message from the maildrop): trusted like a client in
    /// `allow_networks` whatever `allow_networks` says, and logged as
    /// `127.0.0.1`. Returns when the session ends.
    pub async fn handle_local<S>(&self, stream: S, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let guard = self.inner.open_session(self.inner.slots.force());
        let settings = self.inner.current();
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        Session::new(
            stream,
            peer,
            ListenerKind::Smtp,
            settings,
            self.inner.shared.clone(),
            shutdown,
        )
        .local_client()
        .run()
        .await;
        drop(guard);
    }
}

impl Inner {
    fn current(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn open_session(&self, slot: Slot) -> SessionGuard {
        self.shared.metrics.session_started();
        SessionGuard {
            _slot: slot,
            metrics: self.shared.metrics.clone(),
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: Listener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let Listener {
            socket: listener,
            kind,
        } = listener;
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    self.start(stream, peer, kind, &shutdown, &tracker);
                }
                Err(e) => {
                    use std::io::ErrorKind::*;
                    if matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted) {
                        continue;
                    }
                    warn!(error = %e, "accepting an SMTP connection failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
        // Dropping the listener here closes it: no new connections queue up.
    }

    fn start(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        kind: ListenerKind,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let _ = stream.set_nodelay(true);
        let settings = self.current();
        let ip = peer.ip().to_canonical();
        let trusted = settings.trusts(ip);
        if !trusted && settings.users.is_empty() {
            self.shared.metrics.refused(Refusal::Network);
            self.shared.refusals.refused(peer, shutdown, Some(tracker));
            refuse(stream, kind, Reply::NetworkRefused(ip), &settings, tracker);
            return;
        }
        let slot = match self.slots.take(ip, trusted, settings.slot_limits()) {
            Ok(slot) => slot,
            Err(full) => {
                let reply = match full {
                    Full::Total | Full::Outside => {
                        self.shared.metrics.refused(Refusal::Limit);
                        self.warn_limit(peer, full, &settings);
                        Reply::TooManyConnections
                    }
                    Full::Client => {
                        self.shared.metrics.refused(Refusal::ClientLimit);
                        self.warn_limit(peer, full, &settings);
                        Reply::TooManyFromClient(ip)
                    }
                };
                refuse(stream, kind, reply, &settings, tracker);
                return;
            }
        };
        let guard = self.open_session(slot);
        let shared = self.shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            Session::new(stream, peer, kind, settings, shared, shutdown)
                .run()
                .await;
            drop(guard);
        });
    }

    fn warn_limit(&self, peer: SocketAddr, full: Full, settings: &Settings) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let last = self.last_limit_warning.load(Ordering::Relaxed);
        if now >= last + LIMIT_WARN_EVERY_SECS
            && self
                .last_limit_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let limits = settings.slot_limits();
            match full {
                Full::Total => {
                    warn!(client = %peer, max_connections = limits.total, "refusing connections: [server] max_connections sessions are open")
                }
                Full::Outside => {
                    warn!(client = %peer, max_connections = limits.total, reserved_connections = limits.reserved, "refusing connections from outside allow_networks: every slot but the reserved_connections kept for allow_networks is taken")
                }
                Full::Client => {
                    warn!(client = %peer, max_connections_per_client = limits.per_client, "refusing connections: this client has [server] max_connections_per_client sessions open")
                }
            }
        } else {
            debug!(client = %peer, reason = ?full, "refused: too many connections");
        }
    }
}

/// Tell a client refused at connect why, and close the connection. The
/// reply fits in the socket's send buffer, so this takes no time unless the
/// connection is already broken; it never holds a slot. On an implicit-TLS
/// listener the connection is closed at once: a reply would need a TLS
/// handshake first, which strangers are not given (the log and the metrics
/// say why).
fn refuse(
    stream: TcpStream,
    kind: ListenerKind,
    reply: Reply<'_>,
    settings: &Settings,
    tracker: &TaskTracker,
) {
    if kind == ListenerKind::Smtps {
        drop(stream);
        return;
    }
    let mut msg = Vec::with_capacity(96);
    reply.write(
        &mut msg,
        &ReplyCtx {
            host: &settings.hostname,
        },
    );
    let mut stream = stream;
    tracker.spawn(async move {
        let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, async {
            stream.write_all(&msg).await?;
            stream.shutdown().await
        })
        .await;
    });
}
