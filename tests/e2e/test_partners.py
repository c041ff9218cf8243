"""Partner keys, runtime keys and live-only routes through the real Envoy, set up with the
CLI as an operator would: `keys create --kind partner|runtime`, `partners delegate`,
`partners undelegate`. The policy comes from environment overrides alone."""

import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied

ROUTES = (
    "["
    "{name: partner-billing, methods: [GET], path: '/v1/billing/partner/**', scope: 'billing:partner:read', tenant: optional},"
    "{name: internal-jobs, methods: [GET], path: '/internal/jobs/**', scope: 'jobs:run', internal: true},"
    "{name: payments, methods: [GET], path: '/v1/payments/**', scope: 'payments:read', environments: [live]},"
    "{name: contacts-read, methods: [GET], path: '/v1/contacts/**', scope: 'contacts:read'}"
    "]"
)
PARTNER = "e2e-partner"


@pytest.fixture(scope="module")
def partner_stack(workdir, redis, upstream):
    env = {
        "KEYGATE_POLICY__ROUTES": ROUTES,
        "KEYGATE_POLICY__PARTNER_SCOPES": "['billing:partner:*']",
    }
    yield from harness.running(harness.Stack("partners", workdir, redis, upstream, keygate_env=env))


def key(stack, *args: str) -> dict:
    result = stack.keygate.cli("keys", "create", "--json", *args)
    assert result.code == 0, str(result)
    return result.json()


def get(stack, path: str, token: str, tenant: str | None = None):
    headers = [("authorization", f"Bearer {token}")]
    if tenant:
        headers.append(("x-tenant-id", tenant))
    return stack.request("GET", path, headers)


def test_a_partner_acts_for_a_delegated_tenant_until_it_is_withdrawn(partner_stack):
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    k = key(partner_stack, "--kind", "partner", "--partner", PARTNER, "--scopes", "contacts:read,billing:partner:read")
    assert k["partner_id"] == PARTNER and k["kind"] == "partner" and k["tenant_id"] == "", k
    delegated = partner_stack.keygate.cli("partners", "delegate", PARTNER, tenant, "--json")
    assert delegated.code == 0 and delegated.json()["changed"] is True, str(delegated)

    resp = get(partner_stack, "/v1/contacts/1", k["token"], tenant)
    assert_allowed(resp)
    assert resp.upstream_headers("x-tenant-id") == [tenant], str(resp)
    assert resp.upstream_headers("x-keygate-partner") == [PARTNER], str(resp)
    assert resp.upstream_headers("x-keygate-kind") == ["partner"], str(resp)
    assert_denied(get(partner_stack, "/v1/contacts/1", k["token"], other), 403, "tenant_forbidden")

    # A partner-level route: the partner as itself, and no tenant upstream.
    resp = get(partner_stack, "/v1/billing/partner/invoices", k["token"])
    assert_allowed(resp)
    assert resp.upstream_headers("x-tenant-id") == [], str(resp)

    listed = partner_stack.keygate.cli("partners", "delegations", "--partner", PARTNER, "--json")
    assert listed.code == 0, str(listed)
    assert {"partner_id": PARTNER, "tenant_id": tenant} in listed.json()["delegations"], str(listed)

    withdrawn = partner_stack.keygate.cli("partners", "undelegate", PARTNER, tenant)
    assert withdrawn.code == 0, str(withdrawn)
    assert_denied(get(partner_stack, "/v1/contacts/1", k["token"], tenant), 403, "tenant_forbidden")


def test_a_runtime_key_passes_on_internal_routes_only(partner_stack):
    runtime = key(partner_stack, "--kind", "runtime", "--service", "jobs-runner", "--scopes", "jobs:run,contacts:read")
    tenant_key = key(partner_stack, "--tenant", str(uuid.uuid4()), "--scopes", "jobs:run,contacts:read")
    resp = get(partner_stack, "/internal/jobs/nightly", runtime["token"])
    assert_allowed(resp)
    assert resp.upstream_headers("x-keygate-kind") == ["runtime"], str(resp)
    assert_denied(get(partner_stack, "/v1/contacts/1", runtime["token"]), 403, "insufficient_permissions")
    assert_denied(get(partner_stack, "/internal/jobs/nightly", tenant_key["token"]), 403, "insufficient_permissions")


def test_a_test_key_is_refused_on_a_live_only_route(partner_stack):
    tenant = str(uuid.uuid4())
    live = key(partner_stack, "--tenant", tenant, "--scopes", "payments:read")
    test = key(partner_stack, "--tenant", tenant, "--scopes", "payments:read", "--env", "test")
    resp = get(partner_stack, "/v1/payments/1", live["token"])
    assert_allowed(resp)
    assert resp.upstream_headers("x-keygate-environment") == ["live"], str(resp)
    assert_denied(get(partner_stack, "/v1/payments/1", test["token"]), 403, "insufficient_permissions")


def test_a_tenant_key_cannot_hold_a_partner_scope(partner_stack):
    result = partner_stack.keygate.cli(
        "keys", "create", "--tenant", str(uuid.uuid4()), "--scopes", "billing:partner:read"
    )
    assert result.code != 0, str(result)
    assert "scopes" in result.stderr, str(result)
