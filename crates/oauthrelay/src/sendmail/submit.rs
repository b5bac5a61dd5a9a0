//! Handing one message to an SMTP session: the daemon's over TCP, or an
//! in-process one (offline spool, maildrop import). Every address that goes
//! into a command was checked by [`super::address`]; a command with CR or
//! LF in it is still refused here, whatever the caller did.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The envelope of one submission.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `""`: the null sender.
    pub sender: String,
    pub recipients: Vec<String>,
    /// Announce `BODY=8BITMIME`.
    pub eight_bit: bool,
}

/// Why a submission did not end in `250`.
#[derive(Debug)]
pub enum SubmitError {
    /// Nobody listens there.
    Unreachable(std::io::Error),
    /// The server answered with an error.
    Reply {
        code: u16,
        text: String,
    },
    Io(std::io::Error),
    /// An address that would change the command (never sent).
    Unsafe(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::Unreachable(e) => write!(f, "cannot connect to oauthrelay: {e}"),
            SubmitError::Reply { code, text } => {
                write!(f, "{code} {}", outbound::escape_controls(text))
            }
            SubmitError::Io(e) => write!(f, "{e}"),
            SubmitError::Unsafe(what) => write!(f, "refused to send {what}"),
        }
    }
}

impl std::error::Error for SubmitError {}

impl SubmitError {
    /// A permanent refusal (5xx): trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SubmitError::Reply { code, .. } if *code >= 500)
            || matches!(self, SubmitError::Unsafe(_))
    }
}

/// Submit over TCP to `addr`.
pub async fn tcp(addr: SocketAddr, env: &Envelope, message: &[u8]) -> Result<String, SubmitError> {
    let stream = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(addr))
        .await
        .map_err(|_| {
            SubmitError::Unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timeout",
            ))
        })?
        .map_err(SubmitError::Unreachable)?;
    stream_submit(stream, env, message).await
}

/// Submit one message over `stream` (the session's greeting first);
/// returns the text of the final `250`.
pub async fn stream_submit<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    env: &Envelope,
    message: &[u8],
) -> Result<String, SubmitError> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    let step = Duration::from_secs(300);
    expect(&mut r, 2, step).await?;
    let utf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.is_ascii());
    let mut params = String::new();
    if env.eight_bit {
        params.push_str(" BODY=8BITMIME");
    }
    if utf8 {
        params.push_str(" SMTPUTF8");
    }
    let mut cmds = vec!["EHLO localhost".to_string()];
    cmds.push(format!("MAIL FROM:<{}>{params}", env.sender));
    for rc in &env.recipients {
        cmds.push(format!("RCPT TO:<{rc}>"));
    }
    for c in &cmds {
        if c.chars().any(|ch| ch.is_control()) {
            return Err(SubmitError::Unsafe(format!(
                "a command with a control character: {}",
                outbound::escape_controls(c)
            )));
        }
        w.write_all(format!("{c}\r\n").as_bytes())
            .await
            .map_err(SubmitError::Io)?;
        expect(&mut r, 2, step).await?;
    }
    w.write_all(b"DATA\r\n").await.map_err(SubmitError::Io)?;
    expect(&mut r, 3, step).await?;
    let mut body = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            body.push(b'.');
        }
        body.push(b);
        at_line_start = b == b'\n';
    }
    if !body.ends_with(b"\r\n") {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b".\r\n");
    w.write_all(&body).await.map_err(SubmitError::Io)?;
    let done = expect(&mut r, 2, Duration::from_secs(600)).await?;
    let _ = w.write_all(b"QUIT\r\n").await;
    let _ = w.flush().await;
    let mut rest = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut rest)).await;
    let _ = w.shutdown().await;
    Ok(done)
}

/// Read one (possibly multi-line) reply; error unless its first digit is `class`.
async fn expect<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    class: u8,
    limit: Duration,
) -> Result<String, SubmitError> {
    let mut text = String::new();
    let code = loop {
        let mut line = String::new();
        let n = tokio::time::timeout(limit, r.read_line(&mut line))
            .await
            .map_err(|_| {
                SubmitError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no reply from oauthrelay",
                ))
            })?
            .map_err(SubmitError::Io)?;
        if n == 0 {
            return Err(SubmitError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "oauthrelay closed the connection",
            )));
        }
        let line = line.trim_end();
        let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        if line.as_bytes().get(3) != Some(&b'-') {
            break code;
        }
    };
    if code / 100 == u16::from(class) {
        Ok(text)
    } else {
        Err(SubmitError::Reply { code, text })
    }
}
