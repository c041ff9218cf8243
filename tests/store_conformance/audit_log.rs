//! `AuditLog`: the audit trail appended and read back, oldest first, filtered and bounded.

use super::*;
use keygate::audit::{AuditEntry, AuditQuery};

fn entry(at_ms: u64, action: &str, key_id: &str, tenant: &str) -> AuditEntry {
    AuditEntry {
        id: String::new(),
        at_ms,
        action: action.into(),
        key_id: Some(key_id.into()),
        tenant_id: Some(tenant.into()),
        partner_id: None,
        actor: "admin:conformance".into(),
        outcome: "ok".into(),
    }
}

/// What a query found, as (key id, action).
async fn found(s: &Subject, q: AuditQuery) -> Vec<(String, String)> {
    s.store
        .audit(&q)
        .await
        .expect("audit")
        .into_iter()
        .map(|e| (e.key_id.unwrap_or_default(), e.action))
        .collect()
}

fn pairs(of: &[(&str, &str)]) -> Vec<(String, String)> {
    of.iter()
        .map(|(k, a)| (k.to_string(), a.to_string()))
        .collect()
}

async fn the_audit_trail_reads_back_oldest_first_filtered_and_bounded(s: Subject) {
    // Entries are stamped before they are appended, as `Audit` does: in the past.
    let t0 = now_ms();
    let written = [
        entry(t0 - 30, "key.created", "k1", TENANT),
        entry(t0 - 20, "key.created", "k2", OTHER_TENANT),
        entry(t0 - 10, "key.revoked", "k1", TENANT),
        entry(t0, "key.deleted", "k1", TENANT),
    ];
    for e in &written {
        s.store.append_audit(e).await.expect("append");
    }

    let everything = AuditQuery {
        limit: 100,
        ..Default::default()
    };
    let all = s.store.audit(&everything).await.expect("audit");
    assert!(
        all.iter().all(|e| !e.id.is_empty()),
        "each entry read back names its position: {all:?}"
    );
    let unpositioned: Vec<AuditEntry> = all
        .into_iter()
        .map(|e| AuditEntry {
            id: String::new(),
            ..e
        })
        .collect();
    assert_eq!(
        unpositioned, written,
        "every entry as written, oldest first"
    );

    let by_key = AuditQuery {
        key_id: Some("k1".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(
        found(&s, by_key).await,
        pairs(&[
            ("k1", "key.created"),
            ("k1", "key.revoked"),
            ("k1", "key.deleted")
        ])
    );
    let by_tenant = AuditQuery {
        tenant_id: Some(OTHER_TENANT.into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(found(&s, by_tenant).await, pairs(&[("k2", "key.created")]));
    let since = AuditQuery {
        since_ms: t0 - 10,
        limit: 100,
        ..Default::default()
    };
    assert_eq!(
        found(&s, since).await,
        pairs(&[("k1", "key.revoked"), ("k1", "key.deleted")])
    );
    let first_two = AuditQuery {
        limit: 2,
        ..Default::default()
    };
    assert_eq!(
        found(&s, first_two).await,
        pairs(&[("k1", "key.created"), ("k2", "key.created")]),
        "the limit keeps the oldest"
    );
}

conformance!(the_audit_trail_reads_back_oldest_first_filtered_and_bounded);
