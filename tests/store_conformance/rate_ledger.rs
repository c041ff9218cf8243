//! `RateLedger`: GCRA reservations, give-backs and concurrent-session leases.

use super::*;

/// A reservation: `want` under `rule`, named `id`, returning `back`.
fn rate_request(
    rule: keygate::store::RateRule,
    id: &str,
    want: u32,
    back: &[(&str, Option<u32>)],
) -> keygate::store::RateRequest {
    keygate::store::RateRequest {
        rule,
        id: id.into(),
        want,
        spend_ms: 100,
        give_back: back
            .iter()
            .map(|(id, unspent)| keygate::store::GiveBack {
                id: (*id).into(),
                unspent: *unspent,
            })
            .collect(),
    }
}

/// One a minute, a burst of 3: nothing refills while the test runs.
const SLOW_GCRA: keygate::store::RateRule = keygate::store::RateRule::Gcra {
    interval_ms: 60_000,
    burst: 3,
};

/// Three in any minute.
const THREE_A_MINUTE: keygate::store::RateRule = keygate::store::RateRule::Window {
    limit: 3,
    window_ms: 60_000,
};

/// `s`'s store reserves `want` of `rule` for `key`, as the reservation `id`, with the
/// give-backs `back` (it must answer).
async fn reserve(
    s: &Subject,
    rule: keygate::store::RateRule,
    key: &str,
    (id, want): (&str, u32),
    back: &[(&str, Option<u32>)],
) -> keygate::store::RateGrant {
    let req = rate_request(rule, id, want, back);
    s.store.reserve(key, &req).await.expect("reserve")
}

async fn rate_reservations_follow_gcra_and_leases_their_limit(s: Subject) {
    use keygate::store::{LeaseOp, LeaseResult};
    let rule = SLOW_GCRA;
    let g = reserve(&s, rule, "k1", ("a", 2), &[]).await;
    assert_eq!((g.granted, g.remaining), (2, 1));
    let g = reserve(&s, rule, "k1", ("b", 5), &[]).await;
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = reserve(&s, rule, "k1", ("c", 1), &[]).await;
    assert_eq!(g.granted, 0);
    assert!((59_000..=60_000).contains(&g.retry_after_ms), "{g:?}");
    assert!((179_000..=180_000).contains(&g.full_in_ms), "{g:?}");
    // Given back, it can be reserved again; another key is untouched.
    let g = reserve(&s, rule, "k1", ("d", 1), &[("b", Some(1))]).await;
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = reserve(&s, rule, "k2", ("a", 3), &[]).await;
    assert_eq!(g.granted, 3);

    let acquire = LeaseOp::Acquire {
        ttl_ms: 60_000,
        limit: 2,
    };
    let renew = LeaseOp::Renew { ttl_ms: 60_000 };
    let release = LeaseOp::Release;
    // (key, lease, what is done to it, whether it is done, leases the key holds after)
    for (key, lease, op, done, held) in [
        ("k1", "k1.a", acquire, true, 1),
        ("k1", "k1.b", acquire, true, 2),
        ("k1", "k1.c", acquire, false, 2),
        ("k1", "k1.a", renew, true, 2),
        ("k1", "k1.c", renew, false, 2),
        ("k1", "k1.a", release, true, 1),
        ("k1", "k1.a", release, false, 1),
        ("k1", "k1.c", acquire, true, 2),
        // A lease of another key does not count here.
        ("k2", "k2.a", acquire, true, 1),
    ] {
        assert_eq!(
            s.store.lease(key, lease, op).await.unwrap(),
            LeaseResult { done, held },
            "{lease}: {op:?}"
        );
    }
}

/// A reply lost to a timeout, or a client that sends a call again, must not change what
/// the store granted: a reservation asked twice (same id) is granted once, and the same
/// give-back applied twice returns its budget once — for both rules.
async fn a_reservation_and_its_give_back_each_apply_once(s: Subject) {
    for (rule, key) in [(SLOW_GCRA, "g1"), (THREE_A_MINUTE, "w1")] {
        let g = reserve(&s, rule, key, ("a", 3), &[]).await;
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}");
        // Sent again (its answer lost): the first answer, nothing more taken.
        let g = reserve(&s, rule, key, ("a", 3), &[]).await;
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}: asked again");
        // Two of the three were not spent: returned once, however often it is named.
        let g = reserve(&s, rule, key, ("b", 0), &[("a", Some(2))]).await;
        assert_eq!(g.remaining, 2, "{rule:?}: returned");
        let twice = [("a", Some(2)), ("a", Some(2))];
        let g = reserve(&s, rule, key, ("c", 0), &twice).await;
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: the same give-back again adds nothing"
        );
        // A call that carried a give-back, sent again, returns nothing twice either.
        let g = reserve(&s, rule, key, ("d", 2), &[]).await;
        assert_eq!((g.granted, g.remaining), (2, 0), "{rule:?}");
        for _ in 0..2 {
            let g = reserve(&s, rule, key, ("e", 1), &[("d", None)]).await;
            assert_eq!((g.granted, g.remaining), (1, 1), "{rule:?}: all of d, once");
        }
        // One the store never granted, or more than it granted, returns nothing more.
        let unknown_or_too_much = [("unknown", None), ("e", Some(100))];
        let g = reserve(&s, rule, key, ("f", 0), &unknown_or_too_much).await;
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: e's one back, nothing else (a's one spent)"
        );
    }
}

/// A rolling window admits its limit in any window, all at once if asked so; each
/// admission counts until a window after the end of the time it may be spent in.
async fn a_rolling_window_admits_its_limit_in_any_window(s: Subject) {
    let rule = THREE_A_MINUTE;
    let g = reserve(&s, rule, "w", ("a", 2), &[]).await;
    assert_eq!((g.granted, g.remaining, g.retry_after_ms), (2, 1, 0));
    // Counted from the end of its spending time (100 ms, and 1 for the clock's rounding).
    assert!((60_000..=60_101).contains(&g.full_in_ms), "{g:?}");
    let g = reserve(&s, rule, "w", ("b", 5), &[]).await;
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = reserve(&s, rule, "w", ("c", 1), &[]).await;
    assert_eq!((g.granted, g.remaining), (0, 0));
    // One fits again when the first reservation's admissions leave the window.
    assert!((55_000..=60_101).contains(&g.retry_after_ms), "{g:?}");
    let g = reserve(&s, rule, "w", ("d", 1), &[("b", Some(1))]).await;
    assert_eq!(
        (g.granted, g.remaining),
        (1, 0),
        "b's unspent one, reserved again"
    );
    let g = reserve(&s, rule, "w2", ("a", 4), &[]).await;
    assert_eq!(g.granted, 3, "another key has its own window");
}

conformance!(
    rate_reservations_follow_gcra_and_leases_their_limit,
    a_reservation_and_its_give_back_each_apply_once,
    a_rolling_window_admits_its_limit_in_any_window,
);
