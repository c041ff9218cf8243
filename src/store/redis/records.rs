//! Key records: their two formats (a hash per key with one partition, packed strings in
//! bucket hashes with more), reading and decoding them, and `impl KeyRecords`. The packed
//! encoding is `crate::store::packed`'s, usage counting `usage_sink.rs`'s.

use async_trait::async_trait;
use redis::{AsyncCommands, Script};

use super::failure::{outage, RedisFailure};
use super::writes::Change;
use super::{RedisStore, STREAM_MAX_LEN};
use crate::store::{
    EventKind, KeyChange, KeyPage, KeyRecord, KeyRecords, KeyUsage, Owner, StoreError,
};

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

/// How key records are kept: the hash of every earlier keygate (one partition), or the
/// packed string of partitioned layouts (`record.lua`, `packed.rs`), a third of the
/// memory. A layout with more than one partition is new (no earlier keygate could write
/// one), so it starts packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordFormat {
    Hash,
    Packed,
}

impl RedisStore {
    /// How this layout keeps key records (see `RecordFormat`).
    pub(super) fn format(&self) -> RecordFormat {
        if self.layout.partitions() > 1 {
            RecordFormat::Packed
        } else {
            RecordFormat::Hash
        }
    }

    /// The script that changes `key_id`'s record: `hash_script` with one partition, else
    /// `record.lua`'s `op`; its keys (the record's, the partition's stream) and the
    /// operation's leading arguments given, the rest for the caller to add.
    fn record_change<'a>(
        &'a self,
        hash_script: &'a Script,
        op: &str,
        key_id: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = match self.format() {
            RecordFormat::Hash => hash_script.prepare_invoke(),
            RecordFormat::Packed => {
                let mut invocation = self.record.prepare_invoke();
                invocation.arg(op).arg(key_id);
                invocation
            }
        };
        invocation
            .key(self.key_key(key_id))
            .key(self.events_key(self.partition_of(key_id)));
        invocation
    }

    /// `key_id`'s record, and what an update compares to know nobody wrote in between.
    async fn read_record(&self, key_id: &str) -> Result<Option<(KeyRecord, Vec<u8>)>, StoreError> {
        let mut conn = self.conn().await?;
        let raw: redis::Value = self
            .run(
                "reading a key record",
                self.read_cmd(key_id).query_async(&mut conn),
            )
            .await?;
        self.decode_raw(key_id, raw)
    }

    /// The command that reads `key_id`'s record (as `decode_raw` reads its answer).
    fn read_cmd(&self, key_id: &str) -> redis::Cmd {
        let key = self.key_key(key_id);
        match self.format() {
            RecordFormat::Hash => {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(key).arg(&RECORD_FIELDS[..]);
                cmd
            }
            RecordFormat::Packed => {
                let mut cmd = redis::cmd("HGET");
                cmd.arg(key).arg(key_id);
                cmd
            }
        }
    }

    /// A record as Redis answered it (`read_cmd`, or a script returning the record), and
    /// what an update compares to know nobody wrote in between. `None`: no such key.
    fn decode_raw(
        &self,
        key_id: &str,
        raw: redis::Value,
    ) -> Result<Option<(KeyRecord, Vec<u8>)>, StoreError> {
        // Told by its kind: a type error quotes the reply, and a record holds a hash.
        let corrupt = |e: redis::RedisError| {
            StoreError::Corrupt(format!("key {key_id}: {}", RedisFailure::from(&e)))
        };
        match self.format() {
            RecordFormat::Hash => {
                if raw == redis::Value::Nil {
                    return Ok(None);
                }
                let fields: RecordFields = redis::from_redis_value(&raw).map_err(corrupt)?;
                let data = fields.0.clone().unwrap_or_default().into_bytes();
                Ok(decode(fields)?.map(|record| (record, data)))
            }
            RecordFormat::Packed => {
                let Some(bytes): Option<Vec<u8>> =
                    redis::from_redis_value(&raw).map_err(corrupt)?
                else {
                    return Ok(None);
                };
                decode_packed(key_id, &bytes).map(Some)
            }
        }
    }
}

/// The arguments every change of a record ends with, for the event it appends to the
/// partition's stream: when, which key, the stream's bound, what happened.
fn add_event(change: &mut redis::ScriptInvocation<'_>, at_ms: u64, key_id: &str, kind: EventKind) {
    change
        .arg(at_ms)
        .arg(key_id)
        .arg(STREAM_MAX_LEN)
        .arg(kind.as_str());
}

/// A packed record string, `<revoked_at_ms>|<allowed>|<denied>|<last_used_ms>|<packed>`.
fn decode_packed(key_id: &str, bytes: &[u8]) -> Result<(KeyRecord, Vec<u8>), StoreError> {
    let corrupt = || StoreError::Corrupt(format!("key {key_id}: malformed record"));
    let mut parts = bytes.splitn(5, |b| *b == b'|');
    let mut number = || -> Result<Option<u64>, StoreError> {
        let field = parts.next().ok_or_else(corrupt)?;
        if field.is_empty() {
            return Ok(None);
        }
        std::str::from_utf8(field)
            .ok()
            .and_then(|t| t.parse().ok())
            .map(Some)
            .ok_or_else(corrupt)
    };
    let (revoked, allowed, denied, last_used) = (number()?, number()?, number()?, number()?);
    let packed = parts.next().ok_or_else(corrupt)?;
    let mut record = crate::store::packed::decode(key_id, packed)?;
    record.revoked_at_ms = revoked;
    record.usage = KeyUsage {
        allowed: allowed.unwrap_or(0),
        denied: denied.unwrap_or(0),
        last_used_at_ms: last_used,
    };
    Ok((record, packed.to_vec()))
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
impl KeyRecords for RedisStore {
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let mut stored = record.clone();
        stored.revoked_at_ms = None;
        let p = self.partition_of(&record.key_id);
        let index = self.index_key(self.index_partition(&record.owner()), &record.owner());
        let created: bool = match self.format() {
            RecordFormat::Hash => {
                let json = serde_json::to_string(&stored)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let created: i64 = self
                    .write(
                        "creating a key record",
                        p,
                        Change::Script(
                            self.create
                                .key(self.key_key(&record.key_id))
                                .key(index)
                                .arg(json)
                                .arg(&record.key_id),
                        ),
                    )
                    .await?;
                created == 1
            }
            RecordFormat::Packed => {
                // The index entry first, in the owner's partition: a record is never
                // without one, and an entry whose record is missing (a crash in between)
                // is skipped by `list`.
                let mut value = b"||||".to_vec();
                value.extend(crate::store::packed::encode(&stored)?);
                let index_partition = self.index_partition(&record.owner());
                let added: i64 = self
                    .write(
                        "indexing a new key",
                        index_partition,
                        Change::Command(redis::cmd("ZADD").arg(&index).arg(0).arg(&record.key_id)),
                    )
                    .await?;
                let set: i64 = self
                    .write(
                        "creating a key record",
                        p,
                        Change::Command(
                            redis::cmd("HSETNX")
                                .arg(self.key_key(&record.key_id))
                                .arg(&record.key_id)
                                .arg(value),
                        ),
                    )
                    .await?;
                if set == 0 && added == 1 {
                    // Another key has this id: its owner's index is not ours to add to.
                    let _: i64 = self
                        .write(
                            "unindexing a key not created",
                            index_partition,
                            Change::Command(redis::cmd("ZREM").arg(&index).arg(&record.key_id)),
                        )
                        .await?;
                }
                set == 1
            }
        };
        if created {
            Ok(())
        } else {
            Err(StoreError::Conflict(record.key_id.clone()))
        }
    }

    async fn get(&self, key_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.read_record(key_id).await?.map(|(record, _)| record))
    }

    async fn get_verifiable(
        &self,
        key_id: &str,
    ) -> Result<Option<(KeyRecord, Option<String>)>, StoreError> {
        let mut conn = self.conn().await?;
        let key = self.key_key(key_id);
        let mut verifier = redis::cmd("HGET");
        match self.format() {
            RecordFormat::Hash => verifier.arg(&key).arg("verifier"),
            RecordFormat::Packed => verifier.arg(&key).arg(format!("{key_id}:v")),
        };
        // One round trip: both live under the record's own key (one slot).
        let (raw, verifier): (redis::Value, Option<String>) = self
            .run(
                "reading a key record",
                redis::pipe()
                    .add_command(self.read_cmd(key_id))
                    .add_command(verifier)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(self
            .decode_raw(key_id, raw)?
            .map(|(record, _)| (record, verifier)))
    }

    async fn set_verifier(&self, key_id: &str, verifier: &str) -> Result<bool, StoreError> {
        let mut invocation = self.verifier.prepare_invoke();
        invocation.key(self.key_key(key_id));
        match self.format() {
            RecordFormat::Hash => invocation.arg("hash").arg(verifier),
            RecordFormat::Packed => invocation.arg("packed").arg(verifier).arg(key_id),
        };
        // Not waited on by replicas: a verifier lost in a failover costs one argon2 run.
        let mut conn = self.conn().await?;
        let written: i64 = self
            .run("leaving a verifier", invocation.invoke_async(&mut conn))
            .await?;
        Ok(written == 1)
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
        let index = self.index_key(self.index_partition(owner), owner);
        let mut ids: Vec<String> = self
            .run(
                "listing keys",
                conn.zrangebylex_limit(index, min, "+", 0, limit as isize + 1),
            )
            .await?;
        let more = ids.len() > limit;
        ids.truncate(limit);
        // The records, one pipeline per partition (a pipeline stays in one slot).
        let mut by_partition: std::collections::BTreeMap<usize, Vec<&String>> =
            std::collections::BTreeMap::new();
        for id in &ids {
            by_partition
                .entry(self.partition_of(id))
                .or_default()
                .push(id);
        }
        let fetched = futures::future::try_join_all(by_partition.into_values().map(|group| {
            let mut conn = conn.clone();
            let mut pipe = redis::pipe();
            for id in &group {
                pipe.add_command(self.read_cmd(id));
            }
            async move {
                let rows: Vec<redis::Value> = self
                    .run("listing keys", pipe.query_async(&mut conn))
                    .await?;
                Ok::<_, StoreError>(group.into_iter().zip(rows).collect::<Vec<_>>())
            }
        }))
        .await?;
        let mut keys = Vec::with_capacity(ids.len());
        for (id, row) in fetched.into_iter().flatten() {
            // An index entry whose record is gone, or is another owner's, is not listed.
            if let Some((record, _)) = self.decode_raw(id, row)? {
                if record.owner() == *owner {
                    keys.push(record);
                }
            }
        }
        keys.sort_unstable_by(|a, b| a.key_id.cmp(&b.key_id));
        let next_after = if more { ids.last().cloned() } else { None };
        Ok(KeyPage { keys, next_after })
    }

    async fn revoke(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let mut revoke = self.record_change(&self.revoke, "revoke", key_id);
        add_event(&mut revoke, at_ms, key_id, EventKind::Revoked);
        let raw: redis::Value = self
            .write(
                "revoking a key",
                self.partition_of(key_id),
                Change::Script(&revoke),
            )
            .await?;
        Ok(self.decode_raw(key_id, raw)?.map(|(record, _)| record))
    }

    async fn update(
        &self,
        key_id: &str,
        change: &KeyChange,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        // Read, change, and write back only if nobody wrote in between; a concurrent
        // update makes us read again. Records are written by keygate alone, so the change
        // is made here rather than in Lua.
        let p = self.partition_of(key_id);
        for _ in 0..8 {
            let Some((mut record, as_read)) = self.read_record(key_id).await? else {
                return Ok(None);
            };
            change.apply(&mut record);
            let mut stored = record.clone();
            stored.revoked_at_ms = None;
            let new_value = match self.format() {
                RecordFormat::Hash => {
                    serde_json::to_vec(&stored).map_err(|e| StoreError::Corrupt(e.to_string()))?
                }
                RecordFormat::Packed => crate::store::packed::encode(&stored)?,
            };
            let mut update = self.record_change(&self.update, "update", key_id);
            update.arg(as_read).arg(new_value);
            add_event(&mut update, at_ms, key_id, EventKind::Updated);
            let written: i64 = self
                .write("updating a key record", p, Change::Script(&update))
                .await?;
            match written {
                1 => return Ok(Some(record)),
                -1 => return Ok(None),
                _ => continue,
            }
        }
        Err(outage(
            "updating a key record",
            format!("key {key_id} kept changing while being updated"),
        ))
    }

    async fn delete(&self, key_id: &str, at_ms: u64) -> Result<Option<KeyRecord>, StoreError> {
        let Some(existing) = self.get(key_id).await? else {
            return Ok(None);
        };
        let p = self.partition_of(key_id);
        let owner = existing.owner();
        let index = self.index_key(self.index_partition(&owner), &owner);
        let mut delete = self.record_change(&self.delete, "delete", key_id);
        if self.format() == RecordFormat::Hash {
            // One partition: the index entry goes in the same step.
            delete.key(&index);
        }
        add_event(&mut delete, at_ms, key_id, EventKind::Deleted);
        let raw: redis::Value = self
            .write("deleting a key", p, Change::Script(&delete))
            .await?;
        if self.format() == RecordFormat::Packed {
            // The record went first: an index entry left by a crash here is skipped.
            let _: i64 = self
                .write(
                    "unindexing a deleted key",
                    self.index_partition(&owner),
                    Change::Command(redis::cmd("ZREM").arg(&index).arg(key_id)),
                )
                .await?;
        }
        Ok(self.decode_raw(key_id, raw)?.map(|(record, _)| record))
    }
}
