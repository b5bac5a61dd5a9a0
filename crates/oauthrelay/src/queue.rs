//! The `queue` commands. With the daemon running they go through its
//! control socket (the daemon owns the spool); without it they open the
//! spool directly.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use outbound::{DeliveryState, Outbound, QueueState, escape_controls};
use serde::{Deserialize, Serialize};
use spool::{Envelope, MessageId, Queued, Spool, SpoolError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A queue request, on the command line or as one JSON line on the socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    List,
    Show {
        id: String,
    },
    Retry {
        id: String,
    },
    RetryAll,
    Delete {
        id: String,
    },
    /// Where the daemon listens (for `sendmail` when the configured port
    /// is 0 or the sockets came from systemd).
    Info,
}

/// One line of `queue list --json`: a stable interface for scripts
/// (`docs/operations.md`, "The queue from scripts").
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub from: String,
    /// Recipients not yet delivered.
    pub recipients: Vec<String>,
    pub size: u64,
    pub created: String,
    pub attempts: u32,
    pub next_attempt: Option<String>,
    pub last_error: Option<String>,
    /// `queued`, `deferred`, `held` or `failed`.
    pub state: QueueState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// `queue show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detail {
    pub entry: Entry,
    /// As received.
    pub envelope: Envelope,
    /// What delivery made of it so far.
    pub delivery: DeliveryState,
    pub headers: String,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn entry(id: MessageId, q: &Queued, d: &DeliveryState) -> Entry {
    let e = &q.envelope;
    Entry {
        id: id.to_string(),
        from: e.sender.clone(),
        recipients: d
            .pending()
            .filter_map(|i| e.recipients.get(i).cloned())
            .collect(),
        size: q.size,
        created: rfc3339(e.received),
        attempts: d.attempts,
        next_attempt: d.next_attempt.map(rfc3339),
        last_error: d.last_error.as_ref().map(ToString::to_string),
        state: d.queue_state(SystemTime::now()),
        held: d.hold.as_ref().map(|h| h.reason.to_string()),
    }
}

fn parse_id(s: &str) -> Result<MessageId, String> {
    s.parse()
}

/// Read the header section of a queued message (at most 64 KiB).
async fn headers(spool: &Spool, id: MessageId) -> Result<String, SpoolError> {
    let mut r = spool.read_body(id)?;
    let mut head = Vec::new();
    while head.len() < 64 << 10 {
        let Some(piece) = r.next_chunk().await? else {
            break;
        };
        head.extend_from_slice(&piece);
        if memfind(&head, b"\r\n\r\n").is_some() {
            break;
        }
    }
    let end = memfind(&head, b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(head.len().min(64 << 10));
    Ok(String::from_utf8_lossy(&head[..end]).into_owned())
}

fn memfind(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Carry out a request against the spool (and the scheduler when the
/// daemon runs).
pub async fn handle(
    spool: &Spool,
    scheduler: Option<&Outbound>,
    req: Request,
) -> Result<serde_json::Value, String> {
    let not_queued = |id: MessageId| format!("no message {id} in the queue");
    let v = match req {
        Request::List => {
            let list: Vec<Entry> = spool
                .list()
                .iter()
                .map(|(id, q)| entry(*id, q, &DeliveryState::of(*id, q)))
                .collect();
            serde_json::to_value(list)
        }
        Request::Show { id } => {
            let id = parse_id(&id)?;
            let q = spool.message(id).ok_or_else(|| not_queued(id))?;
            let delivery = DeliveryState::of(id, &q);
            let headers = headers(spool, id).await.map_err(|e| e.to_string())?;
            serde_json::to_value(Detail {
                entry: entry(id, &q, &delivery),
                envelope: (*q.envelope).clone(),
                delivery,
                headers,
            })
        }
        Request::Retry { id } => {
            let id = parse_id(&id)?;
            match scheduler {
                Some(s) => {
                    if !s.retry(id).await {
                        return Err(not_queued(id));
                    }
                }
                None => {
                    let q = spool.message(id).ok_or_else(|| not_queued(id))?;
                    spool
                        .update(id, outbound::due_now(id, &q))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            serde_json::to_value(serde_json::json!({ "retried": 1 }))
        }
        Request::RetryAll => {
            let n = match scheduler {
                Some(s) => s.retry_all().await,
                None => {
                    let mut n = 0;
                    for (id, q) in spool.list() {
                        if DeliveryState::of(id, &q).next_attempt.is_some() {
                            spool
                                .update(id, outbound::due_now(id, &q))
                                .await
                                .map_err(|e| e.to_string())?;
                            n += 1;
                        }
                    }
                    n
                }
            };
            serde_json::to_value(serde_json::json!({ "retried": n }))
        }
        Request::Info => return Err("only a running daemon can answer this".into()),
        Request::Delete { id } => {
            let id = parse_id(&id)?;
            let queued = spool.message(id);
            match spool.remove(id).await {
                Ok(()) => {}
                Err(SpoolError::NotFound(_)) => return Err(not_queued(id)),
                Err(e) => return Err(e.to_string()),
            }
            // Postfix's postsuper logs `ID: removed`; so do we, with what
            // the message was, since it is gone for good.
            let (from, left) = queued
                .map(|q| {
                    let left = DeliveryState::of(id, &q)
                        .recipients
                        .iter()
                        .filter(|r| r.state != outbound::RcptState::Delivered)
                        .count();
                    (escape_controls(&q.envelope.sender), left)
                })
                .unwrap_or_default();
            info!(
                queue_id = %id,
                "{id}: removed by queue delete: from=<{from}>, undelivered recipients={left}"
            );
            serde_json::to_value(serde_json::json!({ "deleted": id.to_string() }))
        }
    };
    v.map_err(|e| e.to_string())
}

#[derive(Debug, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default)]
    result: serde_json::Value,
    #[serde(default)]
    error: Option<String>,
}

/// The daemon side: answer queue requests on a Unix socket (mode 0600).
pub async fn serve_control(
    path: &Path,
    spool: Spool,
    scheduler: Outbound,
    smtp: Vec<std::net::SocketAddr>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let smtp = Arc::new(smtp);
    // We hold the spool lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let path = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => break,
                c = listener.accept() => c,
            };
            let Ok((stream, _)) = conn else { continue };
            let spool = spool.clone();
            let scheduler = scheduler.clone();
            let smtp = smtp.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &spool, &scheduler, &smtp).await {
                    debug!(error = %e, "control connection ended");
                }
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn answer(
    stream: UnixStream,
    spool: &Spool,
    scheduler: &Outbound,
    smtp: &[std::net::SocketAddr],
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        BufReader::new(r).take(1 << 20).read_line(&mut line),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timeout"))??;
    if n == 0 {
        return Ok(());
    }
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Info) => Response {
            ok: true,
            result: serde_json::json!({ "smtp": smtp }),
            error: None,
        },
        Ok(req) => match handle(spool, Some(scheduler), req).await {
            Ok(result) => Response {
                ok: true,
                result,
                error: None,
            },
            Err(e) => Response {
                ok: false,
                result: serde_json::Value::Null,
                error: Some(e),
            },
        },
        Err(e) => Response {
            ok: false,
            result: serde_json::Value::Null,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

use tokio::io::AsyncReadExt as _;

/// Ask a running daemon; `None` when none answers on `socket`.
pub async fn ask_daemon(socket: &Path, req: &Request) -> Option<anyhow::Result<serde_json::Value>> {
    let mut s = UnixStream::connect(socket).await.ok()?;
    Some(
        async {
            let mut line = serde_json::to_vec(req)?;
            line.push(b'\n');
            s.write_all(&line).await?;
            let mut out = String::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                s.read_to_string(&mut out),
            )
            .await
            .map_err(|_| anyhow::anyhow!("the daemon did not answer on {}", socket.display()))??;
            let resp: Response = serde_json::from_str(&out)?;
            if resp.ok {
                Ok(resp.result)
            } else {
                anyhow::bail!(resp.error.unwrap_or_else(|| "request failed".into()))
            }
        }
        .await,
    )
}

/// The CLI side: ask the daemon, or work on the spool directly when no
/// daemon runs.
pub async fn request(
    socket: &Path,
    spool_dir: &Path,
    req: Request,
) -> anyhow::Result<serde_json::Value> {
    if let Some(answer) = ask_daemon(socket, &req).await {
        return answer;
    }
    let dir = spool_dir.to_path_buf();
    let opened = tokio::task::spawn_blocking(move || Spool::open(&dir)).await?;
    let (spool, _) = match opened {
        Ok(s) => s,
        Err(e @ SpoolError::Locked { .. }) => {
            warn!(socket = %socket.display(), "cannot reach the daemon's control socket");
            anyhow::bail!(
                "{e}; and its control socket {} does not answer",
                socket.display()
            )
        }
        Err(e) => return Err(e.into()),
    };
    let r = handle(&spool, None, req).await;
    spool.close().await?;
    crate::paths::hand_over(spool_dir);
    r.map_err(anyhow::Error::msg)
}

/// Print `queue list` the way `mailq` does: `*` after the id of mail
/// being (or about to be) delivered, `!` after held mail, nothing after
/// deferred mail. A hold reason (which names the account and the fix) is
/// printed in full once; the other messages held for the same reason point
/// at the first.
pub fn print_list(entries: &[Entry], out: &mut impl std::io::Write) -> std::io::Result<()> {
    if entries.is_empty() {
        return writeln!(out, "Mail queue is empty");
    }
    writeln!(
        out,
        "{:<16} {:>9} {:<20}  -Sender/Recipient-------",
        "-Queue ID-", "--Size--", "----Arrival Time----"
    )?;
    let mut bytes = 0;
    let mut reasons: Vec<(&str, &str)> = Vec::new();
    for e in entries {
        bytes += e.size;
        let flag = match e.state {
            QueueState::Held => "!",
            QueueState::Queued => "*",
            QueueState::Deferred | QueueState::Failed => " ",
        };
        let sender = if e.from.is_empty() {
            "MAILER-DAEMON".to_string()
        } else {
            escape_controls(&e.from)
        };
        writeln!(
            out,
            "{:<15}{flag} {:>9} {:<20}  {sender}",
            e.id, e.size, e.created
        )?;
        if let Some(h) = &e.held {
            match reasons.iter().find(|(r, _)| r == h) {
                Some((_, first)) => writeln!(out, "{:>48}(held: as {first} above)", "")?,
                None => {
                    writeln!(out, "{:>48}(held: {})", "", escape_controls(h))?;
                    reasons.push((h, &e.id));
                }
            }
        } else if let Some(err) = &e.last_error {
            writeln!(out, "{:>48}({})", "", escape_controls(err))?;
        }
        for r in &e.recipients {
            writeln!(out, "{:>48}{}", "", escape_controls(r))?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "-- {} Kbytes in {} Request{}.",
        bytes.div_ceil(1024),
        entries.len(),
        if entries.len() == 1 { "" } else { "s" }
    )?;
    out.flush()
}

/// Print `queue show`. Everything a client or a server chose (addresses,
/// the EHLO name, headers, replies) has its control characters escaped, so
/// printing a message can never drive the terminal.
pub fn print_detail(d: &Detail, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let e = &d.envelope;
    let s = &d.delivery;
    let c = |t: &str| escape_controls(t);
    writeln!(out, "Queue ID:     {}", d.entry.id)?;
    writeln!(
        out,
        "State:        {}{}",
        d.entry.state.as_str(),
        d.entry
            .held
            .as_deref()
            .map(|h| format!(" ({})", c(h)))
            .unwrap_or_default()
    )?;
    writeln!(out, "From:         <{}>", c(&e.sender))?;
    writeln!(out, "Size:         {} bytes", d.entry.size)?;
    writeln!(out, "Received:     {}", d.entry.created)?;
    if let Some(client) = &e.client {
        writeln!(out, "Client:       {} (helo {})", c(client), c(&e.helo))?;
    }
    if let Some(u) = &e.auth_user {
        writeln!(out, "Auth user:    {}", c(u))?;
    }
    writeln!(out, "Attempts:     {}", s.attempts)?;
    if let Some(n) = &d.entry.next_attempt {
        writeln!(out, "Next attempt: {n}")?;
    }
    if let Some(l) = &s.last_error {
        writeln!(out, "Last error:   {}", c(&l.to_string()))?;
    }
    if let Some(a) = &s.account {
        writeln!(out, "Account:      {a}")?;
    }
    writeln!(out, "Recipients:")?;
    for (i, address) in e.recipients.iter().enumerate() {
        let r = s.recipients.get(i).cloned().unwrap_or_default();
        writeln!(
            out,
            "  <{}> {}{}",
            c(address),
            r.state.as_str(),
            r.answer
                .as_ref()
                .map(|x| format!(": {}", c(&x.to_string())))
                .unwrap_or_default()
        )?;
    }
    writeln!(out, "Headers:")?;
    for line in d.headers.lines() {
        writeln!(out, "  {}", c(line))?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, state: QueueState, held: Option<&str>) -> Entry {
        Entry {
            id: id.into(),
            from: "app@example.com".into(),
            recipients: vec!["r@example.org".into()],
            size: 100,
            created: "2026-12-02T10:00:00Z".into(),
            attempts: 0,
            next_attempt: None,
            last_error: None,
            state,
            held: held.map(str::to_string),
        }
    }

    /// mailq's flags: `*` active, `!` held, nothing for deferred mail; a
    /// hold reason once, the other messages held for it point at the first.
    #[test]
    fn list_flags_like_mailq_and_says_a_hold_reason_once() {
        let why = "account \"default\" needs authorization: no refresh token; run oauthrelay authorize --account default";
        let entries = [
            entry("AAAAAAAAAAAAA1", QueueState::Queued, None),
            entry("AAAAAAAAAAAAA2", QueueState::Deferred, None),
            entry("AAAAAAAAAAAAA3", QueueState::Held, Some(why)),
            entry("AAAAAAAAAAAAA4", QueueState::Held, Some(why)),
            entry(
                "AAAAAAAAAAAAA5",
                QueueState::Held,
                Some("no [[accounts]] entry takes sender <x@y> (check `senders`)"),
            ),
        ];
        let mut out = Vec::new();
        print_list(&entries, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let flag = |id: &str| {
            let line = text.lines().find(|l| l.starts_with(id)).unwrap();
            line[15..16].to_string()
        };
        assert_eq!(flag("AAAAAAAAAAAAA1"), "*", "{text}");
        assert_eq!(flag("AAAAAAAAAAAAA2"), " ", "{text}");
        assert_eq!(flag("AAAAAAAAAAAAA3"), "!", "{text}");
        assert_eq!(flag("AAAAAAAAAAAAA4"), "!", "{text}");
        assert_eq!(text.matches("needs authorization").count(), 1, "{text}");
        assert!(text.contains("(held: as AAAAAAAAAAAAA3 above)"), "{text}");
        assert!(text.contains("(held: no [[accounts]] entry"), "{text}");
    }
}
