"""examples/kallglot as shipped, through its Envoy: Kallglot's page, promise by promise.
sk_live_ and sk_test_ keys, its permission scopes, its four error codes, per-plan requests
per minute and concurrent sessions (test 60/5, starter 120/10, pro 600/50), one-hour
session tokens for WebSockets checked at connection time, Idempotency-Key untouched."""

import calendar
import subprocess
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import harness
import walkthrough
from harness import wait_for, with_wrong_secret

EXAMPLE = harness.EXAMPLES / "kallglot"
ENV = {
    "KALLGLOT_SESSION_KEY": subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519"], check=True, capture_output=True, text=True
    ).stdout
}
SCOPES = {
    ("GET", "/v1/sessions/s-1"): "sessions:read",
    ("DELETE", "/v1/sessions/s-1"): "sessions:write",
    ("GET", "/v1/recordings/r-1"): "recordings:read",
    ("DELETE", "/v1/recordings/r-1"): "recordings:delete",
    ("GET", "/v1/analysis/a-1"): "analysis:read",
    ("POST", "/v1/analysis/a-1"): "analysis:write",
    ("PUT", "/v1/webhooks/w-1"): "webhooks:manage",
}


kallglot = harness.stack_fixture("kallglot", keygate_env=ENV, example="kallglot")


def key(stack, scopes, *extra) -> dict:
    return stack.keygate.create_key(str(uuid.uuid4()), scopes, *extra)


def call(stack, method, path, token, *headers):
    return stack.request(method, path, [("authorization", f"Bearer {token}"), *headers])


def error(resp) -> tuple[int, str, str]:
    e = resp.json()["error"]
    return resp.status, e["code"], e["message"]


def test_the_readme_walkthrough_runs_as_written(kallglot):
    walkthrough.run(EXAMPLE / "README.md", kallglot, ENV)


def test_live_and_test_keys_each_on_their_plan(kallglot):
    live = key(kallglot, ["sessions:read"])["token"]
    test = key(kallglot, ["sessions:read"], "--env", "test")["token"]
    pro = key(kallglot, ["sessions:read"], "--plan", "pro")["token"]
    assert live.startswith("sk_live_") and test.startswith("sk_test_")
    for token, limit in [(live, "120"), (test, "60"), (pro, "600")]:
        resp = call(kallglot, "GET", "/v1/sessions/s-1", token)
        assert resp.status == 200, str(resp)
        assert resp.header("x-ratelimit-limit") == limit, str(resp)
        assert resp.upstream_headers("x-keygate-environment") == [
            "test" if token is test else "live"
        ]


def test_each_route_family_needs_its_permission(kallglot):
    everything = key(kallglot, sorted(set(SCOPES.values())))["token"]
    for (method, path), scope in SCOPES.items():
        assert call(kallglot, method, path, everything).status == 200, f"{method} {path}"
        others = key(kallglot, sorted(set(SCOPES.values()) - {scope}))["token"]
        assert error(call(kallglot, method, path, others)) == (
            401, "insufficient_permissions", "The API key lacks required permissions."
        ), f"{method} {path} without {scope}"
    # No scopes, no access.
    assert call(kallglot, "GET", "/v1/sessions/s-1", key(kallglot, [])["token"]).status == 401


def test_the_four_error_codes(kallglot):
    valid = key(kallglot, ["sessions:read"])
    assert error(call(kallglot, "GET", "/v1/sessions/s-1", "sk_live_garbage")) == (
        401, "invalid_api_key", "The API key is malformed or doesn't exist."
    )
    assert error(call(kallglot, "GET", "/v1/sessions/s-1", with_wrong_secret(valid["token"])))[1] == "invalid_api_key"
    short = key(kallglot, ["sessions:read"], "--expires-in", "1s")

    def expired():
        return kallglot.keygate.cli("keys", "get", short["key_id"], "--json").json()["status"] == "expired"

    wait_for("the key to expire", expired, timeout=15, interval=0.1)
    assert error(call(kallglot, "GET", "/v1/sessions/s-1", short["token"])) == (
        401, "expired_api_key", "The API key has expired."
    )
    assert kallglot.keygate.cli("keys", "revoke", valid["key_id"]).code == 0
    resp = call(kallglot, "GET", "/v1/sessions/s-1", valid["token"])
    assert error(resp) == (401, "revoked_api_key", "The API key has been revoked.")
    assert resp.header("www-authenticate") == "Bearer"


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param([], id="no header"),
        pytest.param([("authorization", "Basic dXNlcjpwYXNz")], id="Basic"),
        pytest.param([("authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl")], id="JWT-shaped"),
        pytest.param([("authorization", "Bearer")], id="empty Bearer"),
    ],
)
def test_a_missing_or_malformed_key_is_the_pages_invalid_api_key(kallglot, presented):
    # keygate's own codes would be missing_credentials and invalid_token; the page has one.
    resp = kallglot.request("GET", "/v1/sessions/s-1", presented)
    assert error(resp) == (401, "invalid_api_key", "The API key is malformed or doesn't exist."), str(resp)
    assert resp.header("www-authenticate") == "Bearer", str(resp)
    assert resp.upstream == [], str(resp)


def test_metrics_count_keygates_own_codes_behind_the_pages(kallglot):
    def count(code):
        status, body = harness.http_get(kallglot.keygate.http_url + "/metrics", timeout=5)
        assert status == 200
        for line in body.splitlines():
            if line.startswith("keygate_decisions_total{") and f'"{code}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = count("missing_credentials")
    assert error(kallglot.request("GET", "/v1/sessions/s-1"))[1] == "invalid_api_key"
    assert count("missing_credentials") == before + 1


def test_a_test_key_gets_60_requests_in_any_minute_and_the_61st_is_refused(kallglot):
    # The plan is a rolling window: 60 in any minute, all at once if they come so. The
    # 61st is refused unless a minute has passed since the first was admitted (which
    # only a machine stalled for a minute would see: then nothing can be said of it).
    test = key(kallglot, ["sessions:read"], "--env", "test")["token"]
    started = time.monotonic()
    answers = [call(kallglot, "GET", "/v1/sessions/s-1", test) for _ in range(61)]
    within_a_minute = time.monotonic() - started < 60
    statuses = [a.status for a in answers]
    assert statuses[:60] == [200] * 60, statuses
    assert answers[59].header("x-ratelimit-remaining") == "0", str(answers[59])
    if not within_a_minute:
        pytest.skip("the 61 requests took more than a minute")
    refused = answers[60]
    assert refused.status == 429, statuses
    assert refused.json()["error"]["code"] == "rate_limited", str(refused)
    # When the first request leaves the window: a minute after it (and the quarter
    # second a replica may spend a reservation in), never before the next second.
    assert 1 <= int(refused.header("retry-after")) <= 61, str(refused)
    assert refused.header("x-ratelimit-limit") == "60", str(refused)
    assert refused.upstream == []


def test_a_test_key_holds_five_concurrent_sessions(kallglot):
    test = key(kallglot, ["sessions:write"], "--env", "test")["token"]
    created = [call(kallglot, "POST", "/v1/sessions", test) for _ in range(5)]
    assert [r.status for r in created] == [200] * 5, [str(r) for r in created]
    leases = {r.upstream_headers("x-keygate-lease-id")[0] for r in created}
    assert len(leases) == 5
    sixth = call(kallglot, "POST", "/v1/sessions", test)
    assert sixth.status == 429 and sixth.json()["error"]["code"] == "rate_limited", str(sixth)


def test_idempotency_key_passes_through_untouched(kallglot):
    token = key(kallglot, ["sessions:write"])["token"]
    resp = call(kallglot, "POST", "/v1/sessions/s-1/end", token, ("idempotency-key", "Abc-123_x"))
    assert resp.status == 200, str(resp)
    assert resp.upstream_headers("idempotency-key") == ["Abc-123_x"]


def ws(stack, token):
    return connect(
        f"ws://127.0.0.1:{stack.envoy.port}/v1/stream/s-1",
        additional_headers={"authorization": f"Bearer {token}"},
        open_timeout=10,
    )


def test_a_created_sessions_stream_token_opens_the_websocket_for_an_hour(kallglot):
    live = key(kallglot, ["sessions:read", "sessions:write"])["token"]
    before = int(time.time())
    created = call(kallglot, "POST", "/v1/sessions", live)
    after = int(time.time())
    assert created.status == 200, str(created)
    token = created.upstream_headers("x-keygate-session-token")[0]
    assert created.header("x-keygate-session-token") == token
    expires = created.header("x-keygate-session-expires-at")
    # An hour after it was made (in whole seconds), whenever during the call that was.
    at = calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ"))
    assert before + 3600 <= at <= after + 3600, (before, expires, after)
    with ws(kallglot, token) as conn:
        conn.send("hola")
        assert conn.recv(timeout=5) == "hola"
    with pytest.raises(InvalidStatus) as refused:
        with ws(kallglot, live):
            pass
    assert refused.value.response.status_code == 401


def test_a_session_token_opens_the_websocket_and_nothing_else(kallglot):
    # The key holds every scope the session token is refused on, so only the route's
    # credentials (`session` on the stream alone) can refuse it.
    live = key(kallglot, ["sessions:read", "sessions:write", "recordings:delete", "webhooks:manage"])["token"]
    created = call(kallglot, "POST", "/v1/sessions", live)
    assert created.status == 200, str(created)
    session = created.header("x-keygate-session-token")
    with ws(kallglot, session) as conn:
        conn.send("hola")
        assert conn.recv(timeout=5) == "hola"
    for method, path in [("DELETE", "/v1/recordings/r-1"), ("POST", "/v1/webhooks"), ("GET", "/v1/sessions/s-1")]:
        assert call(kallglot, method, path, live).status == 200, f"the key itself on {method} {path}"
        resp = call(kallglot, method, path, session)
        assert error(resp) == (401, "insufficient_permissions", "The API key lacks required permissions."), (
            f"{method} {path}: {resp}"
        )
        assert resp.upstream == [], str(resp)


def test_a_created_sessions_lease_is_given_back_with_the_cli(kallglot):
    test = key(kallglot, ["sessions:write"], "--env", "test")["token"]
    leases = []
    for _ in range(5):
        created = call(kallglot, "POST", "/v1/sessions", test)
        assert created.status == 200, str(created)
        leases.append(created.upstream_headers("x-keygate-lease-id")[0])
    assert call(kallglot, "POST", "/v1/sessions", test).status == 429
    released = kallglot.keygate.cli("leases", "release", leases[0], "--json")
    assert released.code == 0, str(released)
    assert released.json() == {"lease_id": leases[0], "released": True}
    assert call(kallglot, "POST", "/v1/sessions", test).status == 200
    assert call(kallglot, "POST", "/v1/sessions", test).status == 429
    again = kallglot.keygate.cli("leases", "release", leases[0])
    assert again.code == 1 and "not found" in again.stderr, str(again)
