//! What a platform team's tooling sees of a running keygate: gRPC health for the
//! services on the main port, server reflection, the admin credential on the admin
//! port, and readiness.

mod support;

use std::sync::Arc;

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

/// `msg` with the admin credential attached.
fn authed<T>(secrets: &keygate::config::Secrets, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", secrets.admin_token.expose())
            .parse()
            .unwrap(),
    );
    r
}

async fn start() -> (Arc<App>, server::Running, keygate::config::Secrets) {
    let secrets = secrets();
    let app = Arc::new(App::build(config(Backend::Memory), secrets.clone()).unwrap());
    let running = server::start(app.clone()).await.unwrap();
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
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
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
        .create_key(authed(&secrets, create()))
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
        let err = admin.create_key(authed(&secrets, req)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = admin
        .get_key(authed(
            &secrets,
            proto::GetKeyRequest { key_id: "x".into() },
        ))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("key_id"), "{}", err.message());
    let missing = admin
        .revoke_key(authed(
            &secrets,
            proto::RevokeKeyRequest {
                key_id: "0123456789abcdef".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let page = admin
        .list_keys(authed(
            &secrets,
            proto::ListKeysRequest {
                tenant_id: TENANT.into(),
                page_size: 5000,
                page_token: String::new(),
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
    let (_, running, _) = start().await;
    let open = || keygate::telemetry::metrics().watch_streams.get();
    assert_eq!(open(), 0);
    let mut client = keygate::api::proto::revocations_client::RevocationsClient::new(
        channel(running.grpc).await,
    );
    let stream = client
        .watch(proto::WatchRequest::default())
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
