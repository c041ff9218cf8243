//! Envoy's side of the wire: `CheckRequest`s as Envoy sends them, and a reading of
//! keygate's `CheckResponse` that checks the invariants Envoy relies on; and the same read
//! as keygate.v1's own Check asks it.

use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HeaderMap, HeaderValue, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    check_response::HttpResponse,
    AttributeContext, CheckRequest, CheckResponse,
};

use crate::READ_PATH;

/// A CheckRequest as Envoy sends it (without `encode_raw_headers`): lower-cased headers
/// in `headers`, pseudo-headers included, method and path also in their own fields.
pub fn check_request(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut map: std::collections::HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        ("user-agent", "keygate-tests/1.0"),
        ("x-request-id", "6f1c2a9e-1d2b-4c3d-8e4f-5a6b7c8d9e0f"),
        ("x-forwarded-proto", "https"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in headers {
        map.insert(k.to_ascii_lowercase(), (*v).to_owned());
    }
    let headers = HttpRequest {
        headers: map,
        ..Default::default()
    };
    envelope(method, path, headers)
}

/// A CheckRequest as Envoy sends it with `encode_raw_headers: true`: `headers` empty,
/// every header (pseudo-headers too) in `header_map` as raw bytes.
pub fn raw_check_request(method: &str, path: &str, headers: &[(&str, &[u8])]) -> CheckRequest {
    let mut raw: Vec<HeaderValue> = [
        (":authority", b"api.example.com".as_slice()),
        (":method", method.as_bytes()),
        (":path", path.as_bytes()),
        (":scheme", b"https".as_slice()),
        ("user-agent", b"keygate-tests/1.0".as_slice()),
    ]
    .into_iter()
    .map(|(k, v)| HeaderValue {
        key: k.to_owned(),
        raw_value: v.to_vec(),
        ..Default::default()
    })
    .collect();
    for (k, v) in headers {
        raw.push(HeaderValue {
            key: k.to_ascii_lowercase(),
            raw_value: v.to_vec(),
            ..Default::default()
        });
    }
    let headers = HttpRequest {
        header_map: Some(HeaderMap { headers: raw }),
        ..Default::default()
    };
    envelope(method, path, headers)
}

/// The rest of what Envoy sends around a request's headers (`headers` or `header_map`,
/// the only fields of `headers` this reads): the request's own fields and both peers.
fn envelope(method: &str, path: &str, headers: HttpRequest) -> CheckRequest {
    let http = HttpRequest {
        id: "1234567890123456789".into(),
        method: method.into(),
        path: path.into(),
        host: "api.example.com".into(),
        scheme: "https".into(),
        size: -1,
        protocol: "HTTP/2".into(),
        ..headers
    };
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 53124)),
            destination: Some(peer("10.9.8.7", 8443)),
            request: Some(Request {
                time: None,
                http: Some(http),
            }),
            ..Default::default()
        }),
    }
}

/// An Envoy ext_authz client of the gRPC listener at `addr`.
pub async fn envoy_client(
    addr: std::net::SocketAddr,
) -> envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient<
    tonic::transport::Channel,
> {
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
        format!("http://{addr}"),
    )
    .await
    .expect("the gRPC listener answers")
}

/// `authorization: Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A GET on the read route carrying `token` the usual way.
pub fn read_with(token: &str) -> CheckRequest {
    check_request("GET", READ_PATH, &[("authorization", &bearer(token))])
}

/// The read of `read_with` through keygate.v1's own Check (what internal callers send):
/// `token` as the credential, nothing else but the method and path.
pub fn read_through_keygate_v1(token: &str) -> keygate::api::proto::CheckRequest {
    keygate::api::proto::CheckRequest {
        credential: token.to_owned(),
        method: "GET".into(),
        path: READ_PATH.into(),
        ..Default::default()
    }
}

/// Headers an answer sets or adds (`OkHttpResponse.headers`, `.response_headers_to_add`,
/// `DeniedHttpResponse.headers`), as (name, value), in order.
pub fn header_pairs(
    options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
) -> Vec<(String, String)> {
    options
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// What Envoy makes of keygate's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied {
        code: String,
        http: i32,
    },
    /// A gRPC error: Envoy applies `failure_mode_allow` / `status_on_error`.
    Error(tonic::Code),
}

impl Outcome {
    pub fn denied(code: &str, http: i32) -> Outcome {
        Outcome::Denied {
            code: code.to_owned(),
            http,
        }
    }

    /// What a revoked API key gets: 401 `revoked_api_key`.
    pub fn revoked_key() -> Outcome {
        Outcome::denied("revoked_api_key", 401)
    }
}

/// Reads a `decide` result the way Envoy would, and fails the test on any answer Envoy
/// could misread: a missing `status` (reads as allow), an allow without an OK response,
/// a deny with code 0, or a deny without a JSON error body.
pub fn outcome(result: &Result<CheckResponse, tonic::Status>) -> Outcome {
    let resp = match result {
        Ok(r) => r,
        Err(status) => return Outcome::Error(status.code()),
    };
    let status = resp
        .status
        .as_ref()
        .expect("CheckResponse.status must always be set (unset reads as allow)");
    match &resp.http_response {
        Some(HttpResponse::OkResponse(_)) => {
            assert_eq!(status.code, 0, "an OK response must carry status code 0");
            Outcome::Allowed
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            assert_ne!(status.code, 0, "a denial must carry a non-zero status code");
            let http = denied
                .status
                .as_ref()
                .expect("a denial names its HTTP status")
                .code;
            let body: serde_json::Value =
                serde_json::from_str(&denied.body).expect("the denial body is JSON");
            let code = body["error"]["code"]
                .as_str()
                .expect("the denial body has error.code")
                .to_owned();
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "the denial body has error.message: {}",
                denied.body
            );
            let content_type = denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "content-type")
                .map(|h| h.value.as_str());
            assert_eq!(content_type, Some("application/json"));
            Outcome::Denied { code, http }
        }
        other => panic!("a CheckResponse without an http_response: {other:?}"),
    }
}

/// Asks `envoy` and reads the answer with `outcome`.
pub async fn outcome_of(
    envoy: &keygate::api::envoy::EnvoyAuthorization,
    req: CheckRequest,
) -> Outcome {
    outcome(&envoy.decide(req).await)
}
