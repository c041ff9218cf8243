//! Wiring: builds the core from configuration and serves it on its three listeners —
//! gRPC (Envoy Check, keygate.v1.Authorizer, Revocations/Watch behind the watch token,
//! health, reflection), admin gRPC (keygate.v1.Keys and Revocations/Watch, behind the
//! admin credential) and HTTP (/metrics, /healthz, /readyz, /.well-known/jwks.json).
//!
//! Checks are answered only once the revocation follower knows its position in the
//! stream, and `grpc.health.v1` says per service what `/readyz` says.
//!
//! One file over 500 lines because it is the wiring and nothing else: what is built, which
//! listener serves what, and the order of shutdown; readiness is `health.rs`, the rules
//! and their reload `rules.rs` and `live.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::authorizer::AuthorizerService;
use crate::api::envoy::{EnvoyAuthorization, EnvoyOptions};
use crate::api::envoy_wire::AuthorizationServer;
use crate::api::keys::{admin_auth, bearer_auth};
use crate::api::proto::{
    authorizer_server::AuthorizerServer, keys_server::KeysServer, partners_server::PartnersServer,
    revocations_server::RevocationsServer,
};
use crate::api::revocations::{RevocationsService, WatchFeed};
use crate::apikey::SecretHasher;
use crate::authorizer::Authorizer;
use crate::cache::CredentialCache;
use crate::config::{Config, RevocationSource, Secrets, StoreBackend};
use crate::decision::ErrorShape;
use crate::keys::KeyAdmin;
use crate::revocation::{EventFeed, RevocationBus, StoreFeed};
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::KeyStore;
use crate::tls::ListenerTls;
use crate::transport::incoming;

mod health;
mod live;
pub mod module;
mod rules;
pub use health::LIVENESS;
use health::{readiness, report_health, HEALTH_SERVICES};
pub use live::{follow_file, Hangup, Live, LiveRules, ReloadError, Reloaded, FILE_CHECK};
pub use rules::{Rules, Shared};

/// The core, built from configuration, without any listener.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn KeyStore>,
    pub cache: Arc<CredentialCache>,
    pub hasher: SecretHasher,
    pub authorizer: Arc<Authorizer>,
    pub admin: Arc<KeyAdmin>,
    pub token_admin: Arc<crate::keys::TokenAdmin>,
    pub partners: Arc<crate::keys::PartnerAdmin>,
    /// Requests per key, flushed to the store every `api_keys.usage_flush_interval`.
    pub usage: Arc<crate::usage::UsageCounter>,
    pub bus: Arc<RevocationBus>,
    /// What this replica remembers of partners' delegations.
    pub delegations: Arc<crate::tenant::Delegations>,
    pub jwt: Arc<crate::jwt::JwtVerifier>,
    /// How denials look to clients (`errors`), on every API.
    pub errors: Arc<ErrorShape>,
    /// keygate's own session-token keys, when `sessions` is configured.
    pub sessions: Option<Arc<crate::jwt::session::SessionKeys>>,
    /// The rules the listeners answer with: those above at startup, then whatever a live
    /// reload of the configuration file put in their place.
    pub live: Arc<Live>,
    /// TLS of the gRPC and admin listeners (`listen.grpc_tls`, `listen.admin_tls`).
    pub grpc_tls: Option<ListenerTls>,
    pub admin_tls: Option<ListenerTls>,
    admin_token: crate::secret::Secret,
    watch_token: Option<crate::secret::Secret>,
}

impl App {
    /// Everything `serve` needs, read and checked, short of the store and the listeners:
    /// secrets, keys, issuers, TLS files, policy, error shapes. It binds no port and does
    /// not reach the store (`serve --check` stops after it, so both refuse the same).
    pub fn build(config: Config, secrets: Secrets) -> anyhow::Result<App> {
        let store: Arc<dyn KeyStore> = match config.store.backend {
            StoreBackend::Memory => Arc::new(MemoryStore::new()),
            StoreBackend::Redis => {
                let tls_ca = match &config.store.tls_ca_file {
                    None => None,
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        crate::config::ConfigError::new(
                            "store.tls_ca_file",
                            format!("cannot read {path}: {e}"),
                        )
                    })?),
                };
                Arc::new(RedisStore::with_options(
                    &config.store.redis_url,
                    secrets.redis_password.as_ref(),
                    &config.store.namespace,
                    config.store.timeout,
                    &crate::store::redis::RedisOptions {
                        username: config.store.username.clone(),
                        tls_ca,
                        cluster_nodes: config.store.cluster_nodes.clone(),
                        partitions: config.store.partitions(),
                        replica_acks: config.store.replica_acks(),
                    },
                )?)
            }
        };
        App::with_store(config, secrets, store)
    }

    /// Builds the core around a given store (tests share one between replicas).
    pub fn with_store(
        config: Config,
        secrets: Secrets,
        store: Arc<dyn KeyStore>,
    ) -> anyhow::Result<App> {
        let usage = store.clone();
        App::with_usage_sink(config, secrets, store, usage)
    }

    /// The same, with the usage it counts written to `usage` instead of the store: the
    /// module inside Envoy reports its usage to the keygate it follows.
    pub fn with_usage_sink(
        config: Config,
        secrets: Secrets,
        store: Arc<dyn KeyStore>,
        usage: Arc<dyn crate::store::UsageSink>,
    ) -> anyhow::Result<App> {
        if config.revocation.source == RevocationSource::Watch && secrets.watch_token.is_none() {
            return Err(crate::config::ConfigError::new(
                "KEYGATE_WATCH_TOKEN",
                "revocation.source is watch: set the other keygate's watch token",
            )
            .into());
        }
        let hasher = SecretHasher::new(secrets.pepper.clone(), &config.api_keys.argon2)?;
        let cache = Arc::new(CredentialCache::new(&config.cache, &secrets.pepper));
        let revoked_tokens = Arc::new(crate::jwt::revoked::RevokedTokens::new());
        let audit = Arc::new(crate::audit::Audit::new(
            store.clone(),
            &secrets.admin_token,
        ));
        let tls = |t: &Option<crate::config::TlsConfig>, field: &str| {
            t.as_ref().map(|t| ListenerTls::load(t, field)).transpose()
        };
        let grpc_tls = tls(&config.listen.grpc_tls, "listen.grpc_tls")?;
        let admin_tls = tls(&config.listen.admin_tls, "listen.admin_tls")?;
        let delegations = Arc::new(crate::tenant::Delegations::new(
            store.clone(),
            config.cache.ttl,
        ));
        let usage = Arc::new(crate::usage::UsageCounter::new(usage));
        let bus = Arc::new(RevocationBus::new(
            cache.clone(),
            revoked_tokens.clone(),
            delegations.clone(),
        ));
        let partners = Arc::new(crate::keys::PartnerAdmin::new(
            store.clone(),
            delegations.clone(),
            audit.clone(),
        ));
        let remembered = delegations.clone();
        let shared = Shared {
            store: store.clone(),
            hasher: hasher.clone(),
            cache: cache.clone(),
            revoked_tokens,
            audit,
            delegations,
            usage: usage.clone(),
            bus: bus.clone(),
            failures: Arc::new(crate::authn::FailureBudget::new(&config.api_keys.argon2)),
            secrets: secrets.clone(),
        };
        let rules = Rules::build(config.clone(), &shared, None)?;
        Ok(App {
            store,
            cache,
            hasher,
            authorizer: rules.authorizer.clone(),
            admin: rules.admin.clone(),
            token_admin: rules.token_admin.clone(),
            partners,
            usage,
            bus,
            delegations: remembered,
            jwt: rules.issuers.jwt.clone(),
            errors: rules.errors.clone(),
            sessions: rules.issuers.sessions.clone(),
            live: Arc::new(Live::new(rules, shared)),
            config,
            grpc_tls,
            admin_tls,
            admin_token: secrets.admin_token,
            watch_token: secrets.watch_token,
        })
    }

    /// Where this replica's revocation events come from.
    pub fn revocation_feed(&self) -> Arc<dyn EventFeed> {
        let r = &self.config.revocation;
        match r.source {
            RevocationSource::Store => Arc::new(StoreFeed::new(self.store.clone(), r.read_block)),
            RevocationSource::Watch => Arc::new(WatchFeed::new(
                r.watch_url.clone(),
                self.watch_token
                    .clone()
                    .expect("checked in App::with_store"),
                r.read_block,
            )),
        }
    }

    fn revocations_service(&self, stop: watch::Receiver<bool>) -> RevocationsService {
        RevocationsService::new(
            self.store.clone(),
            self.bus.clone(),
            self.usage.clone(),
            stop,
        )
    }

    pub fn envoy_service(&self) -> EnvoyAuthorization {
        EnvoyAuthorization::new(
            self.authorizer.clone(),
            self.errors.clone(),
            EnvoyOptions {
                strip_credentials: self.config.policy.strip_credential_headers,
                dynamic_metadata: self.config.policy.dynamic_metadata,
                rules: self.config.rules_id(),
            },
        )
    }

    pub fn authorizer_service(&self) -> AuthorizerService {
        AuthorizerService::new(self.authorizer.clone(), self.errors.clone())
    }
}

/// A running server: its bound addresses, and the handle to stop it.
pub struct Running {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub http: SocketAddr,
    /// The HTTP authorization listener, when `listen.http_authz` is set.
    pub http_authz: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    drain_delay: Duration,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Running {
    /// Stops accepting, lets in-flight calls finish, and waits for the listeners.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.draining.send(true);
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// What stops this server the way SIGTERM should (see `Drainer::drain`), usable
    /// while something else waits on the server.
    pub fn drainer(&self) -> Drainer {
        Drainer {
            stop: self.stop.clone(),
            draining: self.draining.clone(),
            delay: self.drain_delay,
        }
    }

    /// Waits until every listener has stopped (after `shutdown` or a failure).
    pub async fn wait(self) -> anyhow::Result<()> {
        for t in self.tasks {
            t.await??;
        }
        Ok(())
    }
}

/// Drains a running server.
pub struct Drainer {
    stop: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    delay: Duration,
}

impl Drainer {
    /// Reports NOT_SERVING at once, keeps serving for `listen.drain_delay` while load
    /// balancers take this replica out, then stops accepting; in-flight calls finish,
    /// usage is flushed and Watch streams end before the server's tasks do.
    pub async fn drain(self) {
        let _ = self.draining.send(true);
        tracing::info!(event = "server.draining", delay = ?self.delay, "draining: reporting NOT_SERVING, still serving");
        tokio::time::sleep(self.delay).await;
        let _ = self.stop.send(true);
    }
}

/// Serves `router` on `listener` until `stop` (an HTTP listener: health, metrics and JWKS,
/// or HTTP authorization).
fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    stop: watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stopped(stop))
            .await?;
        Ok(())
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (listen.{what}): {e}"))
}

/// Binds the three listeners and serves until `shutdown` is called.
pub async fn start(app: Arc<App>) -> anyhow::Result<Running> {
    let cfg = &app.config;
    // A store written with another layout stops startup here, naming the setting; one
    // that cannot be reached yet is waited for (the replica is not ready meanwhile).
    if let Err(crate::store::StoreError::Corrupt(e)) = app.store.ping().await {
        anyhow::bail!("{e}");
    }
    let grpc_listener = bind(cfg.listen.grpc, "grpc").await?;
    let admin_listener = bind(cfg.listen.admin, "admin").await?;
    let http_listener = bind(cfg.listen.http, "http").await?;
    let http_authz_listener = match cfg.listen.http_authz {
        Some(addr) => Some(bind(addr, "http_authz").await?),
        None => None,
    };
    let grpc = grpc_listener.local_addr()?;
    let admin = admin_listener.local_addr()?;
    let http = http_listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let (health, health_service) = tonic_health::server::health_reporter();
    // Known from the first probe on, as not serving until readiness says otherwise.
    for name in HEALTH_SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let (draining_tx, draining_rx) = watch::channel(false);
    tasks.push(tokio::spawn({
        let (bus, draining) = (app.bus.clone(), draining_rx.clone());
        async move {
            report_health(health, bus, draining).await;
            Ok(())
        }
    }));

    for tls in app.grpc_tls.iter().chain(&app.admin_tls) {
        tasks.push(tokio::spawn(tls.clone().watch(stop_rx.clone()).map(Ok)));
    }
    app.live.current().issuers.spawn_refresh(stop_rx.clone());
    if app.live.path().is_some() {
        tasks.push(tokio::spawn(
            live::follow_file(app.live.clone(), stop_rx.clone(), Hangup::Reloads).map(Ok),
        ));
    }
    let follower = tokio::spawn(
        app.bus
            .clone()
            .follow(app.revocation_feed(), stop_rx.clone()),
    );
    let usage = tokio::spawn(
        app.usage
            .clone()
            .run(cfg.api_keys.usage_flush_interval, stop_rx.clone()),
    );
    tasks.push(tokio::spawn(async move {
        usage.await?;
        Ok(())
    }));
    tasks.push(tokio::spawn(async move {
        follower.await?;
        Ok(())
    }));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::api::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let grpc_server = tonic::transport::Server::builder()
        .max_connection_age(cfg.listen.max_connection_age)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AuthorizationServer::new(LiveRules(app.live.clone())))
        .add_service(AuthorizerServer::new(LiveRules(app.live.clone())))
        .add_service(RevocationsServer::with_interceptor(
            app.revocations_service(stop_rx.clone()),
            bearer_auth(
                app.watch_token.iter().cloned().collect(),
                "Watch needs the watch token (KEYGATE_WATCH_TOKEN) on this port",
            ),
        ))
        .serve_with_incoming_shutdown(
            incoming(grpc_listener, app.grpc_tls.clone()),
            stopped(stop_rx.clone()),
        );
    tasks.push(tokio::spawn(async move { Ok(grpc_server.await?) }));

    let admin_server = tonic::transport::Server::builder()
        .add_service(PartnersServer::with_interceptor(
            crate::api::partners::PartnersService::new(app.partners.clone()),
            admin_auth(app.admin_token.clone()),
        ))
        .add_service(KeysServer::with_interceptor(
            LiveRules(app.live.clone()),
            admin_auth(app.admin_token.clone()),
        ))
        .add_service(RevocationsServer::with_interceptor(
            app.revocations_service(stop_rx.clone()),
            admin_auth(app.admin_token.clone()),
        ))
        .serve_with_incoming_shutdown(
            incoming(admin_listener, app.admin_tls.clone()),
            stopped(stop_rx.clone()),
        );
    tasks.push(tokio::spawn(async move { Ok(admin_server.await?) }));

    let store = app.store.clone();
    let cache = app.cache.clone();
    let bus = app.bus.clone();
    let draining = draining_rx.clone();
    let (ready_live, jwks_live) = (app.live.clone(), app.live.clone());
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let store = store.clone();
                let bus = bus.clone();
                let draining = *draining.borrow();
                let reload_failure = ready_live.last_failure();
                async move {
                    let (status, mut body) = readiness(store.as_ref(), &bus, draining).await;
                    // Still serving, on the rules it had: said, not hidden.
                    if let Some(failure) = reload_failure {
                        body.push_str(&format!("config: {failure}\n"));
                    }
                    (status, body)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let cache = cache.clone();
                async move {
                    crate::telemetry::metrics()
                        .cache_entries
                        .set(cache.entry_count() as i64);
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        crate::telemetry::render(),
                    )
                }
            }),
        )
        .route(
            "/.well-known/jwks.json",
            get(move || {
                let jwks = jwks_live
                    .current()
                    .issuers
                    .sessions
                    .as_ref()
                    .map(|k| k.jwks());
                async move {
                    match jwks {
                        Some(body) => (
                            StatusCode::OK,
                            [
                                ("content-type", "application/json"),
                                // Replicas and clients may keep it a while; a rotation adds
                                // the new key well before it signs.
                                ("cache-control", "public, max-age=300"),
                            ],
                            body.to_string(),
                        ),
                        None => (
                            StatusCode::NOT_FOUND,
                            [
                                ("content-type", "text/plain"),
                                ("cache-control", "no-cache"),
                            ],
                            "session tokens are not configured (sessions.signing_keys)\n"
                                .to_owned(),
                        ),
                    }
                }
            }),
        );
    tasks.push(serve_http(http_listener, router, stop_rx.clone()));

    let http_authz = match http_authz_listener {
        None => None,
        Some(listener) => {
            let addr = listener.local_addr()?;
            let router = axum::Router::new()
                .fallback(crate::api::http_authz::handle)
                .with_state(app.live.clone() as Arc<dyn crate::api::envoy::CurrentEnvoy>);
            tasks.push(serve_http(listener, router, stop_rx.clone()));
            Some(addr)
        }
    };

    tracing::info!(event = "server.listening", %grpc, %admin, %http, http_authz = ?http_authz, store = ?cfg.store.backend, "keygate listening");
    Ok(Running {
        grpc,
        admin,
        http,
        http_authz,
        stop,
        draining: draining_tx,
        drain_delay: cfg.listen.drain_delay,
        tasks,
    })
}
