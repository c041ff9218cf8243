//! The revocation bus of one replica: follow the event feed, drop revoked keys from the
//! cache and add JWT revocations to the replica's set the moment their event arrives, and
//! re-publish applied events to local `Watch` clients.
//!
//! The feed is the store's stream (Redis XREAD on a dedicated connection) or another
//! keygate's `Watch` stream. After a lost connection the follower resumes from the last id
//! it applied; if events after that id were lost, it flushes the whole cache and loads the
//! JWT revocations afresh (no JWT is judged until it has them). While it
//! cannot follow, cached entries keep only their TTL as the bound on staleness, and the
//! replica says so in `/readyz` and the `revocation_stream_connected` metric.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, watch};

use crate::cache::CredentialCache;
use crate::jwt::revoked::RevokedTokens;
use crate::store::{
    now_ms, DelegationEvent, EventId, KeyStore, RevocationEvent, StoreError, StreamEntry,
    TokenRevocation, TokenRevocationEvent,
};
use crate::telemetry::metrics;
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

impl FeedItem {
    /// The stream position after this item.
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
                tracing::warn!(%id, key_id = key_id.as_deref().unwrap_or(""), detail, "revocation stream entry cannot be read; taking the safe side");
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
    /// The position to start from when nothing was applied yet: the newest event now.
    async fn start_position(&self) -> Result<EventId, StoreError>;

    /// The next items after `after`, waiting a bounded time for them (an empty result is
    /// fine). `resync` is set after a failure: the feed must then check whether events
    /// after `after` were lost and, if so, yield a `Reset` first.
    async fn read(&self, after: EventId, resync: bool) -> Result<Vec<FeedItem>, StoreError>;

    /// Every JWT revocation in force now. Asked after `start_position` and after each
    /// `Reset`: it holds at least every revocation up to that position.
    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError>;
}

/// The store's own stream.
pub struct StoreFeed {
    store: Arc<dyn KeyStore>,
    block: Duration,
}

impl StoreFeed {
    pub fn new(store: Arc<dyn KeyStore>, block: Duration) -> Self {
        StoreFeed { store, block }
    }
}

/// Most events one read returns.
const BATCH: usize = 1000;

#[async_trait]
impl EventFeed for StoreFeed {
    async fn start_position(&self) -> Result<EventId, StoreError> {
        self.store.latest_event_id().await
    }

    async fn read(&self, after: EventId, resync: bool) -> Result<Vec<FeedItem>, StoreError> {
        if resync && self.store.events_lost_after(after).await? {
            return Ok(vec![FeedItem::Reset(self.store.latest_event_id().await?)]);
        }
        let entries = self
            .store
            .read_events(after, BATCH, Some(self.block))
            .await?;
        // A reader that fell behind while connected may have had events trimmed from
        // under it: what it read then starts after a gap. Asked after each batch, not
        // each request: events are rare next to checks.
        if !entries.is_empty() && self.store.events_lost_after(after).await? {
            return Ok(vec![FeedItem::Reset(self.store.latest_event_id().await?)]);
        }
        Ok(entries.into_iter().map(FeedItem::from_entry).collect())
    }

    async fn token_revocations(&self) -> Result<Vec<TokenRevocation>, StoreError> {
        self.store.token_revocations(now_ms()).await
    }
}

/// One replica's revocation state.
pub struct RevocationBus {
    cache: Arc<CredentialCache>,
    tokens: Arc<RevokedTokens>,
    delegations: Arc<Delegations>,
    published: broadcast::Sender<FeedItem>,
    connected: AtomicBool,
    /// Set once the follower knows where in the stream it starts: before that, nothing
    /// verified may be answered, or a revocation in between would be missed.
    positioned: AtomicBool,
    last_applied: Mutex<EventId>,
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
            last_applied: Mutex::new(EventId::START),
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

    pub fn last_applied(&self) -> EventId {
        *self.last_applied.lock().expect("not poisoned")
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
    pub fn subscribe(&self) -> broadcast::Receiver<FeedItem> {
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
                "lost the revocation stream; cached keys are bounded by their TTL until it is back"
            );
        } else if !was && connected {
            tracing::info!(after = %self.last_applied(), "following the revocation stream");
        }
    }

    /// Applies one item: the cache first, then local watchers.
    pub async fn apply(&self, item: FeedItem) {
        let m = metrics();
        match &item {
            FeedItem::Event(e) => {
                self.cache.invalidate_key(&e.key_id, Some(e.kind));
                applied(e.at_ms);
                tracing::debug!(key_id = %e.key_id, kind = e.kind.as_str(), id = %e.id, "revocation applied");
            }
            FeedItem::Tokens(t) => {
                self.tokens.prune(now_ms());
                self.tokens.apply(&t.revocation);
                m.jwt_revocations.set(self.tokens.len() as i64);
                applied(t.revocation.at_ms);
                tracing::info!(issuer = %t.revocation.issuer, id = %t.id, "JWT revocation applied");
            }
            FeedItem::Delegation(d) => {
                self.delegations.changed();
                applied(d.at_ms);
                tracing::info!(partner = %d.partner_id, tenant = %d.tenant_id, granted = d.granted, id = %d.id, "delegation change applied");
            }
            FeedItem::Unknown { id, key_id } => {
                self.cache.invalidate_key(key_id, None);
                m.revocation_unreadable.inc();
                tracing::warn!(%key_id, %id, "revocation event of an unknown kind: dropped the key from the cache");
            }
            FeedItem::Reset(id) => {
                // JWT revocations may have been among the lost events: none is judged
                // until they are loaded again (`follow` does that next).
                self.tokens.mark_incomplete();
                self.delegations.changed();
                self.cache.invalidate_all();
                m.revocation_flushes.inc();
                self.flushes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(resume_after = %id, "revocation events were lost or unreadable; flushed the credential cache");
            }
        }
        *self.last_applied.lock().expect("not poisoned") = item.position();
        let _ = self.published.send(item);
    }

    /// Follows `feed` until `stop` turns true.
    pub async fn follow(
        self: Arc<Self>,
        feed: Arc<dyn EventFeed>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::default();
        let mut after = loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = feed.start_position() => match r {
                    Ok(id) => break id,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot find the revocation stream's position");
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        };
        *self.last_applied.lock().expect("not poisoned") = after;
        // Revocations up to the position, before anything is answered; later ones come
        // on the feed.
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                loaded = self.load_tokens(feed.as_ref()) => match loaded {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load the JWT revocations");
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        }
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
                    tracing::warn!(error = %e, "cannot reload the JWT revocations");
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
                r = feed.read(after, resync) => r,
            };
            match read {
                Ok(items) => {
                    resync = false;
                    backoff = Backoff::default();
                    self.set_connected(true);
                    for item in items {
                        after = item.position();
                        self.apply(item).await;
                    }
                }
                Err(e) => {
                    if self.is_connected() || !resync {
                        tracing::warn!(error = %e, "revocation stream read failed");
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
        tracing::debug!(held = all.len(), "JWT revocations loaded");
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
