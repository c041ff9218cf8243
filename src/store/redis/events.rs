//! The revocation stream: what XINFO STREAM says of a partition's stream, decoding its
//! entries, and `impl EventLog` (reading events, telling whether some were trimmed away).
//! Appending events is the writing scripts' (records, delegations, token revocations).

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;

use super::RedisStore;
use crate::store::{
    DelegationEvent, EventId, EventKind, EventLog, RevocationEvent, StoreError, StreamEntry,
    TokenRevocation, TokenRevocationEvent, DELEGATED, TOKENS_REVOKED, UNDELEGATED,
};

/// What XINFO STREAM says of the revocation stream.
struct StreamInfo {
    last_generated: EventId,
    length: u64,
    entries_added: u64,
    first_entry: Option<EventId>,
}

impl RedisStore {
    /// `None` when the partition's stream does not exist.
    async fn stream_info(&self, partition: usize) -> Result<Option<StreamInfo>, StoreError> {
        let mut conn = self.conn().await?;
        let events = self.events_key(partition);
        let exists: bool = self
            .run("reading the revocation stream", conn.exists(&events))
            .await?;
        if !exists {
            return Ok(None);
        }
        let info: Vec<redis::Value> = self
            .run(
                "reading the revocation stream",
                redis::cmd("XINFO")
                    .arg("STREAM")
                    .arg(&events)
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

#[async_trait]
impl EventLog for RedisStore {
    fn partitions(&self) -> usize {
        self.layout.partitions()
    }

    fn key_partition(&self, key_id: &str) -> usize {
        self.partition_of(key_id)
    }

    async fn latest_event_id(&self, partition: usize) -> Result<EventId, StoreError> {
        // The last id ever generated, even if trimming has emptied the stream since.
        Ok(self
            .stream_info(partition)
            .await?
            .map_or(EventId::START, |i| i.last_generated))
    }

    async fn read_events(
        &self,
        partition: usize,
        after: EventId,
        count: usize,
        block: Option<Duration>,
    ) -> Result<Vec<StreamEntry>, StoreError> {
        let mut opts = redis::streams::StreamReadOptions::default().count(count);
        let (mut conn, limit) = match block {
            Some(b) => {
                opts = opts.block(b.as_millis().max(1) as usize);
                let limit = b + self.timeout;
                (self.blocking_conn(partition, limit).await?, limit)
            }
            None => (self.conn().await?, self.timeout),
        };
        let reply: Option<redis::streams::StreamReadReply> = self
            .run_for(
                "reading the revocation stream",
                limit,
                conn.xread_options(&[self.events_key(partition)], &[after.to_string()], &opts),
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

    async fn events_lost_after(
        &self,
        partition: usize,
        after: EventId,
    ) -> Result<bool, StoreError> {
        let Some(info) = self.stream_info(partition).await? else {
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
