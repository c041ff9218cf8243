//! Differential properties of keygate's own protobuf: `api::envoy_wire` reads Envoy's
//! `CheckRequest` and `api::envoy_answer` writes allow answers without envoy-types' generated
//! code, for speed. These properties say that nothing was lost: on generated requests, on
//! requests whose fields are split, reordered and padded with unknown fields by hand, and on
//! arbitrary bytes, keygate reads what envoy-types decodes (less the differences
//! `envoy_wire`'s module doc lists), and every allow keygate writes decodes to the
//! `CheckResponse` it stands for.
//!
//! What "reads what envoy-types decodes" means is `fuzz/src/envoy_oracle.rs`, shared with
//! the `envoy_request` fuzz target. Case counts are bounded: the file runs in seconds in a
//! debug build; the fuzz targets are where long runs go (docs/security.md).

#[path = "../fuzz/src/envoy_oracle.rs"]
mod envoy_oracle;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{
    address, socket_address::PortSpecifier, Address, HeaderMap, HeaderValue, HeaderValueOption,
    Pipe, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Timestamp, Value};
use envoy_types::pb::google::rpc;
use keygate::api::envoy_answer::{AllowAnswer, CheckAnswer, Identity};
use keygate::api::envoy_wire::{auth_request, CheckRequestView, WireError};
use keygate::principal::{Environment, KeyKind, Principal};
use keygate::request::AuthRequest;
use keygate::secret::Secret;
use proptest::collection::{hash_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;

use envoy_oracle::{check_bytes, filter, Reading};

/// Enough cases to cover the shapes below many times over, few enough to keep the file
/// to seconds; no regression files are written into the tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn keygate_reads(bytes: &[u8]) -> Result<AuthRequest, WireError> {
    auth_request(CheckRequestView::decode(bytes)?, &filter())
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

/// Header names: the consulted ones, near misses and twins of them, pseudo-headers and
/// others.
const NAMES: &[&str] = &[
    "authorization",
    "x-api-key",
    "x-tenant-id",
    "x-keygate-subject",
    "x-keygate-scopes",
    "x-keygate-",
    "x-keygate",
    "x-api-keys",
    "authorizatio",
    "x_tenant_id",
    "x.keygate.subject",
    "x_custom",
    "user-agent",
    "cookie",
    ":method",
    ":path",
    ":authority",
];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(NAMES).prop_map(str::to_owned),
        1 => "[a-z:-]{0,12}",
        1 => ".{0,6}",
    ]
}

/// `name` with the letters whose bit is set in `mask` upper-cased.
fn recase(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// A name as it may arrive in `header_map`, which keeps the case Envoy received: lower
/// case, or any mix.
fn any_case_name() -> impl Strategy<Value = String> {
    (header_name(), prop_oneof![Just(0u64), any::<u64>()]).prop_map(|(n, m)| recase(&n, m))
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[ -~]{0,16}", ".{0,8}",]
}

fn bytes_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        "[ -~]{1,16}".prop_map(String::into_bytes),
        // Not UTF-8, mostly: raw_value is `bytes`.
        vec(any::<u8>(), 1..12),
    ]
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(&["GET", "POST", "DELETE", "HEAD", "OPTIONS"][..])
            .prop_map(str::to_owned),
        Just(String::new()),
        ".{0,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(&["/v1/contacts/42?fields=name", "/public/a", "/"][..])
            .prop_map(str::to_owned),
        Just(String::new()),
        "/[ -~]{0,20}",
        ".{0,10}",
    ]
}

fn header_value() -> impl Strategy<Value = HeaderValue> {
    (any_case_name(), text(), bytes_value()).prop_map(|(key, value, raw_value)| HeaderValue {
        key,
        value,
        raw_value,
    })
}

fn http_request() -> impl Strategy<Value = HttpRequest> {
    (
        method(),
        path(),
        // Mostly lower case, as Envoy sends `headers`; sometimes not.
        vec(
            (
                prop_oneof![3 => header_name(), 1 => any_case_name()],
                text(),
            ),
            0..8,
        ),
        prop::option::weighted(0.6, vec(header_value(), 0..8)),
        (text(), text(), text(), any::<i64>()),
    )
        .prop_map(
            |(method, path, headers, header_map, (host, id, body, size))| HttpRequest {
                method,
                path,
                headers: headers.into_iter().collect(),
                header_map: header_map.map(|headers| HeaderMap { headers }),
                host,
                id,
                body,
                size,
                scheme: "https".into(),
                protocol: "HTTP/2".into(),
                ..Default::default()
            },
        )
}

fn peer() -> impl Strategy<Value = Peer> {
    let address = prop_oneof![
        3 => ("[0-9a-f.:]{0,15}", any::<u32>()).prop_map(|(address, port)| {
            address::Address::SocketAddress(SocketAddress {
                address,
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })
        }),
        1 => text().prop_map(|path| address::Address::Pipe(Pipe { path, mode: 0o600 })),
    ];
    (prop::option::weighted(0.9, address), text()).prop_map(|(address, principal)| Peer {
        address: Some(Address { address }),
        principal,
        ..Default::default()
    })
}

/// A CheckRequest as Envoy fills it, or with parts missing.
fn check_request() -> impl Strategy<Value = CheckRequest> {
    (
        prop::option::weighted(0.9, http_request()),
        prop::option::weighted(0.8, peer()),
        prop::option::of(peer()),
        hash_map("[a-z]{0,4}", text(), 0..3),
        // Mostly there, as Envoy always sends them.
        (
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.9),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(http, source, destination, context_extensions, (attrs, request, secs))| {
                CheckRequest {
                    attributes: attrs.then(|| AttributeContext {
                        source,
                        destination,
                        request: request.then_some(Request {
                            time: Some(Timestamp {
                                seconds: secs,
                                nanos: 0,
                            }),
                            http,
                        }),
                        context_extensions,
                        tls_session: Some(TlsSession {
                            sni: "api.example.com".into(),
                        }),
                        ..Default::default()
                    }),
                }
            },
        )
}

/// The request as keygate must read it, next to what it read.
fn differs(req: &CheckRequest, bytes: &[u8]) -> Result<(), TestCaseError> {
    let ours = keygate_reads(bytes)
        .map_err(|e| TestCaseError::fail(format!("keygate refused a valid request: {e}")))?;
    prop_assert_eq!(Reading::of(&ours), Reading::expected(req));
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn keygate_reads_what_envoy_types_decodes(req in check_request()) {
        let bytes = req.encode_to_vec();
        let theirs = CheckRequest::decode(bytes.as_slice()).unwrap();
        differs(&theirs, &bytes)?;
    }
}

// ---------------------------------------------------------------------------------------
// Requests encoded by hand: split, reordered, padded with unknown fields
// ---------------------------------------------------------------------------------------

// Field numbers, from Envoy's protos (keygate's own constants are not public: these are
// written out again so that a wrong one in keygate is a difference, not an agreement).
const CHECK_ATTRIBUTES: u32 = 1;
const ATTR_SOURCE: u32 = 1;
const ATTR_REQUEST: u32 = 4;
const REQUEST_HTTP: u32 = 2;
const HTTP_METHOD: u32 = 2;
const HTTP_HEADERS: u32 = 3;
const HTTP_PATH: u32 = 4;
const HTTP_HEADER_MAP: u32 = 13;
const MAP_HEADERS: u32 = 1;
const KEY: u32 = 1;
const VALUE: u32 = 2;
const RAW_VALUE: u32 = 3;

/// The fields keygate reads in each message it walks: where a "foreign" field (one of
/// these with another wire type) can go.
const AT_ATTRIBUTES: &[u32] = &[ATTR_SOURCE, ATTR_REQUEST];
const AT_REQUEST: &[u32] = &[REQUEST_HTTP];
const AT_HTTP: &[u32] = &[HTTP_METHOD, HTTP_HEADERS, HTTP_PATH, HTTP_HEADER_MAP];
const AT_HEADER_MAP: &[u32] = &[MAP_HEADERS];
/// A `headers` map entry: `map<string, string>` has no field 3, so a field 3 there is an
/// unknown field (which envoy-types skips too), not a foreign one.
const AT_MAP_ENTRY: &[u32] = &[KEY, VALUE];
/// A `HeaderValue` of `header_map`.
const AT_HEADER: &[u32] = &[KEY, VALUE, RAW_VALUE];
/// The outer CheckRequest: tonic's generated view refuses a foreign `attributes`, as
/// envoy-types does, so none goes there.
const AT_TOP: &[u32] = &[];

fn delimited(tag: u32, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    encode_key(tag, WireType::LengthDelimited, &mut out);
    encode_varint(contents.len() as u64, &mut out);
    out.extend_from_slice(contents);
    out
}

/// A field of another wire type than length-delimited: varint, fixed 64, fixed 32 or a
/// group (with a varint inside).
fn non_delimited(tag: u32, kind: u32, n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    match kind % 4 {
        0 => {
            encode_key(tag, WireType::Varint, &mut out);
            encode_varint(n, &mut out);
        }
        1 => {
            encode_key(tag, WireType::SixtyFourBit, &mut out);
            out.extend_from_slice(&n.to_le_bytes());
        }
        2 => {
            encode_key(tag, WireType::ThirtyTwoBit, &mut out);
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        _ => {
            encode_key(tag, WireType::StartGroup, &mut out);
            encode_key(1, WireType::Varint, &mut out);
            encode_varint(n, &mut out);
            encode_key(tag, WireType::EndGroup, &mut out);
        }
    }
    out
}

/// An unknown field: a number none of the messages keygate walks defines (theirs stop
/// below 20), of any wire type.
fn unknown_field() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![50u32..5000, Just((1 << 29) - 1)],
        0u32..5,
        any::<u64>(),
        vec(any::<u8>(), 0..8),
    )
        .prop_map(|(tag, kind, n, bytes)| {
            if kind == 4 {
                delimited(tag, &bytes)
            } else {
                non_delimited(tag, kind, n)
            }
        })
}

/// The random choices of one hand encoding, drawn up front so that proptest can shrink
/// them; read in turn, cycling.
#[derive(Debug, Clone)]
struct Dice {
    rolls: Vec<u32>,
    /// Unknown fields, or nothing.
    pads: Vec<Vec<u8>>,
    /// Whether `pad` also puts in fields keygate reads with a wire type not theirs.
    foreign: bool,
    foreign_written: usize,
    r: usize,
    p: usize,
}

fn dice(foreign: bool) -> impl Strategy<Value = Dice> {
    (
        vec(any::<u32>(), 64),
        vec(prop_oneof![Just(Vec::new()), unknown_field()], 24),
    )
        .prop_map(move |(rolls, pads)| Dice {
            rolls,
            pads,
            foreign,
            foreign_written: 0,
            r: 0,
            p: 0,
        })
}

impl Dice {
    fn roll(&mut self, n: usize) -> usize {
        let v = self.rolls[self.r % self.rolls.len()];
        self.r += 1;
        v as usize % n
    }

    fn coin(&mut self) -> bool {
        self.roll(2) == 0
    }

    /// Padding between two fields of a message whose read fields are `known`.
    fn pad(&mut self, known: &[u32]) -> Vec<u8> {
        let mut out = self.pads[self.p % self.pads.len()].clone();
        self.p += 1;
        if self.foreign && !known.is_empty() && self.roll(3) == 0 {
            let tag = known[self.roll(known.len())];
            let kind = self.roll(4) as u32;
            out.extend(non_delimited(tag, kind, self.r as u64));
            self.foreign_written += 1;
        }
        out
    }
}

/// A `map<string, string>` entry: key and value in either order, between unknown
/// fields, sometimes after an earlier value the later one replaces.
fn map_entry(name: &str, value: &str, dice: &mut Dice) -> Vec<u8> {
    let mut e = dice.pad(AT_MAP_ENTRY);
    if dice.roll(4) == 0 {
        e.extend(delimited(VALUE, b"decoy"));
        e.extend(dice.pad(AT_MAP_ENTRY));
    }
    let (k, v) = (
        delimited(KEY, name.as_bytes()),
        delimited(VALUE, value.as_bytes()),
    );
    let (first, second) = if dice.coin() { (k, v) } else { (v, k) };
    e.extend(first);
    e.extend(dice.pad(AT_MAP_ENTRY));
    e.extend(second);
    e.extend(dice.pad(AT_MAP_ENTRY));
    e
}

/// A `HeaderValue`: its three fields, all present (an empty one too), in any order.
fn header_value_wire(hv: &HeaderValue, dice: &mut Dice) -> Vec<u8> {
    let mut fields = vec![
        delimited(KEY, hv.key.as_bytes()),
        delimited(VALUE, hv.value.as_bytes()),
        delimited(RAW_VALUE, &hv.raw_value),
    ];
    let mut e = dice.pad(AT_HEADER);
    while !fields.is_empty() {
        let i = dice.roll(fields.len());
        e.extend(fields.remove(i));
        e.extend(dice.pad(AT_HEADER));
    }
    e
}

/// One random interleaving of `seqs`, each kept in its own order.
fn interleave(mut seqs: Vec<Vec<Vec<u8>>>, dice: &mut Dice) -> Vec<Vec<u8>> {
    seqs.retain(|s| !s.is_empty());
    let mut out = Vec::new();
    while !seqs.is_empty() {
        let i = dice.roll(seqs.len());
        out.push(seqs[i].remove(0));
        if seqs[i].is_empty() {
            seqs.swap_remove(i);
        }
    }
    out
}

/// `req` on the wire as a sender other than prost could put it: `attributes` twice,
/// `request.http` three times over the two, the HttpRequest's fields in any order (only
/// what protobuf gives an order keeps it: repeated elements, and an earlier occurrence of
/// a field before the later one that replaces it), unknown fields between any two.
/// Protobuf merges the occurrences of a message field, so this is `req` again.
fn hand_encoded(req: &CheckRequest, dice: &mut Dice) -> Vec<u8> {
    let attributes = req.attributes.clone().unwrap_or_default();
    let request = attributes.request.clone().unwrap_or_default();
    let http = request.http.clone().unwrap_or_default();

    let mut seqs: Vec<Vec<Vec<u8>>> = Vec::new();
    // The fields keygate does not read, as prost writes them.
    let others = HttpRequest {
        method: String::new(),
        path: String::new(),
        headers: HashMap::new(),
        header_map: None,
        ..http.clone()
    };
    seqs.push(vec![others.encode_to_vec()]);
    for (tag, value) in [(HTTP_METHOD, &http.method), (HTTP_PATH, &http.path)] {
        let mut seq = Vec::new();
        if dice.coin() {
            seq.push(delimited(tag, b"decoy"));
        }
        // Written even when empty after a decoy: an empty field on the wire replaces too.
        if !value.is_empty() || !seq.is_empty() || dice.coin() {
            seq.push(delimited(tag, value.as_bytes()));
        }
        seqs.push(seq);
    }
    for (name, value) in &http.headers {
        let mut seq = Vec::new();
        if dice.roll(4) == 0 {
            // An earlier entry for the name, which the later one replaces.
            seq.push(delimited(HTTP_HEADERS, &map_entry(name, "decoy", dice)));
        }
        seq.push(delimited(HTTP_HEADERS, &map_entry(name, value, dice)));
        seqs.push(seq);
    }
    if let Some(map) = &http.header_map {
        // `header_map` is one message: its occurrences merge, their entries concatenate.
        let mut seq = Vec::new();
        let mut rest = map.headers.as_slice();
        loop {
            let n = if rest.is_empty() {
                0
            } else {
                1 + dice.roll(rest.len())
            };
            let (now, later) = rest.split_at(n);
            let mut m = dice.pad(AT_HEADER_MAP);
            for hv in now {
                m.extend(delimited(MAP_HEADERS, &header_value_wire(hv, dice)));
                m.extend(dice.pad(AT_HEADER_MAP));
            }
            seq.push(delimited(HTTP_HEADER_MAP, &m));
            rest = later;
            if rest.is_empty() {
                break;
            }
        }
        seqs.push(seq);
    }
    let mut parts: Vec<Vec<u8>> = interleave(seqs, dice)
        .into_iter()
        .map(|mut chunk| {
            chunk.extend(dice.pad(AT_HTTP));
            chunk
        })
        .collect();
    parts.insert(0, dice.pad(AT_HTTP));

    // Three occurrences of `http`, cut anywhere between fields (an empty one too).
    let (mut a, mut b) = (dice.roll(parts.len() + 1), dice.roll(parts.len() + 1));
    if a > b {
        std::mem::swap(&mut a, &mut b);
    }
    let http1 = parts[..a].concat();
    let http2 = parts[a..b].concat();
    let http3 = parts[b..].concat();

    let request_others = Request {
        http: None,
        ..request.clone()
    };
    let mut request1 = dice.pad(AT_REQUEST);
    request1.extend(request_others.encode_to_vec());
    request1.extend(delimited(REQUEST_HTTP, &http1));
    request1.extend(dice.pad(AT_REQUEST));
    let mut request2 = delimited(REQUEST_HTTP, &http2);
    request2.extend(dice.pad(AT_REQUEST));
    request2.extend(delimited(REQUEST_HTTP, &http3));

    let attributes_others = AttributeContext {
        source: None,
        request: None,
        ..attributes.clone()
    };
    let source = attributes
        .source
        .as_ref()
        .map(|s| delimited(ATTR_SOURCE, &s.encode_to_vec()))
        .unwrap_or_default();
    let source_first = dice.coin();
    let mut attrs1 = dice.pad(AT_ATTRIBUTES);
    if source_first {
        attrs1.extend(&source);
    }
    attrs1.extend(attributes_others.encode_to_vec());
    attrs1.extend(delimited(ATTR_REQUEST, &request1));
    attrs1.extend(dice.pad(AT_ATTRIBUTES));
    let mut attrs2 = if source_first { Vec::new() } else { source };
    attrs2.extend(dice.pad(AT_ATTRIBUTES));
    attrs2.extend(delimited(ATTR_REQUEST, &request2));

    let mut out = dice.pad(AT_TOP);
    out.extend(delimited(CHECK_ATTRIBUTES, &attrs1));
    out.extend(dice.pad(AT_TOP));
    out.extend(delimited(CHECK_ATTRIBUTES, &attrs2));
    out.extend(dice.pad(AT_TOP));
    out
}

fn http_of(req: &CheckRequest) -> HttpRequest {
    req.attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.clone())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn keygate_reads_split_reordered_and_padded_requests_as_envoy_types_does(
        req in check_request(),
        mut dice in dice(false),
    ) {
        let bytes = hand_encoded(&req, &mut dice);
        let theirs = CheckRequest::decode(bytes.as_slice()).unwrap();
        // The hand encoding is faithful: envoy-types reads the request it was made from.
        prop_assert_eq!(http_of(&theirs), http_of(&req));
        prop_assert_eq!(
            theirs.attributes.as_ref().and_then(|a| a.source.clone()),
            req.attributes.as_ref().and_then(|a| a.source.clone())
        );
        differs(&theirs, &bytes)?;
    }

    /// The documented difference: a field keygate reads, arriving with a wire type not its
    /// own, is skipped as an unknown one would be, where envoy-types refuses the request.
    #[test]
    fn a_read_field_of_another_wire_type_is_skipped_where_envoy_types_refuses(
        req in check_request(),
        mut dice in dice(true),
    ) {
        let bytes = hand_encoded(&req, &mut dice);
        if dice.foreign_written > 0 {
            prop_assert!(CheckRequest::decode(bytes.as_slice()).is_err());
        }
        differs(&req, &bytes)?;
    }
}

// ---------------------------------------------------------------------------------------
// Arbitrary bytes
// ---------------------------------------------------------------------------------------

/// One change to a byte string: overwrite, insert or remove a byte, or cut it short.
fn mutate(bytes: &mut Vec<u8>, (kind, at, byte): (u8, usize, u8)) {
    let at = at % (bytes.len() + 1);
    match kind {
        0 if at < bytes.len() => bytes[at] = byte,
        1 => bytes.insert(at, byte),
        2 if at < bytes.len() => {
            bytes.remove(at);
        }
        3 => bytes.truncate(at),
        _ => {}
    }
}

/// Mostly a byte overwritten, and mostly with ASCII: that keeps strings UTF-8 and lengths
/// whole, so that many changed requests still decode and are compared; the other changes
/// mostly make bytes that are not protobuf, where only "no panic, both refuse" is checked.
fn change() -> impl Strategy<Value = (u8, usize, u8)> {
    (
        prop_oneof![6 => Just(0u8), 1 => Just(1), 1 => Just(2), 1 => Just(3)],
        any::<usize>(),
        prop_oneof![3 => 0u8..0x80, 1 => any::<u8>()],
    )
}

fn near_requests() -> impl Strategy<Value = Vec<u8>> {
    let encoded = prop_oneof![
        check_request().prop_map(|r| r.encode_to_vec()),
        (check_request(), dice(false)).prop_map(|(r, mut d)| hand_encoded(&r, &mut d)),
    ];
    let changes =
        prop_oneof![6 => vec(change(), 1..2), 3 => vec(change(), 2..3), 1 => vec(change(), 3..5)];
    (encoded, changes).prop_map(|(mut bytes, changes)| {
        for change in changes {
            mutate(&mut bytes, change);
        }
        bytes
    })
}

/// Never a panic; wherever envoy-types decodes the bytes, keygate does and reads the same
/// (`envoy_oracle::check_bytes`, which says how the peer is narrowed); so wherever keygate
/// refuses them, envoy-types does too.
#[test]
fn on_any_bytes_keygate_never_panics_and_reads_whatever_envoy_types_decodes() {
    let cases = 1024;
    let mut runner = TestRunner::new(RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let decoded = AtomicUsize::new(0);
    let strategy = prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        6 => near_requests(),
    ];
    runner
        .run(&strategy, |bytes| {
            if CheckRequest::decode(bytes.as_slice()).is_ok() {
                decoded.fetch_add(1, Ordering::Relaxed);
            }
            check_bytes(&bytes).map_err(TestCaseError::fail)
        })
        .unwrap();
    // Not vacuous: a good share of the inputs were requests envoy-types accepts.
    let decoded = decoded.into_inner();
    assert!(
        decoded >= cases as usize / 8,
        "only {decoded} of {cases} inputs decoded"
    );
}

// ---------------------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------------------

/// Strings for answers: empty, short, non-ASCII, and now and then long enough for two-
/// and three-byte lengths.
fn answer_text() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => Just(String::new()),
        8 => ".{0,12}",
        1 => (any::<char>(), 100usize..20_000).prop_map(|(c, n)| c.to_string().repeat(n)),
    ]
}

fn identity() -> impl Strategy<Value = Identity> {
    (
        (
            answer_text(),
            answer_text(),
            prop::option::of(answer_text()),
        ),
        prop::sample::select(&[KeyKind::Tenant, KeyKind::Partner, KeyKind::Runtime][..]),
        prop::sample::select(&[Environment::Live, Environment::Test][..]),
        vec(answer_text(), 0..6),
        (
            prop::option::of(answer_text()),
            answer_text(),
            any::<bool>(),
        ),
        (
            prop::option::of(answer_text()),
            prop::option::of(answer_text()),
            prop::option::of(answer_text()),
            prop::option::of((answer_text(), answer_text()).prop_map(|(t, e)| (Secret::new(t), e))),
        ),
    )
        .prop_map(
            |(
                (tenant_id, subject, key_id),
                kind,
                environment,
                scopes,
                (tenant, header, metadata),
                (partner_id, service, lease_id, session),
            )| {
                let mut principal = Principal::new(tenant_id, subject, kind, environment, scopes);
                principal.key_id = key_id.map(Into::into);
                principal.partner_id = partner_id.map(Into::into);
                principal.service = service.map(Into::into);
                Identity {
                    principal: Arc::new(principal),
                    tenant,
                    tenant_header: header.into(),
                    metadata,
                    lease_id,
                    session,
                    // What the module learns: one more metadata string, covered by the
                    // unit tests of envoy_answer.
                    learn: None,
                }
            },
        )
}

fn allow_answer() -> impl Strategy<Value = AllowAnswer> {
    (
        prop::option::weighted(0.8, identity()),
        vec(answer_text(), 0..5),
        prop::option::of((any::<u32>(), any::<u32>(), any::<u64>())),
    )
        .prop_map(|(identity, remove, rate)| AllowAnswer {
            identity,
            remove,
            response_headers: rate
                .map(|(limit, remaining, reset)| {
                    keygate::decision::RateInfo {
                        limit,
                        remaining,
                        reset,
                        retry_after: None,
                    }
                    .headers()
                    .to_vec()
                })
                .unwrap_or_default(),
        })
}

/// The CheckResponse an allow stands for, from envoy-types' messages (as keygate built
/// it before it wrote answers itself): status OK; an ok_response that overwrites the
/// tenant (if any), subject, key id (if any), kind, environment, partner (if any) and
/// scopes headers and removes `remove`; and, if asked for,
/// the principal as dynamic metadata.
fn intended(a: &AllowAnswer) -> CheckResponse {
    let overwrite = |key: &str, value: &str| HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    };
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let headers = a
        .identity
        .iter()
        .flat_map(|i| {
            let p = &i.principal;
            [
                i.tenant.as_deref().map(|t| overwrite(&i.tenant_header, t)),
                Some(overwrite("x-keygate-subject", &p.subject)),
                p.key_id
                    .as_deref()
                    .map(|k| overwrite("x-keygate-key-id", k)),
                Some(overwrite("x-keygate-kind", p.kind.as_str())),
                Some(overwrite("x-keygate-environment", p.environment.as_str())),
                p.partner_id
                    .as_deref()
                    .map(|k| overwrite("x-keygate-partner", k)),
                Some(overwrite("x-keygate-scopes", &p.scopes.join(","))),
                i.lease_id
                    .as_deref()
                    .map(|l| overwrite("x-keygate-lease-id", l)),
                i.session
                    .as_ref()
                    .map(|(t, _)| overwrite("x-keygate-session-token", t.expose())),
                i.session
                    .as_ref()
                    .map(|(_, e)| overwrite("x-keygate-session-expires-at", e)),
            ]
            .into_iter()
            .flatten()
        })
        .collect();
    let dynamic_metadata = a.identity.as_ref().filter(|i| i.metadata).map(|i| {
        let p = &i.principal;
        let mut fields: HashMap<String, Value> = [
            ("subject", string(&p.subject)),
            ("kind", string(p.kind.as_str())),
            ("environment", string(p.environment.as_str())),
            (
                "scopes",
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: p.scopes.iter().map(|s| string(s)).collect(),
                    })),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (name, value) in [
            ("tenant_id", i.tenant.as_deref()),
            ("key_id", p.key_id.as_deref()),
            ("partner_id", p.partner_id.as_deref()),
            ("service", p.service.as_deref()),
        ] {
            if let Some(v) = value {
                fields.insert(name.into(), string(v));
            }
        }
        Struct { fields }
    });
    CheckResponse {
        status: Some(rpc::Status::default()),
        dynamic_metadata,
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: a.remove.clone(),
            response_headers_to_add: a
                .response_headers
                .iter()
                .map(|(k, v)| overwrite(k, v))
                .chain(a.identity.iter().flat_map(|i| {
                    i.session.iter().flat_map(|(t, e)| {
                        [
                            overwrite("x-keygate-session-token", t.expose()),
                            overwrite("x-keygate-session-expires-at", e),
                        ]
                    })
                }))
                .collect(),
            ..Default::default()
        })),
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn every_allow_keygate_writes_decodes_to_the_response_it_stands_for(a in allow_answer()) {
        let want = intended(&a);
        let answer = CheckAnswer::Allow(a);
        let bytes = answer.encode_to_vec();
        prop_assert_eq!(bytes.len(), answer.encoded_len());
        prop_assert_eq!(&CheckResponse::decode(bytes.as_slice()).unwrap(), &want);
        prop_assert_eq!(&answer.to_response().unwrap(), &want);
    }
}
