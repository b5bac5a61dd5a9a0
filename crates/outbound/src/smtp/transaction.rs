//! One mail transaction on an open, authenticated connection: `MAIL`,
//! `RCPT`s and the message, pipelined (RFC 2920) in as few writes as
//! possible, the message sent with `BDAT` (RFC 3030) when offered and with
//! dot-stuffed `DATA` otherwise, streamed from the spool.

use std::time::Duration;

use spool::SpoolError;

use super::conn::{ConnError, Connection};
use crate::body::{Body, DotStuffer};
use crate::classify::TxReplies;
use crate::reply::Reply;

/// Messages up to this size go out in the same write as their commands.
pub(crate) const INLINE_MAX: u64 = 128 * 1024;

/// What to send.
pub(crate) struct TxRequest<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// Start with `RSET` (a reused connection).
    pub reset_first: bool,
    pub data_timeout: Duration,
}

/// Why a transaction stopped short.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TxError {
    /// A reused connection turned out dead before the server answered
    /// anything (closed, reset, `421` to `RSET`/`MAIL`): nothing happened,
    /// try again on a fresh connection.
    #[error("pooled connection was dead: {0}")]
    Stale(String),
    /// The connection failed mid-transaction; `replies` holds what was
    /// answered before.
    #[error("{error}")]
    Conn {
        error: ConnError,
        replies: Box<TxReplies>,
    },
    /// The spool could not be read (the connection is left in an unknown
    /// state and must be dropped).
    #[error("reading the message from the spool: {0}")]
    Spool(#[from] SpoolError),
}

fn mail_command(req: &TxRequest<'_>, conn: &Connection, size: u64) -> String {
    let mut s = format!("MAIL FROM:<{}>", req.sender);
    if conn.caps.size.is_some() {
        s.push_str(&format!(" SIZE={size}"));
    }
    if req.eight_bit && conn.caps.eight_bit_mime {
        s.push_str(" BODY=8BITMIME");
    }
    if req.smtputf8 && conn.caps.smtputf8 {
        s.push_str(" SMTPUTF8");
    }
    s.push_str("\r\n");
    s
}

/// Whether the connection can carry the next transaction after `replies`
/// (and `sent_chunk`: a BDAT chunk went out). Any reply it did not expect
/// makes the server's state unknown: a code outside 2xx-5xx (or a `354`
/// out of place), a refused BDAT chunk (the server may not have read it,
/// and would take the message bytes for commands), a `421`, a `530`/`535`,
/// or bytes nobody asked for. Then the next message gets a fresh
/// connection, never a reply that belonged to another command.
pub(crate) fn reusable(conn: &Connection, replies: &TxReplies) -> bool {
    let odd = |r: &Reply, expect_354: bool| {
        !(200..600).contains(&r.code)
            || (r.code == 354) != expect_354
            || r.is_closing()
            || r.is_auth_failure()
    };
    let bad_mail = replies.mail.as_ref().is_some_and(|r| odd(r, false));
    let bad_rcpt = replies.rcpts.iter().flatten().any(|r| odd(r, false));
    let bad_data = replies.data.as_ref().is_some_and(|r| odd(r, false));
    !(bad_mail || bad_rcpt || bad_data || replies.chunk_refused || conn.has_unread())
}

/// Run one transaction. The connection is reusable afterwards if this
/// returns `Ok` and [`reusable`] says so.
pub(crate) async fn run(
    conn: &mut Connection,
    req: &TxRequest<'_>,
    body: Body,
) -> Result<TxReplies, TxError> {
    let size = body.size;
    let chunking = conn.caps.chunking;
    let pipelining = conn.caps.pipelining;
    let mut replies = TxReplies::default();
    let ct = conn.command_timeout;
    let reused = req.reset_first;

    // A stale pooled connection shows itself before any reply arrives.
    macro_rules! early {
        ($e:expr, $replies:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if reused => return Err(TxError::Stale(e.to_string())),
                Err(error) => {
                    return Err(TxError::Conn {
                        error,
                        replies: Box::new($replies),
                    })
                }
            }
        };
    }

    let mut head = Vec::with_capacity(256 + 64 * req.recipients.len());
    if req.reset_first {
        head.extend_from_slice(b"RSET\r\n");
    }
    head.extend_from_slice(mail_command(req, conn, size).as_bytes());

    if !pipelining {
        return run_lockstep(conn, req, body, head, replies).await;
    }

    for r in req.recipients {
        head.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
    }
    let mut body = Some(body);
    let inline = chunking && size <= INLINE_MAX;
    if inline {
        head.extend_from_slice(format!("BDAT {size} LAST\r\n").as_bytes());
        if let Some(b) = body.take() {
            head.extend_from_slice(&b.read_all().await?);
        }
    } else if !chunking {
        head.extend_from_slice(b"DATA\r\n");
    }
    early!(
        conn.send(&head, "sending the envelope").await,
        TxReplies::default()
    );
    drop(head);

    if req.reset_first {
        let r = early!(
            conn.read_reply(ct, "after RSET").await,
            TxReplies::default()
        );
        if !r.is_positive() {
            // A 421, or a reply that belonged to something else: nothing
            // of this transaction may be judged on this connection.
            return Err(TxError::Stale(r.to_string()));
        }
    }
    let mail = early!(
        conn.read_reply(ct, "after MAIL FROM").await,
        TxReplies::default()
    );
    if reused && mail.is_closing() {
        return Err(TxError::Stale(mail.to_string()));
    }
    let closing = mail.is_closing();
    replies.mail = Some(mail);
    if closing {
        return Ok(replies);
    }
    for _ in req.recipients {
        match conn.read_reply(ct, "after RCPT TO").await {
            Ok(r) => {
                let closing = r.is_closing();
                replies.rcpts.push(Some(r));
                if closing {
                    return Ok(replies);
                }
            }
            Err(error) => {
                return Err(TxError::Conn {
                    error,
                    replies: Box::new(replies),
                });
            }
        }
    }
    let go = replies.mail_ok() && replies.accepted() > 0;

    if inline {
        let stage = "after the end of the message (BDAT)";
        match conn.read_reply(req.data_timeout, stage).await {
            // Without an accepted recipient the BDAT reply is an error that
            // says nothing new about the message, but it decides whether
            // the server read the chunk (see `reusable`).
            Ok(r) => {
                replies.chunk_refused = !r.is_positive();
                replies.data = go.then_some(r);
            }
            Err(error) => {
                return Err(TxError::Conn {
                    error,
                    replies: Box::new(replies),
                });
            }
        }
        return Ok(replies);
    }

    let Some(body) = body else {
        return Ok(replies);
    };
    if chunking {
        if !go {
            return Ok(replies);
        }
        let r = bdat(conn, body, req.data_timeout, &mut replies).await;
        return finish(r, replies);
    }

    // DATA was pipelined: its reply decides.
    let data_reply = match conn.read_reply(ct, "after DATA").await {
        Ok(r) => r,
        Err(error) => {
            return Err(TxError::Conn {
                error,
                replies: Box::new(replies),
            });
        }
    };
    if data_reply.code != 354 {
        if go {
            replies.data = Some(data_reply);
        }
        return Ok(replies);
    }
    if !go {
        // RFC 2920: DATA accepted without recipients; send an empty end.
        let r = async {
            conn.send(b".\r\n", "ending an empty DATA").await?;
            conn.read_reply(ct, "after an empty DATA").await
        }
        .await;
        return match r {
            Ok(_) => Ok(replies),
            Err(error) => Err(TxError::Conn {
                error,
                replies: Box::new(replies),
            }),
        };
    }
    let r = send_data(conn, body, req.data_timeout).await;
    finish(r, replies)
}

fn finish(r: Result<Reply, TxError>, mut replies: TxReplies) -> Result<TxReplies, TxError> {
    match r {
        Ok(reply) => {
            replies.data = Some(reply);
            Ok(replies)
        }
        Err(TxError::Conn { error, .. }) => Err(TxError::Conn {
            error,
            replies: Box::new(replies),
        }),
        Err(e) => Err(e),
    }
}

fn conn_err(error: ConnError) -> TxError {
    TxError::Conn {
        error,
        replies: Box::default(),
    }
}

/// `BDAT <size> LAST` and the message, streamed.
async fn send_bdat(
    conn: &mut Connection,
    mut body: Body,
    limit: Duration,
) -> Result<Reply, TxError> {
    let mut first = format!("BDAT {} LAST\r\n", body.size).into_bytes();
    let mut sent: u64 = 0;
    if let Some(c) = body.next().await? {
        sent += c.len() as u64;
        first.extend_from_slice(&c);
    }
    conn.send(&first, "sending the message")
        .await
        .map_err(conn_err)?;
    drop(first);
    while let Some(c) = body.next().await? {
        sent += c.len() as u64;
        conn.send(&c, "sending the message")
            .await
            .map_err(conn_err)?;
    }
    if sent != body.size {
        // The spool copy changed size under us: the BDAT count is wrong and
        // the connection cannot be trusted any more.
        return Err(TxError::Spool(SpoolError::Io(std::sync::Arc::new(
            std::io::Error::other(format!("message is {sent} bytes, expected {}", body.size)),
        ))));
    }
    conn.read_reply(limit, "after the end of the message (BDAT)")
        .await
        .map_err(conn_err)
}

/// `send_bdat`, noting a refused chunk in `replies`.
async fn bdat(
    conn: &mut Connection,
    body: Body,
    limit: Duration,
    replies: &mut TxReplies,
) -> Result<Reply, TxError> {
    let r = send_bdat(conn, body, limit).await;
    if let Ok(reply) = &r {
        replies.chunk_refused = !reply.is_positive();
    }
    r
}

/// The message dot-stuffed, then `.`.
async fn send_data(
    conn: &mut Connection,
    mut body: Body,
    limit: Duration,
) -> Result<Reply, TxError> {
    let mut stuffer = DotStuffer::new();
    let mut out = Vec::with_capacity(64 * 1024 + 1024);
    while let Some(c) = body.next().await? {
        out.clear();
        stuffer.stuff(&c, &mut out);
        conn.send(&out, "sending the message")
            .await
            .map_err(conn_err)?;
    }
    out.clear();
    stuffer.finish(&mut out);
    conn.send(&out, "sending the message")
        .await
        .map_err(conn_err)?;
    conn.read_reply(limit, "after the end of the message (DATA)")
        .await
        .map_err(conn_err)
}

/// For servers without PIPELINING: one command, one reply.
async fn run_lockstep(
    conn: &mut Connection,
    req: &TxRequest<'_>,
    body: Body,
    mut head: Vec<u8>,
    mut replies: TxReplies,
) -> Result<TxReplies, TxError> {
    let ct = conn.command_timeout;
    let reused = req.reset_first;
    let fail = |error: ConnError, replies: TxReplies, early: bool| {
        if early && reused {
            TxError::Stale(error.to_string())
        } else {
            TxError::Conn {
                error,
                replies: Box::new(replies),
            }
        }
    };
    if req.reset_first {
        let rset_len = b"RSET\r\n".len();
        let rest = head.split_off(rset_len);
        if let Err(e) = conn.send(&head, "sending RSET").await {
            return Err(fail(e, replies, true));
        }
        match conn.read_reply(ct, "after RSET").await {
            Ok(r) if !r.is_positive() => return Err(TxError::Stale(r.to_string())),
            Ok(_) => {}
            Err(e) => return Err(fail(e, replies, true)),
        }
        head = rest;
    }
    if let Err(e) = conn.send(&head, "sending MAIL FROM").await {
        return Err(fail(e, replies, true));
    }
    let mail = match conn.read_reply(ct, "after MAIL FROM").await {
        Ok(r) => r,
        Err(e) => return Err(fail(e, replies, true)),
    };
    if reused && mail.is_closing() {
        return Err(TxError::Stale(mail.to_string()));
    }
    let ok = mail.is_positive();
    replies.mail = Some(mail);
    if !ok {
        replies.rcpts = vec![None; req.recipients.len()];
        return Ok(replies);
    }
    for r in req.recipients {
        let cmd = format!("RCPT TO:<{r}>\r\n");
        let reply = match conn.send(cmd.as_bytes(), "sending RCPT TO").await {
            Ok(()) => conn.read_reply(ct, "after RCPT TO").await,
            Err(e) => Err(e),
        };
        match reply {
            Ok(r) => {
                let closing = r.is_closing();
                replies.rcpts.push(Some(r));
                if closing {
                    return Ok(replies);
                }
            }
            Err(e) => return Err(fail(e, replies, false)),
        }
    }
    if replies.accepted() == 0 {
        return Ok(replies);
    }
    let r = if conn.caps.chunking {
        bdat(conn, body, req.data_timeout, &mut replies).await
    } else {
        if let Err(e) = conn.send(b"DATA\r\n", "sending DATA").await {
            return Err(fail(e, replies, false));
        }
        match conn.read_reply(ct, "after DATA").await {
            Ok(r) if r.code == 354 => send_data(conn, body, req.data_timeout).await,
            Ok(r) => Ok(r),
            Err(e) => return Err(fail(e, replies, false)),
        }
    };
    finish(r, replies)
}
