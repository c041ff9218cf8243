//! Adapters: the only code that knows a wire format. Each turns a protocol's request into
//! the core's plain values and the core's answer back into the protocol's response.

pub mod authorizer;
pub mod envoy;
pub mod envoy_answer;
pub mod envoy_learn;
pub mod envoy_module;
pub mod envoy_wire;
pub mod http_authz;
pub mod keys;
pub mod partners;
pub mod revocations;

/// keygate's own gRPC API, generated from `proto/keygate/v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keygate.v1");

    /// For server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("keygate_descriptor");
}

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use crate::revocation::RevocationBus;

/// What a gRPC method returns: its response, or the status it fails with.
pub(crate) type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

/// UNAVAILABLE because `backend` (the store, in practice) could not be asked: never a
/// denial and never an allow, so the caller's own failure policy decides.
pub(crate) fn unavailable(backend: &str) -> tonic::Status {
    tonic::Status::unavailable(format!("authorization backend unavailable: {backend}"))
}

/// `req` decided inside `span` (`telemetry::check_span`), which gets the decision and the
/// route. Untraced (no OTLP endpoint) the span is disabled and the check runs as it is.
pub(crate) async fn traced_check(
    authorizer: &crate::authorizer::Authorizer,
    req: &crate::request::AuthRequest,
    span: tracing::Span,
) -> crate::decision::Decision {
    use tracing::Instrument as _;
    if span.is_disabled() {
        return authorizer.check(req).await;
    }
    let decision = authorizer.check(req).instrument(span.clone()).await;
    span.record("keygate.decision", decision.label());
    if let crate::decision::Decision::Allow(a) = &decision {
        span.record("keygate.route", &*a.route);
    }
    decision
}

/// UNAVAILABLE while the replica that answers does not yet know where it starts in the
/// revocation stream: a key verified and cached before then could miss a revocation made
/// in between. `None` (no gate) for adapters that are not served (tests, benchmarks).
pub(crate) fn starting(gate: &Option<Arc<RevocationBus>>) -> Result<(), tonic::Status> {
    match gate {
        Some(bus) if !bus.has_position() => Err(tonic::Status::unavailable(
            "starting: the revocation stream's position is not known yet",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as unix milliseconds (before 1970: 0).
pub(crate) fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
}

/// RFC 3339 (UTC, seconds) for a unix-millisecond instant.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
