//! The baseline: an ext_authz server on the same stack as keygate (tonic, the same
//! transport settings) that allows every request at once. Whatever it costs per request
//! is the floor — gRPC, HTTP/2, protobuf — against which keygate's own work is measured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

pub struct NoopAuthorization {
    /// Print the first request received (to compare with what Envoy sends).
    dump_first: AtomicBool,
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
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status::default()),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

/// Serves until the process is stopped. Same builder settings as keygate's gRPC
/// listener (`src/server.rs`): TCP_NODELAY, a maximum connection age.
///
/// TCP_NODELAY is set on the accepted sockets here, through `TcpIncoming`: tonic ignores
/// `Server::tcp_nodelay` for a stream of connections handed to `serve_with_incoming*`.
/// `nagle: true` leaves it off, to show what that costs (BENCHMARKS.md).
pub async fn serve(listen: SocketAddr, dump_first: bool, nagle: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "noop ext_authz server listening on {}",
        listener.local_addr()?
    );
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(!nagle));
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_connection_age(Duration::from_secs(300))
        .add_service(AuthorizationServer::new(NoopAuthorization {
            dump_first: AtomicBool::new(dump_first),
        }))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
