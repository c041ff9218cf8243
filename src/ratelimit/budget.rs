//! What one replica holds of a key's admissions: the reservation being spent, the one
//! reserved ahead, the give-backs owed to the store, and a refusal remembered. Spending is
//! local and under a short lock; the store is asked by `Limiter` (`mod.rs`) only.

use tokio::time::Instant;

use super::{info, limited, Plan, RateLimitConfig, Verdict};
use crate::decision::RateInfo;
use crate::store::{GiveBack, MAX_GIVE_BACKS};

/// A key's budget on this replica: spent under a short lock that is never held across a
/// store call; refilled by one store call at a time (`refill`), which the requests that
/// find nothing to spend wait on.
#[derive(Default)]
pub(super) struct KeyBudget {
    pub(super) state: std::sync::Mutex<Budget>,
    pub(super) refill: tokio::sync::Mutex<()>,
}

/// What a replica holds of one key's admissions.
#[derive(Default)]
pub(super) struct Budget {
    /// The reservation being spent.
    pub(super) current: Option<Held>,
    /// The next one, reserved ahead while the current one was being spent (a busy key far
    /// from its limit), so that its requests do not wait for the store.
    pub(super) next: Option<Held>,
    /// A reservation ahead of need is being asked for.
    pub(super) reserving_ahead: bool,
    /// Reservations to return with the next store call, each by its id (the store applies
    /// each once): the unspent rest of spent ones, and all of those whose answer never
    /// arrived or never reached enough replicas. Kept until a call that carried them
    /// succeeds; at most `MAX_GIVE_BACKS` (dropping one only under-admits).
    pub(super) returns: Vec<GiveBack>,
    /// What still fitted in the store after the last reservation.
    pub(super) remaining: u32,
    pub(super) full_in_ms: u64,
    /// After a refusal: nothing fits before this, so nothing is asked before it either
    /// (a key far over its plan would otherwise cost a store call per request).
    pub(super) refused_until: Option<Instant>,
}

/// A reservation a replica spends.
pub(super) struct Held {
    pub(super) id: String,
    pub(super) granted: u32,
    pub(super) left: u32,
    /// Measured from before the store was asked: never later than the end of the spending
    /// time the store counted (`RateRequest::spend_ms` after its own now).
    pub(super) until: Instant,
}

impl KeyBudget {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, Budget> {
        // Nothing panics while holding it; a poisoned lock still holds a whole budget.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Held {
    pub(super) fn usable(&self, now: Instant) -> bool {
        now < self.until && self.left > 0
    }
}

/// What spending from a key's budget on this replica came to, without the store.
pub(super) enum Spent {
    /// Admitted; `reserve_ahead`: this request is the one to ask for the next budget.
    Admitted {
        info: RateInfo,
        reserve_ahead: bool,
    },
    Limited {
        retry_ms: u64,
        full_in_ms: u64,
    },
    /// Nothing to spend: the store must be asked.
    Nothing,
}

impl Spent {
    /// The verdict, unless the store must decide.
    pub(super) fn verdict(self, plan: &Plan) -> Option<Verdict> {
        match self {
            Spent::Admitted { info, .. } => Some(Verdict::Admitted(info)),
            Spent::Limited {
                retry_ms,
                full_in_ms,
            } => Some(limited(plan, retry_ms, full_in_ms)),
            Spent::Nothing => None,
        }
    }
}

impl Budget {
    /// Admissions held and not spent: the current budget's and the next one's.
    pub(super) fn held(&self) -> u32 {
        [&self.current, &self.next]
            .into_iter()
            .flatten()
            .map(|h| h.left)
            .sum()
    }

    pub(super) fn give_back(&mut self, g: GiveBack) {
        if self.returns.len() >= MAX_GIVE_BACKS {
            self.returns.remove(0);
        }
        self.returns.push(g);
    }

    /// A reservation that is no longer spent goes back with the next store call (even
    /// with nothing left: the store forgets it).
    pub(super) fn retire(&mut self, held: Held) {
        self.give_back(GiveBack {
            id: held.id,
            unspent: Some(held.left),
        });
    }

    /// One admission from what this replica holds: the current reservation, else the one
    /// reserved ahead.
    pub(super) fn spend(&mut self, plan: &Plan, now: Instant, cfg: &RateLimitConfig) -> Spent {
        if !self.current.as_ref().is_some_and(|h| h.usable(now)) {
            if let Some(spent) = self.current.take() {
                self.retire(spent);
            }
            match self.next.take() {
                Some(next) if next.usable(now) => self.current = Some(next),
                Some(lapsed) => self.retire(lapsed),
                None => {}
            }
        }
        if let Some(held) = self.current.as_mut() {
            held.left -= 1;
            let (left, granted) = (held.left, held.granted);
            // Far from its limit (what fits is more than the budgets replicas may take)
            // and half of the current budget spent: the next one is asked for now.
            let reserve_ahead = !self.reserving_ahead
                && self.next.is_none()
                && left <= granted / 2
                && self.remaining / 8 >= cfg.max_reservation;
            self.reserving_ahead |= reserve_ahead;
            return Spent::Admitted {
                info: info(plan, self.remaining + self.held(), self.full_in_ms),
                reserve_ahead,
            };
        }
        match self.refused_until.filter(|u| now < *u) {
            Some(until) => Spent::Limited {
                retry_ms: (until - now).as_millis() as u64,
                full_in_ms: self.full_in_ms,
            },
            None => Spent::Nothing,
        }
    }
}
