//! A lean gRPC client for `Authorization/Check`, straight on `h2`: one HTTP/2 connection
//! per `Connection`, as many streams as the server allows. Written on `h2` rather than a
//! tonic `Channel` so that the generator spends as little CPU per request as it can —
//! on a 2-core machine every cycle it uses is taken from the server it measures — and so
//! that the request metadata is exactly what Envoy sends (`grpc-timeout`,
//! `x-envoy-internal`, `x-envoy-expected-rq-timeout-ms`, `te: trailers`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use envoy_types::pb::google::rpc;
use h2::client::SendRequest;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use prost::Message;
use tokio::net::TcpStream;

/// The decision carried in a CheckResponse; only what the generator needs is decoded.
#[derive(Clone, PartialEq, Message)]
struct CheckResponseHead {
    #[prost(message, optional, tag = "1")]
    status: Option<rpc::Status>,
    #[prost(bytes = "bytes", optional, tag = "2")]
    denied_response: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "3")]
    ok_response: Option<Bytes>,
}

/// What one Check came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    /// A denial: the status message (keygate puts the public error code there).
    Deny(String),
    /// No decision: a gRPC error or a transport failure.
    Error(String),
}

/// One HTTP/2 connection to a gRPC server.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Bytes>,
    uri: Uri,
    headers: HeaderMap,
}

impl Connection {
    /// Connects and completes the HTTP/2 handshake. `timeout` is sent as `grpc-timeout`
    /// (as Envoy sends its ext_authz timeout); `None` sends none.
    pub async fn open(addr: SocketAddr, timeout: Option<Duration>) -> anyhow::Result<Connection> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(1 << 24)
            .handshake::<_, Bytes>(tcp)
            .await?;
        tokio::spawn(async move {
            // Ends when the connection closes; an error then shows on the next request.
            let _ = conn.await;
        });
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        if let Some(t) = timeout {
            let ms = t.as_millis().max(1);
            headers.insert("grpc-timeout", HeaderValue::from_str(&format!("{ms}m"))?);
            headers.insert(
                "x-envoy-expected-rq-timeout-ms",
                HeaderValue::from_str(&ms.to_string())?,
            );
        }
        headers.insert("x-envoy-internal", HeaderValue::from_static("true"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.10"));
        Ok(Connection {
            send,
            // Envoy's :authority is the cluster name.
            uri: Uri::from_static("http://ext_authz/envoy.service.auth.v3.Authorization/Check"),
            headers,
        })
    }

    /// Sends one gRPC frame (see `shape::Template::frame`) and reads the answer: the
    /// outcome and the size of the response message in bytes (0 without one).
    pub async fn check(&self, frame: Bytes) -> (Outcome, usize) {
        match self.round_trip(frame).await {
            Ok((outcome, message)) => (outcome, message.len()),
            Err(e) => (Outcome::Error(e), 0),
        }
    }

    /// Sends one gRPC frame and returns the encoded CheckResponse of an allow (to replay
    /// it from the no-op server); anything else is an error.
    pub async fn allow_answer(&self, frame: Bytes) -> anyhow::Result<Bytes> {
        match self.round_trip(frame).await {
            Ok((Outcome::Allow, message)) => Ok(message),
            Ok((other, _)) => anyhow::bail!("expected an allow, got {other:?}"),
            Err(e) => anyhow::bail!("{e}"),
        }
    }

    /// The outcome and the response message (empty without one).
    async fn round_trip(&self, frame: Bytes) -> Result<(Outcome, Bytes), String> {
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let (response, mut body_out) = send
            .send_request(req, false)
            .map_err(|e| format!("send: {e}"))?;
        body_out
            .send_data(frame, true)
            .map_err(|e| format!("send: {e}"))?;
        let response = response.await.map_err(|e| format!("response: {e}"))?;
        let (parts, mut body) = response.into_parts();
        if parts.status != http::StatusCode::OK {
            return Ok((
                Outcome::Error(format!("HTTP {}", parts.status)),
                Bytes::new(),
            ));
        }
        // A trailers-only response (an error) carries grpc-status in the headers.
        if let Some(code) = grpc_status(&parts.headers) {
            if code != 0 {
                return Ok((
                    Outcome::Error(grpc_error(code, &parts.headers)),
                    Bytes::new(),
                ));
            }
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("body: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("trailers: {e}"))?
            .unwrap_or_default();
        match grpc_status(&trailers).or_else(|| grpc_status(&parts.headers)) {
            Some(0) => {}
            Some(code) => return Ok((Outcome::Error(grpc_error(code, &trailers)), Bytes::new())),
            None => return Err("response without grpc-status".into()),
        }
        decode(buf.freeze())
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn grpc_error(code: i32, headers: &HeaderMap) -> String {
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    format!(
        "grpc-status {code} {}",
        tonic::Code::from(code).description()
    ) + if message.is_empty() { "" } else { ": " }
        + message
}

/// Reads a gRPC response frame: the outcome, and the message it carried.
fn decode(mut buf: Bytes) -> Result<(Outcome, Bytes), String> {
    if buf.len() < 5 {
        return Err("response without a message".into());
    }
    if buf[0] != 0 {
        return Err("compressed response".into());
    }
    buf.advance(1);
    let len = buf.get_u32() as usize;
    if buf.len() != len {
        return Err(format!("message of {} bytes, frame says {len}", buf.len()));
    }
    let outcome =
        outcome(CheckResponseHead::decode(buf.clone()).map_err(|e| format!("decode: {e}"))?);
    Ok((outcome, buf))
}

fn outcome(head: CheckResponseHead) -> Outcome {
    // Envoy reads a missing status as OK (docs/architecture.md); a target that omits it is broken.
    let Some(status) = head.status else {
        return Outcome::Error("CheckResponse without status".into());
    };
    if status.code == 0 {
        Outcome::Allow
    } else if head.denied_response.is_some() || !status.message.is_empty() {
        Outcome::Deny(if status.message.is_empty() {
            format!("code {}", status.code)
        } else {
            status.message
        })
    } else {
        Outcome::Deny(format!("code {}", status.code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::{
        check_response::HttpResponse, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    };

    fn framed(resp: &CheckResponse) -> Bytes {
        let msg = resp.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        Bytes::from(out)
    }

    #[test]
    fn responses_are_read_as_envoy_reads_them() {
        let allow = CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            ..Default::default()
        };
        let message = allow.encode_to_vec();
        assert_eq!(
            decode(framed(&allow)),
            Ok((Outcome::Allow, Bytes::from(message)))
        );
        let deny = CheckResponse {
            status: Some(rpc::Status {
                code: 16,
                message: "invalid_api_key".into(),
                ..Default::default()
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse::default())),
            ..Default::default()
        };
        assert_eq!(
            decode(framed(&deny)).map(|r| r.0),
            Ok(Outcome::Deny("invalid_api_key".into()))
        );
        assert!(matches!(
            decode(framed(&CheckResponse::default())),
            Ok((Outcome::Error(_), _))
        ));
        assert!(decode(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
    }
}
