//! The baseline: an ext_authz server on the same stack as keygate (tonic, the same
//! transport settings) that allows every request at once. Whatever it costs per request
//! is the floor — gRPC, HTTP/2, protobuf — against which keygate's own work is measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use prost::Message;
use tonic::{Request, Response, Status};

pub struct NoopAuthorization {
    /// Print the first request received (to compare with what Envoy sends).
    dump_first: AtomicBool,
    /// CPU to burn per request before answering: a no-op that costs what keygate costs,
    /// to tell keygate's work apart from anything else keygate does.
    busy: Duration,
    /// The answer, built once.
    response: CheckResponse,
}

/// An OK answer of (about) `size` bytes encoded: 4 bytes bare, padded with one upstream
/// header to keygate's size when asked — so the transport cost of a bigger answer can be
/// told apart from the cost of deciding.
pub fn ok_response(size: usize) -> CheckResponse {
    let mut r = CheckResponse {
        status: Some(rpc::Status::default()),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        dynamic_metadata: None,
    };
    let bare = r.encoded_len();
    if size > bare {
        let mut pad = size - bare;
        // Varint lengths grow with the value; converge on the size in a few steps.
        for _ in 0..4 {
            r.http_response = Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "x-pad".into(),
                        value: "p".repeat(pad.max(1)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }));
            let got = r.encoded_len();
            if got == size {
                break;
            }
            pad = (pad + size).saturating_sub(got);
        }
    }
    r
}

/// The answer in `path`: an encoded CheckResponse (for instance keygate's own allow,
/// saved by the `envoy` scenario), so that the no-op answers exactly what keygate does.
pub fn answer_from_file(path: &std::path::Path) -> anyhow::Result<CheckResponse> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    CheckResponse::decode(bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("{} is not a CheckResponse: {e}", path.display()))
}

#[tonic::async_trait]
impl Authorization for NoopAuthorization {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        if self.dump_first.swap(false, Ordering::Relaxed) {
            eprintln!("first request metadata: {:?}", request.metadata());
            eprintln!("first request: {:#?}", request.get_ref());
        }
        if !self.busy.is_zero() {
            let started = std::time::Instant::now();
            while started.elapsed() < self.busy {
                std::hint::spin_loop();
            }
        }
        Ok(Response::new(self.response.clone()))
    }
}

/// Serves until the process is stopped, on keygate's own transport
/// (`keygate::transport::incoming`: TCP_NODELAY, one write per small answer) and with
/// the builder settings of keygate's gRPC listener (`src/server.rs`).
pub async fn serve(
    listen: SocketAddr,
    dump_first: bool,
    response: CheckResponse,
    busy: Duration,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "noop ext_authz server listening on {}",
        listener.local_addr()?
    );
    let incoming = keygate::transport::incoming(listener);
    tonic::transport::Server::builder()
        .max_connection_age(Duration::from_secs(300))
        .add_service(AuthorizationServer::new(NoopAuthorization {
            dump_first: AtomicBool::new(dump_first),
            busy,
            response,
        }))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_answers_have_the_asked_size() {
        assert!(ok_response(0).encoded_len() < 16);
        for size in [100, 257, 398, 1000] {
            let got = ok_response(size).encoded_len();
            assert!(got.abs_diff(size) <= 2, "asked {size}, got {got}");
        }
    }
}
