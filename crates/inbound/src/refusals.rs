//! The log of connections refused because the client is outside
//! `allow_networks` (and no user may log in). A refusal costs nothing, so a
//! scanner can make thousands a second: the first of each minute is logged
//! as it happens, the rest are counted and summed up in one line when the
//! minute is over (or at shutdown), with the address that made most.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// One full line per this long; the rest are summarised.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Distinct addresses counted per window (a scan from many addresses
/// cannot make the count grow without bound).
const MAX_ADDRESSES: usize = 1024;

#[derive(Default)]
struct Window {
    /// When the current window started, if one is open.
    started: Option<Instant>,
    /// Refusals in this window after the first (not logged yet).
    more: u64,
    by_ip: HashMap<IpAddr, u64>,
    /// Addresses beyond [`MAX_ADDRESSES`] were seen.
    overflow: bool,
}

/// Shared by every listener and session of one server.
#[derive(Clone, Default)]
pub(crate) struct RefusalLog {
    window: Arc<Mutex<Window>>,
}

impl RefusalLog {
    /// Log (or count) one refused connection from `peer`. `shutdown` ends
    /// the window early so its summary is not lost; the summary's task
    /// runs on `tracker` when given (the server waits for it, which takes
    /// no time once `shutdown` is cancelled).
    pub(crate) fn refused(
        &self,
        peer: SocketAddr,
        shutdown: &CancellationToken,
        tracker: Option<&TaskTracker>,
    ) {
        let now = Instant::now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let open = w.started.is_some_and(|s| now < s + WINDOW || w.more > 0);
        if !open {
            *w = Window {
                started: Some(now),
                ..Window::default()
            };
            drop(w);
            info!(client = %peer, "refused: not in [server] allow_networks and no [[server.users]] to authenticate");
            return;
        }
        w.more += 1;
        let ip = peer.ip().to_canonical();
        if w.by_ip.len() < MAX_ADDRESSES || w.by_ip.contains_key(&ip) {
            *w.by_ip.entry(ip).or_default() += 1;
        } else {
            w.overflow = true;
        }
        if w.more == 1 {
            // The first one not logged: sum them up when the window ends.
            let end = w.started.unwrap_or(now) + WINDOW;
            let log = self.clone();
            let shutdown = shutdown.clone();
            let task = async move {
                tokio::select! {
                    _ = tokio::time::sleep_until(end) => {}
                    _ = shutdown.cancelled() => {}
                }
                log.summarise();
            };
            match tracker {
                Some(t) => drop(t.spawn(task)),
                None => drop(tokio::spawn(task)),
            }
        }
    }

    /// Log the refusals counted in the window, and close it.
    fn summarise(&self) {
        let w = std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()));
        if w.more == 0 {
            return;
        }
        let secs = w
            .started
            .map(|s| s.elapsed().as_secs().max(1))
            .unwrap_or(WINDOW.as_secs());
        let addresses = w.by_ip.len();
        let (top, top_count) = w
            .by_ip
            .iter()
            .max_by_key(|(ip, n)| (**n, std::cmp::Reverse(**ip)))
            .map(|(ip, n)| (*ip, *n))
            .unwrap_or((IpAddr::from([0, 0, 0, 0]), 0));
        info!(
            refused = w.more,
            addresses,
            "refused {} more connection{} from outside [server] allow_networks in {secs} s, from {}{addresses} address{}; most from unknown[{top}] ({top_count})",
            w.more,
            if w.more == 1 { "" } else { "s" },
            if w.overflow { "over " } else { "" },
            if addresses == 1 { "" } else { "es" },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc as StdArc;
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(StdArc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    fn peer(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, last], port))
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_one_line_and_one_summary_a_minute() {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        let _g = tracing::subscriber::set_default(sub);
        let log = RefusalLog::default();
        let stop = CancellationToken::new();

        // 1000 refusals in a second: 700 from one address, 300 from another.
        for i in 0..1000u16 {
            log.refused(peer(if i % 10 < 7 { 7 } else { 9 }, 1000 + i), &stop, None);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lines = out.lines();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("refused: not in [server] allow_networks")
                && lines[0].contains("client=192.0.2.7:1000"),
            "{lines:#?}"
        );
        // The minute ends: one summary.
        tokio::time::sleep(WINDOW).await;
        let lines = out.lines();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(
            lines[1].contains(
                "refused 999 more connections from outside [server] allow_networks in 60 s, from 2 addresses; most from unknown[192.0.2.7] (699)"
            ),
            "{lines:#?}"
        );
        // Quiet again: the next refusal is logged in full at once.
        tokio::time::sleep(Duration::from_secs(5)).await;
        log.refused(peer(9, 5000), &stop, None);
        let lines = out.lines();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[2].contains("client=192.0.2.9:5000"), "{lines:#?}");
        // A lone refusal a minute later is logged in full too, and one
        // pending at shutdown is summed up then.
        tokio::time::sleep(WINDOW + Duration::from_secs(1)).await;
        log.refused(peer(9, 5001), &stop, None);
        log.refused(peer(9, 5002), &stop, None);
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let lines = out.lines();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[3].contains("client=192.0.2.9:5001"), "{lines:#?}");
        assert!(
            lines[4].contains("refused 1 more connection from outside [server] allow_networks in 1 s, from 1 address; most from unknown[192.0.2.9] (1)"),
            "{lines:#?}"
        );
    }
}
