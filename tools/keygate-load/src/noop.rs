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
use keygate::api::envoy_answer::CheckAnswer;
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

/// The no-op on keygate's own server code: tonic decodes only the outer `CheckRequest`,
/// keeping its attributes as one slice of the frame (`envoy_wire::CheckRequestView`),
/// and nothing reads them. keygate does all that and then reads what it uses, decides
/// and answers: the difference is keygate's own work, with no decode it skips counted
/// in its favour.
struct OuterDecodeOnly {
    response: CheckResponse,
}

#[tonic::async_trait]
impl keygate::api::envoy_wire::Authorization for OuterDecodeOnly {
    async fn check(
        &self,
        _request: Request<keygate::api::envoy_wire::CheckRequestView>,
    ) -> Result<Response<CheckAnswer>, Status> {
        Ok(Response::new(CheckAnswer::Message(self.response.clone())))
    }
}

/// Which no-op serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// envoy-types' generated server on keygate's transport and builder settings.
    Generated,
    /// `OuterDecodeOnly` on keygate's transport and builder settings.
    OuterDecodeOnly,
    /// envoy-types' generated server as a user would write it: tonic's own accept loop
    /// and defaults, none of keygate's transport or settings.
    Plain,
}

/// Serves until the process is stopped, on keygate's own transport
/// (`keygate::transport::incoming`: TCP_NODELAY, one write per small answer) and with
/// the builder settings of keygate's gRPC listener (`src/server.rs`), except `Plain`.
pub async fn serve(
    listen: SocketAddr,
    dump_first: bool,
    response: CheckResponse,
    busy: Duration,
    flavour: Flavour,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "noop ext_authz server listening on {}",
        listener.local_addr()?
    );
    serve_on(listener, dump_first, response, busy, flavour).await
}

pub async fn serve_on(
    listener: tokio::net::TcpListener,
    dump_first: bool,
    response: CheckResponse,
    busy: Duration,
    flavour: Flavour,
) -> anyhow::Result<()> {
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let noop = NoopAuthorization {
        dump_first: AtomicBool::new(dump_first),
        busy,
        response,
    };
    if flavour == Flavour::Plain {
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(noop))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await?;
        return Ok(());
    }
    let incoming = keygate::transport::incoming(listener, None);
    let mut builder =
        tonic::transport::Server::builder().max_connection_age(Duration::from_secs(300));
    if flavour == Flavour::OuterDecodeOnly {
        builder
            .add_service(keygate::api::envoy_wire::AuthorizationServer::new(
                OuterDecodeOnly {
                    response: noop.response,
                },
            ))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
    } else {
        builder
            .add_service(AuthorizationServer::new(noop))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every no-op answers a request shaped like Envoy's with the answer it was given.
    #[tokio::test]
    async fn every_noop_allows_with_its_answer() {
        use crate::client::Connection;
        use crate::shape::{Ids, Shape, Template};
        let template = Template::new(&Shape::new("GET", "/v1/contacts/1"), 20);
        for flavour in [Flavour::Generated, Flavour::OuterDecodeOnly, Flavour::Plain] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let response = ok_response(300);
            let server = tokio::spawn(serve_on(
                listener,
                false,
                response.clone(),
                Duration::ZERO,
                flavour,
            ));
            let answer = Connection::open(addr, None)
                .await
                .unwrap()
                .allow_answer(template.frame(&[b'k'; 20], &Ids::for_sequence(0, 0)))
                .await
                .unwrap();
            assert_eq!(
                CheckResponse::decode(answer).unwrap(),
                response,
                "{flavour:?}"
            );
            server.abort();
        }
    }

    #[test]
    fn padded_answers_have_the_asked_size() {
        assert!(ok_response(0).encoded_len() < 16);
        for size in [100, 257, 398, 1000] {
            let got = ok_response(size).encoded_len();
            assert!(got.abs_diff(size) <= 2, "asked {size}, got {got}");
        }
    }
}
