"""examples/engium as shipped, through its Envoy: Engium's page, promise by promise.
`Authorization: Bearer` with an eng_live_ key or a JWT on the same routes, `X-Tenant-ID`
a UUID on every request (400 without it), 30-minute access tokens refused once expired,
login and refresh reachable without a credential."""

import secrets
import time
import uuid

import pytest

import harness
import walkthrough

EXAMPLE = harness.EXAMPLES / "engium"
SECRET = secrets.token_hex(32)
ENV = {"ENGIUM_JWT_SECRET": SECRET}
BOOKINGS = "/api/v1/bookings"


engium = harness.stack_fixture("engium", keygate_env=ENV, example="engium")


def access_token(tenant: str, life: int = 1800, issued_ago: int = 0, **over) -> str:
    now = int(time.time()) - issued_ago
    claims = {"iss": "https://api.engium.app/", "aud": "engium-api", "sub": "user-1",
              "tenant_id": tenant, "iat": now, "exp": now + life, **over}
    return harness.hs256(SECRET, claims)


def call(stack, token: str | None, tenant: str | None, method="GET", path=BOOKINGS):
    headers = []
    if token is not None:
        headers.append(("authorization", f"Bearer {token}"))
    if tenant is not None:
        headers.append(("x-tenant-id", tenant))
    return stack.request(method, path, headers)


def code(resp) -> tuple[int, str]:
    return resp.status, resp.json()["error"]["code"]


def test_the_readme_walkthrough_runs_as_written(engium):
    walkthrough.run(EXAMPLE / "README.md", engium, ENV)


def test_an_api_key_and_a_jwt_work_on_the_same_routes(engium):
    tenant = str(uuid.uuid4())
    key = engium.keygate.create_key(tenant)
    assert key["token"].startswith("eng_live_"), key
    for token, kind in [(key["token"], "tenant"), (access_token(tenant), "jwt")]:
        for method, path in [("GET", BOOKINGS), ("POST", "/api/v1/messages")]:
            resp = call(engium, token, tenant, method, path)
            assert resp.status == 200, str(resp)
            assert resp.upstream_headers("x-keygate-kind") == [kind], str(resp)
            assert resp.upstream_headers("x-tenant-id") == [tenant], str(resp)
            assert resp.upstream_headers("authorization") == [], str(resp)


@pytest.mark.parametrize("credential", ["api key", "jwt"])
def test_x_tenant_id_is_a_uuid_on_every_request(engium, credential):
    tenant = str(uuid.uuid4())
    token = engium.keygate.create_key(tenant)["token"] if credential == "api key" else access_token(tenant)
    assert code(call(engium, token, None)) == (400, "tenant_required")
    assert code(call(engium, token, "not-a-uuid")) == (400, "invalid_tenant")
    assert code(call(engium, token, str(uuid.uuid4()))) == (403, "tenant_forbidden")
    assert call(engium, token, tenant.upper()).status == 200


def test_an_access_token_is_refused_once_its_30_minutes_are_over(engium):
    tenant = str(uuid.uuid4())
    assert code(call(engium, access_token(tenant, life=1800, issued_ago=1810), tenant)) == (401, "invalid_token")
    # Past the 5 s leeway, and no longer-lived tokens either.
    assert code(call(engium, access_token(tenant, life=1800, issued_ago=1806), tenant)) == (401, "invalid_token")
    assert code(call(engium, access_token(tenant, life=7200), tenant)) == (401, "invalid_token")
    assert call(engium, access_token(tenant, life=1800, issued_ago=1790), tenant).status == 200


def test_login_and_refresh_need_no_credential_and_nothing_else_is_open(engium):
    for path in ["/api/v1/auth/login", "/api/v1/auth/refresh"]:
        resp = call(engium, None, None, "POST", path)
        assert resp.status == 200, str(resp)
        assert len(resp.upstream) == 1
    assert code(call(engium, None, str(uuid.uuid4()))) == (401, "missing_credentials")
    assert code(call(engium, None, None, "GET", "/api/v1/auth/login")) == (401, "missing_credentials")
