//! The revocation stream's entries and the cursor over its partitions.

use serde::{Deserialize, Serialize};

use super::{EventLog, StoreError};

/// What happened to a key, as carried on the revocation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Revoked,
    Deleted,
    /// Scopes, expiry or other fields changed: cached principals are stale.
    Updated,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Revoked, EventKind::Deleted, EventKind::Updated];

    /// The name on the stream (and in logs). The one mapping: the stores write it, and
    /// read it back with `parse`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Revoked => "revoked",
            EventKind::Deleted => "deleted",
            EventKind::Updated => "updated",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// One entry of the revocation stream. `id` orders events (Redis stream ids, `ms-seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationEvent {
    pub id: String,
    pub key_id: String,
    pub kind: EventKind,
    pub at_ms: u64,
}

impl RevocationEvent {
    /// The id as (milliseconds, sequence), for ordering.
    pub fn position(&self) -> EventId {
        EventId::parse(&self.id).unwrap_or_default()
    }
}

/// Which JWTs a revocation matches, all from one issuer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum TokenTarget {
    /// The token whose `jti` claim is this.
    Jti { jti: String },
    /// Every token of this subject issued before `before_ms`, compared in whole seconds as
    /// `iat` is: a token whose `iat` is in the second of `before_ms` or later passes. A
    /// token without `iat` cannot show it is newer and is matched.
    Subject { subject: String, before_ms: u64 },
}

/// A revocation of JWTs: stored, carried on the stream, held by every replica until
/// `expires_at_ms`, when no token it matches can still be valid (the issuer's
/// `max_token_lifetime` and `leeway` bound that).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevocation {
    /// The issuer's configured name (`jwt.issuers[].name`).
    pub issuer: String,
    #[serde(flatten)]
    pub target: TokenTarget,
    pub at_ms: u64,
    pub expires_at_ms: u64,
}

impl TokenRevocation {
    /// The one name of what this revocation is about: a later revocation of the same
    /// subject (or the same `jti`) replaces it, merged by `merged_with`.
    pub fn rule_key(&self) -> String {
        match &self.target {
            TokenTarget::Jti { jti } => format!("jti\u{1f}{}\u{1f}{jti}", self.issuer),
            TokenTarget::Subject { subject, .. } => {
                format!("sub\u{1f}{}\u{1f}{subject}", self.issuer)
            }
        }
    }

    /// This revocation with `newer` folded in (same `rule_key`): the later cut-off and
    /// the later expiry win, so revoking never un-revokes. `None` if `newer` adds nothing.
    pub fn merged_with(&self, newer: &TokenRevocation) -> Option<TokenRevocation> {
        let mut merged = self.clone();
        let mut changed = false;
        if let (
            TokenTarget::Subject { before_ms, .. },
            TokenTarget::Subject {
                before_ms: newer_before,
                ..
            },
        ) = (&mut merged.target, &newer.target)
        {
            if newer_before > before_ms {
                *before_ms = *newer_before;
                merged.at_ms = newer.at_ms;
                changed = true;
            }
        }
        if newer.expires_at_ms > merged.expires_at_ms {
            merged.expires_at_ms = newer.expires_at_ms;
            changed = true;
        }
        changed.then_some(merged)
    }

    pub fn expired(&self, now_ms: u64) -> bool {
        crate::principal::expired(self.expires_at_ms, now_ms)
    }
}

/// A partner's right to act for a tenant, granted or withdrawn, as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationEvent {
    pub id: EventId,
    pub partner_id: String,
    pub tenant_id: String,
    pub granted: bool,
    pub at_ms: u64,
}

/// The stream's names for delegation changes.
pub const DELEGATED: &str = "delegated";
pub const UNDELEGATED: &str = "undelegated";

/// A token revocation as read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRevocationEvent {
    pub id: EventId,
    pub revocation: TokenRevocation,
}

/// The stream's name for token revocations (beside `EventKind`'s, which name a key).
pub const TOKENS_REVOKED: &str = "tokens_revoked";

/// One entry of the revocation stream, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEntry {
    Event(RevocationEvent),
    Tokens(TokenRevocationEvent),
    Delegation(DelegationEvent),
    /// An entry this version cannot read: a kind from a newer keygate (during a rolling
    /// upgrade), or a corrupt entry. Readers must take the safe side — drop `key_id`, or
    /// everything when no key id can be read — and move past it, never stop at it.
    Unreadable {
        id: EventId,
        key_id: Option<String>,
        /// What was wrong, for the log (no secret is ever written to the stream).
        detail: String,
    },
}

impl StreamEntry {
    /// The event, if this entry could be read as one.
    pub fn event(&self) -> Option<&RevocationEvent> {
        match self {
            StreamEntry::Event(e) => Some(e),
            StreamEntry::Tokens(_)
            | StreamEntry::Delegation(_)
            | StreamEntry::Unreadable { .. } => None,
        }
    }

    pub fn position(&self) -> EventId {
        match self {
            StreamEntry::Event(e) => e.position(),
            StreamEntry::Tokens(t) => t.id,
            StreamEntry::Delegation(d) => d.id,
            StreamEntry::Unreadable { id, .. } => *id,
        }
    }
}

/// A position in the revocation stream: Redis stream id `ms-seq`. `0-0` is the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub ms: u64,
    pub seq: u64,
}

impl EventId {
    pub const START: EventId = EventId { ms: 0, seq: 0 };

    /// Parses `ms-seq` (or a bare `ms`, meaning `ms-0`). Nothing else.
    pub fn parse(s: &str) -> Option<EventId> {
        let (ms, seq) = match s.split_once('-') {
            Some((ms, seq)) => (ms, seq),
            None => (s, "0"),
        };
        let digits =
            |x: &str| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(EventId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A position in every partition of the revocation stream, one `EventId` each, in
/// partition order. Written `ms-seq,ms-seq,…`; with one partition it is just that
/// partition's id, so a single-stream position reads as a cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Cursor(pub Vec<EventId>);

impl Cursor {
    /// The start of `partitions` partitions.
    pub fn start(partitions: usize) -> Cursor {
        Cursor(vec![EventId::START; partitions])
    }

    /// Parses `ms-seq[,ms-seq…]`, whatever the number of partitions.
    pub fn parse(s: &str) -> Option<Cursor> {
        s.split(',')
            .map(|part| EventId::parse(part.trim()))
            .collect::<Option<Vec<_>>>()
            .map(Cursor)
    }

    pub fn partitions(&self) -> usize {
        self.0.len()
    }

    /// The position in `partition`; the start when there is no such partition.
    pub fn at(&self, partition: usize) -> EventId {
        self.0.get(partition).copied().unwrap_or_default()
    }

    /// This cursor moved to `id` in `partition`.
    pub fn with(&self, partition: usize, id: EventId) -> Cursor {
        let mut next = self.clone();
        if let Some(slot) = next.0.get_mut(partition) {
            *slot = id;
        }
        next
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        Ok(())
    }
}

/// Where every partition of `store`'s stream is now: its newest event ids.
pub async fn latest_cursor(store: &dyn EventLog) -> Result<Cursor, StoreError> {
    let ids =
        futures::future::try_join_all((0..store.partitions()).map(|p| store.latest_event_id(p)))
            .await?;
    Ok(Cursor(ids))
}
