//! Partner keys acting for delegated tenants, runtime keys on internal routes, partner
//! scopes, and key environments, through the Envoy adapter; and a withdrawn delegation
//! reaching every replica (through Redis, and through Watch).

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use keygate::api::proto::{self, partners_client::PartnersClient};
use keygate::config::{Config, RouteConfig, TenantRule};
use keygate::keys::{AdminError, KeyUpdate, NewKey};
use keygate::principal::Environment;
use keygate::revocation::FeedItem;
use keygate_test_support as support;
use keygate_test_support::{
    arrives, bearer, check_request, config, outcome, secrets, Backend, Deployment, Outcome,
    RedisServer, Replica, OTHER_TENANT, TENANT,
};

const PARTNER: &str = "acme-partners";

/// The shared test policy, plus: a partner-level billing family (no tenant), a tenant
/// family that requires the header, an internal family and a live-only family; and
/// `billing:partner:*` as partner scopes.
fn partner_config(backend: Backend<'_>) -> Config {
    let mut cfg = config(backend);
    let route = |name: &str, path: &str, scope: &str| RouteConfig {
        name: name.into(),
        methods: vec!["GET".into()],
        path: path.into(),
        scope: Some(scope.into()),
        public: false,
        tenant: None,
        credentials: None,
        internal: false,
        environments: None,
        lease_ttl: None,
        ..Default::default()
    };
    let mut billing = route(
        "partner-billing",
        "/v1/billing/partner/**",
        "billing:partner:read",
    );
    billing.tenant = Some(TenantRule::Optional);
    let mut projects = route("projects", "/v1/projects/**", "projects:read");
    projects.tenant = Some(TenantRule::Required);
    let mut internal = route("internal-jobs", "/internal/jobs/**", "jobs:run");
    internal.internal = true;
    let mut payments = route("payments", "/v1/payments/**", "payments:read");
    payments.environments = Some(vec![Environment::Live]);
    for r in [billing, projects, internal, payments] {
        cfg.policy.routes.insert(0, r);
    }
    cfg.policy.partner_scopes = vec!["billing:partner:*".into()];
    cfg
}

fn new_key(kind: &str, scopes: &[&str]) -> NewKey {
    NewKey {
        kind: kind.into(),
        tenant_id: if kind == "tenant" {
            TENANT.into()
        } else {
            String::new()
        },
        partner_id: if kind == "partner" {
            PARTNER.into()
        } else {
            String::new()
        },
        service: if kind == "runtime" {
            "billing-worker".into()
        } else {
            String::new()
        },
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..NewKey::default()
    }
}

async fn create(r: &Replica, kind: &str, scopes: &[&str]) -> String {
    r.app
        .admin
        .create(new_key(kind, scopes))
        .await
        .expect("the key is created")
        .token
}

/// GET `path` with `token`, and `X-Tenant-Id: tenant` if given: the outcome and, on an
/// allow, the headers set upstream and those removed.
async fn get(
    r: &Replica,
    token: &str,
    path: &str,
    tenant: Option<&str>,
) -> (Outcome, Vec<(String, String)>, Vec<String>) {
    let auth = bearer(token);
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(t) = tenant {
        headers.push(("x-tenant-id", t));
    }
    let result = r
        .app
        .envoy_service()
        .decide(check_request("GET", path, &headers))
        .await;
    let verdict = outcome(&result);
    let (mut set, mut removed) = (Vec::new(), Vec::new());
    if let Ok(resp) = result {
        if let Some(HttpResponse::OkResponse(ok)) = resp.http_response {
            for h in ok.headers {
                let h = h.header.unwrap();
                set.push((h.key, h.value));
            }
            removed = ok.headers_to_remove;
        }
    }
    set.sort();
    (verdict, set, removed)
}

async fn partners(r: &Replica) -> PartnersClient<tonic::transport::Channel> {
    PartnersClient::new(r.admin_channel().await)
}

async fn delegation(r: &Replica, tenant: &str, granted: bool) -> proto::DelegationResponse {
    let req = support::with_admin(
        &r.secrets,
        proto::DelegationRequest {
            partner_id: PARTNER.into(),
            tenant_id: tenant.into(),
        },
    );
    let mut client = partners(r).await;
    let resp = if granted {
        client.delegate(req).await
    } else {
        client.undelegate(req).await
    };
    resp.expect("the delegation call succeeds").into_inner()
}

fn header<'a>(set: &'a [(String, String)], name: &str) -> Option<&'a str> {
    set.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_acts_for_delegated_tenants_only_or_as_itself_where_no_tenant_is_needed() {
    let redis = RedisServer::start().await;
    let r = Replica::serving(partner_config(Backend::Redis(&redis)), &secrets()).await;
    let partner = create(
        &r,
        "partner",
        &["contacts:read", "projects:read", "billing:partner:read"],
    )
    .await;
    // Not delegated yet: the tenant is forbidden.
    let (o, _, _) = get(&r, &partner, support::READ_PATH, Some(TENANT)).await;
    assert_eq!(o, Outcome::denied("tenant_forbidden", 403));
    let granted = delegation(&r, TENANT, true).await;
    assert!(granted.changed);
    assert!(
        !delegation(&r, TENANT, true).await.changed,
        "granting twice"
    );

    let (o, set, _) = get(&r, &partner, support::READ_PATH, Some(TENANT)).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-tenant-id"), Some(TENANT));
    assert_eq!(header(&set, "x-keygate-partner"), Some(PARTNER));
    assert_eq!(header(&set, "x-keygate-kind"), Some("partner"));
    assert_eq!(header(&set, "x-keygate-environment"), Some("live"));

    let (o, _, _) = get(&r, &partner, support::READ_PATH, Some(OTHER_TENANT)).await;
    assert_eq!(o, Outcome::denied("tenant_forbidden", 403));
    let (o, _, _) = get(&r, &partner, "/v1/projects/7", None).await;
    assert_eq!(o, Outcome::denied("tenant_required", 400));

    // A partner-level route: the partner acts as itself, and no tenant goes upstream.
    let (o, set, removed) = get(&r, &partner, "/v1/billing/partner/invoices", None).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-tenant-id"), None, "{set:?}");
    assert_eq!(header(&set, "x-keygate-partner"), Some(PARTNER));
    assert!(!removed.contains(&"x-tenant-id".to_owned()));
    r.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_delegation_is_refused_on_another_replica_and_on_a_watch_follower() {
    let deployment = Deployment::start(partner_config).await;
    let (a, b) = (deployment.serving().await, deployment.serving().await);
    let remote_redis = RedisServer::start().await;
    let mut remote_cfg = partner_config(Backend::Redis(&remote_redis));
    remote_cfg.revocation.source = keygate::config::RevocationSource::Watch;
    remote_cfg.revocation.watch_url = format!("http://{}", a.running.grpc);
    // A replica in another region follows A's Watch (its own keys live in its own
    // Redis): the withdrawal must reach it too.
    let remote = Replica::serving(remote_cfg, &deployment.secrets).await;

    let partner = create(&a, "partner", &["contacts:read"]).await;
    delegation(&a, TENANT, true).await;
    for r in [&a, &b] {
        let (o, _, _) = get(r, &partner, support::READ_PATH, Some(TENANT)).await;
        assert_eq!(o, Outcome::Allowed, "delegated");
    }
    let mut b_events = b.app.bus.subscribe();
    let mut remote_events = remote.app.bus.subscribe();
    assert!(delegation(&a, TENANT, false).await.changed);
    for events in [&mut b_events, &mut remote_events] {
        let change = arrives(events, "the withdrawal", |item| match item {
            FeedItem::Delegation(d) => Some(d),
            _ => None,
        })
        .await;
        assert_eq!(
            (change.partner_id.as_str(), change.granted),
            (PARTNER, false)
        );
    }
    for r in [&a, &b] {
        // B had the delegation remembered: the withdrawal made it forget.
        let (o, _, _) = get(r, &partner, support::READ_PATH, Some(TENANT)).await;
        assert_eq!(o, Outcome::denied("tenant_forbidden", 403));
    }
    support::shut_down([a, b, remote]).await;
}

/// Delegation reads Redis answered since `CONFIG RESETSTAT` (one `SISMEMBER` each; the
/// delegation script's writes are `SADD`/`SREM`).
async fn delegation_reads(conn: &mut redis::aio::MultiplexedConnection) -> usize {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_sismember:calls="))
        .map_or(0, |rest| {
            rest.split(',').next().unwrap().parse().expect("a number")
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawing_one_tenant_keeps_the_partners_other_tenants_cached_on_every_replica() {
    let deployment = Deployment::start(partner_config).await;
    let (a, b) = (deployment.serving().await, deployment.serving().await);
    let partner = create(&a, "partner", &["contacts:read"]).await;
    delegation(&a, TENANT, true).await;
    delegation(&a, OTHER_TENANT, true).await;
    for r in [&a, &b] {
        for t in [TENANT, OTHER_TENANT] {
            let (o, _, _) = get(r, &partner, support::READ_PATH, Some(t)).await;
            assert_eq!(o, Outcome::Allowed, "delegated");
        }
    }
    let mut events = [a.app.bus.subscribe(), b.app.bus.subscribe()];
    assert!(delegation(&a, TENANT, false).await.changed);
    for events in &mut events {
        arrives(events, "the withdrawal", |item| match item {
            FeedItem::Delegation(_) => Some(()),
            _ => None,
        })
        .await;
    }
    let mut raw = deployment.redis.connection().await;
    let () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut raw)
        .await
        .unwrap();
    for r in [&a, &b] {
        let (o, _, _) = get(r, &partner, support::READ_PATH, Some(OTHER_TENANT)).await;
        assert_eq!(o, Outcome::Allowed, "still delegated");
    }
    assert_eq!(
        delegation_reads(&mut raw).await,
        0,
        "the other tenant's answer was remembered on both replicas"
    );
    for r in [&a, &b] {
        let (o, _, _) = get(r, &partner, support::READ_PATH, Some(TENANT)).await;
        assert_eq!(o, Outcome::denied("tenant_forbidden", 403));
    }
    assert_eq!(
        delegation_reads(&mut raw).await,
        2,
        "the withdrawn pair, read again once per replica"
    );
    support::shut_down([a, b]).await;
}

#[tokio::test]
async fn runtime_keys_pass_on_internal_routes_only_and_nothing_else_passes_there() {
    let redis = RedisServer::start().await;
    let r = Replica::serving(partner_config(Backend::Redis(&redis)), &secrets()).await;
    let runtime = create(&r, "runtime", &["jobs:run", "contacts:read"]).await;
    let tenant = create(&r, "tenant", &["jobs:run", "contacts:read"]).await;
    let partner = create(&r, "partner", &["jobs:run"]).await;

    let (o, set, _) = get(&r, &runtime, "/internal/jobs/run", None).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-keygate-kind"), Some("runtime"));
    assert_eq!(header(&set, "x-tenant-id"), None);
    // Acting for a tenant it names.
    let (o, set, _) = get(&r, &runtime, "/internal/jobs/run", Some(TENANT)).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-tenant-id"), Some(TENANT));

    let (o, _, _) = get(&r, &runtime, support::READ_PATH, None).await;
    assert_eq!(
        o,
        Outcome::denied("insufficient_permissions", 403),
        "customer route"
    );
    for other in [&tenant, &partner] {
        let (o, _, _) = get(&r, other, "/internal/jobs/run", None).await;
        assert_eq!(o, Outcome::denied("insufficient_permissions", 403));
    }
    r.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn partner_scopes_are_for_partner_keys_only() {
    let redis = RedisServer::start().await;
    let r = Replica::serving(partner_config(Backend::Redis(&redis)), &secrets()).await;
    for scopes in [&["billing:partner:read"][..], &["billing:partner:*"][..]] {
        let refused = r.app.admin.create(new_key("tenant", scopes)).await;
        assert!(
            matches!(
                &refused,
                Err(AdminError::InvalidArgument {
                    field: "scopes",
                    ..
                })
            ),
            "{:?}",
            refused.err()
        );
    }
    let refused = r
        .app
        .admin
        .create(new_key("runtime", &["billing:partner:read"]))
        .await;
    assert!(matches!(
        refused,
        Err(AdminError::InvalidArgument {
            field: "scopes",
            ..
        })
    ));

    // A tenant key with a wide wildcard still does not reach a partner scope.
    let wide = r.app.admin.create(new_key("tenant", &["*"])).await.unwrap();
    let (o, _, _) = get(&r, &wide.token, "/v1/billing/partner/x", None).await;
    assert_eq!(o, Outcome::denied("insufficient_permissions", 403));
    // Nor can it be updated into one.
    let update = r
        .app
        .admin
        .update(
            &wide.record.key_id,
            KeyUpdate {
                scopes: Some(vec!["billing:partner:read".into()]),
                ..KeyUpdate::default()
            },
        )
        .await;
    assert!(matches!(
        update,
        Err(AdminError::InvalidArgument {
            field: "scopes",
            ..
        })
    ));

    let partner = create(&r, "partner", &["billing:partner:*"]).await;
    let (o, _, _) = get(&r, &partner, "/v1/billing/partner/x", None).await;
    assert_eq!(o, Outcome::Allowed);
    r.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_test_key_is_refused_on_a_live_only_route() {
    let redis = RedisServer::start().await;
    let r = Replica::serving(partner_config(Backend::Redis(&redis)), &secrets()).await;
    let live = create(&r, "tenant", &["payments:read"]).await;
    let test = r
        .app
        .admin
        .create(NewKey {
            environment: "test".into(),
            ..new_key("tenant", &["payments:read"])
        })
        .await
        .unwrap()
        .token;
    let (o, set, _) = get(&r, &live, "/v1/payments/1", None).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-keygate-environment"), Some("live"));
    let (o, _, _) = get(&r, &test, "/v1/payments/1", None).await;
    assert_eq!(o, Outcome::denied("insufficient_permissions", 403));
    // Elsewhere the test key passes, and says so upstream.
    let elsewhere = r.app.admin.create(NewKey {
        environment: "test".into(),
        ..new_key("tenant", &["contacts:read"])
    });
    let elsewhere = elsewhere.await.unwrap().token;
    let (o, set, _) = get(&r, &elsewhere, support::READ_PATH, None).await;
    assert_eq!(o, Outcome::Allowed);
    assert_eq!(header(&set, "x-keygate-environment"), Some("test"));
    r.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_key_owners_and_delegations_name_the_field_and_change_nothing() {
    let redis = RedisServer::start().await;
    let r = Replica::serving(partner_config(Backend::Redis(&redis)), &secrets()).await;
    let field_of = |e: Result<_, AdminError>| match e {
        Err(AdminError::InvalidArgument { field, .. }) => field,
        other => panic!("not refused: {:?}", other.err()),
    };
    let partner = || new_key("partner", &[]);
    let cases: Vec<(NewKey, &str)> = vec![
        (partner().tap(|k| k.tenant_id = TENANT.into()), "tenant_id"),
        (
            partner().tap(|k| k.partner_id = String::new()),
            "partner_id",
        ),
        (
            partner().tap(|k| k.partner_id = "no spaces".into()),
            "partner_id",
        ),
        (partner().tap(|k| k.service = "svc".into()), "service"),
        (
            new_key("runtime", &[]).tap(|k| k.service = String::new()),
            "service",
        ),
        (
            new_key("tenant", &[]).tap(|k| k.partner_id = PARTNER.into()),
            "partner_id",
        ),
        (new_key("robot", &[]), "kind"),
    ];
    for (key, field) in cases {
        let res = r.app.admin.create(key).await.map(|c| c.record);
        assert_eq!(field_of(res), field);
    }
    let page = r
        .app
        .admin
        .list(
            &keygate::keys::KeyOwner {
                partner_id: PARTNER.into(),
                ..Default::default()
            },
            10,
            None,
        )
        .await
        .unwrap();
    assert!(page.keys.is_empty(), "nothing was created");

    let mut client = partners(&r).await;
    for (partner, tenant, field) in [("", TENANT, "partner_id"), (PARTNER, "acme", "tenant_id")] {
        let status = client
            .delegate(support::with_admin(
                &r.secrets,
                proto::DelegationRequest {
                    partner_id: partner.into(),
                    tenant_id: tenant.into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{status:?}");
    }
    let listed = client
        .list_delegations(support::with_admin(
            &r.secrets,
            proto::ListDelegationsRequest {
                partner_id: PARTNER.into(),
                tenant_id: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.delegations.is_empty());
    let unauthenticated = client
        .delegate(proto::DelegationRequest {
            partner_id: PARTNER.into(),
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);
    r.running.shutdown().await.unwrap();
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

impl Tap for NewKey {}
