use super::*;
use envoy_types::pb::envoy::config::core::v3::{
    address, Address, HeaderMap, HeaderValue, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::{attribute_context, AttributeContext};

fn filter() -> HeaderFilter {
    HeaderFilter::new(["authorization", "x-api-key", "x-tenant-id"], "x-keygate-")
}

/// A request as Envoy fills it: everything set, most of it of no interest to keygate.
/// The request's HTTP attributes, to change.
fn http_of(
    req: &mut CheckRequest,
) -> &mut envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
    req.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("a full request has HTTP attributes")
}

fn full_request(headers: &[(&str, &str)]) -> CheckRequest {
    let peer = |ip: &str| {
        attribute_context::Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(443),
                    ),
                    ..Default::default()
                })),
            }),
            principal: "spiffe://cluster.local/ns/a/sa/b".into(),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ..Default::default()
        }
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3")),
            destination: Some(peer("10.9.9.9")),
            request: Some(attribute_context::Request {
                time: Some(Default::default()),
                http: Some(attribute_context::HttpRequest {
                    id: "1234".into(),
                    method: "POST".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    path: "/v1/contacts/42?x=1".into(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/2".into(),
                    body: "ignored".into(),
                    size: 7,
                    ..Default::default()
                }),
            }),
            context_extensions: [("k".to_owned(), "v".to_owned())].into(),
            tls_session: Some(attribute_context::TlsSession {
                sni: "api.example.com".into(),
            }),
            ..Default::default()
        }),
    }
}

/// Headers as Envoy sends them: pseudo-headers, consulted ones and others.
const HEADERS: &[(&str, &str)] = &[
    (":method", "POST"),
    (":path", "/v1/contacts/42?x=1"),
    ("authorization", "Bearer sk_live_abc"),
    ("x-tenant-id", "t-1"),
    ("x-keygate-subject", "smuggled"),
    ("user-agent", "curl/8"),
    ("accept", "*/*"),
    ("cookie", "session=secret"),
];

#[test]
fn reads_what_keygate_uses_and_only_the_consulted_headers() {
    let req = full_request(HEADERS);
    let r = auth_request((&req).into(), &filter()).unwrap();
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/contacts/42?x=1");
    assert_eq!(r.peer.as_deref(), Some("10.1.2.3"));
    assert_eq!(r.header("authorization"), Some("Bearer sk_live_abc"));
    assert_eq!(r.header("x-tenant-id"), Some("t-1"));
    assert_eq!(r.header("x-keygate-subject"), Some("smuggled"));
    let mut names: Vec<_> = r.headers.keys().map(String::as_str).collect();
    names.sort();
    // No pseudo-header: the request's own method and path are set.
    assert_eq!(names, ["authorization", "x-keygate-subject", "x-tenant-id"]);
}

#[test]
fn an_empty_method_or_path_falls_back_to_the_pseudo_headers() {
    let mut req = full_request(&[(":method", "DELETE"), (":path", "/v1/x")]);
    let http = http_of(&mut req);
    http.method.clear();
    http.path.clear();
    let r = auth_request((&req).into(), &filter()).unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("DELETE", "/v1/x"));
}

#[test]
fn header_map_entries_are_lower_cased_joined_and_raw_values_read_lossily() {
    let mut req = full_request(&[]);
    let http = http_of(&mut req);
    let hv = |k: &str, v: &str, raw: &[u8]| HeaderValue {
        key: k.into(),
        value: v.into(),
        raw_value: raw.to_vec(),
    };
    http.header_map = Some(HeaderMap {
        headers: vec![
            hv("Authorization", "", b"Bearer sk_live_\xff"),
            hv("X-Keygate-Scopes", "a", b""),
            hv("x-keygate-scopes", "", b"b"),
            hv("User-Agent", "", b"curl"),
        ],
    });
    let r = auth_request((&req).into(), &filter()).unwrap();
    assert_eq!(r.header("authorization"), Some("Bearer sk_live_\u{fffd}"));
    assert_eq!(r.header("x-keygate-scopes"), Some("a,b"));
    assert_eq!(r.header("user-agent"), None);
}

#[test]
fn twins_of_consulted_headers_are_kept_in_headers_and_header_map() {
    let mut req = full_request(&[
        ("x_tenant_id", "t-2"),
        ("x.keygate.subject", "smuggled"),
        ("x_custom", "kept upstream, not read"),
        ("x_tenant", "not a twin"),
    ]);
    let http = http_of(&mut req);
    http.header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "X_Keygate_Scopes".into(),
            raw_value: b"*".to_vec(),
            ..Default::default()
        }],
    });
    let r = auth_request((&req).into(), &filter()).unwrap();
    let mut names: Vec<_> = r.headers.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        ["x.keygate.subject", "x_keygate_scopes", "x_tenant_id"]
    );

    // A consulted name with `_`: its dashed spelling is a twin too.
    let underscored = HeaderFilter::new(["x_org_id"], "x-keygate-");
    let req = full_request(&[("x-org-id", "o"), ("x_org_id", "p"), ("x-org", "q")]);
    let r = auth_request((&req).into(), &underscored).unwrap();
    let mut names: Vec<_> = r.headers.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["x-org-id", "x_org_id"]);
}

/// Test-only messages, to put on the wire what envoy-types would refuse to encode.
#[derive(Clone, PartialEq, Message)]
struct WireCheck {
    #[prost(message, optional, tag = "1")]
    attributes: Option<WireAttributes>,
}
#[derive(Clone, PartialEq, Message)]
struct WireAttributes {
    #[prost(message, optional, tag = "4")]
    request: Option<WireRequest>,
}
#[derive(Clone, PartialEq, Message)]
struct WireRequest {
    #[prost(message, optional, tag = "2")]
    http: Option<WireHttp>,
}
#[derive(Clone, PartialEq, Message)]
struct WireHttp {
    #[prost(bytes = "vec", tag = "2")]
    method: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    headers: Vec<WireEntry>,
    #[prost(bytes = "vec", tag = "4")]
    path: Vec<u8>,
}
#[derive(Clone, PartialEq, Message)]
struct WireEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

fn wire(http: WireHttp) -> Vec<u8> {
    WireCheck {
        attributes: Some(WireAttributes {
            request: Some(WireRequest { http: Some(http) }),
        }),
    }
    .encode_to_vec()
}

fn read(wire: &[u8]) -> Result<AuthRequest, WireError> {
    auth_request(CheckRequestView::decode(wire)?, &filter())
}

fn entry(k: &str, v: &[u8]) -> WireEntry {
    WireEntry {
        key: k.into(),
        value: v.to_vec(),
    }
}

#[test]
fn a_later_map_entry_replaces_an_earlier_one_as_in_a_protobuf_map() {
    // Two entries for one key, concatenated on the wire as a sender may emit them.
    let wire = wire(WireHttp {
        headers: vec![
            entry("authorization", b"Bearer first"),
            entry("authorization", b"Bearer second"),
        ],
        ..Default::default()
    });
    let full = CheckRequest::decode(wire.as_slice()).unwrap();
    let headers = &full
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap()
        .headers;
    assert_eq!(
        headers["authorization"], "Bearer second",
        "envoy-types agrees"
    );
    let r = read(&wire).unwrap();
    assert_eq!(r.header("authorization"), Some("Bearer second"));
}

#[test]
fn a_non_utf8_string_field_is_read_not_refused() {
    // `headers` values are protobuf strings; envoy-types refuses the whole message.
    let wire = wire(WireHttp {
        method: b"GET".to_vec(),
        path: b"/v1/\xc3".to_vec(),
        headers: vec![entry("x-api-key", b"\x80")],
    });
    assert!(CheckRequest::decode(wire.as_slice()).is_err());
    let r = read(&wire).unwrap();
    assert_eq!(r.path, "/v1/\u{fffd}");
    assert_eq!(r.header("x-api-key"), Some("\u{fffd}"));
}

#[test]
fn bytes_that_are_not_protobuf_are_an_error() {
    let good = wire(WireHttp {
        method: b"GET".to_vec(),
        headers: vec![entry("authorization", b"Bearer sk_live_abc")],
        path: b"/v1/x".to_vec(),
    });
    assert!(read(&good).is_ok());
    // Every strict prefix cuts a length-delimited field short somewhere.
    for cut in 1..good.len() {
        assert!(
            read(&good[..cut]).is_err(),
            "cut at {cut} of {}",
            good.len()
        );
    }
    // A length running past the end of the header entry.
    let mut bad = good.clone();
    let at = bad.iter().position(|&b| b == b'a').unwrap() - 1;
    bad[at] = 0x7f;
    assert!(read(&bad).is_err());
}

/// The bytes of a CheckRequest whose `attributes.request.http` is `http`, which may be
/// the concatenation of several encodings (protobuf merges them).
fn with_http(http: Vec<u8>) -> Vec<u8> {
    let nest = |tag: u32, inner: Vec<u8>| {
        let mut out = Vec::new();
        prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(inner.len() as u64, &mut out);
        out.extend(inner);
        out
    };
    nest(1, nest(field::REQUEST, nest(field::HTTP, http)))
}

#[test]
fn a_request_reads_the_same_whatever_the_order_of_its_fields() {
    let headers = attribute_context::HttpRequest {
        headers: [("authorization", "Bearer a"), (":method", "GET")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into(),
        ..Default::default()
    }
    .encode_to_vec();
    let hv = |k: &str, raw: &[u8]| HeaderValue {
        key: k.into(),
        raw_value: raw.to_vec(),
        ..Default::default()
    };
    let header_map = attribute_context::HttpRequest {
        header_map: Some(HeaderMap {
            headers: vec![hv("Authorization", b"Bearer b"), hv(":METHOD", b"POST")],
        }),
        ..Default::default()
    }
    .encode_to_vec();
    // prost writes `headers` (3) before `header_map` (13); another sender may not.
    for http in [
        [&headers[..], &header_map].concat(),
        [&header_map[..], &headers].concat(),
    ] {
        let wire = with_http(http);
        let full = CheckRequest::decode(wire.as_slice()).unwrap();
        assert_eq!(
            full,
            CheckRequest::decode(with_http([&headers[..], &header_map].concat()).as_slice())
                .unwrap()
        );
        let r = read(&wire).unwrap();
        assert_eq!(r.header("authorization"), Some("Bearer a,Bearer b"));
        assert_eq!(r.method, "POST", "header_map's :method wins");
    }
}

#[test]
fn in_headers_only_the_lower_case_pseudo_header_names_stand_in() {
    // Two map keys for envoy-types; which one came last would be the order the
    // sender's map iterated in.
    for entries in [
        vec![entry(":METHOD", b"PUT"), entry(":method", b"GET")],
        vec![entry(":method", b"GET"), entry(":METHOD", b"PUT")],
    ] {
        let r = read(&wire(WireHttp {
            headers: entries,
            path: b"/v1/x".to_vec(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(r.method, "GET");
    }
    let r = read(&wire(WireHttp {
        headers: vec![entry(":Method", b"PUT"), entry(":PATH", b"/v1/x")],
        ..Default::default()
    }))
    .unwrap();
    assert_eq!((r.method.as_str(), r.path.as_str()), ("", ""));
}

/// Every one-byte change of a request Envoy could send: keygate's reading either fails
/// or agrees with envoy-types' on every field it uses, and never panics.
#[test]
fn reads_what_envoy_types_reads_under_every_one_byte_change() {
    let original = full_request(HEADERS).encode_to_vec();
    let (mut agreed, mut refused) = (0, 0);
    for at in 0..original.len() {
        for byte in [
            0x00,
            0x01,
            0x0a,
            0x12,
            0x7f,
            0x80,
            0xff,
            original[at] ^ 0x20,
        ] {
            let mut wire = original.clone();
            wire[at] = byte;
            let ours = read(&wire);
            let Ok(theirs) = CheckRequest::decode(wire.as_slice()) else {
                continue;
            };
            let http = theirs
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.clone())
                .unwrap_or_default();
            let Ok(ours) = ours else {
                refused += 1;
                continue;
            };
            let or_pseudo = |own: &str, name: &str| {
                if own.is_empty() {
                    http.headers.get(name).cloned().unwrap_or_default()
                } else {
                    own.to_owned()
                }
            };
            assert_eq!(ours.method, or_pseudo(&http.method, ":method"), "byte {at}");
            assert_eq!(ours.path, or_pseudo(&http.path, ":path"), "byte {at}");
            for name in ["authorization", "x-tenant-id", "x-keygate-subject"] {
                assert_eq!(
                    ours.header(name),
                    http.headers.get(name).map(String::as_str),
                    "{name}, byte {at}"
                );
            }
            let peer = theirs
                .attributes
                .as_ref()
                .and_then(|a| a.source.as_ref())
                .and_then(|s| s.address.as_ref())
                .and_then(|a| a.address.as_ref());
            if let Some(address::Address::SocketAddress(sa)) = peer {
                assert_eq!(ours.peer.as_deref(), Some(sa.address.as_str()), "byte {at}");
            }
            agreed += 1;
        }
    }
    // envoy-types refuses a wire type it does not expect for a field; keygate reads
    // past it. Nothing else may differ, and most changes must have been compared.
    assert!(
        agreed > original.len(),
        "{agreed} compared, {refused} refused"
    );
    assert_eq!(refused, 0, "keygate refused what envoy-types read");
}
