//! The GCRA arithmetic, in one place for the embedded store (the Redis store runs the
//! same in `src/store/lua/reserve.lua`; the conformance suite holds the two to one
//! behaviour).
//!
//! The state is a key's theoretical arrival time (TAT, unix ms). With an interval `T`
//! per admission and a burst `b`, `k` more may be admitted now while
//! `TAT + k*T - now <= b*T`.

use crate::store::{RateGrant, RateRequest};

/// Reserves what `req` asks for against `tat` (`None`: a fresh key) at `now_ms`; the new
/// TAT (`None`: nothing owed, the state may be forgotten) and the grant.
pub fn reserve(tat: Option<u64>, now_ms: u64, req: &RateRequest) -> (Option<u64>, RateGrant) {
    let t = req.interval_ms;
    let back = u64::from(req.give_back) * t;
    let tat = tat.unwrap_or(now_ms).saturating_sub(back).max(now_ms);
    let capacity = u64::from(req.burst) * t;
    let fits = capacity.saturating_sub(tat - now_ms) / t;
    let granted = fits.min(u64::from(req.want));
    let tat = tat + granted * t;
    let debt = tat - now_ms;
    let retry_after_ms = if granted == 0 {
        debt.saturating_sub(u64::from(req.burst.saturating_sub(1)) * t)
    } else {
        0
    };
    let grant = RateGrant {
        granted: granted as u32,
        remaining: (fits - granted) as u32,
        retry_after_ms,
        full_in_ms: debt,
    };
    ((debt > 0).then_some(tat), grant)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(want: u32, give_back: u32) -> RateRequest {
        // 60 a minute: one a second, a burst of 3.
        RateRequest {
            interval_ms: 1000,
            burst: 3,
            want,
            give_back,
        }
    }

    #[test]
    fn a_fresh_key_gets_its_burst_then_one_per_interval() {
        let (tat, g) = reserve(None, 10_000, &req(5, 0));
        assert_eq!((g.granted, g.remaining), (3, 0));
        let (tat, g) = reserve(tat, 10_000, &req(1, 0));
        assert_eq!(g.granted, 0);
        assert_eq!(g.retry_after_ms, 1000, "one fits again in one interval");
        assert_eq!(g.full_in_ms, 3000);
        let (_, g) = reserve(tat, 11_000, &req(5, 0));
        assert_eq!((g.granted, g.remaining), (1, 0));
    }

    #[test]
    fn what_is_given_back_can_be_reserved_again_but_never_more_than_the_burst() {
        let (tat, g) = reserve(None, 0, &req(2, 0));
        assert_eq!((g.granted, g.remaining), (2, 1));
        let (tat, g) = reserve(tat, 0, &req(3, 2));
        assert_eq!((g.granted, g.remaining), (3, 0));
        let (_, g) = reserve(tat, 0, &req(1, 100));
        assert_eq!(g.granted, 1, "giving back more than was taken adds nothing");
        assert_eq!(g.remaining, 2);
    }
}
