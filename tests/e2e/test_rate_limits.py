"""A plan's rate limit through the real Envoy: allowed responses carry `x-ratelimit-*` to
the client (Envoy's ok_response.response_headers_to_add), and the request past the limit
is 429 `rate_limited` with `retry-after` and the same headers, never reaching the
upstream. The plan comes from environment overrides alone."""

import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied


@pytest.fixture(scope="module")
def limited_stack(workdir, redis, upstream):
    env = {
        "KEYGATE_POLICY__PLANS": "{trial: {requests_per_minute: 2, concurrent_sessions: 1}}",
        "KEYGATE_POLICY__DEFAULT_PLANS": "{live: trial}",
    }
    yield from harness.running(harness.Stack("limits", workdir, redis, upstream, keygate_env=env))


def test_the_limit_reaches_the_client_on_allow_and_on_429(limited_stack):
    key = limited_stack.keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    headers = [("authorization", f"Bearer {key['token']}")]
    remaining = []
    for _ in range(2):
        resp = limited_stack.request("GET", "/v1/contacts/1", headers)
        assert_allowed(resp)
        assert resp.header("x-ratelimit-limit") == "2", str(resp)
        assert resp.header("x-ratelimit-reset") is not None, str(resp)
        remaining.append(int(resp.header("x-ratelimit-remaining")))
    assert remaining == [1, 0], remaining
    resp = limited_stack.request("GET", "/v1/contacts/1", headers)
    assert_denied(resp, 429, "rate_limited")
    assert resp.header("retry-after") == "30", str(resp)
    assert resp.header("x-ratelimit-limit") == "2", str(resp)
    assert resp.header("x-ratelimit-remaining") == "0", str(resp)


def test_an_unknown_plan_is_refused_naming_plan(limited_stack):
    result = limited_stack.keygate.cli(
        "keys", "create", "--tenant", str(uuid.uuid4()), "--plan", "platinum"
    )
    assert result.code != 0, str(result)
    assert "plan" in result.stderr and "trial" in result.stderr, str(result)
