//! Connections to Redis: the client (one Redis or a Cluster), the connections opened from
//! it (the shared one, each partition's blocking reader, the waiting writers'), and
//! running one exchange under the store's timeout. Knows nothing of what a command means:
//! key names, record formats and the store traits are the sibling files'.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

use super::failure::{outage, redis_outage, RedisFailure};
use super::RedisStore;
use crate::store::StoreError;

#[derive(Clone)]
pub(super) enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A connection to one Redis or to a Cluster (which follows MOVED, ASK and failovers
/// itself); every command below goes through one of these.
#[derive(Clone)]
pub(super) enum Conn {
    Single(Managed),
    Cluster(ClusterConnection),
}

/// One Redis's connection manager, shared, so that `Health` can bring it back after an
/// outage without keeping it alive. A command goes through a clone of the manager (which
/// shares its connection): the shared one cannot be borrowed mutably.
#[derive(Clone)]
pub(super) struct Managed(Arc<ConnectionManager>);

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => {
                let mut manager = ConnectionManager::clone(&c.0);
                Box::pin(async move { manager.send_packed_command(cmd).await })
            }
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => {
                let mut manager = ConnectionManager::clone(&c.0);
                Box::pin(async move { manager.send_packed_commands(cmd, offset, count).await })
            }
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.0.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisStore {
    pub(super) async fn conn(&self) -> Result<Conn, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let mut conn = self.open(self.timeout).await?;
                self.check_layout(&mut conn).await?;
                Ok::<_, StoreError>(conn)
            })
            .await?;
        Ok(conn.clone())
    }

    /// A connection of its own for blocking reads of `partition`.
    pub(super) async fn blocking_conn(
        &self,
        partition: usize,
        response_timeout: Duration,
    ) -> Result<Conn, StoreError> {
        // The shared connection first: it checks the layout.
        self.conn().await?;
        let conn = self.blocking[partition]
            .get_or_try_init(|| self.open(response_timeout))
            .await?;
        Ok(conn.clone())
    }

    async fn open(&self, response_timeout: Duration) -> Result<Conn, StoreError> {
        const WHAT: &str = "connecting to Redis";
        let epoch = self.health.admit(WHAT)?;
        let connect = async {
            match &self.client {
                Client::Single(client) => {
                    // No retry inside the connection manager: its backoff (with jitter)
                    // outlasts `timeout`, so a refused connection was reported as a
                    // timeout. Every caller retries on its own schedule.
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(response_timeout)
                        .set_number_of_retries(0);
                    let manager =
                        Arc::new(ConnectionManager::new_with_config(client.clone(), config).await?);
                    self.health.opened(&manager);
                    Ok(Conn::Single(Managed(manager)))
                }
                Client::Cluster(client) => {
                    let config = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(self.timeout)
                        .set_response_timeout(response_timeout);
                    client
                        .get_async_connection_with_config(config)
                        .await
                        .map(Conn::Cluster)
                }
            }
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| outage(WHAT, RedisFailure::TimedOut(self.timeout)))?
            .map_err(|e| self.health.failed(WHAT, e, epoch))
    }

    /// `cmd` (which names no key) on the master of `slot`, through `conn`; `what` says
    /// what it is for.
    pub(super) async fn on_slot_master<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        conn: &mut Conn,
        slot: u16,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let limit = self.timeout * 2;
        match conn {
            Conn::Single(_) => self.run_for(what, limit, cmd.query_async(conn)).await,
            Conn::Cluster(c) => {
                // Sent to the master of the slot, on the connection the script went
                // through (WAIT counts that connection's writes).
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                let value = self
                    .run_for(what, limit, c.route_command(cmd, route))
                    .await?;
                redis::from_redis_value(&value).map_err(|e| redis_outage(what, &e))
            }
        }
    }

    /// A connection of its own for calls followed by `WAIT` (which blocks its
    /// connection), opened on first use, after the shared one.
    pub(super) async fn waiting_conn(&self, cell: &OnceCell<Conn>) -> Result<Conn, StoreError> {
        self.conn().await?;
        let conn = cell.get_or_try_init(|| self.open(self.timeout * 2)).await?;
        Ok(conn.clone())
    }

    /// Runs one Redis exchange under the store's timeout; `what` names it in the outage
    /// it may fail with ("reading a key record").
    pub(super) async fn run<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.run_for(what, self.timeout, f).await
    }

    /// Runs one Redis exchange under `limit`; at once an error while Redis is marked down
    /// (`Health`), without sending anything.
    pub(super) async fn run_for<T>(
        &self,
        what: &'static str,
        limit: Duration,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let epoch = self.health.admit(what)?;
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(|e| self.health.failed(what, e, epoch)),
            Err(_) => Err(outage(what, RedisFailure::TimedOut(limit))),
        }
    }
}
