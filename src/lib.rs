//! keygate: external authorization for Envoy and internal callers.
//!
//! The request flows through one straight line (see docs/architecture.md): an adapter in `api`
//! builds an [`request::AuthRequest`]; [`authorizer::Authorizer`] extracts the credential,
//! authenticates it (through the [`cache`]), resolves the tenant, checks the route's
//! scope, and returns a [`decision::Decision`] that the adapter turns back into its wire
//! format. Everything outside `api`, `server` and `cli` is free of protobuf and transport.

#![forbid(unsafe_code)]

pub mod api;
pub mod apikey;
pub mod audit;
pub mod authn;
pub mod authorizer;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credential;
pub mod decision;
pub mod file_watch;
pub mod header_alias;
pub mod jwt;
pub mod keys;
pub mod policy;
pub mod principal;
pub mod ratelimit;
pub mod request;
pub mod revocation;
pub mod secret;
pub mod server;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod tls;
pub mod transport;
pub mod usage;
