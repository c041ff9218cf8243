//! `RateLedger`: GCRA reservations, give-backs and concurrent-session leases.

use super::*;

/// A reservation asked of `s`'s store: `want` under `rule`, named `id`, returning `back`.
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

async fn rate_reservations_follow_gcra_and_leases_their_limit(s: Subject) {
    use keygate::store::LeaseOp;
    let req = |id, want, back| rate_request(SLOW_GCRA, id, want, back);
    let g = s.store.reserve("k1", &req("a", 2, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (2, 1));
    let g = s.store.reserve("k1", &req("b", 5, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("k1", &req("c", 1, &[])).await.unwrap();
    assert_eq!(g.granted, 0);
    assert!((59_000..=60_000).contains(&g.retry_after_ms), "{g:?}");
    assert!((179_000..=180_000).contains(&g.full_in_ms), "{g:?}");
    // Given back, it can be reserved again; another key is untouched.
    let g = s
        .store
        .reserve("k1", &req("d", 1, &[("b", Some(1))]))
        .await
        .unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("k2", &req("a", 3, &[])).await.unwrap();
    assert_eq!(g.granted, 3);

    let acquire = LeaseOp::Acquire {
        ttl_ms: 60_000,
        limit: 2,
    };
    let l = |done, held| keygate::store::LeaseResult { done, held };
    assert_eq!(
        s.store.lease("k1", "k1.a", acquire).await.unwrap(),
        l(true, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.b", acquire).await.unwrap(),
        l(true, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", acquire).await.unwrap(),
        l(false, 2)
    );
    let renew = LeaseOp::Renew { ttl_ms: 60_000 };
    assert_eq!(
        s.store.lease("k1", "k1.a", renew).await.unwrap(),
        l(true, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", renew).await.unwrap(),
        l(false, 2)
    );
    assert_eq!(
        s.store.lease("k1", "k1.a", LeaseOp::Release).await.unwrap(),
        l(true, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.a", LeaseOp::Release).await.unwrap(),
        l(false, 1)
    );
    assert_eq!(
        s.store.lease("k1", "k1.c", acquire).await.unwrap(),
        l(true, 2)
    );
    // A lease of another key does not count here.
    assert_eq!(
        s.store.lease("k2", "k2.a", acquire).await.unwrap(),
        l(true, 1)
    );
}

/// A reply lost to a timeout, or a client that sends a call again, must not change what
/// the store granted: a reservation asked twice (same id) is granted once, and the same
/// give-back applied twice returns its budget once — for both rules.
async fn a_reservation_and_its_give_back_each_apply_once(s: Subject) {
    for (rule, key) in [(SLOW_GCRA, "g1"), (THREE_A_MINUTE, "w1")] {
        let req = |id, want, back| rate_request(rule, id, want, back);
        let g = s.store.reserve(key, &req("a", 3, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}");
        // Sent again (its answer lost): the first answer, nothing more taken.
        let g = s.store.reserve(key, &req("a", 3, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (3, 0), "{rule:?}: asked again");
        // Two of the three were not spent: returned once, however often it is named.
        let g = s
            .store
            .reserve(key, &req("b", 0, &[("a", Some(2))]))
            .await
            .unwrap();
        assert_eq!(g.remaining, 2, "{rule:?}: returned");
        let g = s
            .store
            .reserve(key, &req("c", 0, &[("a", Some(2)), ("a", Some(2))]))
            .await
            .unwrap();
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: the same give-back again adds nothing"
        );
        // A call that carried a give-back, sent again, returns nothing twice either.
        let g = s.store.reserve(key, &req("d", 2, &[])).await.unwrap();
        assert_eq!((g.granted, g.remaining), (2, 0), "{rule:?}");
        for _ in 0..2 {
            let g = s
                .store
                .reserve(key, &req("e", 1, &[("d", None)]))
                .await
                .unwrap();
            assert_eq!((g.granted, g.remaining), (1, 1), "{rule:?}: all of d, once");
        }
        // One the store never granted, or more than it granted, returns nothing more.
        let g = s
            .store
            .reserve(key, &req("f", 0, &[("unknown", None), ("e", Some(100))]))
            .await
            .unwrap();
        assert_eq!(
            g.remaining, 2,
            "{rule:?}: e's one back, nothing else (a's one spent)"
        );
    }
}

/// A rolling window admits its limit in any window, all at once if asked so; each
/// admission counts until a window after the end of the time it may be spent in.
async fn a_rolling_window_admits_its_limit_in_any_window(s: Subject) {
    let req = |id, want, back| rate_request(THREE_A_MINUTE, id, want, back);
    let g = s.store.reserve("w", &req("a", 2, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining, g.retry_after_ms), (2, 1, 0));
    // Counted from the end of its spending time (100 ms, and 1 for the clock's rounding).
    assert!((60_000..=60_101).contains(&g.full_in_ms), "{g:?}");
    let g = s.store.reserve("w", &req("b", 5, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (1, 0));
    let g = s.store.reserve("w", &req("c", 1, &[])).await.unwrap();
    assert_eq!((g.granted, g.remaining), (0, 0));
    // One fits again when the first reservation's admissions leave the window.
    assert!((55_000..=60_101).contains(&g.retry_after_ms), "{g:?}");
    let g = s
        .store
        .reserve("w", &req("d", 1, &[("b", Some(1))]))
        .await
        .unwrap();
    assert_eq!(
        (g.granted, g.remaining),
        (1, 0),
        "b's unspent one, reserved again"
    );
    let g = s.store.reserve("w2", &req("a", 4, &[])).await.unwrap();
    assert_eq!(g.granted, 3, "another key has its own window");
}

conformance!(
    rate_reservations_follow_gcra_and_leases_their_limit,
    a_reservation_and_its_give_back_each_apply_once,
    a_rolling_window_admits_its_limit_in_any_window,
);
