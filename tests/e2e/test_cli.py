"""The `keygate` command line against a running server: keys create|list|get|revoke|delete,
check and leases acquire|renew|release, as a script would use them (--json, exit codes)."""

import uuid
from datetime import datetime, timedelta, timezone

import pytest

import harness
from harness import free_port, run_cli, token_parts, with_bad_checksum


def test_create_returns_the_token_once_with_its_metadata(keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read", "contacts:write"], "--name", "ci", "--expires-in", "90d")
    assert key["tenant_id"] == tenant
    assert sorted(key["scopes"]) == ["contacts:read", "contacts:write"]
    assert key["token"].startswith("sk_live_" + key["key_id"] + "_"), key
    expires_at = datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
    assert expires_at.tzinfo is not None, key
    expected = datetime.now(timezone.utc) + timedelta(days=90)
    assert abs(expires_at - expected) < timedelta(minutes=5), key


def test_test_environment_keys_say_so(keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read"], "--env", "test")
    assert key["token"].startswith("sk_test_" + key["key_id"] + "_"), key


def test_list_shows_metadata_and_never_a_token(keygate, tenant):
    keys = [keygate.create_key(tenant, ["contacts:read"], "--name", f"k{i}") for i in range(2)]
    other = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    result = keygate.cli("keys", "list", "--tenant", tenant, "--json")
    assert result.code == 0, str(result)
    listed = result.json()["keys"]
    assert sorted(k["key_id"] for k in listed) == sorted(k["key_id"] for k in keys), str(result)
    for entry in listed:
        assert entry["tenant_id"] == tenant
        assert entry["status"] == "active"
        assert "token" not in entry, f"keys list shows a token: {entry}"
    for key in [*keys, other]:
        _, secret = token_parts(key["token"])
        assert key["token"] not in result.stdout + result.stderr
        assert secret not in result.stdout + result.stderr, "keys list shows a key's secret"


def test_get_revoke_delete_lifecycle(keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read"], "--name", "lifecycle")

    got = keygate.cli("keys", "get", key["key_id"], "--json")
    assert got.code == 0, str(got)
    assert got.json()["key_id"] == key["key_id"]
    assert got.json()["status"] == "active"
    assert got.json()["name"] == "lifecycle"
    assert key["token"] not in got.stdout

    revoked = keygate.cli("keys", "revoke", key["key_id"], "--json")
    assert revoked.code == 0, str(revoked)
    assert revoked.json()["status"] == "revoked", str(revoked)
    assert keygate.cli("keys", "get", key["key_id"], "--json").json()["status"] == "revoked"

    deleted = keygate.cli("keys", "delete", key["key_id"])
    assert deleted.code == 0, str(deleted)
    gone = keygate.cli("keys", "get", key["key_id"], "--json")
    assert gone.code != 0, f"a deleted key can still be read:\n{gone}"


def test_create_with_a_bad_tenant_names_the_field(keygate):
    result = keygate.cli("keys", "create", "--tenant", "nope", "--scopes", "contacts:read", "--json")
    assert result.code != 0, str(result)
    assert "tenant_id" in result.stdout + result.stderr, str(result)


def test_admin_calls_need_the_admin_token(keygate, tenant):
    env = keygate.cli_env(KEYGATE_ADMIN_TOKEN="not-the-admin-token")
    result = run_cli(["keys", "list", "--tenant", tenant, "--json"], env)
    assert result.code != 0, f"an admin call with a wrong admin token succeeded:\n{result}"
    assert "not-the-admin-token" not in result.stdout + result.stderr


def test_check_allows_with_exit_0(keygate, reader):
    result = keygate.check(reader["token"], "GET", "/v1/contacts/42")
    assert result.code == 0, str(result)
    answer = result.json()
    assert answer["allowed"] is True, str(result)
    assert answer["principal"]["tenant_id"] == reader["tenant_id"], str(result)
    assert answer["principal"]["key_id"] == reader["key_id"], str(result)


def test_check_denies_with_exit_3_and_the_code(keygate, reader, writer):
    cases = [
        (reader["token"], "POST", "/v1/contacts/42", reader["tenant_id"], 403, "insufficient_permissions"),
        (writer["token"], "POST", "/v1/contacts/42", None, 400, "tenant_required"),
        (writer["token"], "POST", "/v1/contacts/42", str(uuid.uuid4()), 403, "tenant_forbidden"),
        (with_bad_checksum(reader["token"]), "GET", "/v1/contacts/42", None, 401, "invalid_api_key"),
    ]
    for token, method, path, tenant, status, code in cases:
        result = keygate.check(token, method, path, tenant)
        assert result.code == 3, str(result)
        answer = result.json()
        assert answer["allowed"] is False, str(result)
        assert answer["code"] == code, str(result)
        assert answer["http_status"] == status, str(result)


def test_check_with_tenant_flag_allows_a_write(keygate, writer):
    result = keygate.check(writer["token"], "PUT", "/v1/contacts/42", writer["tenant_id"])
    assert result.code == 0, str(result)
    assert result.json()["allowed"] is True


def test_check_exits_1_when_the_server_cannot_be_reached(keygate, reader):
    env = keygate.cli_env(KEYGATE_URL=f"http://127.0.0.1:{free_port()}")
    result = run_cli(
        ["check", "--token", reader["token"], "--method", "GET", "--path", "/v1/contacts/42", "--json"],
        env,
    )
    assert result.code == 1, str(result)
    assert reader["token"] not in result.stdout + result.stderr



def test_rotate_gives_a_successor_and_the_old_key_works_through_its_grace(keygate, stack, tenant):
    old = keygate.create_key(tenant, ["contacts:read"], "--name", "rotating")
    result = keygate.cli("keys", "rotate", old["key_id"], "--grace", "1h", "--json")
    assert result.code == 0, str(result)
    new = result.json()
    assert new["key_id"] != old["key_id"] and new["rotated_from"] == old["key_id"], str(result)
    assert new["name"] == "rotating" and new["scopes"] == ["contacts:read"], str(result)
    assert new["previous"]["key_id"] == old["key_id"], str(result)
    for token in (old["token"], new["token"]):
        resp = stack.request("GET", "/v1/contacts/1", [("authorization", f"Bearer {token}")])
        assert resp.status == 200, str(resp)


def test_revoked_keys_leave_the_list_and_the_audit_trail_names_each_change(keygate, tenant):
    kept = keygate.create_key(tenant, ["contacts:read"])
    gone = keygate.create_key(tenant, ["contacts:read"])
    assert keygate.cli("keys", "revoke", gone["key_id"]).code == 0
    listed = keygate.cli("keys", "list", "--tenant", tenant, "--json").json()["keys"]
    assert [k["key_id"] for k in listed] == [kept["key_id"]], listed
    revoked = keygate.cli("keys", "list", "--tenant", tenant, "--status", "revoked", "--json").json()["keys"]
    assert [k["key_id"] for k in revoked] == [gone["key_id"]], revoked
    result = keygate.cli("audit", "list", "--key", gone["key_id"], "--json")
    assert result.code == 0, str(result)
    actions = [e["action"] for e in result.json()["entries"]]
    assert actions == ["key.created", "key.revoked"], str(result)
    assert gone["token"] not in result.stdout
    assert all(e["actor"].startswith("admin:") for e in result.json()["entries"]), str(result)


@pytest.fixture(scope="module")
def leasing(workdir, redis):
    """A keygate whose plan `two` holds two concurrent sessions, and which shows its
    clients `too_many_requests` for keygate's `rate_limited`."""
    yield from harness.running(harness.Keygate(
        "cli-leases",
        workdir,
        redis,
        {
            "KEYGATE_POLICY__PLANS": "{two: {requests_per_minute: 600, concurrent_sessions: 2}}",
            "KEYGATE_ERRORS__CODES": "{rate_limited: {code: too_many_requests}}",
        },
    ))


def acquire(keygate, token, *extra):
    return keygate.cli("leases", "acquire", "--token", token, "--ttl", "1h", *extra)


def test_leases_acquire_renew_and_release(leasing, tenant):
    key = leasing.create_key(tenant, ["contacts:read"], "--plan", "two")
    first = acquire(leasing, key["token"], "--json")
    assert first.code == 0, str(first)
    lease = first.json()["lease_id"]
    assert lease.startswith(key["key_id"] + "."), str(first)
    expires = datetime.fromisoformat(first.json()["expires_at"].replace("Z", "+00:00"))
    assert abs(expires - (datetime.now(timezone.utc) + timedelta(hours=1))) < timedelta(minutes=5)
    second = acquire(leasing, key["token"], "--quiet")
    assert second.code == 0 and second.stdout.count("\n") == 1, str(second)
    # Both in use: refused with exit 3 and the deployment's code for rate_limited.
    full = acquire(leasing, key["token"], "--json")
    assert full.code == 3, str(full)
    assert full.json()["code"] == "too_many_requests" and full.json()["http_status"] == 429, str(full)
    renewed = leasing.cli("leases", "renew", lease, "--ttl", "2h", "--json")
    assert renewed.code == 0, str(renewed)
    assert renewed.json() == {"lease_id": lease, "renewed": True, "ttl_seconds": 7200}
    released = leasing.cli("leases", "release", lease, "--json")
    assert released.code == 0, str(released)
    assert released.json() == {"lease_id": lease, "released": True}
    # The session is back: the key may take one again.
    assert acquire(leasing, key["token"]).code == 0
    for result in (first, second, full, renewed, released):
        assert key["token"] not in result.stdout + result.stderr


def test_releasing_a_lease_twice_or_an_unknown_one_fails_naming_it(leasing, tenant):
    key = leasing.create_key(tenant, ["contacts:read"], "--plan", "two")
    lease = acquire(leasing, key["token"], "--quiet").stdout.strip()
    assert leasing.cli("leases", "release", lease).code == 0
    again = leasing.cli("leases", "release", lease)
    assert again.code == 1 and "not found: lease_id" in again.stderr, str(again)
    renew = leasing.cli("leases", "renew", lease, "--ttl", "1h")
    assert renew.code == 1 and "not found: lease_id" in renew.stderr, str(renew)
    bad_ttl = leasing.cli("leases", "renew", lease, "--ttl", "2d")
    assert bad_ttl.code == 1 and "--ttl" in bad_ttl.stderr, str(bad_ttl)


def test_leases_acquire_with_a_bad_key_is_denied_without_echoing_it(leasing):
    forged = with_bad_checksum(leasing.create_key(str(uuid.uuid4()), ["contacts:read"])["token"])
    result = acquire(leasing, forged, "--json")
    assert result.code == 3, str(result)
    assert result.json()["code"] == "invalid_api_key", str(result)
    assert forged not in result.stdout + result.stderr
