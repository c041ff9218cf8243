//! keygate replicas serving on ephemeral ports, and calls to their admin API.

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
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.running.admin))
            .unwrap()
            .connect()
            .await
            .expect("admin listener answers")
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
