//! What the rate ledger is asked and answers: rules, reservations, give-backs, leases.

/// How a key's admissions are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateRule {
    /// GCRA: one admission per `interval_ms` sustained, up to `burst` at once.
    Gcra { interval_ms: u64, burst: u32 },
    /// At most `limit` admissions in any `window_ms` (a log of admissions, each counted
    /// from the end of the time it may be spent in).
    Window { limit: u32, window_ms: u64 },
}

/// A reservation asked of a key's rate-limit state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRequest {
    pub rule: RateRule,
    /// This reservation's id (`RESERVATION_ID_LEN` of base62). A reservation is made at
    /// most once: asked again (a retry whose first answer was lost), the store answers
    /// what it granted the first time, and grants nothing more.
    pub id: String,
    pub want: u32,
    /// How long after the store's clock says "now" the caller may spend what is granted
    /// (a rolling window counts each admission from the end of that time).
    pub spend_ms: u64,
    /// Earlier reservations whose unspent admissions are returned, first. Each is
    /// returned at most once, however often it is named; one the store does not know
    /// (already returned, lost in a failover, or older than `RESERVATION_RECORD_MS`)
    /// returns nothing.
    pub give_back: Vec<GiveBack>,
}

/// Unspent admissions of an earlier reservation, returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveBack {
    pub id: String,
    /// How many were not spent; `None`: all it granted (its answer never arrived, so
    /// none was spent).
    pub unspent: Option<u32>,
}

/// How long the store remembers a reservation: what it granted, so that a retry gets
/// the same answer and its unspent admissions can be returned once. Past this, a retry
/// or a give-back finds nothing (the store only ever under-admits for it).
pub const RESERVATION_RECORD_MS: u64 = 120_000;

/// The length of a reservation id.
pub const RESERVATION_ID_LEN: usize = 12;

/// The most give-backs one reservation carries.
pub const MAX_GIVE_BACKS: usize = 8;

/// What a reservation got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateGrant {
    pub granted: u32,
    /// Admissions that would still fit now, after this grant.
    pub remaining: u32,
    /// With nothing granted: when one would fit again.
    pub retry_after_ms: u64,
    /// When the whole burst would fit again.
    pub full_in_ms: u64,
}

/// The outcome of a lease operation: whether it was done, and how many the key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseResult {
    pub done: bool,
    pub held: u32,
}

/// What to do with a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take a new lease for `ttl` if fewer than `limit` are held.
    Acquire {
        ttl_ms: u64,
        limit: u32,
    },
    /// Extend a held lease to `ttl` from now.
    Renew {
        ttl_ms: u64,
    },
    Release,
}
