//! `listen`: the three listeners' addresses, and how long a connection may live.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Envoy ext_authz, keygate.v1.Authorizer, health, reflection.
    pub grpc: SocketAddr,
    /// keygate.v1.Keys; loopback by default, since it manages credentials.
    pub admin: SocketAddr,
    /// /metrics, /healthz, /readyz.
    pub http: SocketAddr,
    /// Connections older than this are closed gracefully so that long-lived Envoy
    /// connections spread over new replicas.
    #[serde(deserialize_with = "duration")]
    pub max_connection_age: Duration,
    /// On SIGTERM, how long keygate keeps serving while reporting NOT_SERVING, so that
    /// load balancers stop sending before the listeners close.
    #[serde(deserialize_with = "duration")]
    pub drain_delay: Duration,
    /// TLS on the gRPC listener; plain text when left out.
    pub grpc_tls: Option<TlsConfig>,
    /// TLS on the admin listener (with `client_ca_file`: mTLS).
    pub admin_tls: Option<TlsConfig>,
    /// HTTP authorization (Envoy `http_service`, nginx `auth_request`, Traefik and Caddy
    /// forward auth); off unless set.
    pub http_authz: Option<SocketAddr>,
}

/// A listener's TLS: its certificate chain and key (PEM files, re-read when they
/// change), and optionally the CA its clients' certificates must chain to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: String,
    pub key_file: String,
    /// With it, every client must present a certificate signed by this CA (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<String>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: "0.0.0.0:50051".parse().expect("literal"),
            admin: "127.0.0.1:50052".parse().expect("literal"),
            http: "0.0.0.0:9090".parse().expect("literal"),
            max_connection_age: Duration::from_secs(300),
            drain_delay: Duration::from_secs(5),
            grpc_tls: None,
            admin_tls: None,
            http_authz: None,
        }
    }
}
