"""No secret — token, key secret, pepper, admin token — ever appears in keygate's output,
even at trace level, whatever happens to a key (create, allow, wrong secret, revoke)."""

import pytest

import harness
from harness import assert_allowed, assert_denied, token_parts, with_wrong_secret

CONTACT = "/v1/contacts/42"
# A secret leaks if any run of this many of its characters shows up in the log.
WINDOW = 12


@pytest.fixture(scope="module", params=["text", "json"])
def chatty(request, workdir, redis, upstream):
    yield from harness.running(harness.Stack(
        f"chatty-{request.param}",
        workdir,
        redis,
        upstream,
        keygate_env={"KEYGATE_LOGGING__LEVEL": "trace", "KEYGATE_LOGGING__FORMAT": request.param},
    ))


def leaks(log: str, value: str, window: int) -> list[str]:
    """Log lines holding `value`, or any `window` consecutive characters of it."""
    pieces = {value[i : i + window] for i in range(max(1, len(value) - window + 1))}
    return [line for line in log.splitlines() if any(p in line for p in pieces)]


def test_secrets_never_reach_the_log(chatty, tenant):
    keygate = chatty.keygate
    key = keygate.create_key(tenant, ["contacts:read"])
    wrong = with_wrong_secret(key["token"])

    allowed = keygate.check(key["token"], "GET", CONTACT)
    assert allowed.code == 0, str(allowed)
    denied = keygate.check(wrong, "GET", CONTACT)
    assert denied.code == 3 and denied.json()["code"] == "invalid_api_key", str(denied)

    for header in (
        ("authorization", f"Bearer {key['token']}"),
        ("x-api-key", key["token"]),
        ("x-access-token", key["token"]),
    ):
        assert_allowed(chatty.request("GET", CONTACT, [header]))
    assert_denied(chatty.request("GET", CONTACT, [("x-api-key", wrong)]), 401, "invalid_api_key")

    revoked = keygate.cli("keys", "revoke", key["key_id"], "--json")
    assert revoked.code == 0 and revoked.json()["status"] == "revoked", str(revoked)
    assert_denied(chatty.request("GET", CONTACT, [("authorization", f"Bearer {key['token']}")]),
                  401, "revoked_api_key")

    # Stopped, so that everything it had to say is on disk.
    keygate.stop()
    log = keygate.proc.stderr() + keygate.proc.stdout()
    assert len(log.splitlines()) > 10, f"keygate at trace level logged almost nothing:\n{log}"

    _, secret = token_parts(key["token"])
    _, wrong_secret = token_parts(wrong)
    found = {
        "token": leaks(log, key["token"], len(key["token"])),
        "wrong-secret token": leaks(log, wrong, len(wrong)),
        "key secret": leaks(log, secret, WINDOW),
        "guessed secret": leaks(log, wrong_secret, WINDOW),
        "pepper": leaks(log, keygate.pepper, WINDOW),
        "admin token": leaks(log, keygate.admin_token, WINDOW),
    }
    found = {what: lines[:3] for what, lines in found.items() if lines}
    assert not found, f"secrets in keygate's log ({keygate.proc.stderr_path}): {found}"
