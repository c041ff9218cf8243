//! Accepted gRPC connections: TCP_NODELAY, and one write per small answer.
//!
//! Owns only how bytes leave the socket; it knows nothing of what they mean. Used by
//! every gRPC listener of keygate and by the load generator's no-op baseline, so both
//! are measured on the same transport.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpIncoming};

/// The connections accepted on `listener`, ready for `serve_with_incoming*`.
///
/// TCP_NODELAY is set here because `Server::tcp_nodelay` does not apply to
/// `serve_with_incoming`, and without it Nagle and delayed ACKs add ~40 ms to answers.
pub fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<OneWrite<TcpStream>>> + Send + 'static {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map(|conn| conn.map(OneWrite))
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
