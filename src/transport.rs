//! Accepted gRPC connections: TCP_NODELAY, TLS where the listener has it, and one write
//! per small answer.
//!
//! Owns only how bytes leave the socket; it knows nothing of what they mean. Used by
//! every gRPC listener of keygate and by the load generator's no-op baseline, so both
//! are measured on the same transport.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections accepted on `listener` (through a TLS handshake with `tls`'s
/// configuration of the moment), ready for `serve_with_incoming*`.
///
/// TCP_NODELAY is set here because `Server::tcp_nodelay` does not apply to
/// `serve_with_incoming`, and without it Nagle and delayed ACKs add ~40 ms to answers.
/// Handshakes run each on a task of their own, so a slow or silent client holds up no
/// other; one that fails (a plain-text client, no or a wrong client certificate) is
/// dropped and logged, never served.
pub fn incoming(
    listener: TcpListener,
    tls: Option<crate::tls::ListenerTls>,
) -> BoxStream<'static, io::Result<OneWrite<Conn>>> {
    let tcp = TcpIncoming::from(listener).with_nodelay(Some(true));
    let Some(tls) = tls else {
        return tcp
            .map(|conn| conn.map(|c| OneWrite(Conn::Plain(c))))
            .boxed();
    };
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    tokio::spawn(async move {
        let mut tcp = std::pin::pin!(tcp);
        loop {
            let conn = tokio::select! {
                c = tcp.next() => c,
                // The server is gone: stop listening.
                _ = tx.closed() => return,
            };
            let stream = match conn {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    let _ = tx.send(Err(e)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(OneWrite(Conn::Tls(Box::new(tls))))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(event = "tls.handshake_refused", ?peer, error = %e, "TLS handshake refused")
                    }
                    Err(_) => tracing::info!(
                        event = "tls.handshake_timeout",
                        ?peer,
                        "TLS handshake timed out"
                    ),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx).boxed()
}

/// An accepted connection, in plain text or TLS.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(s) => s.connect_info(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// A connection that tells HTTP/2 it has no vectored writes, so that a small answer
/// leaves in one `write`.
///
/// Why: `h2` copies a DATA frame into its write buffer only below a threshold — 256
/// bytes on a socket with vectored writes, 1024 without (`h2::codec::framed_write`). A
/// bigger payload is chained, and the trailers that follow cannot be buffered until it
/// has been written, so every answer of 256–1023 bytes costs two system calls and two
/// TCP segments, and concurrent answers stop sharing writes. keygate's allow answer
/// (identity headers plus dynamic metadata) is about 400 bytes: behind this wrapper it
/// goes out with its HEADERS and trailers in one write. Copying under a kilobyte costs
/// far less than the system call it saves; bigger payloads (admin listings) are still
/// chained. BENCHMARKS.md has the measurements.
#[derive(Debug)]
pub struct OneWrite<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for OneWrite<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for OneWrite<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // Callers that use vectored writes anyway still get them.
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for OneWrite<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}
