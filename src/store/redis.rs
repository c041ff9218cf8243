//! The Redis store.
//!
//! Layout (every key under one hash tag, so each multi-key script stays in one Redis
//! Cluster slot; key records are small and few next to the request traffic, which never
//! writes here):
//!
//! - `<ns>:{keys}:key:<key_id>`   hash: `data` (record JSON, no secret), `revoked_at_ms`
//! - `<ns>:{keys}:tenant:<id>`    sorted set of key ids (score 0, ordered by id); likewise
//!   `partner:<id>` and `service:<name>` for partner and runtime keys
//! - `<ns>:{keys}:deleg:partner:<id>` / `deleg:tenant:<id>`  sets: a partner's tenants, a
//!   tenant's partners
//! - `<ns>:{keys}:tokens`         hash: JWT revocations, rule key → JSON
//! - `<ns>:{keys}:tokens:expiry`  sorted set: rule key by expiry (unix ms), for pruning
//! - `<ns>:{keys}:events`         the revocation stream (XADD MAXLEN ~)
//! - `<ns>:{keys}:audit`          the audit trail (XADD MAXLEN ~), entry JSON
//!
//! A key's rate-limit state and leases sit under a hash tag of their own key id, so a
//! Cluster spreads them (they are what requests write):
//!
//! - `<ns>:{<key_id>}:rate`       the GCRA state (theoretical arrival time, unix ms)
//! - `<ns>:{<key_id>}:leases`     sorted set: lease id by expiry
//!
//! Writes that touch more than one key are Lua scripts rather than MULTI/EXEC: a script
//! can read and decide (does the key exist? is it already revoked?) inside the same atomic
//! step, which MULTI cannot without WATCH retries.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::OnceCell;

use super::{
    Delegation, DelegationEvent, DelegationsOf, EventId, EventKind, KeyChange, KeyPage, KeyRecord,
    KeyStore, KeyUsage, LeaseOp, LeaseResult, Owner, RateGrant, RateRequest, RevocationEvent,
    StoreError, StreamEntry, TokenRevocation, TokenRevocationEvent, UsageDelta, DELEGATED,
    TOKENS_REVOKED, UNDELEGATED,
};
use crate::secret::Secret;

/// Approximate bound on the revocation stream's length.
pub const STREAM_MAX_LEN: usize = 100_000;

pub struct RedisStore {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    /// Blocking stream reads get a connection of their own: a blocked XREAD would
    /// otherwise hold up every request multiplexed on the shared one.
    blocking: OnceCell<ConnectionManager>,
    timeout: Duration,
    ns: String,
    create: Script,
    revoke: Script,
    update: Script,
    delete: Script,
    revoke_tokens: Script,
    delegation: Script,
    reserve: Script,
    lease: Script,
    usage: Script,
}

/// How to reach Redis beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// The ACL user.
    pub username: Option<String>,
    /// PEM of the CA a `rediss://` server's certificate must chain to.
    pub tls_ca: Option<Vec<u8>>,
}

impl RedisStore {
    /// Prepares a store; the connection is made on first use, so keygate can start (and
    /// report itself not ready) while Redis is still coming up.
    pub fn new(
        url: &str,
        password: Option<&Secret>,
        namespace: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        Self::with_options(url, password, namespace, timeout, &RedisOptions::default())
    }

    /// `new`, as an ACL user, and over TLS checked against a CA of its own.
    pub fn with_options(
        url: &str,
        password: Option<&Secret>,
        namespace: &str,
        timeout: Duration,
        opts: &RedisOptions,
    ) -> Result<Self, StoreError> {
        let unavailable = |e: redis::RedisError| StoreError::Unavailable(e.to_string());
        let mut info: redis::ConnectionInfo = url.parse().map_err(unavailable)?;
        if let Some(p) = password {
            info.redis.password = Some(p.expose().to_owned());
        }
        if let Some(user) = &opts.username {
            info.redis.username = Some(user.clone());
        }
        let client = match &opts.tls_ca {
            None => redis::Client::open(info).map_err(unavailable)?,
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .map_err(unavailable)?,
        };
        Ok(RedisStore {
            client,
            conn: OnceCell::new(),
            blocking: OnceCell::new(),
            timeout,
            ns: namespace.to_owned(),
            create: Script::new(include_str!("lua/create.lua")),
            revoke: Script::new(include_str!("lua/revoke.lua")),
            update: Script::new(include_str!("lua/update.lua")),
            delete: Script::new(include_str!("lua/delete.lua")),
            revoke_tokens: Script::new(include_str!("lua/revoke_tokens.lua")),
            delegation: Script::new(include_str!("lua/delegation.lua")),
            reserve: Script::new(include_str!("lua/reserve.lua")),
            lease: Script::new(include_str!("lua/lease.lua")),
            usage: Script::new(include_str!("lua/usage.lua")),
        })
    }

    pub fn key_key(&self, key_id: &str) -> String {
        format!("{}:{{keys}}:key:{key_id}", self.ns)
    }

    fn index_key(&self, owner: &Owner) -> String {
        format!("{}:{{keys}}:{}", self.ns, owner.index_name())
    }

    fn delegation_key(&self, of: &DelegationsOf) -> String {
        match of {
            DelegationsOf::Partner(p) => format!("{}:{{keys}}:deleg:partner:{p}", self.ns),
            DelegationsOf::Tenant(t) => format!("{}:{{keys}}:deleg:tenant:{t}", self.ns),
        }
    }

    fn tokens_key(&self) -> String {
        format!("{}:{{keys}}:tokens", self.ns)
    }

    fn tokens_expiry_key(&self) -> String {
        format!("{}:{{keys}}:tokens:expiry", self.ns)
    }

    pub fn events_key(&self) -> String {
        format!("{}:{{keys}}:events", self.ns)
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.connect(&self.conn, self.timeout).await
    }

    async fn connect(
        &self,
        cell: &OnceCell<ConnectionManager>,
        response_timeout: Duration,
    ) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(response_timeout)
            .set_number_of_retries(1)
            .set_max_delay(200);
        let conn = cell
            .get_or_try_init(|| async {
                tokio::time::timeout(
                    self.timeout,
                    ConnectionManager::new_with_config(self.client.clone(), config),
                )
                .await
                .map_err(|_| StoreError::Unavailable("timed out connecting to Redis".into()))?
                .map_err(unavailable)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs one Redis exchange under the store's timeout.
    async fn run<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.run_for(self.timeout, f).await
    }

    async fn run_for<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable(
                "Redis did not answer in time".into(),
            )),
        }
    }
}

fn unavailable(e: redis::RedisError) -> StoreError {
    crate::telemetry::metrics().store_errors.inc();
    StoreError::Unavailable(e.to_string())
}

/// A key record's raw hash fields, as `RECORD_FIELDS` names them: `data` (JSON),
/// `revoked_at_ms`, and the usage counters.
type RecordFields = (
    Option<String>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// The hash fields a record is read from (the scripts that return a record read the
/// same, in this order).
const RECORD_FIELDS: [&str; 5] = [
    "data",
    "revoked_at_ms",
    "used_allowed",
    "used_denied",
    "last_used_ms",
];

/// What XINFO STREAM says of the revocation stream.
struct StreamInfo {
    last_generated: EventId,
    length: u64,
    entries_added: u64,
    first_entry: Option<EventId>,
}

impl RedisStore {
    async fn record_fields(&self, key_id: &str) -> Result<RecordFields, StoreError> {
        let mut conn = self.conn().await?;
        self.run(
            redis::cmd("HMGET")
                .arg(self.key_key(key_id))
                .arg(&RECORD_FIELDS[..])
                .query_async(&mut conn),
        )
        .await
    }

    /// `None` when the stream does not exist.
    async fn stream_info(&self) -> Result<Option<StreamInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let exists: bool = self.run(conn.exists(self.events_key())).await?;
        if !exists {
            return Ok(None);
        }
        let info: Vec<redis::Value> = self
            .run(
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(self.events_key())
                    .query_async(&mut conn),
            )
            .await?;
        let mut last_generated = EventId::START;
        let mut length: u64 = 0;
        let mut entries_added = None;
        let mut first_entry = None;
        for pair in info.chunks(2) {
            let [name, value] = pair else { continue };
            let name: String = redis::from_redis_value(name).unwrap_or_default();
            match name.as_str() {
                "last-generated-id" => {
                    let id: String = redis::from_redis_value(value).unwrap_or_default();
                    last_generated = event_id(&id)?;
                }
                "length" => length = redis::from_redis_value(value).unwrap_or(0),
                "entries-added" => entries_added = redis::from_redis_value(value).ok(),
                "first-entry" => {
                    // [id, [field, value, …]] or nil when the stream is empty.
                    if let redis::Value::Array(entry) = value {
                        if let Some(id) = entry.first() {
                            let id: String = redis::from_redis_value(id).unwrap_or_default();
                            first_entry = Some(event_id(&id)?);
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(entries_added) = entries_added else {
            // Redis before 7.0 does not say how much it trimmed.
            return Err(StoreError::Corrupt(
                "XINFO STREAM has no entries-added: keygate needs Redis 7.0 or newer".into(),
            ));
        };
        Ok(Some(StreamInfo {
            last_generated,
            length,
            entries_added,
            first_entry,
        }))
    }
}

fn event_id(s: &str) -> Result<EventId, StoreError> {
    EventId::parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad stream id {s}")))
}

/// A stream entry from XREAD: an event, or what keygate cannot read of it (a newer
/// version's kind, a missing field), never an error that would stop the reader there.
fn decode_entry(entry: &redis::streams::StreamId) -> Result<StreamEntry, StoreError> {
    let id = event_id(&entry.id)?;
    let text = |name: &str| entry.get::<String>(name);
    let key_id = text("key_id").filter(|k| crate::apikey::token::valid_key_id(k));
    let unreadable = |detail: String| StreamEntry::Unreadable {
        id,
        key_id: key_id.clone(),
        detail,
    };
    let kind_name = text("kind");
    if let Some(granted) = match kind_name.as_deref() {
        Some(DELEGATED) => Some(true),
        Some(UNDELEGATED) => Some(false),
        _ => None,
    } {
        return Ok(match (text("partner_id"), text("tenant_id")) {
            (Some(partner_id), Some(tenant_id)) => StreamEntry::Delegation(DelegationEvent {
                id,
                partner_id,
                tenant_id,
                granted,
                at_ms: text("at_ms").and_then(|t| t.parse().ok()).unwrap_or(0),
            }),
            _ => unreadable("delegation change without its partner and tenant".into()),
        });
    }
    if kind_name.as_deref() == Some(TOKENS_REVOKED) {
        return Ok(
            match text("rule").map(|r| serde_json::from_str::<TokenRevocation>(&r)) {
                Some(Ok(revocation)) => {
                    StreamEntry::Tokens(TokenRevocationEvent { id, revocation })
                }
                Some(Err(e)) => unreadable(format!("token revocation cannot be read: {e}")),
                None => unreadable("token revocation without its rule".into()),
            },
        );
    }
    let kind = match text("kind") {
        Some(name) => match EventKind::parse(&name) {
            Some(kind) => kind,
            None => return Ok(unreadable(format!("unknown event kind {name:?}"))),
        },
        None => return Ok(unreadable("no event kind".into())),
    };
    let Some(key) = key_id.clone() else {
        return Ok(unreadable("no readable key id".into()));
    };
    Ok(StreamEntry::Event(RevocationEvent {
        id: entry.id.clone(),
        key_id: key,
        kind,
        at_ms: text("at_ms").and_then(|t| t.parse().ok()).unwrap_or(0),
    }))
}

/// A record from its hash fields (`data`, `revoked_at_ms`).
fn decode(fields: RecordFields) -> Result<Option<KeyRecord>, StoreError> {
    let (Some(data), revoked, allowed, denied, last_used) = fields else {
        return Ok(None);
    };
    let mut rec: KeyRecord =
        serde_json::from_str(&data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    if revoked.is_some() {
        rec.revoked_at_ms = revoked;
    }
    rec.usage = KeyUsage {
        allowed: allowed.unwrap_or(0),
        denied: denied.unwrap_or(0),
        last_used_at_ms: last_used,
    };
    Ok(Some(rec))
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let mut stored = record.clone();
        stored.revoked_at_ms = None;
        let json =
            serde_json::to_string(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let created: i64 = self
            .run(
                self.create
                    .key(self.key_key(&record.key_id))
                    .key(self.index_key(&record.owner()))
                    .arg(json)
                    .arg(&record.key_id)
                    .invoke_async(&mut conn),
            )
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::Conflict(record.key_id.clone()))
        }
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        decode(self.record_fields(key_id).await?)
    }

    async fn list(
        &self,
        owner: &Owner,
        after: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        if limit == 0 {
            return Ok(KeyPage {
                keys: Vec::new(),
                next_after: None,
            });
        }
        let mut conn = self.conn().await?;
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_owned(),
        };
        let ids: Vec<String> = self
            .run(conn.zrangebylex_limit(self.index_key(owner), min, "+", 0, limit as isize + 1))
            .await?;
        let more = ids.len() > limit;
        let mut pipe = redis::pipe();
        for id in ids.iter().take(limit) {
            pipe.cmd("HMGET")
                .arg(self.key_key(id))
                .arg(&RECORD_FIELDS[..]);
        }
        let rows: Vec<RecordFields> = if ids.is_empty() {
            Vec::new()
        } else {
            self.run(pipe.query_async(&mut conn)).await?
        };
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(rec) = decode(row)? {
                keys.push(rec);
            }
        }
        let next_after = if more {
            ids.get(limit - 1).cloned()
        } else {
            None
        };
        Ok(KeyPage { keys, next_after })
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn().await?;
        let fields: Option<RecordFields> = self
            .run(
                self.revoke
                    .key(self.key_key(key_id))
                    .key(self.events_key())
                    .arg(at_ms)
                    .arg(key_id)
                    .arg(STREAM_MAX_LEN)
                    .arg(EventKind::Revoked.as_str())
                    .invoke_async(&mut conn),
            )
            .await?;
        fields.map(decode).transpose().map(Option::flatten)
    }

    async fn update(
        &self,
        key_id: &str,
        change: &KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        // Read, change, and write back only if nobody wrote in between; a concurrent
        // update makes us read again. Records are JSON written by keygate alone, so the
        // change is made here rather than in Lua.
        for _ in 0..8 {
            let (data, revoked, ..) = self.record_fields(key_id).await?;
            let Some(data) = data else {
                return Ok(None);
            };
            let mut record: KeyRecord =
                serde_json::from_str(&data).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            change.apply(&mut record);
            let new_data =
                serde_json::to_string(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let mut conn = self.conn().await?;
            let written: i64 = self
                .run(
                    self.update
                        .key(self.key_key(key_id))
                        .key(self.events_key())
                        .arg(&data)
                        .arg(new_data)
                        .arg(at_ms)
                        .arg(key_id)
                        .arg(STREAM_MAX_LEN)
                        .arg(EventKind::Updated.as_str())
                        .invoke_async(&mut conn),
                )
                .await?;
            match written {
                1 => {
                    record.revoked_at_ms = revoked;
                    return Ok(Some(record));
                }
                -1 => return Ok(None),
                _ => continue,
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {key_id} kept changing while being updated"
        )))
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let Some(existing) = self.get(key_id).await? else {
            return Ok(None);
        };
        let mut conn = self.conn().await?;
        let fields: Option<RecordFields> = self
            .run(
                self.delete
                    .key(self.key_key(key_id))
                    .key(self.events_key())
                    .key(self.index_key(&existing.owner()))
                    .arg(at_ms)
                    .arg(key_id)
                    .arg(STREAM_MAX_LEN)
                    .arg(EventKind::Deleted.as_str())
                    .invoke_async(&mut conn),
            )
            .await?;
        fields.map(decode).transpose().map(Option::flatten)
    }

    async fn append_audit(&self, entry: &crate::audit::AuditEntry) -> Result<(), StoreError> {
        let json = serde_json::to_string(entry).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn().await?;
        let _: String = self
            .run(
                redis::cmd("XADD")
                    .arg(format!("{}:{{keys}}:audit", self.ns))
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STREAM_MAX_LEN)
                    .arg("*")
                    .arg("entry")
                    .arg(json)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn audit(
        &self,
        q: &crate::audit::AuditQuery,
    ) -> Result<Vec<crate::audit::AuditEntry>, StoreError> {
        let mut conn = self.conn().await?;
        let key = format!("{}:{{keys}}:audit", self.ns);
        let mut out = Vec::new();
        let mut start = format!("{}-0", q.since_ms);
        // Pages of the stream, filtered here: the trail is bounded, the filters are few.
        loop {
            let reply: redis::streams::StreamRangeReply =
                self.run(conn.xrange_count(&key, &start, "+", 500)).await?;
            let Some(last) = reply.ids.last().map(|e| e.id.clone()) else {
                break;
            };
            for e in &reply.ids {
                let Some(json) = e.get::<String>("entry") else {
                    continue;
                };
                let mut entry: crate::audit::AuditEntry = serde_json::from_str(&json)
                    .map_err(|err| StoreError::Corrupt(err.to_string()))?;
                entry.id = e.id.clone();
                if q.matches(&entry) {
                    out.push(entry);
                    if out.len() >= q.limit {
                        return Ok(out);
                    }
                }
            }
            if reply.ids.len() < 500 {
                break;
            }
            start = format!("({last}");
        }
        Ok(out)
    }

    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut invocation = self.usage.prepare_invoke();
        for d in batch {
            invocation
                .key(self.key_key(&d.key_id))
                .arg(d.allowed)
                .arg(d.denied)
                .arg(d.last_used_at_ms);
        }
        let _: i64 = self.run(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    async fn reserve(&self, key_id: &str, req: &RateRequest) -> Result<RateGrant, StoreError> {
        let mut conn = self.conn().await?;
        let (granted, remaining, retry_after_ms, full_in_ms): (u32, u32, u64, u64) = self
            .run(
                self.reserve
                    .key(format!("{}:{{{key_id}}}:rate", self.ns))
                    .arg(req.interval_ms)
                    .arg(req.burst)
                    .arg(req.want)
                    .arg(req.give_back)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(RateGrant {
            granted,
            remaining,
            retry_after_ms,
            full_in_ms,
        })
    }

    async fn lease(
        &self,
        key_id: &str,
        lease_id: &str,
        op: LeaseOp,
    ) -> Result<LeaseResult, StoreError> {
        let (name, ttl_ms, limit) = match op {
            LeaseOp::Acquire { ttl_ms, limit } => ("acquire", ttl_ms, limit),
            LeaseOp::Renew { ttl_ms } => ("renew", ttl_ms, 0),
            LeaseOp::Release => ("release", 0, 0),
        };
        let mut conn = self.conn().await?;
        let (done, held): (i64, u32) = self
            .run(
                self.lease
                    .key(format!("{}:{{{key_id}}}:leases", self.ns))
                    .arg(name)
                    .arg(lease_id)
                    .arg(ttl_ms)
                    .arg(limit)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(LeaseResult {
            done: done == 1,
            held,
        })
    }

    async fn set_delegation(
        &self,
        d: &Delegation,
        granted: bool,
        at_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let changed: i64 = self
            .run(
                self.delegation
                    .key(self.delegation_key(&DelegationsOf::Partner(d.partner_id.clone())))
                    .key(self.delegation_key(&DelegationsOf::Tenant(d.tenant_id.clone())))
                    .key(self.events_key())
                    .arg(&d.partner_id)
                    .arg(&d.tenant_id)
                    .arg(if granted { "1" } else { "0" })
                    .arg(at_ms)
                    .arg(STREAM_MAX_LEN)
                    .arg(if granted { DELEGATED } else { UNDELEGATED })
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(changed == 1)
    }

    async fn is_delegated(&self, partner_id: &str, tenant_id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.delegation_key(&DelegationsOf::Partner(partner_id.to_owned()));
        self.run(conn.sismember(key, tenant_id)).await
    }

    async fn delegations(&self, of: &DelegationsOf) -> Result<Vec<Delegation>, StoreError> {
        let mut conn = self.conn().await?;
        let mut others: Vec<String> = self.run(conn.smembers(self.delegation_key(of))).await?;
        others.sort();
        Ok(others.into_iter().map(|other| of.with(other)).collect())
    }

    async fn revoke_tokens(
        &self,
        revocation: &TokenRevocation,
    ) -> Result<TokenRevocation, StoreError> {
        let key = revocation.rule_key();
        let corrupt = |e: serde_json::Error| StoreError::Corrupt(e.to_string());
        // Read, merge, and write only if the rule is still what was read (as `update`).
        for _ in 0..8 {
            let mut conn = self.conn().await?;
            let current: Option<String> = self.run(conn.hget(self.tokens_key(), &key)).await?;
            let old = match &current {
                Some(json) => Some(serde_json::from_str::<TokenRevocation>(json).map_err(corrupt)?),
                None => None,
            };
            let stored = match old.filter(|o| !o.expired(revocation.at_ms)) {
                None => revocation.clone(),
                Some(old) => match old.merged_with(revocation) {
                    Some(merged) => merged,
                    None => return Ok(old),
                },
            };
            let json = serde_json::to_string(&stored).map_err(corrupt)?;
            let written: i64 = self
                .run(
                    self.revoke_tokens
                        .key(self.tokens_key())
                        .key(self.tokens_expiry_key())
                        .key(self.events_key())
                        .arg(&key)
                        .arg(current.as_deref().unwrap_or(""))
                        .arg(json)
                        .arg(stored.expires_at_ms)
                        .arg(revocation.at_ms)
                        .arg(STREAM_MAX_LEN)
                        .arg(TOKENS_REVOKED)
                        .invoke_async(&mut conn),
                )
                .await?;
            if written == 1 {
                return Ok(stored);
            }
        }
        Err(StoreError::Unavailable(format!(
            "token revocation {} kept changing while being written",
            revocation.issuer
        )))
    }

    async fn token_revocations(&self, now_ms: u64) -> Result<Vec<TokenRevocation>, StoreError> {
        let mut conn = self.conn().await?;
        let all: Vec<String> = self.run(conn.hvals(self.tokens_key())).await?;
        let mut live = Vec::with_capacity(all.len());
        for json in all {
            let r: TokenRevocation =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if !r.expired(now_ms) {
                live.push(r);
            }
        }
        Ok(live)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let _: String = self.run(redis::cmd("PING").query_async(&mut conn)).await?;
        Ok(())
    }

    async fn latest_event_id(&self) -> Result<EventId, StoreError> {
        // The last id ever generated, even if trimming has emptied the stream since.
        Ok(self
            .stream_info()
            .await?
            .map_or(EventId::START, |i| i.last_generated))
    }

    async fn read_events(
        &self,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut opts = redis::streams::StreamReadOptions::default().count(count);
        let (mut conn, limit) = match block {
            Some(b) => {
                opts = opts.block(b.as_millis().max(1) as usize);
                let limit = b + self.timeout;
                (self.connect(&self.blocking, limit).await?, limit)
            }
            None => (self.conn().await?, self.timeout),
        };
        let reply: Option<redis::streams::StreamReadReply> = self
            .run_for(
                limit,
                conn.xread_options(&[self.events_key()], &[after.to_string()], &opts),
            )
            .await?;
        let mut events = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in &key.ids {
                events.push(decode_entry(entry)?);
            }
        }
        Ok(events)
    }

    async fn events_lost_after(&self, after: EventId) -> Result<bool, StoreError> {
        let Some(info) = self.stream_info().await? else {
            // No stream at all: either nothing was ever revoked (we are at the start),
            // or Redis lost it (a restart without persistence).
            return Ok(after != EventId::START);
        };
        let StreamInfo {
            last_generated,
            length,
            entries_added,
            first_entry,
        } = info;
        if last_generated < after {
            // The stream went backwards: it was reset.
            return Ok(true);
        }
        if entries_added <= length || last_generated == after {
            // Nothing was ever trimmed, or nothing came after `after`.
            return Ok(false);
        }
        // Something was trimmed (XTRIM and MAXLEN do not move `max-deleted-entry-id`, so
        // it cannot say what). Events after `after` are intact only if the oldest one
        // kept is not newer than `after`. When the trim stopped exactly at `after` this
        // flushes once more than needed: the price of never missing one.
        Ok(first_entry.is_none_or(|first| first > after))
    }
}
