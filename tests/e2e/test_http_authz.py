"""One keygate, three front doors: Envoy asking over gRPC (examples/envoy.yaml), Envoy
asking over HTTP (examples/envoy-http.yaml, keygate's `listen.http_authz` under /envoy)
and nginx's `auth_request` (examples/nginx/nginx.conf, /auth-request), each run as
shipped with only its addresses moved. The same scenario list — an allow, each denial
code, tenant and partner cases, a rate limit, a session route, paths that need
normalising — goes through each, and the three answers must be identical: status, body,
the headers the client gets, and the identity headers the upstream gets.

A client's own X-Original-URI / X-Forwarded-Uri never changes a decision: each door
reads the request's method and path only from what its proxy set."""

import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied

PARTNER = "e2e-http-partner"
ROUTES = (
    "["
    "{name: public, methods: [GET], path: /public/**, public: true},"
    "{name: contacts-read, methods: [GET], path: '/v1/contacts/**', scope: 'contacts:read'},"
    "{name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: '/v1/contacts/**',"
    " scope: 'contacts:write', tenant: required},"
    "{name: partner-billing, methods: [GET], path: '/v1/billing/partner/**',"
    " scope: 'billing:partner:read', tenant: optional},"
    "{name: sessions-create, methods: [POST], path: /v1/sessions, scope: 'contacts:read',"
    " credentials: [api_key], mint_session: true},"
    "{name: stream, methods: [GET], path: '/v1/stream/**', scope: 'contacts:read',"
    " credentials: [session]}"
    "]"
)

# What the client gets besides status and body, compared door by door. A reset time is
# a clock reading: only whether it is there is compared.
CLIENT_HEADERS = (
    "content-type",
    "www-authenticate",
    "retry-after",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
)
PRESENCE_ONLY = ("x-ratelimit-reset", "x-keygate-session-token", "x-keygate-session-expires-at")


@pytest.fixture(scope="module")
def doors(workdir, redis, upstream):
    """{name: front door} for the three proxies, all before one keygate."""
    http_authz = harness.free_port()
    env = {
        "KEYGATE_LISTEN__HTTP_AUTHZ": f"127.0.0.1:{http_authz}",
        "KEYGATE_POLICY__ROUTES": ROUTES,
        "KEYGATE_POLICY__PARTNER_SCOPES": "['billing:partner:*']",
        "KEYGATE_POLICY__PLANS": "{trial: {requests_per_minute: 2}}",
        "KEYGATE_SESSIONS__SIGNING_KEYS": "[{kid: e2e-1, key_env: KEYGATE_E2E_SESSION_KEY}]",
        "KEYGATE_E2E_SESSION_KEY": harness.ed25519_pem(),
    }
    started = []
    try:
        grpc = harness.Stack("doors-grpc", workdir, redis, upstream, keygate_env=env)
        started.append(grpc)
        http = harness.Envoy(
            "doors-envoy-http", workdir, http_authz, upstream, template=harness.EXAMPLE_ENVOY_HTTP
        )
        started.append(http)
        nginx = harness.Nginx("doors-nginx", workdir, http_authz, upstream)
        started.append(nginx)
        yield {"envoy-grpc": grpc, "envoy-http": http, "nginx": nginx}
    finally:
        for door in reversed(started):
            door.stop()


@pytest.fixture(scope="module")
def keygate(doors):
    return doors["envoy-grpc"].keygate


def answer(resp: harness.Response, masked=()) -> dict:
    """What a door's answer is made of, with the values that differ by nature (a clock
    reading, a freshly minted token) reduced to whether they are there."""
    body, upstream = resp.body, None
    if resp.upstream:
        # The upstream's echo, which differs by host and request id: what it received of
        # keygate's is compared below instead.
        body = None
        seen = resp.upstream[0]["headers"]
        # A minted session's token and expiry (a clock reading, which two doors asked
        # either side of a second's turn read a second apart) are compared by presence.
        upstream = sorted(
            (k, "<token>" if k in PRESENCE_ONLY or k in masked else v)
            for k, v in seen
            if k.startswith("x-keygate-") or k in harness.IDENTITY_HEADERS or k in harness.CREDENTIAL_HEADERS
        )
    elif resp.header("content-type") == "application/json" and resp.body:
        # (An answer to HEAD has its headers and no body.)
        body = resp.json()
    return {
        "status": resp.status,
        "body": body,
        "client": {h: resp.header(h) for h in CLIENT_HEADERS},
        "present": {h: resp.header(h) is not None for h in PRESENCE_ONLY},
        "upstream": upstream,
    }


def each_door(doors, method: str, path: str, headers=()) -> dict:
    return {name: door.request(method, path, list(headers)) for name, door in doors.items()}


def assert_identical(answers: dict, scenario: str, masked=()) -> harness.Response:
    """The three doors answered alike (the upstream headers named in `masked` only
    present alike); returns the gRPC door's response."""
    seen = {name: answer(resp, masked) for name, resp in answers.items()}
    reference = seen["envoy-grpc"]
    for name, got in seen.items():
        assert got == reference, (
            f"{scenario}: {name} answered otherwise than Envoy over gRPC:\n{name}: {got}\nenvoy-grpc: {reference}\n"
            f"--- {name} ---\n{answers[name]}"
        )
    return answers["envoy-grpc"]


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def scenario_keys(keygate) -> dict:
    """The keys and tenants the scenario list uses, made on `keygate`."""
    tenant, delegated, other = (str(uuid.uuid4()) for _ in range(3))
    reader = keygate.create_key(tenant, ["contacts:read"])
    writer = keygate.create_key(tenant, ["contacts:read", "contacts:write"])
    revoked = keygate.create_key(tenant, ["contacts:read"])
    result = keygate.cli("keys", "revoke", revoked["key_id"])
    assert result.code == 0, str(result)
    partner = keygate.cli(
        "keys", "create", "--json", "--kind", "partner", "--partner", PARTNER,
        "--scopes", "contacts:read,billing:partner:read",
    )
    assert partner.code == 0, str(partner)
    result = keygate.cli("partners", "delegate", PARTNER, delegated, "--json")
    assert result.code == 0, str(result)
    return {
        "tenant": tenant, "delegated": delegated, "other": other, "reader": reader,
        "writer": writer, "revoked": revoked, "partner": partner.json(),
    }


@pytest.fixture(scope="module")
def keys(keygate):
    return scenario_keys(keygate)


def scenarios(k: dict) -> list[tuple[str, str, str, list, int, str | None]]:
    """(name, method, path, headers, status, code): code None for an allow."""
    reader, writer, partner = k["reader"]["token"], k["writer"]["token"], k["partner"]["token"]
    return [
        ("public", "GET", "/public/status", [], 200, None),
        ("allow", "GET", "/v1/contacts/1", [bearer(reader)], 200, None),
        ("allow with x-api-key", "GET", "/v1/contacts/1", [("x-api-key", reader)], 200, None),
        ("smuggled identity is overwritten", "GET", "/v1/contacts/1",
         [bearer(reader), ("x-keygate-subject", "admin"), ("x-keygate-scopes", "*")], 200, None),
        ("missing_credentials", "GET", "/v1/contacts/1", [], 401, "missing_credentials"),
        ("invalid_api_key (checksum)", "GET", "/v1/contacts/1",
         [bearer(harness.with_bad_checksum(reader))], 401, "invalid_api_key"),
        ("invalid_api_key (secret)", "GET", "/v1/contacts/1",
         [bearer(harness.with_wrong_secret(reader))], 401, "invalid_api_key"),
        ("revoked_api_key", "GET", "/v1/contacts/1", [bearer(k["revoked"]["token"])], 401, "revoked_api_key"),
        ("invalid_token", "GET", "/v1/contacts/1", [bearer("eyJhbGciOiJub25lIn0.e30.")], 401, "invalid_token"),
        ("insufficient_permissions", "POST", "/v1/contacts/1",
         [bearer(reader), ("x-tenant-id", k["tenant"])], 403, "insufficient_permissions"),
        ("tenant_required", "POST", "/v1/contacts/1", [bearer(writer)], 400, "tenant_required"),
        ("invalid_tenant", "POST", "/v1/contacts/1",
         [bearer(writer), ("x-tenant-id", "not-a-uuid")], 400, "invalid_tenant"),
        ("tenant_forbidden", "GET", "/v1/contacts/1",
         [bearer(reader), ("x-tenant-id", k["other"])], 403, "tenant_forbidden"),
        ("write with tenant", "POST", "/v1/contacts/1",
         [bearer(writer), ("x-tenant-id", k["tenant"])], 200, None),
        ("partner for a delegated tenant", "GET", "/v1/billing/partner/invoices",
         [bearer(partner), ("x-tenant-id", k["delegated"])], 200, None),
        ("partner for another tenant", "GET", "/v1/billing/partner/invoices",
         [bearer(partner), ("x-tenant-id", k["other"])], 403, "tenant_forbidden"),
        ("api key on the sessions-only route", "GET", "/v1/stream/calls/7",
         [bearer(reader)], 403, "insufficient_permissions"),
        ("no route", "GET", "/v2/nothing-here", [bearer(reader)], None, None),
        ("dot segments are judged where they lead", "GET", "/public/../v1/contacts/1", [], 401,
         "missing_credentials"),
    ]


def test_every_scenario_gets_the_same_answer_through_each_door(doors, keys):
    for name, method, path, headers, status, code in scenarios(keys):
        resp = assert_identical(each_door(doors, method, path, headers), name)
        if status is None:
            continue
        if code is None:
            assert_allowed(resp)
        else:
            assert_denied(resp, status, code)


def test_allow_sends_the_same_identity_upstream(doors, keys):
    headers = [bearer(keys["reader"]["token"]), ("x-tenant-id", keys["tenant"])]
    resp = assert_identical(each_door(doors, "GET", "/v1/contacts/1", headers), "allow")
    assert_allowed(resp)
    assert resp.upstream_headers("x-keygate-key-id") == [keys["reader"]["key_id"]], str(resp)
    assert resp.upstream_headers("x-tenant-id") == [keys["tenant"]], str(resp)
    assert resp.upstream_headers("authorization") == [], str(resp)


def test_the_rate_limit_answers_alike(doors, keygate):
    """Each door gets a key of its own on a 2-a-minute plan: allow, allow, 429."""
    runs = {}
    for name, door in doors.items():
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"], "--plan", "trial")
        runs[name] = [door.request("GET", "/v1/contacts/1", [bearer(key["token"])]) for _ in range(3)]
    for step in range(3):
        # Each door's own key: who the caller is differs, nothing else may.
        resp = assert_identical(
            {name: run[step] for name, run in runs.items()},
            f"request {step + 1}",
            masked=("x-keygate-key-id", "x-keygate-subject", "x-tenant-id"),
        )
        if step < 2:
            assert_allowed(resp)
            assert resp.header("x-ratelimit-remaining") == str(1 - step), str(resp)
        else:
            assert_denied(resp, 429, "rate_limited")
            assert resp.header("retry-after") == "30", str(resp)


def test_a_session_minted_at_each_door_opens_the_stream_route(doors, keys):
    minted = each_door(doors, "POST", "/v1/sessions", [bearer(keys["reader"]["token"])])
    resp = assert_identical(minted, "mint")
    assert_allowed(resp)
    streams = {}
    for name, door in doors.items():
        token = minted[name].header("x-keygate-session-token")
        assert token, f"{name} gave the client no session token:\n{minted[name]}"
        streams[name] = door.request("GET", "/v1/stream/calls/7", [bearer(token)])
    assert_allowed(assert_identical(streams, "stream"))


def test_an_encoded_slash_never_reaches_the_upstream(doors, keys):
    """Not a scenario of the list: Envoy redirects it itself (the examples'
    UNESCAPE_AND_REDIRECT) before asking anyone, nginx passes it to keygate, which
    refuses it. Either way the upstream never sees it."""
    answers = each_door(doors, "GET", "/v1/contacts%2F1", [bearer(keys["reader"]["token"])])
    for name in ("envoy-grpc", "envoy-http"):
        assert answers[name].status == 307 and answers[name].upstream == [], str(answers[name])
    assert_denied(answers["nginx"], 400, "invalid_path")


@pytest.mark.parametrize(
    "method, path, claimed, key, status",
    [
        # A protected path dressed as a public one: still needs a credential.
        ("GET", "/v1/contacts/1", "/public/status", None, 401),
        # A public path dressed as a protected one: still public.
        ("GET", "/public/status", "/v1/contacts/1", None, 200),
        # A write dressed as a read: still needs the write's tenant.
        ("POST", "/v1/contacts/1", "/v1/contacts/1", "writer", 400),
    ],
)
def test_a_client_sent_original_uri_never_changes_the_decision(doors, keys, method, path, claimed, key, status):
    headers = [
        ("x-original-uri", claimed),
        ("x-original-method", "GET"),
        ("x-forwarded-uri", claimed),
        ("x-forwarded-method", "GET"),
    ]
    if key:
        headers.append(bearer(keys[key]["token"]))
    resp = assert_identical(each_door(doors, method, path, headers), f"{method} {path} claiming {claimed}")
    assert resp.status == status, str(resp)
