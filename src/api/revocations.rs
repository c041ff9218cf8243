//! `keygate.v1.Revocations/Watch` (server) and the feed that follows another keygate's
//! Watch stream (client), so a replica in another region can stay in step without
//! reaching the primary's Redis.
//!
//! Watch hands out key ids and events, so it always needs a credential (`server.rs`
//! puts it behind the watch token on the public port and the admin token on the admin
//! port). Positions are cursors over every partition of the stream: each message's `id`
//! is the cursor after it, and every stream's response metadata names the cursor it
//! starts after (`x-keygate-after`), so a client that reconnects before any event arrived
//! resumes from there: no replay of the whole stream, no needless flush.
//!
//! A follower that answers requests itself (keygate's module inside Envoy) reports the
//! usage it counted back through `ReportUsage` (`UsageReporter`), behind the same
//! credential: the replica counts it as its own.
//!
//! One file over 500 lines because the `Watch` server and the `Watch` client (`WatchFeed`,
//! another replica's feed) speak one cursor format and must change together.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc, watch, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::proto::{
    self, revocation_event::Kind, revocations_client::RevocationsClient,
    revocations_server::Revocations,
};
use super::{timestamp, timestamp_ms, Reply};
use crate::revocation::{EventFeed, FeedEntry, FeedItem, RevocationBus};
use crate::secret::Secret;
use crate::store::{
    latest_cursor, now_ms, Cursor, DelegationEvent, EventId, EventKind, EventLog, KeyStore,
    RevocationEvent, StoreError, TokenRevocation, TokenRevocationEvent, TokenTarget, UsageDelta,
    UsageNotWritten, UsageSink,
};
use crate::usage::UsageCounter;

/// Response metadata: the cursor a Watch stream starts after.
pub const AFTER_METADATA: &str = "x-keygate-after";

pub struct RevocationsService {
    store: Arc<dyn KeyStore>,
    bus: Arc<RevocationBus>,
    /// Where `ReportUsage` adds what a follower counted.
    usage: Arc<UsageCounter>,
    /// Ends every open stream on shutdown: a graceful stop waits for open calls, and a
    /// Watch stream would otherwise never finish.
    stop: watch::Receiver<bool>,
}

impl RevocationsService {
    pub fn new(
        store: Arc<dyn KeyStore>,
        bus: Arc<RevocationBus>,
        usage: Arc<UsageCounter>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        RevocationsService {
            store,
            bus,
            usage,
            stop,
        }
    }
}

/// `item` of `partition`, with the cursor after it as its id.
fn event_proto(item: &FeedItem, partition: usize, cursor: &Cursor) -> proto::RevocationEvent {
    let mut msg = item_proto(item);
    msg.id = cursor.to_string();
    msg.partition = partition as u32;
    msg
}

fn item_proto(item: &FeedItem) -> proto::RevocationEvent {
    match item {
        FeedItem::Event(e) => proto::RevocationEvent {
            key_id: e.key_id.clone(),
            kind: match e.kind {
                EventKind::Revoked => Kind::Revoked,
                EventKind::Deleted => Kind::Deleted,
                EventKind::Updated => Kind::Updated,
            } as i32,
            at: Some(timestamp(e.at_ms)),
            ..Default::default()
        },
        FeedItem::Tokens(t) => proto::RevocationEvent {
            key_id: String::new(),
            kind: Kind::TokensRevoked as i32,
            at: Some(timestamp(t.revocation.at_ms)),
            tokens: Some(token_revocation_proto(&t.revocation)),
            ..Default::default()
        },
        FeedItem::Delegation(d) => proto::RevocationEvent {
            kind: if d.granted {
                Kind::Delegated
            } else {
                Kind::Undelegated
            } as i32,
            at: Some(timestamp(d.at_ms)),
            partner_id: d.partner_id.clone(),
            tenant_id: d.tenant_id.clone(),
            ..Default::default()
        },
        // A kind this server cannot read: its clients drop the key, as this server did.
        FeedItem::Unknown { key_id, .. } => proto::RevocationEvent {
            key_id: key_id.clone(),
            kind: Kind::Unspecified as i32,
            ..Default::default()
        },
        FeedItem::Reset(_) => proto::RevocationEvent {
            key_id: String::new(),
            kind: Kind::Reset as i32,
            ..Default::default()
        },
    }
}

pub fn token_revocation_proto(r: &TokenRevocation) -> proto::TokenRevocation {
    let (jti, subject, issued_before) = match &r.target {
        TokenTarget::Jti { jti } => (jti.clone(), String::new(), None),
        TokenTarget::Subject { subject, before_ms } => {
            (String::new(), subject.clone(), Some(timestamp(*before_ms)))
        }
    };
    proto::TokenRevocation {
        issuer: r.issuer.clone(),
        jti,
        subject,
        issued_before,
        revoked_at: Some(timestamp(r.at_ms)),
        expires_at: Some(timestamp(r.expires_at_ms)),
    }
}

/// A revocation as another keygate sent it; `None` when it does not say what it revokes.
fn token_revocation(p: proto::TokenRevocation) -> Option<TokenRevocation> {
    let target = match (p.jti.is_empty(), p.subject.is_empty()) {
        (false, true) => TokenTarget::Jti { jti: p.jti },
        (true, false) => TokenTarget::Subject {
            subject: p.subject,
            before_ms: timestamp_ms(p.issued_before.as_ref()?),
        },
        _ => return None,
    };
    if p.issuer.is_empty() {
        return None;
    }
    Some(TokenRevocation {
        issuer: p.issuer,
        target,
        at_ms: p.revoked_at.as_ref().map_or(0, timestamp_ms),
        expires_at_ms: timestamp_ms(p.expires_at.as_ref()?),
    })
}

fn unavailable(e: StoreError) -> Status {
    Status::unavailable(format!(
        "revocation stream unavailable: {}",
        crate::telemetry::ErrorChain(&e)
    ))
}

/// Sends everything the store holds after `cursor`, partition by partition (first a
/// RESET where some of it was lost); returns the new cursor, or `None` when the client
/// has gone.
async fn replay(
    store: &dyn EventLog,
    tx: &mpsc::Sender<Result<proto::RevocationEvent, Status>>,
    mut cursor: Cursor,
) -> Result<Option<Cursor>, StoreError> {
    for p in 0..store.partitions() {
        loop {
            if store.events_lost_after(p, cursor.at(p)).await? {
                let reset = FeedItem::Reset(store.latest_event_id(p).await?);
                cursor = cursor.with(p, reset.position());
                if tx.send(Ok(event_proto(&reset, p, &cursor))).await.is_err() {
                    return Ok(None);
                }
            }
            let entries = store.read_events(p, cursor.at(p), 1000, None).await?;
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                let item = FeedItem::from_entry(entry);
                cursor = cursor.with(p, item.position());
                if tx.send(Ok(event_proto(&item, p, &cursor))).await.is_err() {
                    return Ok(None);
                }
            }
        }
    }
    Ok(Some(cursor))
}

/// `after_id` as a cursor of this store: as many ids as it has partitions, none past
/// the partition's newest event.
fn requested_cursor(raw: &str, latest: &Cursor) -> Result<Cursor, Status> {
    let cursor = Cursor::parse(raw.trim()).ok_or_else(|| {
        Status::invalid_argument(
            "after_id: must be a cursor from this stream, like 1763900000000-0 (one id per \
             stream partition, comma-separated)",
        )
    })?;
    if cursor.partitions() != latest.partitions() {
        return Err(Status::invalid_argument(format!(
            "after_id: names {} stream partition(s); this stream has {}",
            cursor.partitions(),
            latest.partitions()
        )));
    }
    if cursor
        .0
        .iter()
        .zip(&latest.0)
        .any(|(id, newest)| id > newest)
    {
        return Err(Status::invalid_argument(
            "after_id: no such event (newer than the newest event)",
        ));
    }
    Ok(cursor)
}

type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Revocations for RevocationsService {
    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Reply<Self::WatchStream> {
        let raw = request.into_inner().after_id;
        let latest = latest_cursor(self.store.as_ref())
            .await
            .map_err(unavailable)?;
        let after = if raw.is_empty() {
            latest
        } else {
            requested_cursor(&raw, &latest)?
        };
        let start = after.to_string();
        // Subscribe before replaying, so nothing published meanwhile is missed; what is
        // seen twice is skipped by id.
        let mut live = self.bus.subscribe();
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(256);
        let mut stop = self.stop.clone();
        let client = tx.clone();
        let serve = async move {
            let mut after = after;
            loop {
                // Also after falling behind the live feed: what was missed meanwhile
                // may have been trimmed, and `replay` says so with a RESET.
                match replay(store.as_ref(), &tx, after.clone()).await {
                    Ok(Some(pos)) => after = pos,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e))).await;
                        return;
                    }
                }
                loop {
                    let entry = match live.recv().await {
                        Ok(entry) => entry,
                        // Too slow for the live feed: catch up from the store again.
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let (p, pos) = (entry.partition, entry.item.position());
                    let fresh = matches!(entry.item, FeedItem::Reset(_)) || pos > after.at(p);
                    if !fresh {
                        continue;
                    }
                    after = after.with(p, pos);
                    if tx
                        .send(Ok(event_proto(&entry.item, p, &after)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        };
        let open = crate::telemetry::metrics().watch_streams.clone();
        open.inc();
        tokio::spawn(async move {
            // Ends when the stream is done, the server stops, or the client goes away
            // (which a quiet stream would otherwise notice only at the next event).
            tokio::select! {
                _ = serve => {}
                _ = stop.wait_for(|stopped| *stopped) => {}
                _ = client.closed() => {}
            }
            open.dec();
        });
        let mut response = Response::new(Box::pin(ReceiverStream::new(rx)) as WatchStream);
        if let Ok(v) = start.parse() {
            response.metadata_mut().insert(AFTER_METADATA, v);
        }
        Ok(response)
    }

    async fn list_token_revocations(
        &self,
        _: Request<proto::ListTokenRevocationsRequest>,
    ) -> Reply<proto::ListTokenRevocationsResponse> {
        let all = self
            .store
            .token_revocations(now_ms())
            .await
            .map_err(unavailable)?;
        Ok(Response::new(proto::ListTokenRevocationsResponse {
            revocations: all.iter().map(token_revocation_proto).collect(),
        }))
    }

    async fn report_usage(
        &self,
        request: Request<proto::ReportUsageRequest>,
    ) -> Reply<proto::ReportUsageResponse> {
        // Read whole before any of it counts: a report with one bad entry adds nothing.
        let deltas = usage_deltas(request.into_inner(), now_ms())?;
        for d in &deltas {
            self.usage.add(d);
        }
        Ok(Response::new(proto::ReportUsageResponse {}))
    }
}

/// Keys one `ReportUsage` call may name: what a follower sends in one call at most.
pub const USAGE_KEYS_PER_REPORT: usize = 10_000;
/// Requests one entry may count: far above any flush interval's traffic, and low enough
/// that a replica's sums stay within the store's 64-bit signed counters.
const USAGE_MAX_COUNT: u64 = 1 << 40;

/// A `ReportUsage` request's entries, checked, with last uses after `now_ms` taken as
/// `now_ms`; or the first bad field, named.
fn usage_deltas(req: proto::ReportUsageRequest, now_ms: u64) -> Result<Vec<UsageDelta>, Status> {
    if req.usage.len() > USAGE_KEYS_PER_REPORT {
        return Err(Status::invalid_argument(format!(
            "usage: at most {USAGE_KEYS_PER_REPORT} keys per call, got {}",
            req.usage.len()
        )));
    }
    let bad = |i: usize, field: &str, why: String| {
        Status::invalid_argument(format!("usage[{i}].{field}: {why}"))
    };
    req.usage
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            if !crate::apikey::token::valid_key_id(&u.key_id) {
                return Err(bad(
                    i,
                    "key_id",
                    format!(
                        "must be {} base62 characters",
                        crate::apikey::token::KEY_ID_LEN
                    ),
                ));
            }
            for (field, n) in [("allowed", u.allowed), ("denied", u.denied)] {
                if n > USAGE_MAX_COUNT {
                    return Err(bad(i, field, format!("at most {USAGE_MAX_COUNT}")));
                }
            }
            if u.allowed == 0 && u.denied == 0 {
                return Err(bad(
                    i,
                    "allowed",
                    "an entry counts at least one request".into(),
                ));
            }
            let last = u
                .last_used_at
                .as_ref()
                .ok_or_else(|| bad(i, "last_used_at", "required".into()))?;
            Ok(UsageDelta {
                key_id: u.key_id,
                allowed: u.allowed,
                denied: u.denied,
                last_used_at_ms: timestamp_ms(last).min(now_ms),
            })
        })
        .collect()
}

/// Another keygate's `Revocations` service, and the watch token it takes.
struct Remote {
    url: String,
    /// Sent as `authorization: Bearer …`.
    token: Secret,
}

/// Follows another keygate's `Watch` stream.
pub struct WatchFeed {
    remote: Remote,
    stream: Mutex<Option<Streaming<proto::RevocationEvent>>>,
    /// How long one `read` waits for a message before returning empty.
    wait: Duration,
}

impl WatchFeed {
    pub fn new(url: String, token: Secret, wait: Duration) -> Self {
        WatchFeed {
            remote: Remote { url, token },
            stream: Mutex::new(None),
            wait,
        }
    }
}

impl Remote {
    async fn client(&self) -> Result<RevocationsClient<tonic::transport::Channel>, Status> {
        let channel = tonic::transport::Endpoint::from_shared(self.url.clone())
            .map_err(|e| Status::unavailable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {}: {e}", self.url)))?;
        Ok(RevocationsClient::new(channel))
    }

    /// `msg` with the watch token.
    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Status> {
        let mut req = tonic::Request::new(msg);
        let bearer = format!("Bearer {}", self.token.expose())
            .parse()
            .map_err(|_| Status::invalid_argument("the watch token is not a valid header value"))?;
        req.metadata_mut().insert("authorization", bearer);
        Ok(req)
    }
}

impl WatchFeed {
    /// Opens a stream after `after` (`None`: from now), and the cursor it starts after.
    async fn open(
        &self,
        after: Option<&Cursor>,
    ) -> Result<(Streaming<proto::RevocationEvent>, Option<Cursor>), Status> {
        let req = self.remote.request(proto::WatchRequest {
            after_id: after.map(|a| a.to_string()).unwrap_or_default(),
        })?;
        let response = self.remote.client().await?.watch(req).await?;
        let start = response
            .metadata()
            .get(AFTER_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(Cursor::parse);
        Ok((response.into_inner(), start))
    }
}

/// What a replica that follows another's Watch stream was doing when it failed.
const WATCHING: &str = "following the Watch stream";
/// What a follower that reports its usage was doing when it failed.
const REPORTING: &str = "reporting usage to the Watch URL";

/// Writes the usage a follower counted to the keygate it follows (`ReportUsage`), which
/// counts it as its own: the `UsageSink` of keygate's module inside Envoy, which has no
/// store.
pub struct UsageReporter {
    remote: Remote,
}

impl UsageReporter {
    pub fn new(url: String, token: Secret) -> Self {
        UsageReporter {
            remote: Remote { url, token },
        }
    }
}

#[async_trait]
impl UsageSink for UsageReporter {
    async fn add_usage(&self, batch: &[UsageDelta]) -> Result<(), UsageNotWritten> {
        // One connection per flush: flushes are seconds apart.
        let mut client = match self.remote.client().await {
            Ok(c) => c,
            Err(s) => {
                return Err(UsageNotWritten {
                    unwritten: batch.to_vec(),
                    error: report_error(s),
                })
            }
        };
        for (i, part) in batch.chunks(USAGE_KEYS_PER_REPORT).enumerate() {
            let usage = part
                .iter()
                .map(|d| proto::KeyUsage {
                    key_id: d.key_id.clone(),
                    allowed: d.allowed,
                    denied: d.denied,
                    last_used_at: Some(timestamp(d.last_used_at_ms)),
                })
                .collect();
            let sent = match self.remote.request(proto::ReportUsageRequest { usage }) {
                Ok(req) => client.report_usage(req).await.map(drop),
                Err(s) => Err(s),
            };
            // The parts before were counted there; this one and the rest were not (or
            // its answer was lost: sent again, it is counted twice rather than lost).
            if let Err(s) = sent {
                return Err(UsageNotWritten {
                    unwritten: batch[i * USAGE_KEYS_PER_REPORT..].to_vec(),
                    error: report_error(s),
                });
            }
        }
        Ok(())
    }
}

fn report_error(s: Status) -> StoreError {
    remote_error(REPORTING, s)
}

/// The remote's status as an outage of `what`: its code and message (its metadata is
/// not ours to log).
fn remote_error(what: &'static str, s: Status) -> StoreError {
    StoreError::unavailable(what, format!("{:?}: {}", s.code(), s.message()))
}

fn feed_error(s: Status) -> StoreError {
    remote_error(WATCHING, s)
}

/// A Watch message as a feed entry. What cannot be read takes the safe side, as for the
/// store's own entries: an unknown kind drops its key, and a message without a readable
/// key id or cursor flushes everything (staying at `after` when the cursor is unreadable).
fn feed_entry(msg: proto::RevocationEvent, after: &Cursor) -> FeedEntry {
    let partition = msg.partition as usize;
    let cursor = Cursor::parse(&msg.id)
        .filter(|c| c.partitions() == after.partitions() && partition < c.partitions());
    let Some(cursor) = cursor else {
        tracing::warn!(event = "watch.cursor_unreadable", id = %msg.id, "Watch message with an unreadable cursor; flushing");
        return FeedEntry {
            partition: 0,
            item: FeedItem::Reset(after.at(0)),
            cursor: after.clone(),
        };
    };
    let item = feed_item(msg, cursor.at(partition));
    FeedEntry {
        partition,
        item,
        cursor,
    }
}

/// A Watch message's item, at `id` in its partition.
fn feed_item(msg: proto::RevocationEvent, id: EventId) -> FeedItem {
    let at_ms = msg.at.as_ref().map_or(0, timestamp_ms);
    let kind = match Kind::try_from(msg.kind) {
        Ok(Kind::Reset) => return FeedItem::Reset(id),
        Ok(Kind::TokensRevoked) => {
            return match msg.tokens.and_then(token_revocation) {
                Some(revocation) => FeedItem::Tokens(TokenRevocationEvent { id, revocation }),
                None => FeedItem::from_entry(crate::store::StreamEntry::Unreadable {
                    id,
                    key_id: None,
                    detail: "Watch token revocation that names no token".into(),
                }),
            }
        }
        Ok(kind @ (Kind::Delegated | Kind::Undelegated)) => {
            if msg.partner_id.is_empty() || msg.tenant_id.is_empty() {
                return FeedItem::from_entry(crate::store::StreamEntry::Unreadable {
                    id,
                    key_id: None,
                    detail: "Watch delegation change without its partner and tenant".into(),
                });
            }
            return FeedItem::Delegation(DelegationEvent {
                id,
                partner_id: msg.partner_id,
                tenant_id: msg.tenant_id,
                granted: kind == Kind::Delegated,
                at_ms,
            });
        }
        Ok(Kind::Revoked) => Some(EventKind::Revoked),
        Ok(Kind::Deleted) => Some(EventKind::Deleted),
        Ok(Kind::Updated) => Some(EventKind::Updated),
        Ok(Kind::Unspecified) | Err(_) => None,
    };
    let entry = match (kind, crate::apikey::token::valid_key_id(&msg.key_id)) {
        (Some(kind), true) => crate::store::StreamEntry::Event(RevocationEvent {
            id: id.to_string(),
            key_id: msg.key_id,
            kind,
            at_ms,
        }),
        (kind, readable) => crate::store::StreamEntry::Unreadable {
            id,
            key_id: readable.then_some(msg.key_id),
            detail: match kind {
                None => format!("Watch event of unknown kind {}", msg.kind),
                Some(_) => "Watch event without a readable key id".into(),
            },
        },
    };
    FeedItem::from_entry(entry)
}

#[async_trait]
impl EventFeed for WatchFeed {
    async fn start_position(&self) -> Result<Cursor, StoreError> {
        // Open "from now"; the remote says where "now" is.
        let (stream, start) = self.open(None).await.map_err(feed_error)?;
        *self.stream.lock().await = Some(stream);
        start.ok_or_else(|| {
            StoreError::unavailable(
                WATCHING,
                format!(
                    "{} did not say where its Watch stream starts (an older keygate?)",
                    self.remote.url
                ),
            )
        })
    }

    async fn read(&self, after: &Cursor, resync: bool) -> Result<Vec<FeedEntry>, StoreError> {
        let mut guard = self.stream.lock().await;
        if resync || guard.is_none() {
            // The remote replays what we missed, or sends RESET if it cannot.
            match self.open(Some(after)).await {
                Ok((stream, _)) => *guard = Some(stream),
                // The remote has no such event: its stream was reset (e.g. Redis lost
                // it). Nothing after our position can be replayed, so flush.
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    let (stream, start) = self.open(None).await.map_err(feed_error)?;
                    *guard = Some(stream);
                    let cursor = start.unwrap_or_else(|| Cursor::start(1));
                    return Ok(vec![FeedEntry {
                        partition: 0,
                        item: FeedItem::Reset(cursor.at(0)),
                        cursor,
                    }]);
                }
                Err(s) => return Err(feed_error(s)),
            }
        }
        let stream = guard.as_mut().expect("opened above");
        match tokio::time::timeout(self.wait, stream.message()).await {
            Err(_) => Ok(Vec::new()),
            Ok(Ok(Some(msg))) => Ok(vec![feed_entry(msg, after)]),
            Ok(Ok(None)) => {
                *guard = None;
                Err(StoreError::unavailable(WATCHING, "the stream ended"))
            }
            Ok(Err(status)) => {
                *guard = None;
                Err(feed_error(status))
            }
        }
    }

    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError> {
        let req = self
            .remote
            .request(proto::ListTokenRevocationsRequest {})
            .map_err(feed_error)?;
        let all = self
            .remote
            .client()
            .await
            .map_err(feed_error)?
            .list_token_revocations(req)
            .await
            .map_err(feed_error)?
            .into_inner()
            .revocations;
        // One the remote cannot describe is lost: as for a lost event, refuse to judge
        // rather than go on without it.
        all.into_iter()
            .map(|p| {
                token_revocation(p).ok_or_else(|| {
                    StoreError::Corrupt("a token revocation from Watch names no token".into())
                })
            })
            .collect()
    }
}
