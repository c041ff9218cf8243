//! Authorization over plain HTTP, for proxies that ask an authorizer that way: Envoy's
//! (and Istio's `envoyExtAuthzHttp`) `http_service`, nginx `auth_request`, Traefik
//! `forwardAuth` and Caddy `forward_auth`. The same decision as Envoy's gRPC `Check`, with
//! the same statuses, bodies and identity headers (`api::envoy` shapes both).
//!
//! Each proxy's shape has a path of its own on `listen.http_authz`, and each reads the
//! original request only from the headers its proxy sets itself:
//!
//! - `/envoy/<original path>`: Envoy with `path_prefix: /envoy`. The method, path and
//!   headers are the original request's.
//! - `/forward-auth`: Traefik and Caddy, which send the original method and URI in
//!   `X-Forwarded-Method` and `X-Forwarded-Uri`, overwriting any a client sent.
//! - `/auth-request`: nginx, whose configuration sets `X-Original-Method` and
//!   `X-Original-URI` with `proxy_set_header` (overwriting any a client sent).
//!
//! No shape reads another's headers, so a client's `X-Forwarded-Uri` sent through nginx,
//! or its `X-Original-URI` sent through Traefik, is never read. A request on a shape's
//! path without its headers is a misconfigured proxy: 500, naming the header — an error,
//! never a decision.
//!
//! Answers: an allow is 200 with the identity headers to copy upstream, the client's
//! headers (`x-ratelimit-*`, a minted session token) and, for Envoy, the client-sent
//! headers to remove in `x-envoy-auth-headers-to-remove`. A denial has its configured
//! status, body and headers. nginx passes on only a 401 or 403 from `auth_request` (any
//! other status is its own 500), so on `/auth-request` a denial is 401 or 403 and carries
//! the client's status in `x-keygate-status` and its body in `x-keygate-error-body`, from
//! which the nginx configuration (`examples/nginx/`) answers. A backend failure is 503:
//! Envoy applies its `failure_mode_allow` / `status_on_error`, nginx answers 500, Traefik
//! and Caddy pass it on. Envoy's dynamic metadata has no HTTP form.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri};

use super::envoy::{Answer, CurrentEnvoy, EnvoyAuthorization};
use super::envoy_answer::AllowAnswer;
use crate::request::AuthRequest;

/// On `/auth-request` denials: the status the client must get.
pub const HEADER_STATUS: &str = "x-keygate-status";
/// On `/auth-request` denials: the body the client must get.
pub const HEADER_ERROR_BODY: &str = "x-keygate-error-body";
/// Envoy's HTTP ext_authz removes the request headers this lists (comma-separated).
pub const HEADER_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// Which proxy asked, by the path it asked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Envoy,
    ForwardAuth,
    Nginx,
}

impl Shape {
    /// Envoy's `path_prefix` in the shipped examples: the original path follows it.
    const ENVOY_PREFIX: &'static str = "/envoy";
    /// Traefik's and Caddy's forward-auth address path.
    const FORWARD_AUTH_PATH: &'static str = "/forward-auth";
    /// nginx's `auth_request` target path.
    const AUTH_REQUEST_PATH: &'static str = "/auth-request";

    /// The headers this shape's proxy sets with the original method and URI.
    fn original(self) -> Option<(&'static str, &'static str)> {
        match self {
            Shape::Envoy => None,
            Shape::ForwardAuth => Some(("x-forwarded-method", "x-forwarded-uri")),
            Shape::Nginx => Some(("x-original-method", "x-original-uri")),
        }
    }
}

/// The HTTP authorization listener's one handler (every path).
pub async fn handle(
    State(current): State<Arc<dyn CurrentEnvoy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response<Body> {
    let envoy = current.envoy();
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let (shape, envoy_path) = match uri.path() {
        Shape::FORWARD_AUTH_PATH => (Shape::ForwardAuth, None),
        Shape::AUTH_REQUEST_PATH => (Shape::Nginx, None),
        _ => match path_and_query.strip_prefix(Shape::ENVOY_PREFIX) {
            Some(rest) if rest.starts_with('/') => (Shape::Envoy, Some(rest)),
            _ => {
                return plain(
                    StatusCode::NOT_FOUND,
                    format!(
                        "keygate answers on {}/<path> (Envoy http_service), {} (Traefik, \
                         Caddy) and {} (nginx)\n",
                        Shape::ENVOY_PREFIX,
                        Shape::FORWARD_AUTH_PATH,
                        Shape::AUTH_REQUEST_PATH
                    ),
                )
            }
        },
    };
    let (method, path) = match (shape.original(), envoy_path) {
        (None, Some(path)) => (method.as_str().to_owned(), path.to_owned()),
        (Some((method_header, uri_header)), _) => {
            let read = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
            match (read(method_header), read(uri_header)) {
                (Some(m), Some(u)) if !m.is_empty() && u.starts_with('/') => {
                    (m.to_owned(), u.to_owned())
                }
                _ => {
                    return plain(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "the proxy must set {method_header} and {uri_header} (the original \
                             request's method and its path, from /)\n"
                        ),
                    )
                }
            }
        }
        (None, None) => unreachable!("the Envoy shape always has its path"),
    };
    let auth_req = AuthRequest {
        method,
        path,
        headers: consulted(&envoy, &headers),
        peer: None,
        credential: None,
    };
    match envoy.decide_request(auth_req, "http").await {
        Ok(Answer::Allow(allow)) => allowed(shape, &allow),
        Ok(Answer::Deny { error, headers }) => {
            let mut status = error.status;
            let mut response = Response::builder();
            if shape == Shape::Nginx {
                status = if status == 401 { 401 } else { 403 };
                response = response
                    .header(HEADER_STATUS, error.status)
                    .header(HEADER_ERROR_BODY, header_value(&error.body));
            }
            for (name, value) in &headers {
                response = response.header(*name, header_value(value));
            }
            response
                .status(status)
                .body(Body::from(error.body.to_string()))
                .unwrap_or_else(|e| internal(&e))
        }
        Err(status) => plain(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", status.message()),
        ),
    }
}

/// The request headers a decision consults, as `AuthRequest` holds them: lower-case
/// names, repeated ones joined with commas (as Envoy joins them), bytes that are not
/// UTF-8 replaced.
fn consulted(
    envoy: &EnvoyAuthorization,
    headers: &HeaderMap,
) -> std::collections::HashMap<String, String> {
    let mut out: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (name, value) in headers {
        if !envoy.consults(name.as_str().as_bytes()) {
            continue;
        }
        crate::request::join_header(
            &mut out,
            name.as_str().to_owned(),
            String::from_utf8_lossy(value.as_bytes()),
        );
    }
    out
}

/// 200, with the identity headers, the client's headers and (Envoy) what to remove.
fn allowed(shape: Shape, allow: &AllowAnswer) -> Response<Body> {
    let mut response = Response::builder().status(StatusCode::OK);
    let identity = allow.identity.iter().flat_map(|i| i.headers());
    let mut set: Vec<&str> = Vec::new();
    for (name, value) in identity.chain(allow.client_headers()) {
        if !set.contains(&name) {
            set.push(name);
            response = response.header(name, header_value(value));
        }
    }
    if shape == Shape::Envoy && !allow.remove.is_empty() {
        response = response.header(HEADER_REMOVE, header_value(&allow.remove.join(",")));
    }
    response
        .body(Body::empty())
        .unwrap_or_else(|e| internal(&e))
}

/// A header value as sent: keygate's values are visible ASCII or UTF-8 text; anything
/// else (a control character in a configured body) is left out rather than sent broken.
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn plain(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        HeaderName::from_static("content-type"),
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn internal(e: &dyn std::fmt::Display) -> Response<Body> {
    plain(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("keygate could not write its answer: {e}\n"),
    )
}
