//! The revocation bus of one replica: follow the event feed, drop revoked keys from the
//! cache and add JWT revocations to the replica's set the moment their event arrives, and
//! re-publish applied events to local `Watch` clients.
//!
//! The feed is the store's stream (Redis XREAD, one dedicated connection per stream
//! partition) or another keygate's `Watch` stream. The follower keeps a position per
//! partition (a `Cursor`). After a lost connection it resumes each partition from the last
//! id it applied there; if events of a partition after that id were lost, it flushes the
//! whole cache and loads the JWT revocations afresh (no JWT is judged until it has them). While it
//! cannot follow, cached entries keep only their TTL as the bound on staleness, and the
//! replica says so in `/readyz` and the `revocation_stream_connected` metric.
//!
//! Its retry delays are the few lines of `Backoff`, not backon's `ExponentialBuilder`
//! (already in the tree through redis): that iterator ends and has no `Default`, so each
//! call site and `Partition` would grow, and its jitter would double the 500 ms bound.
//!
//! One file over 500 lines because following, replaying, flushing and applying events
//! share one position per partition, which must move in one place.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use crate::cache::CredentialCache;
use crate::jwt::revoked::RevokedTokens;
use crate::store::{
    latest_cursor, now_ms, Cursor, DelegationEvent, EventId, EventLog, KeyStore, RevocationEvent,
    StoreError, StreamEntry, TokenRevocation, TokenRevocationEvent, TokenRevocations,
};
use crate::telemetry::{metrics, ErrorChain, Failures};
use crate::tenant::Delegations;

/// What a feed yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Event(RevocationEvent),
    /// JWTs revoked by `jti` or by subject.
    Tokens(TokenRevocationEvent),
    /// A partner's delegation to a tenant granted or withdrawn.
    Delegation(DelegationEvent),
    /// An event this version cannot read (a newer keygate's kind, a corrupt entry) naming
    /// a key: the key is dropped, as for any change to it. Without a readable key id an
    /// entry is a `Reset`.
    Unknown {
        id: EventId,
        key_id: String,
    },
    /// Events were lost (or unreadable); flush everything and continue after this id.
    Reset(EventId),
}

/// A feed item, the partition it came from, and the feed's whole position after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEntry {
    pub partition: usize,
    pub item: FeedItem,
    pub cursor: Cursor,
}

impl FeedEntry {
    /// `item` of `partition`, read when the feed stood at `before`.
    pub fn after(before: &Cursor, partition: usize, item: FeedItem) -> FeedEntry {
        FeedEntry {
            cursor: before.with(partition, item.position()),
            partition,
            item,
        }
    }
}

impl FeedItem {
    /// The position after this item in its partition.
    pub fn position(&self) -> EventId {
        match self {
            FeedItem::Event(e) => e.position(),
            FeedItem::Tokens(t) => t.id,
            FeedItem::Delegation(d) => d.id,
            FeedItem::Unknown { id, .. } | FeedItem::Reset(id) => *id,
        }
    }

    /// A stream entry as the safe side of what it says: an unreadable entry never stops
    /// a reader; it drops its key, or everything.
    pub fn from_entry(entry: StreamEntry) -> FeedItem {
        match entry {
            StreamEntry::Event(e) => FeedItem::Event(e),
            StreamEntry::Tokens(t) => FeedItem::Tokens(t),
            StreamEntry::Delegation(d) => FeedItem::Delegation(d),
            StreamEntry::Unreadable { id, key_id, detail } => {
                tracing::warn!(event = "revocation.entry_unreadable", %id, key_id = key_id.as_deref().unwrap_or(""), detail, "revocation stream entry cannot be read; taking the safe side");
                match key_id {
                    Some(key_id) => FeedItem::Unknown { id, key_id },
                    None => FeedItem::Reset(id),
                }
            }
        }
    }
}

/// A source of revocation events.
#[async_trait]
pub trait EventFeed: Send + Sync + 'static {
    /// The position to start from when nothing was applied yet: the newest events now.
    async fn start_position(&self) -> Result<Cursor, StoreError>;

    /// The next items after `after`, waiting a bounded time for them (an empty result is
    /// fine), each with the cursor after it. `resync` is set after a failure: the feed
    /// must then check whether events after `after` were lost and, if so, yield a `Reset`
    /// first.
    async fn read(&self, after: &Cursor, resync: bool) -> Result<Vec<FeedEntry>, StoreError>;

    /// Every JWT revocation in force now. Asked after `start_position` and after each
    /// `Reset`: it holds at least every revocation up to that position.
    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError>;

    /// Whether every part of the feed is followed now (after a successful `read`, some
    /// partitions may still be failing and retried: the follower is then not connected).
    fn following(&self) -> bool {
        true
    }
}

/// The store's own stream, every partition of it.
///
/// Each partition is read by a blocking read of its own, kept running across `read`
/// calls: a quiet partition's read waits in Redis while another's events are applied, so
/// no read is ever cancelled and re-sent (which would pile up blocked reads on a
/// connection). A partition that fails (its master down, failing over) is retried on its
/// own backoff while the others go on: one shard's outage never holds up the revocations
/// of the rest.
pub struct StoreFeed {
    events: Arc<dyn EventLog>,
    tokens: Arc<dyn TokenRevocations>,
    block: Duration,
    parts: tokio::sync::Mutex<Vec<Partition>>,
    /// Partitions whose last read failed.
    failing: AtomicUsize,
}

#[derive(Default)]
struct Partition {
    read: Option<PartitionRead>,
    /// Check for lost events before the next read (after a failure).
    resync: bool,
    /// While failing: when to read again.
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
}

/// A partition's read in flight, and where it reads from.
struct PartitionRead {
    after: EventId,
    task: tokio::task::JoinHandle<Result<PartitionBatch, StoreError>>,
}

/// What one partition's read brought.
enum PartitionBatch {
    Entries(Vec<StreamEntry>),
    /// Events after the position were lost: the partition's newest id now.
    Lost(EventId),
}

impl StoreFeed {
    /// Follows `store`'s stream, and reads its JWT revocations when asked to start over.
    pub fn new(store: Arc<dyn KeyStore>, block: Duration) -> Self {
        let partitions = store.partitions();
        StoreFeed {
            events: store.clone(),
            tokens: store,
            block,
            parts: tokio::sync::Mutex::new((0..partitions).map(|_| Partition::default()).collect()),
            failing: AtomicUsize::new(0),
        }
    }

    /// One partition's next batch after `from`, checking first for lost events when asked.
    async fn read_partition(
        store: Arc<dyn EventLog>,
        p: usize,
        from: EventId,
        resync: bool,
        block: Duration,
    ) -> Result<PartitionBatch, StoreError> {
        if resync && store.events_lost_after(p, from).await? {
            return Ok(PartitionBatch::Lost(store.latest_event_id(p).await?));
        }
        let entries = store.read_events(p, from, BATCH, Some(block)).await?;
        // A reader that fell behind while connected may have had events trimmed from
        // under it: what it read then starts after a gap. Asked after each batch, not
        // each request: events are rare next to checks.
        if !entries.is_empty() && store.events_lost_after(p, from).await? {
            return Ok(PartitionBatch::Lost(store.latest_event_id(p).await?));
        }
        Ok(PartitionBatch::Entries(entries))
    }
}

impl Drop for StoreFeed {
    fn drop(&mut self) {
        for part in self.parts.get_mut().iter() {
            if let Some(read) = &part.read {
                read.task.abort();
            }
        }
    }
}

/// Most events one read returns.
const BATCH: usize = 1000;

#[async_trait]
impl EventFeed for StoreFeed {
    async fn start_position(&self) -> Result<Cursor, StoreError> {
        latest_cursor(self.events.as_ref()).await
    }

    async fn read(&self, after: &Cursor, resync: bool) -> Result<Vec<FeedEntry>, StoreError> {
        let mut parts = self.parts.lock().await;
        if resync {
            for part in parts.iter_mut() {
                part.resync = true;
            }
        }
        loop {
            let now = tokio::time::Instant::now();
            for (p, part) in parts.iter_mut().enumerate() {
                let from = after.at(p);
                if part.read.as_ref().is_some_and(|r| r.after != from) {
                    // The follower moved on (a reset, a restart): that read is stale.
                    if let Some(stale) = part.read.take() {
                        stale.task.abort();
                    }
                }
                if part.read.is_none() && part.retry_at.is_none_or(|t| t <= now) {
                    let task = tokio::spawn(Self::read_partition(
                        self.events.clone(),
                        p,
                        from,
                        part.resync,
                        self.block,
                    ));
                    part.read = Some(PartitionRead { after: from, task });
                }
            }
            let retry = parts
                .iter()
                .filter(|part| part.read.is_none())
                .filter_map(|part| part.retry_at)
                .min();
            let (which, tasks): (Vec<usize>, Vec<_>) = parts
                .iter_mut()
                .enumerate()
                .filter_map(|(p, part)| part.read.as_mut().map(|r| (p, &mut r.task)))
                .unzip();
            let wake = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // The first partition to answer (the others keep waiting), or a failed
            // partition's time to be read again.
            let first = async {
                if tasks.is_empty() {
                    // Every partition is failing: only `wake` can end this.
                    return std::future::pending().await;
                }
                let (done, i, _) = futures::future::select_all(tasks).await;
                (which[i], done)
            };
            let done = tokio::select! {
                done = first => Some(done),
                _ = wake => None,
            };
            let Some((p, done)) = done else { continue };
            let part = &mut parts[p];
            part.read = None;
            let batch = done
                .map_err(|e| StoreError::unavailable("reading the revocation stream", e))
                .and_then(|r| r);
            let before = after.clone();
            match batch {
                Ok(batch) => {
                    if part.retry_at.take().is_some() {
                        self.failing.fetch_sub(1, Ordering::AcqRel);
                        tracing::info!(
                            event = "revocation.partition_resumed",
                            partition = p,
                            "following the revocation stream partition again"
                        );
                    }
                    part.resync = false;
                    part.backoff = Backoff::default();
                    return Ok(match batch {
                        PartitionBatch::Lost(latest) => {
                            vec![FeedEntry::after(&before, p, FeedItem::Reset(latest))]
                        }
                        PartitionBatch::Entries(entries) => {
                            let mut cursor = before;
                            entries
                                .into_iter()
                                .map(|entry| {
                                    let fed =
                                        FeedEntry::after(&cursor, p, FeedItem::from_entry(entry));
                                    cursor = fed.cursor.clone();
                                    fed
                                })
                                .collect()
                        }
                    });
                }
                Err(e) => {
                    part.resync = true;
                    let first = part.retry_at.is_none();
                    part.retry_at = Some(tokio::time::Instant::now() + part.backoff.next());
                    if first {
                        self.failing.fetch_add(1, Ordering::AcqRel);
                        tracing::warn!(event = "revocation.partition_failed", partition = p, error = %ErrorChain(&e), "cannot read a revocation stream partition; following the others meanwhile");
                        return Err(e);
                    }
                    // Still failing: it is retried on its own backoff.
                }
            }
        }
    }

    fn following(&self) -> bool {
        self.failing.load(Ordering::Acquire) == 0
    }

    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError> {
        self.tokens.token_revocations(now_ms()).await
    }
}

/// One replica's revocation state.
pub struct RevocationBus {
    cache: Arc<CredentialCache>,
    tokens: Arc<RevokedTokens>,
    delegations: Arc<Delegations>,
    published: broadcast::Sender<FeedEntry>,
    connected: AtomicBool,
    /// Set once the follower knows where in the stream it starts: before that, nothing
    /// verified may be answered, or a revocation in between would be missed.
    positioned: AtomicBool,
    last_applied: Mutex<Cursor>,
    reconnects: AtomicU64,
    flushes: AtomicU64,
    /// Woken when `connected` changes (for the health reporter).
    changed: tokio::sync::Notify,
}

impl RevocationBus {
    pub fn new(
        cache: Arc<CredentialCache>,
        tokens: Arc<RevokedTokens>,
        delegations: Arc<Delegations>,
    ) -> Self {
        RevocationBus {
            cache,
            tokens,
            delegations,
            published: broadcast::channel(4096).0,
            connected: AtomicBool::new(false),
            positioned: AtomicBool::new(false),
            last_applied: Mutex::new(Cursor::default()),
            reconnects: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether the follower is currently following its feed.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether the follower has its starting position (and so any revocation from now on
    /// reaches the cache).
    pub fn has_position(&self) -> bool {
        self.positioned.load(Ordering::Acquire)
    }

    /// The position after the last item applied, in every partition.
    pub fn last_applied(&self) -> Cursor {
        self.last_applied.lock().expect("not poisoned").clone()
    }

    /// `f`, given the position, while no item is being applied: what `f` reads of the
    /// cache and the delegations is exactly their state at that position (the module
    /// inside Envoy takes its `Ticket` so).
    pub fn at_position<T>(&self, f: impl FnOnce(&Cursor) -> T) -> T {
        f(&self.last_applied.lock().expect("not poisoned"))
    }

    /// Times this replica lost its feed (the metric sums over replicas in one process).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Whole-cache flushes because events were lost.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Items applied from now on (for `Watch`).
    pub fn subscribe(&self) -> broadcast::Receiver<FeedEntry> {
        self.published.subscribe()
    }

    /// Completes the next time the follower connects or loses its feed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn set_connected(&self, connected: bool) {
        let was = self.connected.swap(connected, Ordering::AcqRel);
        if was != connected {
            self.changed.notify_waiters();
        }
        metrics()
            .revocation_connected
            .set(if connected { 1 } else { 0 });
        if was && !connected {
            tracing::warn!(
                event = "revocation.stream_lost",
                "lost the revocation stream; cached keys are bounded by their TTL until it is back"
            );
        } else if !was && connected {
            tracing::info!(event = "revocation.following", after = %self.last_applied(), "following the revocation stream");
        }
    }

    /// Applies one item: the cache first, then local watchers. The position moves under
    /// the same lock as the item's effects are applied, so whoever reads the position
    /// (`last_applied`, `at_position`) knows every effect up to it is in place, and
    /// nothing after it.
    pub async fn apply(&self, entry: FeedEntry) {
        let m = metrics();
        let mut position = self.last_applied.lock().expect("not poisoned");
        match &entry.item {
            FeedItem::Event(e) => {
                self.cache.invalidate_key(&e.key_id, Some(e.kind));
                applied(e.at_ms);
                tracing::debug!(event = "revocation.applied", key_id = %e.key_id, kind = e.kind.as_str(), id = %e.id, "revocation applied");
            }
            FeedItem::Tokens(t) => {
                self.tokens.prune(now_ms());
                self.tokens.apply(&t.revocation);
                m.jwt_revocations.set(self.tokens.len() as i64);
                applied(t.revocation.at_ms);
                tracing::info!(event = "revocation.jwt_applied", issuer = %t.revocation.issuer, id = %t.id, "JWT revocation applied");
            }
            FeedItem::Delegation(d) => {
                self.delegations.changed(&d.partner_id, &d.tenant_id);
                applied(d.at_ms);
                tracing::info!(event = "revocation.delegation_applied", partner = %d.partner_id, tenant = %d.tenant_id, granted = d.granted, id = %d.id, "delegation change applied");
            }
            FeedItem::Unknown { id, key_id } => {
                self.cache.invalidate_key(key_id, None);
                m.revocation_unreadable.inc();
                tracing::warn!(event = "revocation.unknown_kind", %key_id, %id, "revocation event of an unknown kind: dropped the key from the cache");
            }
            FeedItem::Reset(id) => {
                // JWT revocations may have been among the lost events: none is judged
                // until they are loaded again (`follow` does that next).
                self.tokens.mark_incomplete();
                self.delegations.forget_all();
                self.cache.invalidate_all();
                m.revocation_flushes.inc();
                self.flushes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = "revocation.cache_flushed", resume_after = %id, "revocation events were lost or unreadable; flushed the credential cache");
            }
        }
        *position = entry.cursor.clone();
        drop(position);
        let _ = self.published.send(entry);
    }

    /// Follows `feed` until `stop` turns true.
    pub async fn follow(
        self: Arc<Self>,
        feed: Arc<dyn EventFeed>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::default();
        let mut failures = Failures::default();
        let mut after = loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = feed.start_position() => match r {
                    Ok(id) => break id,
                    Err(e) => {
                        if let Some(unlogged) = failures.failed() {
                            tracing::warn!(event = "revocation.position_unknown", error = %ErrorChain(&e), failures_not_logged = unlogged, "cannot find the revocation stream's position");
                        }
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        };
        if let Some(failed) = failures.recovered() {
            tracing::info!(
                event = "revocation.position_found",
                failed_attempts = failed,
                "found the revocation stream's position"
            );
        }
        *self.last_applied.lock().expect("not poisoned") = after.clone();
        // Revocations up to the position, before anything is answered; later ones come
        // on the feed.
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                loaded = self.load_tokens(feed.as_ref()) => match loaded {
                    Ok(()) => break,
                    Err(e) => {
                        if let Some(unlogged) = failures.failed() {
                            tracing::warn!(event = "revocation.jwt_load_failed", error = %ErrorChain(&e), failures_not_logged = unlogged, "cannot load the JWT revocations");
                        }
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        }
        failures.recovered();
        self.positioned.store(true, Ordering::Release);
        self.set_connected(true);
        let mut resync = false;
        loop {
            if *stop.borrow() {
                return;
            }
            if !self.tokens.is_complete() {
                // After a reset: no JWT is judged until this succeeds.
                if let Err(e) = self.load_tokens(feed.as_ref()).await {
                    if let Some(unlogged) = failures.failed() {
                        tracing::warn!(event = "revocation.jwt_reload_failed", error = %ErrorChain(&e), failures_not_logged = unlogged, "cannot reload the JWT revocations");
                    }
                    self.set_connected(false);
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                    continue;
                }
            }
            let read = tokio::select! {
                _ = stop.changed() => return,
                r = feed.read(&after, resync) => r,
            };
            match read {
                Ok(items) => {
                    resync = false;
                    backoff = Backoff::default();
                    failures.recovered();
                    self.set_connected(feed.following());
                    for entry in items {
                        after = entry.cursor.clone();
                        self.apply(entry).await;
                    }
                }
                Err(e) => {
                    if self.is_connected() || !resync {
                        tracing::warn!(event = "revocation.read_failed", error = %ErrorChain(&e), "revocation stream read failed");
                    }
                    self.set_connected(false);
                    metrics().revocation_reconnects.inc();
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    resync = true;
                    tokio::select! {
                        _ = stop.changed() => return,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
        }
    }
}

impl RevocationBus {
    async fn load_tokens(&self, feed: &dyn EventFeed) -> Result<(), StoreError> {
        let all = feed.token_revocations().await?;
        self.tokens.load(&all);
        metrics().jwt_revocations.set(self.tokens.len() as i64);
        tracing::debug!(
            event = "revocation.jwt_loaded",
            held = all.len(),
            "JWT revocations loaded"
        );
        Ok(())
    }
}

/// Counts an applied event, and how long after it was made it arrived.
fn applied(at_ms: u64) {
    let m = metrics();
    m.revocation_events.inc();
    m.revocation_lag
        .observe(now_ms().saturating_sub(at_ms) as f64 / 1000.0);
}

/// Retry delays: 50 ms doubling to 500 ms. The bound is also how late revocations made
/// just after Redis comes back can reach this replica (a reconnect attempt to a Redis
/// that is down costs next to nothing).
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Duration::from_millis(50))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
        d
    }
}
