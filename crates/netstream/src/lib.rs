//! One byte stream that is plain or TLS, for both ends of SMTP: the
//! listener's sessions (STARTTLS on the server side), the delivery client
//! (implicit TLS or STARTTLS on the client side) and the test fakes.
//!
//! ```no_run
//! # async fn demo(tcp: tokio::net::TcpStream, acceptor: tokio_rustls::TlsAcceptor) -> std::io::Result<()> {
//! use netstream::Stream;
//! let mut s = Stream::Plain(tcp);
//! // ... "220 Ready to start TLS" sent, then:
//! let plain = s.take_plain().expect("not TLS yet");
//! s = Stream::from(acceptor.accept(plain).await?);
//! assert!(s.is_tls());
//! # Ok(()) }
//! ```

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsStream;

/// A plain or TLS stream over `S` (usually a `TcpStream`).
pub enum Stream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Between taking the plain stream for a TLS handshake and getting the
    /// TLS one back, or after a failed handshake: reads see the end of the
    /// stream, writes fail.
    Closed,
}

impl<S> Stream<S> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The plain stream, for a TLS handshake (leaves [`Stream::Closed`]);
    /// `None` if TLS is already on or the stream is closed.
    pub fn take_plain(&mut self) -> Option<S> {
        match std::mem::replace(self, Stream::Closed) {
            Stream::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The TLS version and cipher suite (`TLSv1_3, TLS13_AES_256_GCM_SHA384`),
    /// once TLS is on.
    pub fn tls_info(&self) -> Option<String> {
        let Stream::Tls(tls) = self else {
            return None;
        };
        let (version, suite) = match tls.as_ref() {
            TlsStream::Client(c) => {
                let s = c.get_ref().1;
                (s.protocol_version(), s.negotiated_cipher_suite())
            }
            TlsStream::Server(c) => {
                let s = c.get_ref().1;
                (s.protocol_version(), s.negotiated_cipher_suite())
            }
        };
        Some(format!(
            "{}, {}",
            version.and_then(|v| v.as_str()).unwrap_or("?"),
            suite.and_then(|c| c.suite().as_str()).unwrap_or("?")
        ))
    }
}

impl<S> From<tokio_rustls::client::TlsStream<S>> for Stream<S> {
    fn from(s: tokio_rustls::client::TlsStream<S>) -> Stream<S> {
        Stream::Tls(Box::new(TlsStream::Client(s)))
    }
}

impl<S> From<tokio_rustls::server::TlsStream<S>> for Stream<S> {
    fn from(s: tokio_rustls::server::TlsStream<S>) -> Stream<S> {
        Stream::Tls(Box::new(TlsStream::Server(s)))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Closed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn plain_passes_bytes_and_closed_reads_as_end() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Stream::Plain(a);
        s.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert!(!s.is_tls() && s.tls_info().is_none());
        let plain = s.take_plain();
        assert!(plain.is_some());
        assert!(s.take_plain().is_none());
        let mut out = Vec::new();
        assert_eq!(s.read_to_end(&mut out).await.unwrap(), 0);
        assert!(s.write_all(b"x").await.is_err());
    }
}
