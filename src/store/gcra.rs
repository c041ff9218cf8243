//! The GCRA arithmetic, in one place for the embedded store (the Redis store runs the
//! same in `src/store/lua/reserve.lua`; the conformance suite holds the two to one
//! behaviour).
//!
//! The state is a key's theoretical arrival time (TAT, unix ms). With an interval `T`
//! per admission and a burst `b`, `k` more may be admitted now while
//! `TAT + k*T - now <= b*T`.

use crate::store::RateGrant;

/// Returns `back` unspent admissions to `tat` (`None`: a fresh key) at `now_ms`: the TAT
/// moves back by `back * T`, never before now (what has refilled stays refilled).
pub fn give_back(tat: Option<u64>, now_ms: u64, interval_ms: u64, back: u32) -> Option<u64> {
    let tat = tat?.saturating_sub(u64::from(back) * interval_ms);
    (tat > now_ms).then_some(tat)
}

/// Grants up to `want` against `tat` at `now_ms`; the new TAT (`None`: nothing owed, the
/// state may be forgotten) and the grant. `want` 0 asks nothing (a retried reservation
/// asks only what would fit now).
pub fn grant(
    tat: Option<u64>,
    now_ms: u64,
    interval_ms: u64,
    burst: u32,
    want: u32,
) -> (Option<u64>, RateGrant) {
    let t = interval_ms;
    let tat = tat.unwrap_or(now_ms).max(now_ms);
    let capacity = u64::from(burst) * t;
    let fits = capacity.saturating_sub(tat - now_ms) / t;
    let granted = fits.min(u64::from(want));
    let tat = tat + granted * t;
    let debt = tat - now_ms;
    let retry_after_ms = if fits == 0 {
        debt.saturating_sub(u64::from(burst.saturating_sub(1)) * t)
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

    // 60 a minute: one a second, a burst of 3.
    fn grant3(tat: Option<u64>, now: u64, want: u32) -> (Option<u64>, RateGrant) {
        grant(tat, now, 1000, 3, want)
    }

    #[test]
    fn a_fresh_key_gets_its_burst_then_one_per_interval() {
        let (tat, g) = grant3(None, 10_000, 5);
        assert_eq!((g.granted, g.remaining), (3, 0));
        let (tat, g) = grant3(tat, 10_000, 1);
        assert_eq!(g.granted, 0);
        assert_eq!(g.retry_after_ms, 1000, "one fits again in one interval");
        assert_eq!(g.full_in_ms, 3000);
        let (_, g) = grant3(tat, 11_000, 5);
        assert_eq!((g.granted, g.remaining), (1, 0));
    }

    #[test]
    fn what_is_given_back_can_be_reserved_again_but_never_more_than_the_burst() {
        let (tat, g) = grant3(None, 0, 2);
        assert_eq!((g.granted, g.remaining), (2, 1));
        let tat = give_back(tat, 0, 1000, 2);
        let (tat, g) = grant3(tat, 0, 3);
        assert_eq!((g.granted, g.remaining), (3, 0));
        let tat = give_back(tat, 0, 1000, 100);
        assert_eq!(tat, None, "giving back more than was taken adds nothing");
        let (_, g) = grant3(tat, 0, 1);
        assert_eq!((g.granted, g.remaining), (1, 2));
    }
}
