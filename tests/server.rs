//! What a platform team's tooling sees of a running keygate: gRPC health for the
//! services on the main port, server reflection, the admin credential on the admin
//! port, and readiness.

mod support;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use keygate::api::proto::{self, keys_client::KeysClient};
use keygate::server::{self, App};
use support::*;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn start() -> (Arc<App>, server::Running, keygate::config::Secrets) {
    let secrets = secrets();
    let app = Arc::new(App::build(config(Backend::Memory), secrets.clone()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
    positioned(&app).await;
    (app, running, secrets)
}

#[tokio::test]
async fn health_reports_every_service_on_the_main_port_as_serving() {
    let (_, running, _) = start().await;
    let mut health = HealthClient::new(channel(running.grpc).await);
    for service in [
        "",
        "envoy.service.auth.v3.Authorization",
        "keygate.v1.Authorizer",
        "keygate.v1.Revocations",
    ] {
        // Readiness is brought to the health service as it changes: wait for it.
        eventually(PATIENCE, "the service reports SERVING", || async {
            let status = health
                .clone()
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
                .into_inner()
                .status;
            (status == ServingStatus::Serving as i32).then_some(())
        })
        .await;
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn reflection_lists_keygates_services() {
    let (_, running, _) = start().await;
    let mut client = ServerReflectionClient::new(channel(running.grpc).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "keygate.v1.Authorizer",
        "keygate.v1.Revocations",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_port_refuses_calls_without_the_admin_credential() {
    let (_, running, secrets) = start().await;
    let mut admin = KeysClient::connect(format!("http://{}", running.admin))
        .await
        .unwrap();
    let create = || proto::CreateKeyRequest {
        tenant_id: TENANT.into(),
        scopes: vec!["contacts:read".into()],
        ..Default::default()
    };
    let none = admin.create_key(create()).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let mut wrong = tonic::Request::new(create());
    wrong.metadata_mut().insert(
        "authorization",
        "Bearer not-the-admin-token".parse().unwrap(),
    );
    assert_eq!(
        admin.create_key(wrong).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let created = admin
        .create_key(with_admin(&secrets, create()))
        .await
        .unwrap()
        .into_inner();
    assert!(created.token.starts_with("sk_live_"));
    // The Keys service is not on the main port at all.
    let mut on_main = KeysClient::connect(format!("http://{}", running.grpc))
        .await
        .unwrap();
    assert_eq!(
        on_main.create_key(create()).await.unwrap_err().code(),
        tonic::Code::Unimplemented
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_calls_with_bad_arguments_name_the_field() {
    let (_, running, secrets) = start().await;
    let mut admin = KeysClient::connect(format!("http://{}", running.admin))
        .await
        .unwrap();
    let cases = [
        (
            proto::CreateKeyRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            },
            "tenant_id",
        ),
        (
            proto::CreateKeyRequest {
                tenant_id: TENANT.into(),
                scopes: vec!["Bad Scope".into()],
                ..Default::default()
            },
            "scopes",
        ),
        (
            proto::CreateKeyRequest {
                tenant_id: TENANT.into(),
                environment: "prod".into(),
                ..Default::default()
            },
            "environment",
        ),
        (
            proto::CreateKeyRequest {
                tenant_id: TENANT.into(),
                expires_in_seconds: 100 * 365 * 86_400,
                ..Default::default()
            },
            "expires_in",
        ),
    ];
    for (req, field) in cases {
        let err = admin
            .create_key(with_admin(&secrets, req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = admin
        .get_key(with_admin(
            &secrets,
            proto::GetKeyRequest { key_id: "x".into() },
        ))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("key_id"), "{}", err.message());
    let missing = admin
        .revoke_key(with_admin(
            &secrets,
            proto::RevokeKeyRequest {
                key_id: "0123456789abcdef".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let page = admin
        .list_keys(with_admin(
            &secrets,
            proto::ListKeysRequest {
                tenant_id: TENANT.into(),
                page_size: 5000,
                page_token: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(
        page.message().starts_with("page_size"),
        "{}",
        page.message()
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watch_stream_is_released_when_its_client_goes_away() {
    let (_, running, secrets) = start().await;
    let open = || keygate::telemetry::metrics().watch_streams.get();
    assert_eq!(open(), 0);
    let mut client = keygate::api::proto::revocations_client::RevocationsClient::new(
        channel(running.grpc).await,
    );
    let stream = client
        .watch(watch_with(secrets.watch_token.as_ref().unwrap().expose()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(open(), 1);
    drop(stream);
    drop(client);
    eventually(PATIENCE, "the server lets go of the stream", || async {
        (open() == 0).then_some(())
    })
    .await;
    running.shutdown().await.unwrap();
}

/// A socket that counts the writes that carried bytes and, like a `TcpStream`, offers
/// vectored writes.
struct CountedWrites {
    tcp: tokio::net::TcpStream,
    writes: Arc<AtomicUsize>,
}

impl CountedWrites {
    fn count(&self, done: &Poll<io::Result<usize>>) {
        if matches!(done, Poll::Ready(Ok(n)) if *n > 0) {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl tokio::io::AsyncRead for CountedWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountedWrites {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.count(&done);
        done
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.count(&done);
        done
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for CountedWrites {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

/// Serves Envoy's Check for `app` on one accepted connection, wrapped by `wrap`, and
/// returns how many writes each of `answers` sequential allow answers took.
async fn writes_per_allow<S>(
    app: &App,
    token: &str,
    answers: usize,
    wrap: impl FnOnce(CountedWrites) -> S + Send + 'static,
) -> f64
where
    S: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + tonic::transport::server::Connected
        + Unpin
        + Send
        + 'static,
{
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use keygate::api::envoy_wire::AuthorizationServer;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let writes = Arc::new(AtomicUsize::new(0));
    let counter = writes.clone();
    let accepted = async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        Ok::<_, io::Error>(wrap(CountedWrites {
            tcp,
            writes: counter,
        }))
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(app.envoy_service()))
            .serve_with_incoming(futures::stream::once(accepted)),
    );
    let mut client = AuthorizationClient::new(channel(addr).await);
    let warm = client.check(read_with(token)).await.map(|r| r.into_inner());
    assert_eq!(outcome(&warm), Outcome::Allowed);
    let before = writes.load(Ordering::Relaxed);
    for _ in 0..answers {
        let answer = client.check(read_with(token)).await.map(|r| r.into_inner());
        assert_eq!(outcome(&answer), Outcome::Allowed);
    }
    let after = writes.load(Ordering::Relaxed);
    server.abort();
    (after - before) as f64 / answers as f64
}

/// An allow answer (HEADERS, the message, trailers) leaves keygate in one write, so
/// concurrent answers share segments and none waits on a second system call. Counted on
/// the socket, on a current-thread runtime (a response's frames are all queued before the
/// connection task writes): the count is exact, not timing. What it pins is keygate's
/// promise, not how the HTTP/2 library decides to chain frames.
#[tokio::test]
async fn an_allow_answer_leaves_in_one_write() {
    let app = App::build(config(Backend::Memory), secrets()).unwrap();
    let key = app.admin.create(reader_key()).await.unwrap();
    let through_keygate =
        writes_per_allow(&app, &key.token, 50, keygate::transport::OneWrite).await;
    assert_eq!(
        through_keygate, 1.0,
        "writes per allow answer through keygate's transport"
    );
}

/// A Watch request from now on, presenting `token`.
fn watch_with(token: &str) -> tonic::Request<proto::WatchRequest> {
    let mut req = tonic::Request::new(proto::WatchRequest::default());
    req.metadata_mut()
        .insert("authorization", bearer(token).parse().unwrap());
    req
}

/// Watch lists every key id and event: on the public port it needs the watch token, on
/// the admin port the admin token; nothing else opens it.
#[tokio::test]
async fn watch_needs_its_credential_on_each_port() {
    use keygate::api::proto::revocations_client::RevocationsClient;
    let (_, running, secrets) = start().await;
    let watch_token = secrets.watch_token.as_ref().unwrap().expose();
    let admin_token = secrets.admin_token.expose();
    let mut public = RevocationsClient::new(channel(running.grpc).await);
    let mut admin = RevocationsClient::new(channel(running.admin).await);
    let code = |r: Result<
        tonic::Response<tonic::Streaming<proto::RevocationEvent>>,
        tonic::Status,
    >| { r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code()) };
    let no_credential = tonic::Request::new(proto::WatchRequest::default());
    assert_eq!(
        code(public.watch(no_credential).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(public.watch(watch_with("not-the-token")).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(public.watch(watch_with(admin_token)).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(public.watch(watch_with(watch_token)).await),
        tonic::Code::Ok
    );
    assert_eq!(
        code(admin.watch(watch_with(watch_token)).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        code(admin.watch(watch_with(admin_token)).await),
        tonic::Code::Ok
    );
    running.shutdown().await.unwrap();
}

/// Without a watch token configured, the public port serves Watch to nobody.
#[tokio::test]
async fn without_a_watch_token_watch_is_closed_on_the_public_port() {
    use keygate::api::proto::revocations_client::RevocationsClient;
    let mut secrets = secrets();
    secrets.watch_token = None;
    let app = Arc::new(App::build(config(Backend::Memory), secrets.clone()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
    let mut public = RevocationsClient::new(channel(running.grpc).await);
    let err = public
        .watch(watch_with(secrets.admin_token.expose()))
        .await
        .expect_err("no credential opens Watch here");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    running.shutdown().await.unwrap();
}
