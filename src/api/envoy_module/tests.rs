//! The module against the service: two `App`s on one configuration, the service a replica
//! following its own store's stream and answering as its gRPC listener does, the module
//! following the same stream (as it follows the service's `Watch` inside Envoy) with a
//! store of its own that nothing reads. The module learns only through the service's
//! answers, the way the filter does (`Local::Defer`, `x-keygate-learn`, the `learn`
//! metadata field), and its answers are read against what Envoy reads off the wire.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::Struct;
use proptest::prelude::*;
use tokio::sync::{broadcast, watch};

use super::*;
use crate::config::{Config, Secrets};
use crate::keys::NewKey;
use crate::revocation::{EventFeed, FeedEntry, FeedItem, StoreFeed};
use crate::secret::Secret;
use crate::server::{App, Reloaded};
use crate::store::memory::MemoryStore;
use crate::store::{EventKind, StoreError, TokenRevocation};

const TENANT: &str = "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11";
const OTHER_TENANT: &str = "0b3f6a2e-8c11-4c1e-9d55-9f1c7d4e2b7a";
/// A tenant delegated to `PARTNER`.
const DELEGATED: &str = "5a0c6f0e-8c1b-4f6e-9a57-3d2b1c0e9f11";
const PARTNER: &str = "acme-partners";
/// How long anything a test waits for may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);
/// One blocking read of the stream (the memory store answers an append at once).
const BLOCK: Duration = Duration::from_millis(200);

/// Credentials in `authorization` (Bearer) or `x-api-key`, stripped upstream; a request
/// no route matches is denied; a write family that requires the tenant; a partner-level
/// family; a plan that rate-limits; a route that takes a lease and one that mints a
/// session token.
const CONFIG: &str = r#"
api_keys: { prefix: sk, argon2: { memory_kib: 64, iterations: 1, parallelism: 1 } }
policy:
  credential_headers:
    - { header: authorization, scheme: Bearer }
    - { header: x-api-key }
  strip_credential_headers: true
  unmatched: deny
  partner_scopes: ["billing:partner:*"]
  plans:
    metered: { requests_per_minute: 1000 }
  routes:
    - { name: public, methods: [GET], path: "/public/**", public: true }
    - { name: contacts-read, methods: [GET, HEAD], path: "/v1/contacts/**", scope: "contacts:read" }
    - { name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }
    - { name: partner-billing, methods: [GET], path: "/v1/billing/partner/**", scope: "billing:partner:read" }
    - { name: calls-open, methods: [POST], path: /v1/calls, scope: "contacts:read", lease_ttl: 1h }
    - { name: sessions-create, methods: [POST], path: /v1/sessions, scope: "contacts:read", credentials: [api_key], mint_session: true }
sessions: { ephemeral_key: true }
"#;

fn secrets() -> Secrets {
    Secrets {
        pepper: Secret::random(43),
        admin_token: Secret::random(32),
        redis_password: None,
        watch_token: None,
        named: Default::default(),
    }
}

/// An `App` on `CONFIG` with a memory store of its own (and secrets of its own: the
/// module's pepper is never the service's).
fn app() -> App {
    let config = Config::load(Some(CONFIG), Vec::new()).expect("the test configuration is valid");
    App::with_store(config, secrets(), Arc::new(MemoryStore::new())).expect("the app builds")
}

/// A bus's follower, running until it is stopped (or the test ends).
struct Follower {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts `bus` following `feed`.
fn follow(bus: &Arc<RevocationBus>, feed: Arc<dyn EventFeed>) -> Follower {
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(Arc::clone(bus).follow(feed, stopped));
    Follower { stop, task }
}

impl Follower {
    /// Stops following, and returns once nothing more is applied.
    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.expect("the follower ends");
    }
}

/// Waits until `bus` is (`true`) or is not following its feed.
async fn until_following(bus: &RevocationBus, wanted: bool) {
    let waited = tokio::time::timeout(PATIENCE, async {
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = bus.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if (bus.has_position() && bus.is_connected()) == wanted {
                return;
            }
            changed.await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the follower never got to following: {wanted}"
    );
}

/// Delegates `tenant` to `PARTNER` on the service, and waits until the module (whose
/// bus `events` subscribes to) has applied the change.
async fn delegate(service: &Service, events: &mut broadcast::Receiver<FeedEntry>, tenant: &str) {
    service
        .app
        .partners
        .set(PARTNER, tenant, true)
        .await
        .expect("delegated");
    applied(
        events,
        "the delegation",
        |item| matches!(item, FeedItem::Delegation(d) if d.partner_id == PARTNER && d.tenant_id == tenant),
    )
    .await;
}

/// Waits until `events` (a bus's subscription) carries an item `wanted` takes.
async fn applied(
    events: &mut broadcast::Receiver<FeedEntry>,
    what: &str,
    wanted: impl Fn(&FeedItem) -> bool,
) {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(entry) if wanted(&entry.item) => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the bus went away"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "never applied: {what}");
}

fn revoked(key_id: &str) -> impl Fn(&FeedItem) -> bool + '_ {
    move |item| matches!(item, FeedItem::Event(e) if e.key_id == key_id && e.kind == EventKind::Revoked)
}

/// The service: a replica following its own store's stream, answering as its gRPC
/// listener does (by its current rules, gated on that follower, so its allows carry
/// what the module learns).
struct Service {
    app: App,
    follower: Option<Follower>,
}

impl Service {
    async fn start() -> Service {
        let app = app();
        let follower = follow(&app.bus, Arc::new(StoreFeed::new(app.store.clone(), BLOCK)));
        until_following(&app.bus, true).await;
        Service {
            app,
            follower: Some(follower),
        }
    }

    /// The answer Envoy gets from ext_authz for `r`.
    async fn answer(&self, r: &Req) -> CheckResponse {
        self.app
            .live
            .envoy()
            .decide(r.check_request())
            .await
            .expect("the service decides")
    }

    async fn key(&self, new: NewKey) -> (String, String) {
        let created = self
            .app
            .admin
            .create(new)
            .await
            .expect("the key is created");
        (created.token, created.record.key_id)
    }

    /// The stream's events are applied here no more (it still answers, from where it
    /// stopped).
    async fn fall_behind(&mut self) {
        if let Some(follower) = self.follower.take() {
            follower.stop().await;
        }
    }
}

fn tenant_key(scopes: &[&str], plan: &str) -> NewKey {
    NewKey {
        tenant_id: TENANT.into(),
        name: "module test".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        plan: plan.into(),
        ..NewKey::default()
    }
}

fn partner_key() -> NewKey {
    NewKey {
        kind: "partner".into(),
        partner_id: PARTNER.into(),
        name: "module test partner".into(),
        scopes: vec!["contacts:read".into(), "billing:partner:read".into()],
        ..NewKey::default()
    }
}

/// The module's side: its `App` (whose bus, cache and delegations the decider holds).
struct Module {
    app: App,
    decider: ModuleDecider,
}

impl Module {
    /// A module that follows nothing yet.
    fn new() -> Module {
        Module::of(app())
    }

    /// A module following the service's stream, whose usage is written to the service's
    /// store (as the service writes what the module reports to it).
    async fn counting_for(service: &Service) -> (Module, Follower) {
        let config =
            Config::load(Some(CONFIG), Vec::new()).expect("the test configuration is valid");
        let app = App::with_usage_sink(
            config,
            secrets(),
            Arc::new(MemoryStore::new()),
            service.app.store.clone(),
        )
        .expect("the app builds");
        Module::of(app).follow(service).await
    }

    fn of(app: App) -> Module {
        let decider = ModuleDecider::new(
            app.live.clone(),
            Arc::clone(&app.bus),
            Arc::clone(&app.cache),
            Arc::clone(&app.delegations),
        );
        Module { app, decider }
    }

    /// A module following the service's stream.
    async fn following(service: &Service) -> (Module, Follower) {
        Module::new().follow(service).await
    }

    async fn follow(self, service: &Service) -> (Module, Follower) {
        let module = self;
        let feed = Arc::new(StoreFeed::new(service.app.store.clone(), BLOCK));
        let follower = follow(&module.app.bus, feed);
        until_following(&module.app.bus, true).await;
        (module, follower)
    }

    /// What the module does with `r`, read from Envoy's headers.
    fn decide(&self, r: &Req) -> Local {
        let pairs = r.pairs();
        let headers: Vec<Header<'_>> = pairs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        self.decider
            .answer(&headers)
            .expect("the request's headers are UTF-8")
    }

    /// The ticket the module hands `r` over with; fails the test if it answers `r`.
    fn hand_over(&self, r: &Req) -> Ticket {
        match self.decide(r) {
            Local::Defer(ticket) => ticket,
            other => panic!("{r:?}: answered by the module, not handed over: {other:?}"),
        }
    }

    /// As the filter does: hands `r` over with `x-keygate-learn`, and learns from the
    /// service's allow.
    async fn learn_from(&self, service: &Service, r: &Req) -> Result<(), NotLearned> {
        let ticket = self.hand_over(r);
        let text = learnable(&service.answer(&r.asking_to_learn()).await);
        self.decider.learn(&ticket, &text)
    }
}

/// The `learn` field of an allow's dynamic metadata; fails the test without one.
fn learnable(answer: &CheckResponse) -> String {
    learn_field(answer)
        .unwrap_or_else(|| panic!("the service's answer has nothing to learn: {answer:?}"))
}

/// The `learn` field of an allow's dynamic metadata, if it has one.
fn learn_field(answer: &CheckResponse) -> Option<String> {
    let field = answer
        .dynamic_metadata
        .as_ref()
        .and_then(|m| m.fields.get("learn"))
        .and_then(|v| v.kind.as_ref());
    match field {
        Some(Kind::StringValue(text)) => Some(text.clone()),
        _ => None,
    }
}

/// A request as Envoy holds it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(&'static str, String)>,
}

fn req(method: &str, path: &str, headers: &[(&'static str, &str)]) -> Req {
    Req {
        method: method.to_owned(),
        path: path.to_owned(),
        headers: headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    }
}

fn get(path: &str, headers: &[(&'static str, &str)]) -> Req {
    req("GET", path, headers)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

impl Req {
    /// Every header Envoy holds: the pseudo-headers, a few a client always sends, and
    /// the test's.
    fn pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = [
            (":authority", "api.example.com"),
            (":method", self.method.as_str()),
            (":path", self.path.as_str()),
            (":scheme", "https"),
            ("user-agent", "keygate-tests/1.0"),
            ("x-request-id", "6f1c2a9e-1d2b-4c3d-8e4f-5a6b7c8d9e0f"),
        ]
        .into_iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        for (k, v) in &self.headers {
            pairs.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        pairs
    }

    /// The same request as Envoy's ext_authz sends it to the service: a repeated
    /// header's values joined, in order, with a comma.
    fn check_request(&self) -> CheckRequest {
        let mut headers: HashMap<String, String> = HashMap::new();
        for (k, v) in self.pairs() {
            let text = |b: Vec<u8>| String::from_utf8(b).expect("UTF-8");
            join_header(&mut headers, text(k), Cow::Owned(text(v)));
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: self.method.clone(),
                        path: self.path.clone(),
                        headers,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    /// The request as the module hands it to ext_authz.
    fn asking_to_learn(&self) -> Req {
        let mut asked = self.clone();
        asked.headers.push((LEARN_HEADER, "1".into()));
        asked
    }
}

/// What Envoy does with an answer: the parts the client or the upstream can tell apart.
#[derive(Debug, PartialEq, Eq)]
enum Shown {
    Allow {
        set: Vec<(String, String)>,
        /// In no order (Envoy removes them all).
        remove: Vec<String>,
        response_headers: Vec<(String, String)>,
        /// String fields, and the `scopes` list.
        metadata: Option<(BTreeMap<String, String>, Vec<String>)>,
    },
    Deny {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    Deferred,
}

impl Shown {
    /// The module's answer, as the filter carries it out.
    fn of_module(local: Local) -> Shown {
        match local {
            Local::Allow(a) => Shown::Allow {
                set: owned(a.headers()),
                remove: sorted(a.remove().to_vec()),
                response_headers: owned(a.response_headers()),
                metadata: a
                    .metadata()
                    .map(|(fields, scopes)| (owned(fields).into_iter().collect(), scopes.to_vec())),
            },
            Local::Deny(d) => Shown::Deny {
                status: d.status,
                headers: d.headers,
                body: d.body,
            },
            Local::Defer(_) | Local::HandOver | Local::NotFollowing => Shown::Deferred,
        }
    }

    /// The service's answer, as Envoy's ext_authz filter reads it off the wire.
    fn of_service(answer: &CheckResponse) -> Shown {
        let pairs = |options: &[HeaderValueOption]| {
            options
                .iter()
                .map(|o| {
                    let h = o.header.as_ref().expect("a header option holds a header");
                    (h.key.clone(), h.value.clone())
                })
                .collect()
        };
        match answer.http_response.as_ref().expect("an http_response") {
            HttpResponse::OkResponse(ok) => Shown::Allow {
                set: pairs(&ok.headers),
                remove: sorted(ok.headers_to_remove.clone()),
                response_headers: pairs(&ok.response_headers_to_add),
                metadata: answer.dynamic_metadata.as_ref().map(shown_metadata),
            },
            HttpResponse::DeniedResponse(denied) => Shown::Deny {
                status: u16::try_from(denied.status.as_ref().expect("a status").code)
                    .expect("an HTTP status"),
                headers: pairs(&denied.headers),
                body: denied.body.clone(),
            },
            other => panic!("an answer Envoy cannot read: {other:?}"),
        }
    }

    /// `Some(code)` for a denial, `None` for an allow.
    fn code(&self) -> Option<String> {
        match self {
            Shown::Allow { .. } => None,
            Shown::Deny { body, .. } => {
                let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
                Some(
                    body["error"]["code"]
                        .as_str()
                        .expect("error.code")
                        .to_owned(),
                )
            }
            Shown::Deferred => panic!("a deferred request has no answer"),
        }
    }
}

/// Metadata as Envoy holds it: the string fields, and the `scopes` list.
fn shown_metadata(m: &Struct) -> (BTreeMap<String, String>, Vec<String>) {
    let mut fields = BTreeMap::new();
    let mut scopes = Vec::new();
    for (key, value) in &m.fields {
        match (key.as_str(), &value.kind) {
            (_, Some(Kind::StringValue(s))) => {
                fields.insert(key.clone(), s.clone());
            }
            ("scopes", Some(Kind::ListValue(list))) => {
                scopes = list
                    .values
                    .iter()
                    .map(|v| match &v.kind {
                        Some(Kind::StringValue(s)) => s.clone(),
                        other => panic!("a scope that is no string: {other:?}"),
                    })
                    .collect();
            }
            (_, other) => panic!("metadata field {key}: {other:?}"),
        }
    }
    (fields, scopes)
}

fn owned<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<(String, String)> {
    pairs.map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

/// What the module does with a request, in the table below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByModule {
    /// Answers it as the service does.
    Answers,
    /// Hands it to the service (its answer needs the store).
    Defers,
}

#[tokio::test]
async fn a_module_that_learned_the_keys_answers_every_request_the_policy_decides_without_the_store_exactly_as_the_service_does(
) {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (partner, _) = service.key(partner_key()).await;
    let mut events = module.app.bus.subscribe();
    // Applied before anything is handed over: a change while a request is out would
    // (rightly) keep the module from learning its answer.
    delegate(&service, &mut events, DELEGATED).await;
    let reader_auth = bearer(&reader);
    let partner_auth = bearer(&partner);
    let reads = |token: &str| get("/v1/contacts/1", &[("authorization", token)]);
    module
        .learn_from(&service, &reads(&reader_auth))
        .await
        .expect("the reader's allow is learned");
    module
        .learn_from(
            &service,
            &get(
                "/v1/contacts/1",
                &[("authorization", &partner_auth), ("x-tenant-id", DELEGATED)],
            ),
        )
        .await
        .expect("the partner's allow for its delegated tenant is learned");

    use ByModule::{Answers, Defers};
    let upper_tenant = TENANT.to_uppercase();
    let cases: Vec<(&str, Req, Option<&str>, ByModule)> =
        vec![
        ("a learned key", reads(&reader_auth), None, Answers),
        (
            "a learned key in x-api-key, naming its own tenant, with a client's identity headers",
            get(
                "/v1/contacts/1?page=2",
                &[
                    ("x-api-key", &reader),
                    ("x-tenant-id", &upper_tenant),
                    ("x-keygate-subject", "key:admin"),
                    ("x-keygate-scopes", "*"),
                    ("x_tenant_id", OTHER_TENANT),
                ],
            ),
            None,
            Answers,
        ),
        (
            "HEAD",
            req("HEAD", "/v1/contacts/1", &[("authorization", &reader_auth)]),
            None,
            Answers,
        ),
        (
            "no credential",
            get("/v1/contacts/1", &[]),
            Some("missing_credentials"),
            Answers,
        ),
        (
            "a malformed key",
            get("/v1/contacts/1", &[("authorization", "Bearer sk_live_notakey")]),
            Some("invalid_api_key"),
            Answers,
        ),
        (
            "a token of no known form",
            get("/v1/contacts/1", &[("x-api-key", "letmein")]),
            Some("invalid_api_key"),
            Answers,
        ),
        (
            "a scope the key lacks",
            req(
                "POST",
                "/v1/contacts/1",
                &[("authorization", &reader_auth), ("x-tenant-id", TENANT)],
            ),
            Some("insufficient_permissions"),
            Answers,
        ),
        (
            "a partner scope on a tenant key",
            get(
                "/v1/billing/partner/invoices",
                &[("authorization", &reader_auth)],
            ),
            Some("insufficient_permissions"),
            Answers,
        ),
        (
            "a method override onto a route the key may not use",
            get(
                "/v1/contacts/1",
                &[
                    ("authorization", &reader_auth),
                    ("x-tenant-id", TENANT),
                    ("x-http-method-override", "DELETE"),
                ],
            ),
            Some("insufficient_permissions"),
            Answers,
        ),
        (
            "a method override that is no method",
            get(
                "/v1/contacts/1",
                &[
                    ("authorization", &reader_auth),
                    ("x-http-method-override", "GET, DELETE"),
                ],
            ),
            Some("invalid_request"),
            Answers,
        ),
        (
            "no tenant where the route requires one",
            req("POST", "/v1/contacts/1", &[("authorization", &reader_auth)]),
            Some("tenant_required"),
            Answers,
        ),
        (
            "a tenant that is no tenant id",
            get(
                "/v1/contacts/1",
                &[("authorization", &reader_auth), ("x-tenant-id", "acme")],
            ),
            Some("invalid_tenant"),
            Answers,
        ),
        (
            "a tenant key naming another tenant",
            get(
                "/v1/contacts/1",
                &[("authorization", &reader_auth), ("x-tenant-id", OTHER_TENANT)],
            ),
            Some("tenant_forbidden"),
            Answers,
        ),
        (
            "an encoded slash",
            get("/v1/contacts/a%2Fb", &[("authorization", &reader_auth)]),
            Some("invalid_path"),
            Answers,
        ),
        (
            "path parameters",
            get("/v1/contacts/1;x=..", &[("authorization", &reader_auth)]),
            Some("invalid_path"),
            Answers,
        ),
        (
            "a public route, with a client's identity and tenant headers",
            get(
                "/public/docs",
                &[("x-keygate-subject", "key:admin"), ("x-tenant-id", TENANT)],
            ),
            None,
            Answers,
        ),
        (
            "a public route with a learned key",
            get("/public/docs", &[("authorization", &reader_auth)]),
            None,
            Answers,
        ),
        (
            "no route, a learned key",
            get("/v2/elsewhere", &[("authorization", &reader_auth)]),
            Some("insufficient_permissions"),
            Answers,
        ),
        (
            "no route, no credential",
            get("/v2/elsewhere", &[]),
            Some("missing_credentials"),
            Answers,
        ),
        (
            "a partner key for its delegated tenant",
            get(
                "/v1/contacts/1",
                &[("authorization", &partner_auth), ("x-tenant-id", DELEGATED)],
            ),
            None,
            Answers,
        ),
        (
            "a partner key as itself",
            get(
                "/v1/billing/partner/invoices",
                &[("authorization", &partner_auth)],
            ),
            None,
            Answers,
        ),
        (
            "a partner key where the route requires a tenant",
            req(
                "POST",
                "/v1/contacts/1",
                &[("authorization", &partner_auth)],
            ),
            Some("tenant_required"),
            Answers,
        ),
        // A JWT (keygate's own session tokens are JWTs, and `sessions` is on) is the
        // service's to validate.
        (
            "a token shaped as a JWT",
            get("/v1/contacts/1", &[("authorization", "Bearer aGk.aGk.aGk")]),
            Some("invalid_token"),
            Defers,
        ),
        // The module learns delegations only from allows: whether the partner may act
        // for a tenant it was never seen acting for is the store's to say.
        (
            "a partner key for a tenant not delegated to it",
            get(
                "/v1/contacts/1",
                &[("authorization", &partner_auth), ("x-tenant-id", OTHER_TENANT)],
            ),
            Some("tenant_forbidden"),
            Defers,
        ),
    ];
    for (what, r, code, expected) in cases {
        let by_service = Shown::of_service(&service.answer(&r).await);
        assert_eq!(
            by_service.code().as_deref(),
            code,
            "{what}: the service's answer"
        );
        let by_module = Shown::of_module(module.decide(&r));
        match expected {
            Answers => assert_eq!(by_module, by_service, "{what}"),
            Defers => assert_eq!(by_module, Shown::Deferred, "{what}"),
        }
    }
}

#[tokio::test]
async fn a_key_not_learned_and_any_request_needing_a_rate_limit_a_lease_or_a_session_mint_go_to_the_service(
) {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (metered, _) = service.key(tenant_key(&["contacts:read"], "metered")).await;
    let (reader, metered) = (bearer(&reader), bearer(&metered));
    let read = |auth: &str| get("/v1/contacts/1", &[("authorization", auth)]);

    // Nothing learned: a key's request, allowed or denied by the service, is handed over.
    for r in [
        read(&reader),
        get(
            "/v1/contacts/1",
            &[("authorization", &reader), ("x-tenant-id", OTHER_TENANT)],
        ),
    ] {
        assert_eq!(
            Shown::of_module(module.decide(&r)),
            Shown::Deferred,
            "{r:?}"
        );
    }

    module
        .learn_from(&service, &read(&reader))
        .await
        .expect("the reader's allow is learned");
    module
        .learn_from(&service, &read(&metered))
        .await
        .expect("the metered key's allow is learned");
    assert!(matches!(module.decide(&read(&reader)), Local::Allow(_)));

    let always_deferred = [
        ("a key on a rate-limited plan", read(&metered)),
        (
            "a route that takes a lease",
            req("POST", "/v1/calls", &[("authorization", &reader)]),
        ),
        (
            "a route that mints a session token",
            req("POST", "/v1/sessions", &[("authorization", &reader)]),
        ),
    ];
    for (what, r) in always_deferred {
        // Each is one the service allows: what the module hands over is the allow's cost.
        let by_service = Shown::of_service(&service.answer(&r).await);
        assert_eq!(by_service.code(), None, "{what}: the service allows it");
        for _ in 0..2 {
            assert_eq!(
                Shown::of_module(module.decide(&r)),
                Shown::Deferred,
                "{what}"
            );
        }
    }

    // Another key of the same tenant, never handed over, is not known by the first's.
    let (other, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    assert_eq!(
        Shown::of_module(module.decide(&read(&bearer(&other)))),
        Shown::Deferred
    );
}

#[tokio::test]
async fn a_key_whose_plan_limits_its_rate_is_handed_over_without_deciding_until_an_invalidation() {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (metered, metered_id) = service.key(tenant_key(&["contacts:read"], "metered")).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (metered, reader) = (bearer(&metered), bearer(&reader));
    let read = |auth: &str| get("/v1/contacts/1", &[("authorization", auth)]);
    // Denied by the policy alone (the key lacks `contacts:write`): a module deciding it
    // answers it itself.
    let write = |auth: &str| {
        req(
            "DELETE",
            "/v1/contacts/1",
            &[("authorization", auth), ("x-tenant-id", TENANT)],
        )
    };
    module
        .learn_from(&service, &read(&metered))
        .await
        .expect("the metered key's allow is learned");
    module
        .learn_from(&service, &read(&reader))
        .await
        .expect("the reader's allow is learned");
    assert_eq!(
        Shown::of_module(module.decide(&write(&reader)))
            .code()
            .as_deref(),
        Some("insufficient_permissions"),
        "a key the module answers is denied by the module"
    );

    // Handed over once for its plan, the metered key's next requests go to the service
    // without being decided here: even one the policy alone denies. The service answers
    // it as the module would have.
    assert!(matches!(module.decide(&read(&metered)), Local::HandOver));
    let denied = write(&metered);
    assert!(matches!(module.decide(&denied), Local::HandOver));
    assert_eq!(
        Shown::of_service(&service.answer(&denied).await)
            .code()
            .as_deref(),
        Some("insufficient_permissions")
    );

    // A key handed over for one route's lease is still answered on the others.
    let call = req("POST", "/v1/calls", &[("authorization", &reader)]);
    assert!(matches!(module.decide(&call), Local::HandOver));
    assert!(matches!(module.decide(&read(&reader)), Local::Allow(_)));

    // An invalidation forgets it: the revoked key is denied by the module itself.
    let mut events = module.app.bus.subscribe();
    service
        .app
        .admin
        .revoke(&metered_id)
        .await
        .expect("revoked");
    applied(&mut events, "the revocation", revoked(&metered_id)).await;
    let by_module = Shown::of_module(module.decide(&read(&metered)));
    assert_eq!(by_module.code().as_deref(), Some("revoked_api_key"));
    assert_eq!(
        by_module,
        Shown::of_service(&service.answer(&read(&metered)).await)
    );
}

/// A change to the configuration reaches the module as it reaches a replica (the
/// module's file is followed as `serve` follows its own: `server::module`): once both
/// have taken it, a learned key is decided by the new rules, the same on both sides. A
/// route's new scope, an error's new message and a plan that now limits the key's rate
/// (whose requests then go to the service) are each taken at once, the learned key kept.
#[tokio::test]
async fn a_reloaded_configuration_is_what_the_module_decides_by_as_the_service_does() {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);
    module
        .learn_from(&service, &read)
        .await
        .expect("the reader's allow is learned");
    assert!(matches!(module.decide(&read), Local::Allow(_)));

    let reload = |config: &str| {
        let stop = watch::channel(false).1;
        for app in [&service.app, &module.app] {
            let config = Config::load(Some(config), Vec::new()).expect("the new configuration");
            assert_eq!(
                app.live.apply(config, &stop).expect("taken live"),
                Reloaded::Applied
            );
        }
    };
    let rescoped = CONFIG.replace(
        r#"path: "/v1/contacts/**", scope: "contacts:read""#,
        r#"path: "/v1/contacts/**", scope: "contacts:list""#,
    );
    assert_ne!(rescoped, CONFIG, "the route's scope is changed");
    let message = "This key may not read contacts any more.";
    reload(&format!(
        "{rescoped}errors: {{ codes: {{ insufficient_permissions: {{ message: \"{message}\" }} }} }}\n"
    ));
    let by_module = Shown::of_module(module.decide(&read));
    assert_eq!(
        by_module.code().as_deref(),
        Some("insufficient_permissions")
    );
    assert!(
        format!("{by_module:?}").contains(message),
        "the new message: {by_module:?}"
    );
    assert_eq!(by_module, Shown::of_service(&service.answer(&read).await));

    // The scope back, and the key's plan (the default) now limiting its rate: only the
    // service counts it.
    reload(&CONFIG.replace(
        "plans:\n    metered: { requests_per_minute: 1000 }",
        "plans:\n    metered: { requests_per_minute: 1000 }\n  default_plans: { live: metered }",
    ));
    assert!(matches!(module.decide(&read), Local::HandOver));
    assert!(Shown::of_service(&service.answer(&read).await)
        .code()
        .is_none());

    // And back as it was: the module answers the key itself again, once the hand-over
    // memo has let it go (`HANDED_OVER_FOR`).
    reload(CONFIG);
    keygate_test_support::eventually(
        PATIENCE,
        "the module answers the key itself again",
        || async { matches!(module.decide(&read), Local::Allow(_)).then_some(()) },
    )
    .await;
}

/// A module whose settings are not the service's (another file, other overrides in
/// Envoy's environment, a reload one of them has not read yet) learns nothing from it:
/// it would answer the next request by rules the service does not decide by. Every
/// request then goes on to the service. With the same settings again, it learns.
#[tokio::test]
async fn a_module_deciding_by_other_settings_than_the_service_learns_nothing_from_it() {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let stop = watch::channel(false).1;
    let take = |config: &str| {
        let config = Config::load(Some(config), Vec::new()).expect("the configuration");
        assert_eq!(
            module.app.live.apply(config, &stop).expect("taken live"),
            Reloaded::Applied
        );
    };
    take(&CONFIG.replace("unmatched: deny", "unmatched: authenticated"));
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);
    match module.learn_from(&service, &read).await {
        Err(NotLearned::OtherRules { service, module }) => assert_ne!(service, module),
        other => panic!("learned from a service with other settings: {other:?}"),
    }
    assert!(matches!(module.decide(&read), Local::Defer(_)));

    take(CONFIG);
    module
        .learn_from(&service, &read)
        .await
        .expect("the same settings: learned");
    assert!(matches!(module.decide(&read), Local::Allow(_)));
}

#[tokio::test]
async fn an_allow_from_a_replica_behind_the_module_in_the_stream_is_not_learned() {
    let mut service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (_, other_id) = service.key(tenant_key(&["contacts:read"], "")).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);

    // The service stops applying the stream; the module applies an event it never will.
    service.fall_behind().await;
    let mut events = module.app.bus.subscribe();
    service.app.admin.revoke(&other_id).await.expect("revoked");
    applied(
        &mut events,
        "the other key's revocation",
        revoked(&other_id),
    )
    .await;

    assert_eq!(
        module.learn_from(&service, &read).await,
        Err(NotLearned::ReplicaBehind)
    );
    assert_eq!(Shown::of_module(module.decide(&read)), Shown::Deferred);
}

#[tokio::test]
async fn an_allow_overtaken_by_an_invalidation_or_a_delegation_change_while_it_was_out_is_not_learned(
) {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (partner, _) = service.key(partner_key()).await;
    let (_, other_id) = service.key(tenant_key(&["contacts:read"], "")).await;
    let mut events = module.app.bus.subscribe();
    delegate(&service, &mut events, DELEGATED).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);
    let acting = get(
        "/v1/contacts/1",
        &[
            ("authorization", &bearer(&partner)),
            ("x-tenant-id", DELEGATED),
        ],
    );

    // An update of any key, applied to the module's cache while the request was out.
    let ticket = module.hand_over(&read);
    let text = learnable(&service.answer(&read.asking_to_learn()).await);
    module
        .app
        .cache
        .invalidate_key("some-other-key", Some(EventKind::Updated));
    assert_eq!(
        module.decider.learn(&ticket, &text),
        Err(NotLearned::Overtaken)
    );
    assert_eq!(Shown::of_module(module.decide(&read)), Shown::Deferred);

    // Another key's revocation, arriving on the stream while the request was out (the
    // answer itself covers what the module had applied).
    let ticket = module.hand_over(&read);
    let text = learnable(&service.answer(&read.asking_to_learn()).await);
    service.app.admin.revoke(&other_id).await.expect("revoked");
    applied(
        &mut events,
        "the other key's revocation",
        revoked(&other_id),
    )
    .await;
    assert_eq!(
        module.decider.learn(&ticket, &text),
        Err(NotLearned::Overtaken)
    );
    assert_eq!(Shown::of_module(module.decide(&read)), Shown::Deferred);

    // A change of another delegation, while a partner's request for its tenant was out:
    // neither the delegation nor the key is learned.
    let ticket = module.hand_over(&acting);
    let text = learnable(&service.answer(&acting.asking_to_learn()).await);
    delegate(&service, &mut events, OTHER_TENANT).await;
    assert_eq!(
        module.decider.learn(&ticket, &text),
        Err(NotLearned::Overtaken)
    );
    assert_eq!(module.app.delegations.known(PARTNER, DELEGATED), None);
    assert_eq!(Shown::of_module(module.decide(&acting)), Shown::Deferred);

    // Nothing overtaking them, the same answers are learned.
    module.learn_from(&service, &read).await.expect("learned");
    module.learn_from(&service, &acting).await.expect("learned");
    assert!(matches!(module.decide(&read), Local::Allow(_)));
    assert!(matches!(module.decide(&acting), Local::Allow(_)));
}

#[tokio::test]
async fn a_learned_key_revoked_or_deleted_on_the_stream_is_denied_by_the_module_itself_as_by_the_service(
) {
    let service = Service::start().await;
    let (module, _follower) = Module::following(&service).await;
    let (reader, reader_id) = service.key(tenant_key(&["contacts:read"], "")).await;
    let (partner, partner_id) = service.key(partner_key()).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);
    let billing = get(
        "/v1/billing/partner/invoices",
        &[("authorization", &bearer(&partner))],
    );
    module.learn_from(&service, &read).await.expect("learned");
    module
        .learn_from(&service, &billing)
        .await
        .expect("learned");
    assert!(matches!(module.decide(&read), Local::Allow(_)));
    assert!(matches!(module.decide(&billing), Local::Allow(_)));

    let mut events = module.app.bus.subscribe();
    service.app.admin.revoke(&reader_id).await.expect("revoked");
    applied(&mut events, "the revocation", revoked(&reader_id)).await;
    service
        .app
        .admin
        .delete(&partner_id)
        .await
        .expect("deleted");
    applied(&mut events, "the deletion", |item| {
        matches!(item, FeedItem::Event(e) if e.key_id == partner_id && e.kind == EventKind::Deleted)
    })
    .await;

    for (r, code) in [(&read, "revoked_api_key"), (&billing, "invalid_api_key")] {
        let by_module = Shown::of_module(module.decide(r));
        assert_eq!(by_module.code().as_deref(), Some(code), "{r:?}");
        assert_eq!(
            by_module,
            Shown::of_service(&service.answer(r).await),
            "{r:?}"
        );
    }
}

/// The store's stream, which a test can cut: while cut, every read fails (a read
/// waiting when it is cut fails at once).
struct Cuttable {
    inner: StoreFeed,
    cut: watch::Sender<bool>,
}

#[async_trait]
impl EventFeed for Cuttable {
    async fn start_position(&self) -> Result<Cursor, StoreError> {
        self.inner.start_position().await
    }

    async fn read(&self, after: &Cursor, resync: bool) -> Result<Vec<FeedEntry>, StoreError> {
        let mut cut = self.cut.subscribe();
        tokio::select! {
            _ = cut.wait_for(|cut| *cut) => Err(StoreError::unavailable("reading the revocation stream", "cut by the test")),
            read = self.inner.read(after, resync) => read,
        }
    }

    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError> {
        self.inner.token_revocations().await
    }

    fn following(&self) -> bool {
        self.inner.following()
    }
}

#[tokio::test]
async fn while_the_module_is_not_following_the_stream_every_request_goes_to_the_service() {
    let service = Service::start().await;
    let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let read = get("/v1/contacts/1", &[("authorization", &bearer(&reader))]);
    // Answered by a following module without any key: a public route, no credential.
    let keyless = [get("/public/docs", &[]), get("/v1/contacts/1", &[])];

    // Never positioned: nothing is answered, nor asked to be learned.
    let module = Module::new();
    for r in keyless.iter().chain([&read]) {
        assert!(matches!(module.decide(r), Local::NotFollowing), "{r:?}");
    }

    // Positioned, following, then cut off the stream: a learned key too is handed over.
    let module = Module::new();
    let (cut, _) = watch::channel(false);
    let feed = Arc::new(Cuttable {
        inner: StoreFeed::new(service.app.store.clone(), BLOCK),
        cut: cut.clone(),
    });
    let _follower = follow(&module.app.bus, feed);
    until_following(&module.app.bus, true).await;
    module.learn_from(&service, &read).await.expect("learned");
    assert!(matches!(module.decide(&read), Local::Allow(_)));
    for r in &keyless {
        assert!(
            !matches!(
                module.decide(r),
                Local::Defer(_) | Local::HandOver | Local::NotFollowing
            ),
            "{r:?}"
        );
    }
    // A key handed over while following, whose answer comes back after the cut.
    let (other, _) = service.key(tenant_key(&["contacts:read"], "")).await;
    let other = get("/v1/contacts/1", &[("authorization", &bearer(&other))]);
    let ticket = module.hand_over(&other);
    let text = learnable(&service.answer(&other.asking_to_learn()).await);

    cut.send_replace(true);
    until_following(&module.app.bus, false).await;
    assert!(module.app.bus.has_position());
    // Nothing is answered, nor asked to be learned; an answer that comes back now is
    // not kept.
    for r in keyless.iter().chain([&read, &other]) {
        assert!(matches!(module.decide(r), Local::NotFollowing), "{r:?}");
    }
    assert_eq!(
        module.decider.learn(&ticket, &text),
        Err(NotLearned::NotFollowing)
    );

    // Following again, it answers again from what it learned.
    cut.send_replace(false);
    until_following(&module.app.bus, true).await;
    assert!(matches!(module.decide(&read), Local::Allow(_)));
}

type Header<'a> = (&'a [u8], &'a [u8]);

/// `module`'s reading of Envoy's `headers`.
fn read_request(module: &Module, headers: &[Header<'_>]) -> Option<AuthRequest> {
    read(&module.app.live.envoy(), headers.iter().copied())
}

#[test]
fn request_reads_method_path_and_the_consulted_headers_and_refuses_one_that_is_not_utf8() {
    let module = Module::new();
    let read = |headers: &[Header<'_>]| read_request(&module, headers);
    let base: [Header<'_>; 3] = [
        (b":method", b"PATCH"),
        (b":path", b"/v1/contacts/1?q=%C3%A9"),
        (b":authority", b"api.example.com"),
    ];

    let extra: [Header<'_>; 9] = [
        (b"authorization", b"Bearer sk_live_x"),
        (b"x-tenant-id", TENANT.as_bytes()),
        (b"x-api-key", b"a"),
        (b"x-api-key", b"b"),
        (b"x-keygate-learn", b"1"),
        (b"x-http-method-override", b"DELETE"),
        // Not consulted: neither kept nor read, whatever their bytes.
        (b"user-agent", b"\xffbytes"),
        (b"cookie", b"session=1"),
        (b"\xff-name", b"value"),
    ];
    let headers: Vec<Header<'_>> = base.iter().chain(&extra).copied().collect();
    let req = read(&headers).expect("a request");
    assert_eq!(req.method, "PATCH");
    assert_eq!(req.path, "/v1/contacts/1?q=%C3%A9");
    assert_eq!(
        (req.peer.as_deref(), req.credential.as_deref()),
        (None, None)
    );
    let kept: BTreeMap<&str, &str> = req
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let expected: BTreeMap<&str, &str> = [
        ("authorization", "Bearer sk_live_x"),
        ("x-tenant-id", TENANT),
        ("x-api-key", "a,b"),
        (LEARN_HEADER, "1"),
        ("x-http-method-override", "DELETE"),
    ]
    .into_iter()
    .collect();
    assert_eq!(kept, expected);

    // A consulted header that is not UTF-8: the service's to judge.
    let not_utf8: [Header<'_>; 4] = [
        (b"authorization", b"Bearer sk_live_\xff"),
        (b"x-tenant-id", b"\xc3\x28"),
        (b"x-keygate-subject", b"\xff"),
        (b"x-http-method-override", b"DEL\x80"),
    ];
    for bad in not_utf8 {
        let headers: Vec<Header<'_>> = base.iter().copied().chain([bad]).collect();
        assert!(
            read(&headers).is_none(),
            "{}",
            String::from_utf8_lossy(bad.0)
        );
    }

    // The method and path: from the pseudo-headers, UTF-8, both there.
    let path_not_utf8: [Header<'_>; 2] = [(b":method", b"GET"), (b":path", b"/v1/\xff")];
    assert!(read(&path_not_utf8).is_none());
    let no_method: [Header<'_>; 1] = [(b":path", b"/v1/contacts/1")];
    assert!(read(&no_method).is_none());
    let no_path: [Header<'_>; 1] = [(b":method", b"GET")];
    assert!(read(&no_path).is_none());
    let least: [Header<'_>; 2] = [(b":path", b"/"), (b":method", b"GET")];
    let least = read(&least).expect("a request");
    assert_eq!((least.method.as_str(), least.path.as_str()), ("GET", "/"));
    assert!(least.headers.is_empty());
}

/// What the module answers itself is counted in the key's usage as the service counts
/// its own answers (allows, and denials once the key is known), and written where the
/// service's usage is; what it hands over is the service's to count, and a revoked key
/// is counted by neither.
#[tokio::test]
async fn what_the_module_answers_is_counted_in_the_keys_usage_as_the_service_counts_it() {
    let service = Service::start().await;
    let (module, _follower) = Module::counting_for(&service).await;
    let (reader, reader_id) = service.key(tenant_key(&["contacts:read"], "")).await;
    let reader = bearer(&reader);
    let read = get("/v1/contacts/1", &[("authorization", &reader)]);
    let write = req(
        "DELETE",
        "/v1/contacts/1",
        &[("authorization", &reader), ("x-tenant-id", TENANT)],
    );
    // Handed over (and counted by the service, once it answers).
    module
        .learn_from(&service, &read)
        .await
        .expect("the reader's allow is learned");
    service
        .app
        .usage
        .flush()
        .await
        .expect("the service's usage is written");
    let usage = |id: &str| {
        let store = service.app.store.clone();
        let id = id.to_owned();
        async move { store.get(&id).await.unwrap().unwrap().usage }
    };
    let before = usage(&reader_id).await;
    assert_eq!(
        (before.allowed, before.denied),
        (1, 0),
        "the service's own answer"
    );

    for _ in 0..3 {
        assert!(matches!(module.decide(&read), Local::Allow(_)));
    }
    assert!(matches!(module.decide(&write), Local::Deny(_)));
    let call = req("POST", "/v1/calls", &[("authorization", &reader)]);
    assert!(matches!(module.decide(&call), Local::HandOver));
    assert_eq!(
        module.app.usage.flush().await.unwrap(),
        1,
        "one key's counts"
    );
    let after = usage(&reader_id).await;
    assert_eq!(
        (after.allowed, after.denied),
        (4, 1),
        "three allows and a denial answered in Envoy; the hand-over is not the module's"
    );
    assert!(after.last_used_at_ms >= before.last_used_at_ms);

    let mut events = module.app.bus.subscribe();
    service.app.admin.revoke(&reader_id).await.expect("revoked");
    applied(&mut events, "the revocation", revoked(&reader_id)).await;
    let by_module = Shown::of_module(module.decide(&read));
    assert_eq!(by_module.code().as_deref(), Some("revoked_api_key"));
    assert_eq!(
        module.app.usage.flush().await.unwrap(),
        0,
        "a revoked key is not counted"
    );
}

/// The credentials a generated request may carry: keys the module learned (a reader, a
/// writer, a partner for its delegated tenant), one it learned and saw revoked, a valid
/// one it has not seen (it learns it from the first allow), and shapes no key has.
struct Credentials {
    /// Keys the service allows: the learned ones and the unseen one.
    valid: Vec<String>,
    all: Vec<String>,
}

impl Credentials {
    async fn made(service: &Service, module: &Module) -> Credentials {
        let (reader, _) = service.key(tenant_key(&["contacts:read"], "")).await;
        let (writer, _) = service
            .key(tenant_key(&["contacts:read", "contacts:write"], ""))
            .await;
        let (partner, _) = service.key(partner_key()).await;
        let (gone, gone_id) = service.key(tenant_key(&["contacts:read"], "")).await;
        let (unseen, _) = service.key(tenant_key(&["contacts:read"], "")).await;
        let mut events = module.app.bus.subscribe();
        delegate(service, &mut events, DELEGATED).await;
        for token in [&reader, &writer, &gone] {
            let r = get("/v1/contacts/1", &[("authorization", &bearer(token))]);
            module.learn_from(service, &r).await.expect("learned");
        }
        let r = get(
            "/v1/contacts/1",
            &[
                ("authorization", &bearer(&partner)),
                ("x-tenant-id", DELEGATED),
            ],
        );
        module.learn_from(service, &r).await.expect("learned");
        service.app.admin.revoke(&gone_id).await.expect("revoked");
        applied(&mut events, "the revocation", revoked(&gone_id)).await;
        // The reader's token with its secret's last character changed: its checksum fails.
        let mut forged = reader.clone();
        let last = forged.pop().expect("a token");
        forged.push(if last == 'A' { 'B' } else { 'A' });
        let test_env = reader.replacen("sk_live_", "sk_test_", 1);
        let valid = vec![reader, writer, partner, unseen];
        let mut all = valid.clone();
        all.extend([
            gone,
            forged,
            test_env,
            "sk_live_notakey".into(),
            "aGk.aGk.aGk".into(),
            String::new(),
        ]);
        Credentials { valid, all }
    }

    /// A request as a client that read the API's documentation sends it: a route
    /// family's path, a valid key where the policy reads it, perhaps a tenant or a
    /// header of the client's own.
    fn ordinary(&self) -> impl Strategy<Value = Req> {
        let credential = credential(placed(), &self.valid);
        // Each route family's methods and prefix, reads the likeliest.
        let route = prop_oneof![
            4 => proptest::sample::select(vec![("GET", "/v1/contacts"), ("HEAD", "/v1/contacts")]),
            1 => proptest::sample::select(vec![
                ("POST", "/v1/contacts"),
                ("DELETE", "/v1/contacts"),
                ("GET", "/v1/billing/partner"),
                ("GET", "/public"),
                ("POST", "/v1/calls"),
                ("POST", "/v1/sessions"),
                ("GET", "/v2"),
            ]),
        ];
        let segments = prop::collection::vec(
            proptest::sample::select(vec!["1", "invoices", "docs", "%41", "%7e"]),
            0..3,
        );
        (
            route,
            segments,
            credential,
            prop::collection::vec(prop_oneof![tenant(), other()], 0..2),
        )
            .prop_map(|((method, prefix), segments, credential, mut headers)| {
                headers.insert(0, credential);
                Req {
                    method: method.to_owned(),
                    path: joined(prefix, &segments),
                    headers,
                }
            })
    }

    /// Any request: any method, odd paths, any credential in either place the policy
    /// reads, in the forms a client gets wrong, repeated or missing.
    fn wild(&self) -> impl Strategy<Value = Req> {
        let misplaced = (
            proptest::sample::select(vec!["authorization", "x-api-key"]),
            proptest::sample::select(vec!["bearer ", "Basic ", "", "Bearer  ", "Bearer "]),
        );
        let credential = credential(prop_oneof![4 => placed(), 1 => misplaced], &self.all);
        let method = proptest::sample::select(vec![
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get",
        ]);
        (
            method,
            path(),
            prop::collection::vec(
                prop_oneof![3 => credential, 2 => tenant(), 1 => other()],
                0..4,
            ),
        )
            .prop_map(|(method, path, headers)| Req {
                method: method.to_owned(),
                path,
                headers,
            })
    }
}

/// `x-tenant-id`, in every form a client sends it.
fn tenant() -> impl Strategy<Value = (&'static str, String)> {
    proptest::sample::select(vec![
        TENANT.to_owned(),
        TENANT.to_uppercase(),
        format!(" {TENANT}"),
        format!("{TENANT},{TENANT}"),
        OTHER_TENANT.to_owned(),
        DELEGATED.to_owned(),
        DELEGATED.to_uppercase(),
        format!("{DELEGATED} "),
        "acme".to_owned(),
        String::new(),
    ])
    .prop_map(|t| ("x-tenant-id", t))
}

/// A method override, or identity headers of the client's own.
fn other() -> impl Strategy<Value = (&'static str, String)> {
    proptest::sample::select(vec![
        ("x-http-method-override", "DELETE"),
        ("x-http-method-override", "post"),
        ("x-http-method-override", "GET, DELETE"),
        ("x-http-method-override", ""),
        ("x-keygate-subject", "key:admin"),
        ("x-keygate-scopes", "*"),
        ("x-forwarded-for", "203.0.113.7"),
    ])
    .prop_map(|(k, v)| (k, v.to_owned()))
}

/// Any path: a route family's prefix, then segments, then perhaps a query; among them
/// prefixes and segments that normalise (dot segments, encoded unreserved characters,
/// upper case, a leading `//`) or must be refused (an encoded slash or backslash, NUL,
/// path parameters, a fragment).
fn path() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        8 => proptest::sample::select(vec![
            "/v1/contacts",
            "/v1/billing/partner",
            "/public",
            "/v1/calls",
            "/v1/sessions",
            "/v2",
        ]),
        1 => proptest::sample::select(vec!["/V1/contacts", "//v1/contacts", ""]),
    ];
    let segment = prop_oneof![
        8 => proptest::sample::select(vec!["1", "invoices", "docs", "contacts", "%41", "%7e"]),
        1 => proptest::sample::select(vec!["..", ".", "%2e%2e", "%2E", ""]),
        1 => proptest::sample::select(vec!["a%2Fb", "a%5cb", "%00", "x;y=1"]),
    ];
    let query = prop_oneof![
        8 => Just(""),
        2 => Just("?page=2"),
        1 => proptest::sample::select(vec!["?next=/../admin", "#top"]),
    ];
    (prefix, prop::collection::vec(segment, 0..4), query).prop_map(|(prefix, segments, query)| {
        let path = joined(prefix, &segments);
        let path = if path.is_empty() { "/".into() } else { path };
        path + query
    })
}

/// `prefix`, then each of `segments` after a `/`.
fn joined(prefix: &str, segments: &[&str]) -> String {
    segments
        .iter()
        .fold(prefix.to_owned(), |path, s| path + "/" + s)
}

/// A credential where the policy reads it: `authorization` with its scheme, or
/// `x-api-key` bare.
fn placed() -> impl Strategy<Value = (&'static str, &'static str)> {
    prop_oneof![Just(("authorization", "Bearer ")), Just(("x-api-key", ""))]
}

/// One of `tokens`, in a header and after a scheme from `places`.
fn credential(
    places: impl Strategy<Value = (&'static str, &'static str)>,
    tokens: &[String],
) -> impl Strategy<Value = (&'static str, String)> {
    (places, proptest::sample::select(tokens.to_vec()))
        .prop_map(|((name, scheme), token)| (name, format!("{scheme}{token}")))
}

/// On generated requests, ordinary and wild (methods, paths, credential headers repeated
/// or misplaced, tenants in every form), whatever the module answers itself it answers
/// exactly as the service does: status, body, upstream headers, removals, client
/// headers, metadata. What it hands over it learns from as the filter does, so what it
/// learned from odd requests is held to the service too. The module must answer most
/// of them, allows among them, and learn some, or this would prove nothing.
#[test]
fn on_generated_requests_what_the_module_answers_it_answers_as_the_service_does() {
    use proptest::test_runner::{Config as Cases, TestCaseError, TestRunner};
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (service, module, _follower, credentials) = runtime.block_on(async {
        let service = Service::start().await;
        let (module, follower) = Module::following(&service).await;
        let credentials = Credentials::made(&service, &module).await;
        (service, module, follower, credentials)
    });
    let requests = prop_oneof![credentials.ordinary(), credentials.wild()];
    let (asked, answered, allowed, learned) =
        (Cell::new(0), Cell::new(0), Cell::new(0), Cell::new(0));
    let mut runner = TestRunner::new(Cases {
        cases: 1_000,
        failure_persistence: None,
        ..Cases::default()
    });
    let outcome = runner.run(&requests, |r| {
        asked.set(asked.get() + 1);
        let local = module.decide(&r);
        if let Local::Defer(ticket) = &local {
            // As the filter does: asks the service to let it learn, and learns an allow.
            let answer = runtime.block_on(service.answer(&r.asking_to_learn()));
            if let Some(text) = learn_field(&answer) {
                learned.set(learned.get() + u32::from(module.decider.learn(ticket, &text).is_ok()));
            }
        }
        let by_module = Shown::of_module(local);
        if by_module == Shown::Deferred {
            return Ok(());
        }
        answered.set(answered.get() + 1);
        if matches!(by_module, Shown::Allow { .. }) {
            allowed.set(allowed.get() + 1);
        }
        let by_service = Shown::of_service(&runtime.block_on(service.answer(&r)));
        if by_module != by_service {
            return Err(TestCaseError::fail(format!(
                "{r:?}\n  module:  {by_module:?}\n  service: {by_service:?}"
            )));
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let (asked, answered, allowed, learned) =
        (asked.get(), answered.get(), allowed.get(), learned.get());
    assert!(
        answered * 2 >= asked && allowed * 5 >= asked && learned > 0,
        "of {asked} requests the module answered {answered} itself, {allowed} of them allows; \
         it learned {learned} answers"
    );
}
