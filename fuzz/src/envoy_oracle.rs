//! What keygate must read from an Envoy `CheckRequest`, worked out from envoy-types'
//! decoding of the same bytes and the semantics `keygate::api::envoy_wire` documents.
//!
//! One oracle for the property tests (`tests/envoy_wire_props.rs` includes this file) and
//! the `envoy_request` fuzz target, so that both check the same claim: keygate's own
//! reader is envoy-types' decoder, less the differences its module doc lists.
//!
//! The semantics, from the decoded message (so nothing here depends on the order of the
//! fields on the wire, which protobuf says carries no meaning):
//! - a consulted `headers` entry is taken as it is, by its exact (lower-case) name, and so
//!   is a twin of one (`_` and `.` read as `-`, in any case: `x_tenant_id`);
//! - a consulted `header_map` entry (name matched in any case, kept lower-cased) is its
//!   `raw_value` if non-empty, else its `value`, read lossily, and the entries of one name
//!   are joined with commas in their order, after the `headers` value of that name if any;
//! - an empty `method` or `path` is the last `header_map` `:method` / `:path` (any case),
//!   else the `headers` one;
//! - the peer is the source's socket address, when it has a non-empty one.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{address, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use keygate::api::envoy_wire::HeaderFilter;
use keygate::request::AuthRequest;

/// The headers the oracle's filter consults by name (besides the prefix), as keygate's
/// Envoy adapter would with the default credential and tenant headers.
pub const CONSULTED: [&str; 3] = ["authorization", "x-api-key", "x-tenant-id"];
/// keygate's identity prefix, consulted so that a client's copies can be stripped.
pub const PREFIX: &str = "x-keygate-";

/// The filter every reading here is made with.
pub fn filter() -> HeaderFilter {
    HeaderFilter::new(CONSULTED, PREFIX)
}

fn consulted(lower_case_name: &str) -> bool {
    lower_case_name.starts_with(PREFIX)
        || CONSULTED.contains(&lower_case_name)
        || twin(lower_case_name)
}

/// A name with `_` or `.` that, read in lower case with both as `-`, is a consulted one
/// or under the prefix (`x_tenant_id`): kept so that an allow can remove it.
fn twin(name: &str) -> bool {
    if !name.contains(['_', '.']) {
        return false;
    }
    let dashed = name.to_ascii_lowercase().replace(['_', '.'], "-");
    dashed.starts_with(PREFIX) || CONSULTED.contains(&dashed.as_str())
}

/// What keygate reads of a request and what it is compared on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub method: String,
    pub path: String,
    /// Every header keygate kept: the oracle's are the consulted ones only, so keygate
    /// keeping any other is a difference too.
    pub headers: BTreeMap<String, String>,
    /// `None` also for an empty address: "no peer" either way, for logs.
    pub peer: Option<String>,
}

/// `header_map`'s value of an entry, as the module doc says keygate takes it.
fn header_map_value(hv: &HeaderValue) -> String {
    let bytes = if hv.raw_value.is_empty() {
        hv.value.as_bytes()
    } else {
        hv.raw_value.as_slice()
    };
    String::from_utf8_lossy(bytes).into_owned()
}

impl Reading {
    /// What keygate must read from `req`, a message envoy-types decoded.
    pub fn expected(req: &CheckRequest) -> Reading {
        let attributes = req.attributes.as_ref();
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.clone())
            .unwrap_or_default();
        let header_map = http.header_map.clone().unwrap_or_default().headers;

        let mut headers = BTreeMap::new();
        for (name, value) in &http.headers {
            if consulted(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        for hv in &header_map {
            let name = hv.key.to_ascii_lowercase();
            if consulted(&name) {
                let value = header_map_value(hv);
                headers
                    .entry(name)
                    .and_modify(|joined: &mut String| {
                        joined.push(',');
                        joined.push_str(&value);
                    })
                    .or_insert(value);
            }
        }

        let pseudo = |name: &str| {
            header_map
                .iter()
                .rev()
                .find(|hv| hv.key.eq_ignore_ascii_case(name))
                .map(header_map_value)
                .or_else(|| http.headers.get(name).cloned())
                .unwrap_or_default()
        };
        let or_pseudo = |own: &str, name: &str| {
            if own.is_empty() {
                pseudo(name)
            } else {
                own.to_owned()
            }
        };

        let peer = attributes
            .and_then(|a| a.source.as_ref())
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.address.as_ref())
            .and_then(|a| match a {
                address::Address::SocketAddress(sa) => Some(sa.address.clone()),
                _ => None,
            })
            .filter(|a| !a.is_empty());

        Reading {
            method: or_pseudo(&http.method, ":method"),
            path: or_pseudo(&http.path, ":path"),
            headers,
            peer,
        }
    }

    /// What keygate did read.
    pub fn of(req: &AuthRequest) -> Reading {
        Reading {
            method: req.method.clone(),
            path: req.path.clone(),
            headers: req
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            peer: req.peer.clone().filter(|a| !a.is_empty()),
        }
    }
}

/// The claim for arbitrary bytes: keygate's reading, compared with the oracle's when
/// envoy-types decodes them. `Err` says how they differ.
///
/// One narrowing, and why: envoy-types keeps the peer `Address` oneof's last member, and
/// a later member of another kind (a pipe) replaces an earlier socket address; keygate
/// reads only socket addresses, and keeps the last it saw. So the peer is compared only
/// where envoy-types reads a socket address (the last member, whose address is then also
/// the last keygate saw); it is used for logs only.
pub fn check_bytes(bytes: &[u8]) -> Result<(), String> {
    use keygate::api::envoy_wire::{auth_request, CheckRequestView};
    use prost::Message;

    let ours = CheckRequestView::decode(bytes)
        .map_err(keygate::api::envoy_wire::WireError::from)
        .and_then(|view| auth_request(view, &filter()));
    let Ok(theirs) = CheckRequest::decode(bytes) else {
        return Ok(());
    };
    let ours = ours.map_err(|e| format!("envoy-types decodes, keygate refuses: {e}"))?;
    let want = Reading::expected(&theirs);
    let mut got = Reading::of(&ours);
    if want.peer.is_none() {
        got.peer = None;
    }
    if got == want {
        Ok(())
    } else {
        Err(format!("keygate read {got:?}, envoy-types {want:?}"))
    }
}
