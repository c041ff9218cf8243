"""Session tokens for WebSockets, through the real Envoy (examples/envoy.yaml, with its
`upgrade_configs: websocket`) to the echo upstream's WebSocket endpoint: an API key's
"create session" call hands back a session token; a WebSocket opened with it is authorized
once, at the upgrade, and keeps working after the token expires; a new connection with the
expired token, or with a token of a revoked key, is refused 401; the API key itself is
refused on the sessions-only route. keygate is configured by environment overrides alone,
its signing key made by openssl."""

import calendar
import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import harness
from harness import wait_for

ROUTES = (
    "["
    "{name: health, methods: [GET], path: /public/**, public: true},"
    "{name: contacts-read, methods: [GET], path: '/v1/contacts/**', scope: 'contacts:read'},"
    "{name: sessions-create, methods: [POST], path: /v1/sessions, scope: 'contacts:read',"
    " credentials: [api_key], mint_session: true},"
    "{name: stream, methods: [GET], path: '/v1/stream/**', scope: 'contacts:read',"
    " credentials: [session]}"
    "]"
)


@pytest.fixture(scope="module")
def session_stack(workdir, redis, upstream):
    env = {
        "KEYGATE_POLICY__ROUTES": ROUTES,
        "KEYGATE_SESSIONS__SIGNING_KEYS": "[{kid: e2e-1, key_env: KEYGATE_E2E_SESSION_KEY}]",
        "KEYGATE_SESSIONS__LEEWAY": "0s",
        "KEYGATE_E2E_SESSION_KEY": harness.ed25519_pem(),
    }
    yield from harness.running(harness.Stack("sessions", workdir, redis, upstream, keygate_env=env))


def ws_url(stack, path: str = "/v1/stream/calls/7") -> str:
    return f"ws://127.0.0.1:{stack.envoy.port}{path}"


def open_ws(stack, token: str):
    return connect(
        ws_url(stack),
        additional_headers={"authorization": f"Bearer {token}"},
        open_timeout=10,
        close_timeout=5,
    )


def refused_status(stack, token: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        with open_ws(stack, token):
            pass
    return refused.value.response.status_code


def mint(stack, key: dict, *extra: str) -> dict:
    result = stack.keygate.cli("sessions", "mint", "--token", key["token"], "--json", *extra)
    assert result.code == 0, str(result)
    return result.json()


def test_create_session_returns_a_token_that_opens_a_websocket(session_stack, tenant):
    key = session_stack.keygate.create_key(tenant, ["contacts:read"])
    resp = session_stack.request("POST", "/v1/sessions", [("authorization", f"Bearer {key['token']}")])
    assert resp.status == 200, str(resp)
    token = resp.header("x-keygate-session-token")
    assert token and token.count(".") == 2, str(resp)
    # The API gets it too, to put in its own answer (`stream.token`), with its expiry.
    assert resp.upstream_headers("x-keygate-session-token") == [token], str(resp)
    expires = resp.upstream_headers("x-keygate-session-expires-at")
    assert expires and expires == [resp.header("x-keygate-session-expires-at")], str(resp)
    with open_ws(session_stack, token) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    upgrade = [r for r in session_stack.upstream.server.requests() if r["path"] == "/v1/stream/calls/7"]
    seen = dict(upgrade[-1]["headers"])
    assert seen.get("x-keygate-kind") == "session", seen
    assert seen.get("x-keygate-key-id") == key["key_id"], seen
    assert seen.get("x-tenant-id") == tenant, seen
    assert "authorization" not in seen, "the session token reached the upstream"


def test_an_open_connection_outlives_its_token_but_a_new_one_is_refused(session_stack, tenant):
    key = session_stack.keygate.create_key(tenant, ["contacts:read"])
    minted = mint(session_stack, key, "--ttl", "2s")
    expires_at = harness_time(minted["expires_at"])
    with open_ws(session_stack, minted["token"]) as ws:
        ws.send("before expiry")
        assert ws.recv(timeout=5) == "before expiry"
        wait_for("the session token to expire", lambda: time.time() > expires_at, timeout=10, interval=0.05)
        ws.send("after expiry")
        assert ws.recv(timeout=5) == "after expiry"
        assert refused_status(session_stack, minted["token"]) == 401
        ws.send("still open")
        assert ws.recv(timeout=5) == "still open"


def test_a_revoked_keys_session_token_opens_nothing(session_stack, tenant):
    key = session_stack.keygate.create_key(tenant, ["contacts:read"])
    token = mint(session_stack, key)["token"]
    with open_ws(session_stack, token) as ws:
        ws.send("x")
        assert ws.recv(timeout=5) == "x"
    result = session_stack.keygate.cli("keys", "revoke", key["key_id"])
    assert result.code == 0, str(result)
    assert refused_status(session_stack, token) == 401


def test_a_session_token_opens_only_the_routes_that_name_session(session_stack, tenant):
    key = session_stack.keygate.create_key(tenant, ["contacts:read"])
    token = mint(session_stack, key)["token"]
    read = session_stack.request("GET", "/v1/contacts/42", [("authorization", f"Bearer {token}")])
    assert read.status == 403, str(read)
    assert read.json()["error"]["code"] == "insufficient_permissions", str(read)
    with_key = session_stack.request("GET", "/v1/contacts/42", [("authorization", f"Bearer {key['token']}")])
    assert with_key.status == 200, str(with_key)


def test_a_session_minted_right_after_its_key_is_narrowed_works_and_an_older_one_follows_the_key(
    session_stack, tenant
):
    key = session_stack.keygate.create_key(tenant, ["contacts:read", "contacts:write"])
    older = mint(session_stack, key)["token"]
    narrowed = session_stack.keygate.cli("keys", "update", key["key_id"], "--scopes", "contacts:write")
    assert narrowed.code == 0, str(narrowed)
    # The same second as the change: the key now lacks the stream's scope for both tokens…
    assert refused_status(session_stack, older) == 403
    back = session_stack.keygate.cli("keys", "update", key["key_id"], "--scopes", "contacts:read")
    assert back.code == 0, str(back)
    # …and a token minted at once after the next change works at once, as does the older one.
    fresh = mint(session_stack, key)["token"]
    for token in (fresh, older):
        with open_ws(session_stack, token) as ws:
            ws.send("y")
            assert ws.recv(timeout=5) == "y"


def test_the_api_key_itself_is_refused_on_the_websocket_route(session_stack, tenant):
    key = session_stack.keygate.create_key(tenant, ["contacts:read"])
    assert refused_status(session_stack, key["token"]) == 403
    assert refused_status(session_stack, "") == 401


def test_the_public_keys_are_published(session_stack):
    status, body = harness.http_get(session_stack.keygate.http_url + "/.well-known/jwks.json")
    assert status == 200, body
    keys = json.loads(body)["keys"]
    assert [k["kid"] for k in keys] == ["e2e-1"], body
    assert all(k["kty"] == "OKP" and k["crv"] == "Ed25519" and "d" not in k for k in keys), body


def harness_time(rfc3339: str) -> float:
    """Unix seconds of an RFC 3339 UTC instant as keygate prints it."""
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))
