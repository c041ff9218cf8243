//! `DelegationRecords` and `DelegationSource`: a partner's tenants, granted and withdrawn.

use super::*;

async fn delegations_are_granted_and_withdrawn_once_each_with_one_event(s: Subject) {
    let d = |p: &str, t: &str| Delegation {
        partner_id: p.into(),
        tenant_id: t.into(),
    };
    assert!(!s.store.is_delegated("acme", TENANT).await.unwrap());
    assert!(s
        .store
        .set_delegation(&d("acme", TENANT), true, 10)
        .await
        .unwrap());
    assert!(
        !s.store
            .set_delegation(&d("acme", TENANT), true, 11)
            .await
            .unwrap(),
        "granted twice: no change"
    );
    assert!(s
        .store
        .set_delegation(&d("acme", OTHER_TENANT), true, 12)
        .await
        .unwrap());
    assert!(s
        .store
        .set_delegation(&d("globex", TENANT), true, 13)
        .await
        .unwrap());
    assert!(s.store.is_delegated("acme", TENANT).await.unwrap());
    assert!(!s.store.is_delegated("globex", OTHER_TENANT).await.unwrap());
    let mut acme_tenants = vec![d("acme", TENANT), d("acme", OTHER_TENANT)];
    acme_tenants.sort();
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Partner("acme".into()))
            .await
            .unwrap(),
        acme_tenants
    );
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Tenant(TENANT.into()))
            .await
            .unwrap(),
        vec![d("acme", TENANT), d("globex", TENANT)]
    );
    assert!(s
        .store
        .set_delegation(&d("acme", TENANT), false, 14)
        .await
        .unwrap());
    assert!(!s
        .store
        .set_delegation(&d("acme", TENANT), false, 15)
        .await
        .unwrap());
    assert!(!s.store.is_delegated("acme", TENANT).await.unwrap());
    assert_eq!(
        s.store
            .delegations(&DelegationsOf::Tenant(TENANT.into()))
            .await
            .unwrap(),
        vec![d("globex", TENANT)]
    );
    // In order per partner (a partner's changes share its partition).
    let changes: Vec<(String, String, bool)> = all_entries(s.store.as_ref())
        .await
        .into_iter()
        .map(|e| match e {
            StreamEntry::Delegation(d) => (d.partner_id, d.tenant_id, d.granted),
            other => panic!("not a delegation change: {other:?}"),
        })
        .collect();
    let change = |p: &str, t: &str, g| (p.to_owned(), t.to_owned(), g);
    let of = |partner: &str| -> Vec<(String, String, bool)> {
        changes.iter().filter(|c| c.0 == partner).cloned().collect()
    };
    assert_eq!(changes.len(), 4, "{changes:?}");
    assert_eq!(
        of("acme"),
        vec![
            change("acme", TENANT, true),
            change("acme", OTHER_TENANT, true),
            change("acme", TENANT, false),
        ]
    );
    assert_eq!(of("globex"), vec![change("globex", TENANT, true)]);
}

conformance!(delegations_are_granted_and_withdrawn_once_each_with_one_event,);
