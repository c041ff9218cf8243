//! keygate replicas serving on ephemeral ports, deployments of them on a Redis of their
//! own, what reaches their revocation bus, and calls to their admin API.

use std::sync::Arc;

use keygate::config::{Config, Secrets};

use crate::{
    bearer, config, eventually, outcome, read_with, secrets, Backend, Outcome, RedisServer,
    PATIENCE,
};

/// One keygate replica, serving on ephemeral ports. Replicas of one deployment share
/// their `secrets` (pepper, admin and watch tokens).
pub struct Replica {
    pub app: Arc<keygate::server::App>,
    pub running: keygate::server::Running,
    pub secrets: Secrets,
}

/// Replicas of one deployment on a Redis of their own: one configuration, shared secrets.
pub struct Deployment {
    pub redis: RedisServer,
    pub secrets: Secrets,
    configure: fn(Backend<'_>) -> Config,
}

impl Deployment {
    /// A fresh Redis and fresh secrets; each replica configured by `configure` (`config`,
    /// or a test's own).
    pub async fn start(configure: fn(Backend<'_>) -> Config) -> Deployment {
        Deployment::with_secrets(configure, secrets()).await
    }

    pub async fn with_secrets(
        configure: fn(Backend<'_>) -> Config,
        secrets: Secrets,
    ) -> Deployment {
        let redis = RedisServer::start().await;
        Deployment {
            redis,
            secrets,
            configure,
        }
    }

    /// The configuration of this deployment's replicas (to change before one starts).
    pub fn config(&self) -> Config {
        (self.configure)(Backend::Redis(&self.redis))
    }

    /// An `App` of this deployment, not serving.
    pub fn app(&self) -> Arc<keygate::server::App> {
        let app = keygate::server::App::build(self.config(), self.secrets.clone());
        Arc::new(app.expect("the app builds"))
    }

    /// A replica, started (`Replica::start`).
    pub async fn started(&self) -> Replica {
        Replica::start(self.config(), &self.secrets).await
    }

    /// A replica once it answers checks (`Replica::serving`).
    pub async fn serving(&self) -> Replica {
        Replica::serving(self.config(), &self.secrets).await
    }
}

/// Waits until `events` (a replica's bus, `app.bus.subscribe()`) carries an item `wanted`
/// takes (`Some`), and returns what it made of it; fails the test as `what` after
/// `PATIENCE`. Items before it, and a lag, are passed over.
pub async fn arrives<T>(
    events: &mut tokio::sync::broadcast::Receiver<keygate::revocation::FeedEntry>,
    what: &str,
    mut wanted: impl FnMut(keygate::revocation::FeedItem) -> Option<T>,
) -> T {
    use tokio::sync::broadcast::error::RecvError;
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(entry) => {
                    if let Some(found) = wanted(entry.item) {
                        return found;
                    }
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => panic!("{what}: the bus closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what}: did not arrive within {PATIENCE:?}"))
}

/// A plaintext HTTP/2 channel to a listener at `addr`, connected.
pub async fn channel_to(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"));
    let endpoint = endpoint.expect("an http URL");
    let connected = endpoint.connect().await;
    connected.unwrap_or_else(|e| panic!("the listener at {addr} answers: {e}"))
}

/// Shuts each replica down (its listeners closed, its tasks ended).
pub async fn shut_down(replicas: impl IntoIterator<Item = Replica>) {
    for r in replicas {
        r.running.shutdown().await.expect("the replica shuts down");
    }
}

/// `n` replicas on `backend` with argon2 at its production cost (what the benchmarks
/// measure), once each follows its revocation stream.
pub async fn replicas_at_production_cost(
    backend: Backend<'_>,
    secrets: &Secrets,
    n: usize,
) -> Vec<(Arc<keygate::server::App>, keygate::server::Running)> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        let mut cfg = config(backend);
        cfg.api_keys.argon2 = keygate::config::Argon2Config::default();
        let app = Arc::new(keygate::server::App::build(cfg, secrets.clone()).expect("builds"));
        let running = keygate::server::start(app.clone()).await.expect("starts");
        replicas.push((app, running));
    }
    for (app, _) in &replicas {
        eventually(PATIENCE, "replica follows the stream", || async {
            (app.bus.has_position() && app.bus.is_connected()).then_some(())
        })
        .await;
    }
    replicas
}

impl Replica {
    pub async fn start(config: Config, secrets: &Secrets) -> Replica {
        let app =
            Arc::new(keygate::server::App::build(config, secrets.clone()).expect("replica builds"));
        let running = keygate::server::start(app.clone())
            .await
            .expect("replica starts");
        Replica {
            app,
            running,
            secrets: secrets.clone(),
        }
    }

    /// `start`, then wait until it answers checks (its follower has its position).
    pub async fn serving(config: Config, secrets: &Secrets) -> Replica {
        let replica = Replica::start(config, secrets).await;
        positioned(&replica.app).await;
        replica
    }

    /// A replica on `redis`, with fresh secrets, once it follows the stream.
    pub async fn following_on(redis: &RedisServer) -> Replica {
        let replica = Replica::start(config(Backend::Redis(redis)), &secrets()).await;
        replica.following().await;
        replica
    }

    /// Waits until this replica follows its revocation feed.
    pub async fn following(&self) {
        eventually(
            PATIENCE,
            "replica follows the revocation stream",
            || async { self.app.bus.is_connected().then_some(()) },
        )
        .await;
    }

    /// A `contacts:read` request with `token` as a Bearer credential.
    pub async fn check(&self, token: &str) -> Outcome {
        outcome(&self.app.envoy_service().decide(read_with(token)).await)
    }

    pub fn watch_token(&self) -> String {
        self.secrets
            .watch_token
            .as_ref()
            .expect("the test secrets have a watch token")
            .expose()
            .to_owned()
    }

    /// A channel to the admin listener (calls still need `with_admin`).
    pub async fn admin_channel(&self) -> tonic::transport::Channel {
        channel_to(self.running.admin).await
    }

    /// A channel to the gRPC listener (Envoy's, keygate.v1's, Watch's).
    pub async fn grpc_channel(&self) -> tonic::transport::Channel {
        channel_to(self.running.grpc).await
    }

    pub async fn admin(
        &self,
    ) -> keygate::api::proto::keys_client::KeysClient<tonic::transport::Channel> {
        keygate::api::proto::keys_client::KeysClient::new(self.admin_channel().await)
    }
}

/// Waits until the replica's revocation follower has its position: a served replica
/// answers checks only from then on.
pub async fn positioned(app: &keygate::server::App) {
    eventually(PATIENCE, "the follower has its position", || async {
        app.bus.has_position().then_some(())
    })
    .await;
}

/// An admin API request carrying the admin credential.
pub fn with_admin<T>(secrets: &Secrets, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        bearer(secrets.admin_token.expose()).parse().unwrap(),
    );
    req
}
