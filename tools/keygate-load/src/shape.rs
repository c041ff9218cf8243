//! What the generator sends: a `CheckRequest` shaped like the ones Envoy 1.40 builds for
//! an HTTP/1.1 request (captured from a real Envoy; see BENCHMARKS.md), pre-encoded once.
//!
//! Per request only three values change — the credential, `x-request-id` and `http.id`
//! (Envoy's stream id) — so the encoded message is a template with three fixed-width
//! holes. Filling them is a copy, which keeps the generator's cost per request small and
//! the same for every target, while each request still carries its own ids.
//!
//! Self-contained (nothing from the rest of keygate-load): it is the library part of
//! keygate-load, which keygate's `benches/hot_path.rs` uses, so that the micro-benchmarks
//! decide the very request the generator sends.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Address, SocketAddress};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request},
    AttributeContext, CheckRequest,
};
use envoy_types::pb::google::protobuf::Timestamp;
use prost::Message;

/// `x-request-id`: a UUID, as Envoy generates it.
pub const REQUEST_ID_LEN: usize = 36;
/// `http.id`: Envoy's stream id, a u64 in decimal. Kept at 19 digits so it has a fixed
/// width (Envoy's are 1–20 digits; most random u64 have 19 or 20).
pub const STREAM_ID_LEN: usize = 19;

/// The downstream request the CheckRequest describes.
#[derive(Debug, Clone)]
pub struct Shape {
    pub method: String,
    /// With the query string, as Envoy sends it.
    pub path: String,
    pub authority: String,
    /// The header carrying the credential, and the scheme before it (`Bearer`).
    pub credential_header: String,
    pub credential_scheme: Option<String>,
    /// Extra headers (lower-case names), e.g. `x-tenant-id`.
    pub extra_headers: Vec<(String, String)>,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

impl Shape {
    pub fn new(method: &str, path: &str) -> Shape {
        Shape {
            method: method.to_owned(),
            path: path.to_owned(),
            authority: "api.example.com".into(),
            credential_header: "authorization".into(),
            credential_scheme: Some("Bearer".into()),
            extra_headers: Vec::new(),
            source: "10.1.2.3:51234".parse().expect("literal"),
            destination: "10.0.0.10:8443".parse().expect("literal"),
        }
    }

    /// The request with its three variable values set to `token`, `request_id` and
    /// `stream_id`. `CheckRequest.attributes` is filled the way Envoy fills it: peers,
    /// request time, `http` with id, method, the header map (pseudo-headers included),
    /// path, host, scheme, protocol, and the (empty) metadata contexts.
    pub fn check_request(&self, token: &str, request_id: &str, stream_id: &str) -> CheckRequest {
        let credential = match &self.credential_scheme {
            Some(scheme) => format!("{scheme} {token}"),
            None => token.to_owned(),
        };
        let mut headers: HashMap<String, String> = [
            (":authority", self.authority.as_str()),
            (":method", self.method.as_str()),
            (":path", self.path.as_str()),
            (":scheme", "https"),
            (
                "user-agent",
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
                 Chrome/126.0 Safari/537.36",
            ),
            ("accept", "application/json, text/plain, */*"),
            ("accept-encoding", "gzip, deflate, br"),
            ("accept-language", "en-US,en;q=0.9"),
            ("content-length", "0"),
            ("x-request-id", request_id),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-envoy-expected-rq-timeout-ms", "15000"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("cache-control", "no-cache"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        headers.insert(self.credential_header.clone(), credential);
        for (k, v) in &self.extra_headers {
            headers.insert(k.clone(), v.clone());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(self.source)),
                destination: Some(peer(self.destination)),
                request: Some(Request {
                    time: Some(Timestamp {
                        seconds: now.as_secs() as i64,
                        nanos: now.subsec_nanos() as i32,
                    }),
                    http: Some(HttpRequest {
                        id: stream_id.to_owned(),
                        method: self.method.clone(),
                        headers,
                        path: self.path.clone(),
                        host: self.authority.clone(),
                        scheme: "https".into(),
                        protocol: "HTTP/1.1".into(),
                        ..Default::default()
                    }),
                }),
                metadata_context: Some(Default::default()),
                route_metadata_context: Some(Default::default()),
                ..Default::default()
            }),
        }
    }
}

fn peer(addr: SocketAddr) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(addr.port() as u32)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    Token,
    RequestId,
    StreamId,
}

/// The encoded CheckRequest, split around its holes.
#[derive(Debug, Clone)]
pub struct Template {
    /// `pieces.len() == holes.len() + 1`; the message is piece, hole, piece, …, piece.
    pieces: Vec<Bytes>,
    holes: Vec<Hole>,
    token_len: usize,
    encoded_len: usize,
}

impl Template {
    /// Encodes `shape` for tokens of exactly `token_len` bytes.
    pub fn new(shape: &Shape, token_len: usize) -> Template {
        // Sentinels: runs of control characters that nothing else in the message contains.
        let token = "\u{1}".repeat(token_len);
        let request_id = "\u{2}".repeat(REQUEST_ID_LEN);
        let stream_id = "\u{3}".repeat(STREAM_ID_LEN);
        let encoded = shape
            .check_request(&token, &request_id, &stream_id)
            .encode_to_vec();
        let mut found = Vec::new();
        for (hole, marker) in [
            (Hole::Token, token.as_bytes()),
            (Hole::RequestId, request_id.as_bytes()),
            (Hole::StreamId, stream_id.as_bytes()),
        ] {
            let at = find(&encoded, marker).expect("every hole is in the encoded message");
            assert!(
                find(&encoded[at + marker.len()..], marker).is_none(),
                "hole {hole:?} appears twice"
            );
            found.push((at, marker.len(), hole));
        }
        found.sort_by_key(|(at, _, _)| *at);
        let mut pieces = Vec::new();
        let mut holes = Vec::new();
        let mut pos = 0;
        for (at, len, hole) in found {
            pieces.push(Bytes::copy_from_slice(&encoded[pos..at]));
            holes.push(hole);
            pos = at + len;
        }
        pieces.push(Bytes::copy_from_slice(&encoded[pos..]));
        Template {
            pieces,
            holes,
            token_len,
            encoded_len: encoded.len(),
        }
    }

    pub fn token_len(&self) -> usize {
        self.token_len
    }

    /// Length of the protobuf message (without the gRPC frame header).
    pub fn encoded_len(&self) -> usize {
        self.encoded_len
    }

    /// One gRPC length-prefixed message: the template with its holes filled.
    pub fn frame(&self, token: &[u8], ids: &Ids) -> Bytes {
        assert_eq!(
            token.len(),
            self.token_len,
            "token length differs from template"
        );
        let mut out = BytesMut::with_capacity(5 + self.encoded_len);
        out.put_u8(0);
        out.put_u32(self.encoded_len as u32);
        for (i, piece) in self.pieces.iter().enumerate() {
            out.put_slice(piece);
            if let Some(hole) = self.holes.get(i) {
                out.put_slice(match hole {
                    Hole::Token => token,
                    Hole::RequestId => &ids.request_id,
                    Hole::StreamId => &ids.stream_id,
                });
            }
        }
        out.freeze()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The per-request ids, derived from a request sequence number.
pub struct Ids {
    pub request_id: [u8; REQUEST_ID_LEN],
    pub stream_id: [u8; STREAM_ID_LEN],
}

impl Ids {
    /// Distinct for distinct `seq` (splitmix64 is a bijection), and random-looking.
    pub fn for_sequence(seq: u64, run_salt: u64) -> Ids {
        let a = splitmix64(seq ^ run_salt);
        let b = splitmix64(a);
        let mut request_id = [0u8; REQUEST_ID_LEN];
        // 8-4-4-4-12 hex, version 4, variant 10xx.
        let mut nibbles = (a as u128) << 64 | b as u128;
        for (i, slot) in request_id.iter_mut().enumerate() {
            *slot = match i {
                8 | 13 | 18 | 23 => b'-',
                14 => b'4',
                19 => b"89ab"[(nibbles & 3) as usize],
                _ => {
                    let d = (nibbles & 0xf) as usize;
                    nibbles >>= 4;
                    b"0123456789abcdef"[d]
                }
            };
        }
        let mut stream_id = [0u8; STREAM_ID_LEN];
        // 19 digits: 10^18 ..= 10^19 - 1.
        let mut n = 1_000_000_000_000_000_000 + a % 9_000_000_000_000_000_000;
        for slot in stream_id.iter_mut().rev() {
            *slot = b'0' + (n % 10) as u8;
            n /= 10;
        }
        Ids {
            request_id,
            stream_id,
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "sk_live_0123456789abcdef_0123456789012345678901234567ABCDEF";

    #[test]
    fn a_filled_template_is_the_request_encoded_directly() {
        let shape = Shape::new("GET", "/v1/contacts/1?page=2");
        let template = Template::new(&shape, TOKEN.len());
        let ids = Ids::for_sequence(7, 42);
        let frame = template.frame(TOKEN.as_bytes(), &ids);
        assert_eq!(frame[0], 0, "uncompressed");
        let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 5);
        let decoded = CheckRequest::decode(&frame[5..]).unwrap();
        let http = decoded.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.headers["authorization"], format!("Bearer {TOKEN}"));
        assert_eq!(http.headers["x-request-id"].as_bytes(), &ids.request_id[..]);
        assert_eq!(http.id.as_bytes(), &ids.stream_id[..]);
        assert_eq!(http.headers[":path"], "/v1/contacts/1?page=2");
        assert_eq!(http.path, "/v1/contacts/1?page=2");
        assert_eq!(http.method, "GET");
        assert_eq!(http.host, "api.example.com");
        assert_eq!(http.protocol, "HTTP/1.1");
        let ordinary = http.headers.keys().filter(|k| !k.starts_with(':')).count();
        assert!(ordinary >= 12, "{ordinary} ordinary headers");
    }

    #[test]
    fn ids_look_like_envoys_and_differ_per_request() {
        let mut seen = std::collections::HashSet::new();
        for seq in 0..10_000 {
            let ids = Ids::for_sequence(seq, 1);
            let rid = std::str::from_utf8(&ids.request_id).unwrap();
            assert!(uuid::Uuid::parse_str(rid).is_ok(), "{rid}");
            assert_eq!(&rid[14..15], "4");
            let sid = std::str::from_utf8(&ids.stream_id).unwrap();
            assert!(sid.parse::<u64>().is_ok() && !sid.starts_with('0'), "{sid}");
            assert!(seen.insert(ids.request_id));
        }
    }

    #[test]
    #[should_panic(expected = "token length")]
    fn a_token_of_another_length_is_refused() {
        let template = Template::new(&Shape::new("GET", "/"), TOKEN.len());
        template.frame(b"short", &Ids::for_sequence(0, 0));
    }
}
