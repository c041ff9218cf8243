//! What a platform team's tooling sees of a running keygate: gRPC health for the
//! services on the main port, server reflection, the admin credential on the admin
//! port, readiness, and TLS files (certificate and client CA) re-read while it runs.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use keygate::api::proto::{self, keys_client::KeysClient};
use keygate::server::{self, App};
use keygate_test_support::*;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

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
    let mut health = HealthClient::new(channel_to(running.grpc).await);
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
    let mut client = ServerReflectionClient::new(channel_to(running.grpc).await);
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
    let names: std::collections::BTreeSet<String> =
        list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "keygate.v1.Authorizer",
        "keygate.v1.Revocations",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(expected), "{expected} in {names:?}");
    }
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_port_refuses_calls_without_the_admin_credential() {
    let (_, running, secrets) = start().await;
    let mut admin = KeysClient::new(channel_to(running.admin).await);
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
    let mut on_main = KeysClient::new(channel_to(running.grpc).await);
    assert_eq!(
        on_main.create_key(create()).await.unwrap_err().code(),
        tonic::Code::Unimplemented
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn admin_calls_with_bad_arguments_name_the_field() {
    let (_, running, secrets) = start().await;
    let mut admin = KeysClient::new(channel_to(running.admin).await);
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
        channel_to(running.grpc).await,
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
    let mut client = AuthorizationClient::new(channel_to(addr).await);
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
    let mut public = RevocationsClient::new(channel_to(running.grpc).await);
    let mut admin = RevocationsClient::new(channel_to(running.admin).await);
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
    let mut public = RevocationsClient::new(channel_to(running.grpc).await);
    let err = public
        .watch(watch_with(secrets.admin_token.expose()))
        .await
        .expect_err("no credential opens Watch here");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    running.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// TLS: certificates made fresh by openssl, as an operator would make them.

/// Runs `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const P256: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!("req -x509 {P256} -keyout {name}.key -out {name}.pem -days 2 -subj /CN={name}"),
    );
}

fn make_cert(dir: &Path, name: &str, ca: &str, server: bool) {
    openssl(
        dir,
        &format!("req {P256} -keyout {name}.key -out {name}.csr -subj /CN={name}"),
    );
    let ext = if server {
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    } else {
        "extendedKeyUsage=clientAuth\n"
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext"
        ),
    );
}

/// Replaces `to` with `from`'s bytes in one rename, as a secret volume swaps its files.
fn replace(dir: &Path, from: &str, to: &str) {
    let staged = dir.join(format!("{to}.staged"));
    std::fs::write(&staged, std::fs::read(dir.join(from)).unwrap()).unwrap();
    std::fs::rename(staged, dir.join(to)).unwrap();
}

/// What an admin call presenting `client`'s certificate gets (any failure to connect is
/// UNAVAILABLE).
async fn admin_call_as(
    addr: std::net::SocketAddr,
    dir: &Path,
    client: &str,
    secrets: &keygate::config::Secrets,
) -> tonic::Code {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |f: String| std::fs::read(dir.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("server-ca.pem".into())))
        .identity(Identity::from_pem(
            read(format!("{client}.pem")),
            read(format!("{client}.key")),
        ))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let Ok(channel) = endpoint.connect().await else {
        return tonic::Code::Unavailable;
    };
    let request = proto::CreateKeyRequest {
        tenant_id: TENANT.into(),
        scopes: vec!["contacts:read".into()],
        ..Default::default()
    };
    KeysClient::new(channel)
        .create_key(with_admin(secrets, request))
        .await
        .map(|_| tonic::Code::Ok)
        .unwrap_or_else(|s| s.code())
}

/// The certificate a plain TLS client is served on `addr`, as DER.
async fn served_certificate(addr: std::net::SocketAddr, dir: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server-ca.pem")).unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// Waits for the listener's files to have been re-read `until` says.
async fn reloaded(
    rx: &mut tokio::sync::watch::Receiver<keygate::tls::Reloads>,
    what: &str,
    until: impl FnMut(&keygate::tls::Reloads) -> bool,
) {
    tokio::time::timeout(PATIENCE, rx.wait_for(until))
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
        .unwrap();
}

/// The client CA and the certificate are re-read while the server runs: a client of a new
/// CA is served (both, while the file holds both CAs) and one of the old CA refused once
/// it is gone, without a restart; a CA file that does not read keeps the last good one
/// (and is counted); a renewed certificate is served.
#[tokio::test]
async fn a_rotated_client_ca_and_certificate_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for ca in ["server-ca", "old-ca", "new-ca"] {
        make_ca(d, ca);
    }
    make_cert(d, "server", "server-ca", true);
    make_cert(d, "renewed", "server-ca", true);
    make_cert(d, "old-client", "old-ca", false);
    make_cert(d, "new-client", "new-ca", false);
    replace(d, "old-ca.pem", "client-ca.pem");
    let file = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let mut cfg = config(Backend::Memory);
    let tls = keygate::config::TlsConfig {
        cert_file: file("server.pem"),
        key_file: file("server.key"),
        client_ca_file: None,
    };
    cfg.listen.grpc_tls = Some(tls.clone());
    cfg.listen.admin_tls = Some(keygate::config::TlsConfig {
        client_ca_file: Some(file("client-ca.pem")),
        ..tls
    });
    let secrets = secrets();
    let app = Arc::new(App::build(cfg, secrets.clone()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
    let mut admin_reloads = app.admin_tls.as_ref().unwrap().reloads();
    let mut grpc_reloads = app.grpc_tls.as_ref().unwrap().reloads();
    let admin = running.admin;
    assert_eq!(
        admin_call_as(admin, d, "old-client", &secrets).await,
        tonic::Code::Ok
    );
    assert_ne!(
        admin_call_as(admin, d, "new-client", &secrets).await,
        tonic::Code::Ok
    );

    let errors = || {
        keygate::telemetry::metrics()
            .tls_reloads
            .with_label_values(&["listen.admin_tls", "error"])
            .get()
    };
    let errors_before = errors();
    std::fs::write(d.join("not-a-ca.pem"), "not a certificate\n").unwrap();
    replace(d, "not-a-ca.pem", "client-ca.pem");
    reloaded(&mut admin_reloads, "the unreadable CA is seen", |r| {
        r.failed >= 1
    })
    .await;
    assert_eq!(errors(), errors_before + 1);
    assert_eq!(
        admin_call_as(admin, d, "old-client", &secrets).await,
        tonic::Code::Ok
    );

    // A rotation: both CAs while clients move, then the new one alone.
    let both = [d.join("old-ca.pem"), d.join("new-ca.pem")].map(|f| std::fs::read(f).unwrap());
    std::fs::write(d.join("both-cas.pem"), both.concat()).unwrap();
    replace(d, "both-cas.pem", "client-ca.pem");
    reloaded(&mut admin_reloads, "both CAs are read", |r| r.ok >= 1).await;
    for client in ["old-client", "new-client"] {
        assert_eq!(
            admin_call_as(admin, d, client, &secrets).await,
            tonic::Code::Ok
        );
    }
    replace(d, "new-ca.pem", "client-ca.pem");
    reloaded(&mut admin_reloads, "the new CA is read", |r| r.ok >= 2).await;
    assert_eq!(
        admin_call_as(admin, d, "new-client", &secrets).await,
        tonic::Code::Ok
    );
    assert_ne!(
        admin_call_as(admin, d, "old-client", &secrets).await,
        tonic::Code::Ok
    );

    // A renewal as cert-manager writes it: the key first, then the certificate.
    assert_eq!(
        served_certificate(running.grpc, d).await,
        pem_der(&d.join("server.pem"))
    );
    replace(d, "renewed.key", "server.key");
    replace(d, "renewed.pem", "server.pem");
    reloaded(&mut grpc_reloads, "the renewed certificate is read", |r| {
        r.ok >= 1
    })
    .await;
    assert_eq!(
        served_certificate(running.grpc, d).await,
        pem_der(&d.join("renewed.pem"))
    );
    running.shutdown().await.unwrap();
}
