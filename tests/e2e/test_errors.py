"""Error answers shaped per API (`errors`), through the real Envoy, byte for byte: the
default `{"error":{"code","message"}}` shape; an API that answers every authentication
failure with `401 {"message":"Unauthenticated."}`; and an API with its own codes' statuses,
messages, codes shown, body layout and challenge. Each keygate is configured by environment overrides
alone."""

import json
import uuid

import pytest

import harness
from harness import wait_for, with_bad_checksum, with_wrong_secret

CONTACT = "/v1/contacts/42"
UNAUTHENTICATED = b'{"message":"Unauthenticated."}'


def bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


def assert_answer(resp, status: int, body: bytes, challenge: str | None = "Bearer"):
    """Exactly this status and body, as JSON, with the challenge on 401s, and the upstream
    never reached."""
    assert resp.status == status, f"expected {status}:\n{resp}"
    assert resp.body == body, f"expected the body {body!r}:\n{resp}"
    assert resp.upstream == [], f"a denied request reached the upstream:\n{resp}"
    assert resp.header("content-type") == "application/json", str(resp)
    assert resp.header("www-authenticate") == challenge, str(resp)


@pytest.fixture(scope="module")
def message_stack(workdir, redis, upstream):
    env = {
        "KEYGATE_ERRORS__OPAQUE": "true",
        "KEYGATE_ERRORS__OPAQUE_MESSAGE": "Unauthenticated.",
        "KEYGATE_ERRORS__BODY": '{"message": "{message}"}',
    }
    yield from harness.running(harness.Stack("errors-message", workdir, redis, upstream, keygate_env=env))


def expired_key(keygate, tenant: str) -> dict:
    """A key whose one second has passed, as `keys get` reports it."""
    key = keygate.create_key(tenant, ["contacts:read"], "--expires-in", "1s")

    def reported_expired():
        result = keygate.cli("keys", "get", key["key_id"], "--json")
        assert result.code == 0, str(result)
        return result.json()["status"] == "expired"

    wait_for("the 1s key to be reported expired", reported_expired, timeout=15, interval=0.1)
    return key


def revoked_key(stack, tenant: str) -> dict:
    """A key that was allowed (so it is cached) and then revoked."""
    key = stack.keygate.create_key(tenant, ["contacts:read"])
    resp = stack.request("GET", CONTACT, [bearer(key["token"])])
    assert resp.status == 200, str(resp)
    result = stack.keygate.cli("keys", "revoke", key["key_id"])
    assert result.code == 0, str(result)
    return key


@pytest.mark.parametrize("case", ["missing", "malformed", "bad checksum", "wrong secret", "expired", "revoked"])
def test_every_authentication_failure_is_401_unauthenticated(message_stack, tenant, case):
    keygate = message_stack.keygate
    if case == "missing":
        headers = []
    elif case == "malformed":
        headers = [bearer("not-a-key-at-all")]
    elif case == "expired":
        headers = [bearer(expired_key(keygate, tenant)["token"])]
    elif case == "revoked":
        headers = [bearer(revoked_key(message_stack, tenant)["token"])]
    else:
        valid = keygate.create_key(tenant, ["contacts:read"])["token"]
        forged = with_bad_checksum(valid) if case == "bad checksum" else with_wrong_secret(valid)
        headers = [bearer(forged)]
    assert_answer(message_stack.request("GET", CONTACT, headers), 401, UNAUTHENTICATED)


def test_the_message_shape_carries_other_denials_in_its_own_layout(message_stack, tenant):
    key = message_stack.keygate.create_key(tenant, ["contacts:read"])
    resp = message_stack.request("DELETE", CONTACT, [bearer(key["token"]), ("x-tenant-id", tenant)])
    assert_answer(
        resp, 403, b'{"message":"The credential does not grant access to this route."}', None
    )


def test_the_default_shape_is_code_and_message(stack, keygate, tenant):
    valid = keygate.create_key(tenant, ["contacts:read"])["token"]
    resp = stack.request("GET", CONTACT, [bearer(with_wrong_secret(valid))])
    assert_answer(
        resp, 401, b'{"error":{"code":"invalid_api_key","message":"The API key is not valid."}}'
    )
    resp = stack.request("GET", CONTACT, [bearer(valid), ("x-tenant-id", "not-a-uuid")])
    assert_answer(
        resp,
        400,
        b'{"error":{"code":"invalid_tenant","message":"The X-Tenant-Id header must be a UUID."}}',
        None,
    )


CODES = {
    "invalid_api_key": {"message": "The API key is malformed or doesn't exist"},
    "expired_api_key": {"message": "The API key has expired"},
    "revoked_api_key": {"message": "The API key has been revoked"},
    "insufficient_permissions": {"status": 401, "message": "The API key lacks required permissions"},
    "rate_limited": {"message": "Slow down"},
    # Shown as the code the API documents; metrics and logs keep keygate's own.
    "missing_credentials": {"code": "invalid_api_key", "message": "The API key is missing"},
}


@pytest.fixture(scope="module")
def coded_stack(workdir, redis, upstream):
    env = {
        "KEYGATE_ERRORS__CODES": json.dumps(CODES),
        "KEYGATE_ERRORS__BODY": '{"status": "{status}", "error": {"type": "{code}", "detail": "{message}"}}',
        "KEYGATE_ERRORS__WWW_AUTHENTICATE": 'Bearer realm="api"',
        "KEYGATE_POLICY__PLANS": "{single: {requests_per_minute: 1}}",
    }
    yield from harness.running(harness.Stack("errors-coded", workdir, redis, upstream, keygate_env=env))


def coded(status: int, code: str) -> bytes:
    """The body of keygate's `code`, as configured (its public code, status, message)."""
    message = CODES[code]["message"]
    shown = CODES[code].get("code", code)
    return json.dumps(
        {"status": status, "error": {"type": shown, "detail": message}}, separators=(",", ":")
    ).encode()


def test_each_code_answers_with_its_configured_status_and_message(coded_stack, tenant):
    keygate = coded_stack.keygate
    challenge = 'Bearer realm="api"'
    reader = keygate.create_key(tenant, ["contacts:read"])
    resp = coded_stack.request("GET", CONTACT, [bearer(with_wrong_secret(reader["token"]))])
    assert_answer(resp, 401, coded(401, "invalid_api_key"), challenge)
    resp = coded_stack.request("DELETE", CONTACT, [bearer(reader["token"]), ("x-tenant-id", tenant)])
    assert_answer(resp, 401, coded(401, "insufficient_permissions"), challenge)
    resp = coded_stack.request("GET", CONTACT, [bearer(revoked_key(coded_stack, tenant)["token"])])
    assert_answer(resp, 401, coded(401, "revoked_api_key"), challenge)
    resp = coded_stack.request("GET", CONTACT, [bearer(expired_key(keygate, tenant)["token"])])
    assert_answer(resp, 401, coded(401, "expired_api_key"), challenge)


def decisions(keygate, code: str) -> float:
    """keygate_decisions_total for keygate's own `code`."""
    status, text = harness.http_get(keygate.http_url + "/metrics", timeout=5)
    assert status == 200, text
    label = f'keygate_decisions_total{{result="{code}"}} '
    values = [float(line[len(label):]) for line in text.splitlines() if line.startswith(label)]
    return values[0] if values else 0.0


def test_a_code_is_shown_as_the_apis_own_and_counted_as_keygates(coded_stack, tenant):
    keygate = coded_stack.keygate
    before = decisions(keygate, "missing_credentials")
    resp = coded_stack.request("GET", CONTACT, [])
    assert_answer(resp, 401, coded(401, "missing_credentials"), 'Bearer realm="api"')
    assert b"missing_credentials" not in resp.body
    assert decisions(keygate, "missing_credentials") == before + 1
    # keygate.v1's answer (`keygate check`) shows the same code.
    result = keygate.cli("check", "--method", "GET", "--path", CONTACT, "--json")
    assert result.code == 3, str(result)
    assert (result.json()["code"], result.json()["http_status"], result.json()["message"]) == (
        "invalid_api_key", 401, "The API key is missing"
    ), str(result)


def test_a_429_keeps_retry_after_in_the_configured_shape(coded_stack, tenant):
    key = coded_stack.keygate.create_key(tenant, ["contacts:read"], "--plan", "single")
    assert coded_stack.request("GET", CONTACT, [bearer(key["token"])]).status == 200
    resp = coded_stack.request("GET", CONTACT, [bearer(key["token"])])
    assert_answer(resp, 429, coded(429, "rate_limited"), None)
    assert resp.header("retry-after") == "60", str(resp)
    assert resp.header("x-ratelimit-limit") == "1", str(resp)


def serve_with_errors(workdir, redis, codes: dict) -> harness.CliResult:
    """`keygate serve` on a valid file with `errors.codes` set to `codes` from the
    environment: what it answers when it refuses to start."""
    config = workdir / "errors-bad.yaml"
    config.write_text(
        harness.keygate_config(harness.free_port(), harness.free_port(), harness.free_port(), redis.url)
    )
    return harness.run_cli(
        ["serve", "--config", str(config)],
        harness.clean_env(
            KEYGATE_PEPPER="p" * 48,
            KEYGATE_ADMIN_TOKEN="a" * 32,
            KEYGATE_ERRORS__CODES=json.dumps(codes),
        ),
    )


def test_a_mistake_in_errors_stops_startup_naming_the_field(workdir, redis):
    result = serve_with_errors(workdir, redis, {"invalid_api_key": {"status": 503}})
    assert result.code != 0, str(result)
    assert "errors.codes.invalid_api_key.status" in result.stderr, str(result)


@pytest.mark.parametrize("public", ["", "Invalid_Key", "invalid key", 'a"b'])
def test_a_public_code_that_is_not_a_token_stops_startup_naming_the_field(workdir, redis, public):
    result = serve_with_errors(workdir, redis, {"missing_credentials": {"code": public}})
    assert result.code != 0, str(result)
    assert "errors.codes.missing_credentials.code" in result.stderr, str(result)
