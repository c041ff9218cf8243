//! Changes of state that must survive a failover: `write` runs one on the writes' own
//! connection and `await_replicas` waits (WAIT) until enough replicas have it. Says
//! nothing of what is changed: callers build the script or command.

use super::conn::Conn;
use super::failure::outage;
use super::layout::slot_of_tag;
use super::RedisStore;
use crate::store::StoreError;

/// What `RedisStore::await_replicas` accepts when fewer replicas than `replica_acks`
/// acknowledge a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acks {
    /// As many as the master has connected (admin changes: a revocation in force is not
    /// reported as failed because the master has lost its replica).
    AllConnected,
    /// `replica_acks`, whatever the master has (rate-limit grants: one not on a replica
    /// is not spent).
    Strict,
}

/// A change for `RedisStore::write`.
pub(super) enum Change<'a> {
    Script(&'a redis::ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

impl RedisStore {
    /// Runs a script that changes state in `partition` on the writes' own connection, then
    /// waits until `replica_acks` replicas of that partition's master have it: a change
    /// acknowledged to the caller survives the master's failover. The wait blocks its
    /// connection, which is why writes do not share the request path's. `what` names the
    /// change in the outage it may fail with.
    pub(super) async fn write<T: redis::FromRedisValue>(
        &self,
        what: &'static str,
        partition: usize,
        change: Change<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.waiting_conn(&self.writes).await?;
        let out = match change {
            Change::Script(invocation) => {
                self.run(what, invocation.invoke_async(&mut conn)).await?
            }
            Change::Command(cmd) => self.run(what, cmd.query_async(&mut conn)).await?,
        };
        let slot = slot_of_tag(&self.layout.tags[partition]);
        self.await_replicas(&mut conn, slot, Acks::AllConnected)
            .await?;
        Ok(out)
    }

    /// After a write through `conn` to `slot`, waits until `replica_acks` replicas of the
    /// slot's master have it (nothing to wait for with `replica_acks` 0). Fewer answered:
    /// with `Acks::AllConnected`, enough if they are all the master has connected;
    /// otherwise UNAVAILABLE, the write on the master only.
    pub(super) async fn await_replicas(
        &self,
        conn: &mut Conn,
        slot: u16,
        acks: Acks,
    ) -> Result<(), StoreError> {
        let (what, waiting) = match acks {
            Acks::AllConnected => ("change", "waiting for replicas to have a change"),
            Acks::Strict => ("reservation", "waiting for replicas to have a reservation"),
        };
        if self.replica_acks == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(self.replica_acks)
            .arg(self.timeout.as_millis() as u64);
        let acked: u32 = self.on_slot_master(waiting, conn, slot, &wait).await?;
        if acked >= self.replica_acks {
            return Ok(());
        }
        if acks == Acks::Strict {
            return Err(outage(
                waiting,
                format!(
                    "the {what} reached {acked} replica(s) in time, store.replica_acks is {}: \
                 not spent (a failover could lose it)",
                    self.replica_acks
                ),
            ));
        }
        // Fewer answered than asked: wait for the replicas there are. A master left with
        // none (its replica failed over to it, or died) has nobody to copy to; refusing
        // then would report a revocation that is in force as failed.
        let info: String = self
            .on_slot_master(waiting, conn, slot, redis::cmd("INFO").arg("replication"))
            .await?;
        let connected: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        if acked >= self.replica_acks.min(connected) {
            tracing::warn!(event = "store.replica_acks_short", 
                slot,
                acked,
                wanted = self.replica_acks,
                "a {what} was acknowledged by fewer replicas than store.replica_acks: its master has no more connected"
            );
            return Ok(());
        }
        Err(outage(
            waiting,
            format!(
                "the {what} is on the master, but {acked} of its {connected} replica(s) \
             acknowledged it in time (store.replica_acks is {}): a failover now could lose \
             it; retry (the call is idempotent)",
                self.replica_acks
            ),
        ))
    }
}
