//! A minimal HTTP/1.1 upstream for the through-Envoy scenario (`envoy --upstream`): it
//! answers every request with `200 ok` at once, on kept-alive connections, so the
//! baseline is Envoy proxying to a service rather than Envoy answering by itself. It is
//! as cheap as an upstream gets, so it flatters nothing: the authorization hop is
//! compared with the cheapest real hop.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
/// A request head larger than this is refused (Envoy's default limit is 60 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// The no-op HTTP authorizer on keygate's HTTP stack: axum's `serve` with one fallback
/// route answering 200, as keygate serves `listen.http_authz`. Serves until stopped.
pub async fn serve_noop_authz(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "no-op HTTP authorizer listening on {}",
        listener.local_addr()?
    );
    let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    axum::serve(listener, router).await?;
    Ok(())
}

/// Serves until the process is stopped.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("upstream listening on {}", listener.local_addr()?);
    accept(listener).await
}

async fn accept(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            if let Err(e) = connection(stream).await {
                eprintln!("upstream: {peer}: {e:#}");
            }
        });
    }
}

async fn connection(mut stream: TcpStream) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request in the buffer (Envoy may pipeline none, wrk none,
        // but a client that does is still answered in order), in one write.
        let mut answers = 0;
        while let Some(len) = request_len(&buf)? {
            buf.drain(..len);
            answers += 1;
        }
        if answers > 0 {
            stream.write_all(&ANSWER.repeat(answers)).await?;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_HEAD * 2 {
            bail!("request larger than {MAX_HEAD} bytes");
        }
    }
}

/// The length of the first complete request in `buf` (head and `content-length` body),
/// or None while it is incomplete. Chunked bodies are refused: nothing here sends them.
fn request_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("request head larger than {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("request head is not UTF-8")?;
    let mut body = 0usize;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            bail!("malformed header line {line:?}");
        };
        if name.eq_ignore_ascii_case("content-length") {
            body = value.trim().parse().context("content-length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("transfer-encoding is not supported");
        }
    }
    let len = end + 4 + body;
    Ok((buf.len() >= len).then_some(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_delimited_by_head_and_content_length() {
        assert_eq!(request_len(b"GET / HTTP/1.1\r\nhost: a\r\n").unwrap(), None);
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET /x";
        assert_eq!(request_len(get).unwrap(), Some(27));
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab";
        assert_eq!(request_len(post).unwrap(), None);
        let post = b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET";
        assert_eq!(request_len(post).unwrap(), Some(41));
        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(request_len(chunked).is_err());
    }

    #[tokio::test]
    async fn two_pipelined_requests_get_two_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept(listener));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0u8; ANSWER.len() * 2];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, ANSWER.repeat(2));
    }
}
