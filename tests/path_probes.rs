//! The path probe list (`tests/fixtures/path_probes.json`) over Envoy's gRPC `Check`,
//! with the dev policy as shipped (`config/dev.yaml`): each target two servers could read
//! differently gets the documented answer, and where keygate allows, it allows on the
//! route every reading of the target falls on. The same list runs through a real Envoy in
//! `tests/e2e/test_paths.py`.

use keygate::config::Config;
use keygate::decision::Decision;
use keygate::request::AuthRequest;
use keygate::server::App;
use keygate_test_support as support;
use keygate_test_support::{bearer, check_request, raw_check_request, Outcome};
use serde_json::Value;

struct Probe {
    path: String,
    reader: bool,
    expect: String,
    what: String,
}

fn probes() -> Vec<Probe> {
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/path_probes.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    doc["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .map(|p| Probe {
            path: match &p["path"] {
                Value::String(s) => s.clone(),
                Value::Array(pieces) => pieces
                    .iter()
                    .map(|pc| {
                        pc[0]
                            .as_str()
                            .unwrap()
                            .repeat(pc[1].as_u64().unwrap() as usize)
                    })
                    .collect(),
                other => panic!("a probe's path: {other}"),
            },
            reader: p["key"] == "reader",
            expect: p["expect"].as_str().unwrap().to_owned(),
            what: p["what"].as_str().unwrap().to_owned(),
        })
        .collect()
}

/// The dev policy as shipped, on listeners it never binds here.
fn dev_app() -> App {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev.yaml");
    let yaml = std::fs::read_to_string(file).unwrap();
    let config = Config::load(Some(&yaml), Vec::new()).expect("config/dev.yaml loads");
    App::build(config, support::secrets()).expect("the dev app builds")
}

/// The route family a route of the dev policy belongs to.
fn family(route: &str) -> &str {
    match route {
        "contacts-read" | "contacts-write" => "contacts",
        other => other,
    }
}

#[tokio::test]
async fn every_probe_gets_its_documented_answer_over_the_grpc_check() {
    let app = dev_app();
    let envoy = app.envoy_service();
    let key = app.admin.create(support::reader_key()).await.unwrap();
    let token = bearer(&key.token);
    let list = probes();
    assert!(list.len() >= 80, "the probe list has {} rows", list.len());
    let mut wrong = Vec::new();
    for p in &list {
        let headers: Vec<(&str, &str)> = if p.reader {
            vec![("authorization", token.as_str())]
        } else {
            vec![]
        };
        let outcome = support::outcome_of(&envoy, check_request("GET", &p.path, &headers)).await;
        // The route of an allow, from the same core the adapter asked.
        let req = AuthRequest {
            method: "GET".into(),
            path: p.path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let got = match (&outcome, app.authorizer.check(&req).await) {
            (Outcome::Allowed, Decision::Allow(a)) => format!("allow {}", family(&a.route)),
            (Outcome::Denied { code, http }, Decision::Deny(_)) => format!("deny {http} {code}"),
            (o, d) => format!("the adapter said {o:?}, the core {d:?}"),
        };
        if got != p.expect {
            let shown: String = p.path.chars().take(80).collect();
            wrong.push(format!(
                "{} ({shown:?}): expected {}, got {got}",
                p.what, p.expect
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} probes answered otherwise:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Bytes that are not UTF-8 reach keygate only through `encode_raw_headers` (`:path` as
/// bytes); read leniently (U+FFFD), they are still refused, never decoded to `.` or `/`.
#[tokio::test]
async fn a_path_of_bytes_that_are_not_utf8_is_refused() {
    let app = dev_app();
    let envoy = app.envoy_service();
    for raw in [
        b"/public/\xc0\xae\xc0\xae/v1/contacts/42".as_slice(),
        b"/public/\xc0\xaf..\xc0\xafv1/contacts/42",
        b"/public/\xe9",
        b"/public/\xef\xbc\x8e\xef\xbc\x8e/v1/contacts/42",
    ] {
        let req = raw_check_request("GET", "", &[(":path", raw)]);
        assert_eq!(
            support::outcome_of(&envoy, req).await,
            Outcome::denied("invalid_path", 400),
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}
