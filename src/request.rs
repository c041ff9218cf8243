//! `AuthRequest`: the protocol-neutral view of the request being authorized. Adapters
//! build it from Envoy's `CheckRequest` or keygate's own; the core never sees a protobuf.

use std::collections::HashMap;

#[derive(Debug, Clone, Default)]
pub struct AuthRequest {
    pub method: String,
    /// As received, query string included.
    pub path: String,
    /// Lower-cased names. Repeated headers arrive joined with commas. Only the headers
    /// keygate consults need be here: the Envoy adapter keeps the credential headers, the
    /// tenant header, `x-keygate-*`, `:method` and `:path` (`api::envoy_wire`).
    pub headers: HashMap<String, String>,
    /// The downstream peer address, for logs.
    pub peer: Option<String>,
    /// A credential handed over outside the headers (keygate.v1 Check's `credential`).
    /// Read before any header.
    pub credential: Option<String>,
}

impl AuthRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}
