//! One key's rate-limit state, as the embedded store keeps it; `src/store/lua/reserve.lua`
//! is the same for Redis, and the conformance suite holds the two to one behaviour.
//!
//! - the GCRA state (`gcra.rs`), for plans with a rate and a burst;
//! - the rolling window's log, for plans of at most N in any window: what each
//!   reservation granted, by the end of the time it may be spent in (`spend_ms` after the
//!   store's now). An admission counts while that end is within the window: two admissions
//!   counted apart are at least a window apart, whenever in its spending time each was
//!   actually made;
//! - the reservations made and not yet returned, by id: a reservation asked again gets the
//!   first answer and no more, and a give-back returns a reservation's unspent admissions
//!   once, however often it is named.
//!
//! Storage-side state: the embedded store (`memory.rs`) keeps one per key. The limiter
//! (`ratelimit`) never reads it; it asks through `RateLedger`.

use std::collections::{BTreeMap, HashMap};

use super::gcra;
use crate::store::{RateGrant, RateRequest, RateRule, RESERVATION_RECORD_MS};

#[derive(Debug, Default)]
pub struct KeyRate {
    tat: Option<u64>,
    /// (end of spending, reservation id) → admissions counted.
    log: BTreeMap<(u64, String), u32>,
    logged: u64,
    held: HashMap<String, Held>,
}

#[derive(Debug)]
struct Held {
    granted: u32,
    at_ms: u64,
    /// Its entry in the log (rolling windows).
    end_ms: Option<u64>,
}

impl KeyRate {
    /// Returns what `req` gives back, then reserves what it asks, at `now_ms`.
    pub fn reserve(&mut self, now_ms: u64, req: &RateRequest) -> RateGrant {
        self.held
            .retain(|_, h| h.at_ms + RESERVATION_RECORD_MS > now_ms);
        for back in &req.give_back {
            let Some(h) = self.held.remove(&back.id) else {
                continue;
            };
            let n = back.unspent.map_or(h.granted, |u| u.min(h.granted));
            if let (RateRule::Gcra { interval_ms, .. }, None) = (req.rule, h.end_ms) {
                self.tat = gcra::give_back(self.tat, now_ms, interval_ms, n);
            }
            if let Some(end) = h.end_ms {
                self.unlog(end, &back.id, n);
            }
        }
        let replayed = self.held.get(&req.id).map(|h| h.granted);
        let want = if replayed.is_some() { 0 } else { req.want };
        let mut grant = match req.rule {
            RateRule::Gcra { interval_ms, burst } => {
                let (tat, g) = gcra::grant(self.tat, now_ms, interval_ms, burst, want);
                self.tat = tat;
                if g.granted > 0 {
                    self.hold(&req.id, g.granted, now_ms, None);
                }
                g
            }
            RateRule::Window { limit, window_ms } => {
                self.window_grant(now_ms, req, limit, window_ms, want)
            }
        };
        if let Some(granted) = replayed {
            grant.granted = granted;
            grant.retry_after_ms = 0;
        }
        grant
    }

    /// Nothing owed and nothing held: the state may be forgotten.
    pub fn is_idle(&self) -> bool {
        self.tat.is_none() && self.log.is_empty() && self.held.is_empty()
    }

    fn hold(&mut self, id: &str, granted: u32, at_ms: u64, end_ms: Option<u64>) {
        self.held.insert(
            id.to_owned(),
            Held {
                granted,
                at_ms,
                end_ms,
            },
        );
    }

    fn unlog(&mut self, end: u64, id: &str, n: u32) {
        let k = (end, id.to_owned());
        if let Some(c) = self.log.get_mut(&k) {
            let n = n.min(*c);
            *c -= n;
            self.logged -= u64::from(n);
            if *c == 0 {
                self.log.remove(&k);
            }
        }
    }

    fn window_grant(
        &mut self,
        now_ms: u64,
        req: &RateRequest,
        limit: u32,
        window_ms: u64,
        want: u32,
    ) -> RateGrant {
        // An admission counts while the end of its spending time is within the window.
        let expired: Vec<(u64, String)> = self
            .log
            .range(..(now_ms.saturating_sub(window_ms) + 1, String::new()))
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(c) = self.log.remove(&k) {
                self.logged -= u64::from(c);
            }
        }
        let fits = u64::from(limit).saturating_sub(self.logged);
        let granted = fits.min(u64::from(want)) as u32;
        if granted > 0 {
            let end = spend_end(now_ms, req.spend_ms);
            *self.log.entry((end, req.id.clone())).or_default() += granted;
            self.logged += u64::from(granted);
            self.hold(&req.id, granted, now_ms, Some(end));
        }
        let retry_after_ms = if fits == 0 {
            // One fits again when the entries holding the surplus have left the window.
            let surplus = self.logged + 1 - u64::from(limit);
            let mut freed = 0;
            let mut at = now_ms;
            for ((end, _), c) in &self.log {
                freed += u64::from(*c);
                at = end + window_ms;
                if freed >= surplus {
                    break;
                }
            }
            at - now_ms
        } else {
            0
        };
        let full_in_ms = self
            .log
            .keys()
            .next_back()
            .map_or(0, |(end, _)| end + window_ms - now_ms);
        RateGrant {
            granted,
            remaining: (fits - u64::from(granted)) as u32,
            retry_after_ms,
            full_in_ms,
        }
    }
}

/// The embedded store's clock for rate limits: unix milliseconds when it was made, then
/// monotonic (tokio's clock, which a test may pause and advance).
#[derive(Debug)]
pub struct Clock {
    base_ms: u64,
    base: tokio::time::Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            base_ms: crate::store::now_ms(),
            base: tokio::time::Instant::now(),
        }
    }
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.base.elapsed().as_millis() as u64
    }
}

/// The end of the time a reservation made at `now_ms` may be spent in: one millisecond
/// more than asked, for the store's clock's rounding to whole milliseconds.
pub fn spend_end(now_ms: u64, spend_ms: u64) -> u64 {
    now_ms + spend_ms + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::GiveBack;

    fn req(rule: RateRule, id: &str, want: u32, back: &[(&str, Option<u32>)]) -> RateRequest {
        RateRequest {
            rule,
            id: id.into(),
            want,
            spend_ms: 100,
            give_back: back
                .iter()
                .map(|(id, unspent)| GiveBack {
                    id: (*id).into(),
                    unspent: *unspent,
                })
                .collect(),
        }
    }

    const GCRA: RateRule = RateRule::Gcra {
        interval_ms: 1000,
        burst: 3,
    };
    const WINDOW: RateRule = RateRule::Window {
        limit: 3,
        window_ms: 10_000,
    };

    #[test]
    fn a_reservation_asked_twice_is_granted_once() {
        for rule in [GCRA, WINDOW] {
            let mut k = KeyRate::default();
            assert_eq!(k.reserve(0, &req(rule, "a", 2, &[])).granted, 2);
            let again = k.reserve(0, &req(rule, "a", 2, &[]));
            assert_eq!((again.granted, again.remaining), (2, 1), "{rule:?}");
            assert_eq!(k.reserve(0, &req(rule, "b", 5, &[])).granted, 1);
        }
    }

    #[test]
    fn a_give_back_named_twice_returns_once() {
        for rule in [GCRA, WINDOW] {
            let mut k = KeyRate::default();
            assert_eq!(k.reserve(0, &req(rule, "a", 3, &[])).granted, 3);
            let g = k.reserve(0, &req(rule, "b", 0, &[("a", Some(2))]));
            assert_eq!(g.remaining, 2, "{rule:?}");
            let g = k.reserve(0, &req(rule, "c", 0, &[("a", Some(2))]));
            assert_eq!(
                g.remaining, 2,
                "{rule:?}: the second give-back adds nothing"
            );
            // All of one whose answer never arrived; and never more than it granted.
            assert_eq!(k.reserve(0, &req(rule, "d", 2, &[])).granted, 2);
            let g = k.reserve(0, &req(rule, "e", 0, &[("d", None), ("x", None)]));
            assert_eq!(g.remaining, 2, "{rule:?}");
            let g = k.reserve(0, &req(rule, "f", 0, &[("d", None)]));
            assert_eq!(g.remaining, 2, "{rule:?}");
        }
    }

    #[test]
    fn a_window_counts_each_admission_from_the_end_of_its_spending_time() {
        let mut k = KeyRate::default();
        assert_eq!(k.reserve(1000, &req(WINDOW, "a", 2, &[])).granted, 2);
        assert_eq!(k.reserve(5000, &req(WINDOW, "b", 2, &[])).granted, 1);
        let g = k.reserve(5000, &req(WINDOW, "c", 1, &[]));
        assert_eq!(g.granted, 0);
        // "a" may be spent until 1101: it counts until 11_101.
        assert_eq!(g.retry_after_ms, 11_101 - 5000);
        assert_eq!(g.full_in_ms, 15_101 - 5000);
        assert_eq!(k.reserve(11_100, &req(WINDOW, "d", 1, &[])).granted, 0);
        let g = k.reserve(11_101, &req(WINDOW, "e", 5, &[]));
        assert_eq!((g.granted, g.remaining), (2, 0));
        assert!(!k.is_idle());
        let g = k.reserve(21_202, &req(WINDOW, "f", 0, &[]));
        assert_eq!((g.remaining, g.full_in_ms), (3, 0));
    }
}
