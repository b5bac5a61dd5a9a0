//! The accept loop: connection limit, one task per session, shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use spool::Spool;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::metrics::{Metrics, Refusal};
use crate::password::Verifier;
use crate::ratelimit::AuthLimiter;
use crate::session::reply::{Reply, ReplyCtx};
use crate::session::{Session, Shared};
use crate::settings::Settings;

/// How long the `421` to a connection over the limit may take to write.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause after an accept error (out of file descriptors...).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// At most one "too many connections" warning per this many seconds.
const LIMIT_WARN_EVERY_SECS: u64 = 10;

/// The SMTP listener. Cheap to clone; clones share sessions and settings.
#[derive(Clone)]
pub struct Inbound {
    inner: Arc<Inner>,
}

struct Inner {
    settings: RwLock<Arc<Settings>>,
    shared: Arc<Shared>,
    active: AtomicUsize,
    last_limit_warning: AtomicU64,
}

/// Counts a session as open until dropped.
struct SessionGuard(Arc<Inner>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.shared.metrics.session_ended();
    }
}

impl Inbound {
    /// A listener that queues accepted mail into `spool`.
    pub fn new(settings: Settings, spool: Spool, metrics: Metrics) -> Inbound {
        Inbound {
            inner: Arc::new(Inner {
                settings: RwLock::new(Arc::new(settings)),
                shared: Arc::new(Shared {
                    spool,
                    metrics,
                    limiter: AuthLimiter::default(),
                    verifier: Verifier::default(),
                }),
                active: AtomicUsize::new(0),
                last_limit_warning: AtomicU64::new(0),
            }),
        }
    }

    /// Use new settings (SIGHUP): sessions that start from now on get them;
    /// open sessions keep theirs, and listeners are not changed.
    pub fn reload(&self, settings: Settings) {
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
        self.inner.active.load(Ordering::Acquire)
    }

    /// Accept SMTP connections on every listener until `shutdown` is
    /// cancelled; then stop accepting, let sessions finish (those waiting
    /// for a command get `421 4.3.2` at once, those inside DATA/BDAT get up
    /// to `shutdown_grace`), and return when the last one has ended.
    pub async fn serve(&self, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        for listener in listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(listen = %addr, "SMTP listener ready");
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
        let guard = self.inner.open_session();
        let settings = self.inner.current();
        Session::new(stream, peer, settings, self.inner.shared.clone(), shutdown)
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

    fn open_session(self: &Arc<Self>) -> SessionGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.shared.metrics.session_started();
        SessionGuard(self.clone())
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
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
                    self.start(stream, peer, &shutdown, &tracker);
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
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let _ = stream.set_nodelay(true);
        let settings = self.current();
        let guard = self.open_session();
        if self.active.load(Ordering::Acquire) > settings.config.max_connections {
            drop(guard);
            self.shared.metrics.refused(Refusal::Limit);
            self.warn_limit(peer, settings.config.max_connections);
            let mut msg = Vec::with_capacity(64);
            Reply::TooManyConnections.write(
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
            return;
        }
        let shared = self.shared.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            Session::new(stream, peer, settings, shared, shutdown)
                .run()
                .await;
            drop(guard);
        });
    }

    fn warn_limit(&self, peer: SocketAddr, max: usize) {
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
            warn!(client = %peer, max_connections = max, "refusing connections: [server] max_connections sessions are open");
        } else {
            debug!(client = %peer, "refused: too many connections");
        }
    }
}
