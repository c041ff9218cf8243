//! `TokenRevocations`: JWT revocations by `jti` or by subject, merged and streamed.

use super::*;

fn revoked_subject(before_ms: u64, at_ms: u64, expires_at_ms: u64) -> TokenRevocation {
    TokenRevocation {
        issuer: "idp".into(),
        target: TokenTarget::Subject {
            subject: "alice".into(),
            before_ms,
        },
        at_ms,
        expires_at_ms,
    }
}

fn revoked_jti(jti: &str, at_ms: u64, expires_at_ms: u64) -> TokenRevocation {
    TokenRevocation {
        issuer: "idp".into(),
        target: TokenTarget::Jti { jti: jti.into() },
        at_ms,
        expires_at_ms,
    }
}

async fn token_revocations_merge_and_append_one_event_per_change(s: Subject) {
    let now = now_ms();
    let first = revoked_subject(now - 5_000, now, now + 60_000);
    assert_eq!(s.store.revoke_tokens(&first).await.unwrap(), first);
    // An earlier cut-off with an earlier expiry adds nothing: no change, no event.
    let weaker = revoked_subject(now - 9_000, now + 1, now + 30_000);
    assert_eq!(s.store.revoke_tokens(&weaker).await.unwrap(), first);
    // A later cut-off wins, with its own expiry.
    let later = revoked_subject(now - 1_000, now + 2, now + 90_000);
    assert_eq!(s.store.revoke_tokens(&later).await.unwrap(), later);
    let jti = revoked_jti("t-1", now + 3, now + 60_000);
    assert_eq!(s.store.revoke_tokens(&jti).await.unwrap(), jti);
    // One that no token can match any more is not listed.
    let spent = revoked_jti("t-0", now + 4, now - 1);
    s.store.revoke_tokens(&spent).await.unwrap();

    let mut listed = s.store.token_revocations(now + 5).await.unwrap();
    listed.sort_by_key(TokenRevocation::rule_key);
    assert_eq!(listed, vec![jti.clone(), later.clone()]);

    // One event per change, in order per rule (a rule's events share its partition).
    let entries = all_entries(s.store.as_ref()).await;
    let carried: Vec<TokenRevocation> = entries
        .iter()
        .map(|e| match e {
            StreamEntry::Tokens(t) => t.revocation.clone(),
            other => panic!("not a token revocation: {other:?}"),
        })
        .collect();
    assert_eq!(carried.len(), 4, "{carried:?}");
    let of = |rule: &TokenRevocation| -> Vec<TokenRevocation> {
        carried
            .iter()
            .filter(|c| c.rule_key() == rule.rule_key())
            .cloned()
            .collect()
    };
    assert_eq!(of(&first), vec![first.clone(), later]);
    assert_eq!(of(&jti), vec![jti.clone()]);
    assert_eq!(of(&spent), vec![spent.clone()]);
    for p in 0..s.store.partitions() {
        let mine = s
            .store
            .read_events(p, EventId::START, 100, None)
            .await
            .unwrap();
        let positions: Vec<EventId> = mine.iter().map(StreamEntry::position).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        assert_eq!(
            s.store.latest_event_id(p).await.unwrap(),
            positions.last().copied().unwrap_or(EventId::START)
        );
    }
}

/// A token revocation this version cannot read (corrupt, or a newer shape) names no key:
/// a reader must flush everything, which `Unreadable` without a key id tells it to do.
#[tokio::test]
async fn an_unreadable_token_revocation_on_the_stream_is_unreadable_without_a_key() {
    let s = Subject::redis().await;
    let EventSource::Redis(store, Raw::Single(conn), _) = &s.events else {
        unreachable!()
    };
    let mut conn = conn.clone();
    let _: String = ::redis::cmd("XADD")
        .arg(store.events_key(0))
        .arg("*")
        .arg("kind")
        .arg(keygate::store::TOKENS_REVOKED)
        .arg("rule")
        .arg("{\"issuer\": \"idp\"")
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries = s
        .store
        .read_events(0, EventId::START, 10, None)
        .await
        .unwrap();
    assert!(
        matches!(
            entries.as_slice(),
            [StreamEntry::Unreadable { key_id: None, .. }]
        ),
        "{entries:?}"
    );
}

conformance!(token_revocations_merge_and_append_one_event_per_change,);
