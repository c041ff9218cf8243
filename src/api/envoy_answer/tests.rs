use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::{check_response::HttpResponse, OkHttpResponse};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use envoy_types::pb::google::rpc;

use super::*;
use crate::principal::{Environment, KeyKind};

/// The same allow, built from envoy-types' messages: what keygate sent before it
/// wrote its answers itself.
fn reference(a: &AllowAnswer) -> CheckResponse {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    let headers = a
        .identity
        .iter()
        .flat_map(Identity::headers)
        .map(|(key, value)| overwrite(key, value))
        .collect();
    let dynamic_metadata = a.identity.as_ref().filter(|i| i.metadata).map(|i| {
        let mut fields: HashMap<String, Value> = i
            .metadata()
            .map(|(k, v)| (k.to_owned(), string(v)))
            .collect();
        let values = i.scopes().iter().map(|s| string(s)).collect();
        fields.insert(
            "scopes".into(),
            Value {
                kind: Some(Kind::ListValue(ListValue { values })),
            },
        );
        Struct { fields }
    });
    CheckResponse {
        status: Some(rpc::Status::default()),
        dynamic_metadata,
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: a.remove.clone(),
            response_headers_to_add: a.client_headers().map(|(k, v)| overwrite(k, v)).collect(),
            ..Default::default()
        })),
    }
}

fn principal(key_id: Option<&str>, scopes: &[&str]) -> Arc<Principal> {
    let mut p = Principal::new(
        "5a0c6f0e-8c1b-4f6e-9a57-3d2b1c0e9f11".into(),
        format!("key:{}", key_id.unwrap_or("none")),
        KeyKind::Partner,
        Environment::Test,
        scopes.iter().map(|s| s.to_string()).collect(),
    );
    p.key_id = key_id.map(Into::into);
    Arc::new(p)
}

fn identity(p: Arc<Principal>, tenant: &str) -> Option<Identity> {
    Some(Identity {
        tenant: Some(tenant.to_owned()),
        principal: p,
        tenant_header: "x-tenant-id".into(),
        metadata: true,
        lease_id: Some(format!("k.lease-{tenant}")),
        session: Some((
            Secret::new("eyJ.session.token"),
            "2026-12-01T15:00:00Z".into(),
        )),
        learn: None,
    })
}

#[test]
fn every_allow_reads_as_the_envoy_types_message_it_replaces() {
    let remove = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let long = "s".repeat(300);
    let cases = [
        // A key, its own tenant, the credential stripped.
        AllowAnswer {
            identity: identity(principal(Some("k1"), &["contacts:read"]), "t1"),
            remove: remove(&["authorization"]),
            response_headers: vec![],
        },
        // No key id (the header is sent empty), no scopes, nothing to remove.
        AllowAnswer {
            identity: identity(principal(None, &[]), ""),
            remove: vec![],
            response_headers: vec![],
        },
        // Values past 127 and 16,383 bytes: two- and three-byte lengths.
        AllowAnswer {
            identity: identity(
                principal(Some("k2"), &["a:b", "", &long, "é"]),
                &"t".repeat(20_000),
            ),
            remove: remove(&["x-keygate-plan", "authorization", "x-api-key"]),
            response_headers: vec![],
        },
        // Without the dynamic metadata.
        AllowAnswer {
            identity: identity(principal(Some("k3"), &["contacts:read"]), "t3").map(|i| Identity {
                metadata: false,
                ..i
            }),
            remove: remove(&["authorization"]),
            response_headers: vec![],
        },
        // With a rate limit: the x-ratelimit-* go to the client.
        AllowAnswer {
            identity: identity(principal(Some("k4"), &["contacts:read"]), "t4"),
            remove: vec![],
            response_headers: crate::decision::RateInfo {
                limit: 120,
                remaining: 7,
                reset: 30,
                retry_after: None,
            }
            .headers()
            .to_vec(),
        },
        // Asked by the module inside Envoy: what it learns, as one more field.
        AllowAnswer {
            identity: identity(principal(Some("k5"), &["contacts:read"]), "t5").map(|i| Identity {
                learn: Some("{\"after\":\"0-0\"}".into()),
                ..i
            }),
            remove: vec![],
            response_headers: vec![],
        },
        // A public route: no identity, only removals.
        AllowAnswer {
            identity: None,
            remove: remove(&["x-keygate-subject", "x-tenant-id"]),
            response_headers: vec![],
        },
        AllowAnswer {
            identity: None,
            remove: vec![],
            response_headers: vec![],
        },
    ];
    for case in cases {
        let answer = CheckAnswer::Allow(case.clone());
        let bytes = answer.encode_to_vec();
        assert_eq!(bytes.len(), answer.encoded_len(), "{case:?}");
        let read = CheckResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(read, reference(&case), "{case:?}");
        assert_eq!(read.encoded_len(), bytes.len(), "{case:?}");
    }
}

#[test]
fn other_answers_are_envoy_types_messages() {
    let deny = CheckResponse {
        status: Some(rpc::Status {
            code: 16,
            message: "invalid_api_key".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = CheckAnswer::from(deny.clone());
    assert_eq!(answer.encode_to_vec(), deny.encode_to_vec());
    assert_eq!(answer.to_response().unwrap(), deny);
}
