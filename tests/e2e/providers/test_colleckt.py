"""examples/colleckt as shipped, through its Envoy: Colleckt's page, promise by promise.
Bearer tokens shown once and hashed at rest, 180 days by default, full access within the
workspace, revoked at once and gone from the list, and `401 {"message":"Unauthenticated."}`
for a missing, invalid or expired token alike."""

import datetime
import uuid

import pytest

import harness
import walkthrough
from harness import wait_for, with_wrong_secret

EXAMPLE = harness.EXAMPLES / "colleckt"
UNAUTHENTICATED = b'{"message":"Unauthenticated."}'


colleckt = harness.stack_fixture("colleckt", example="colleckt")


def bearer(token: str):
    return [("authorization", f"Bearer {token}")]


def token_for(stack, workspace: str, *extra: str) -> dict:
    return stack.keygate.create_key(workspace, (), *extra)


def assert_unauthenticated(resp):
    assert resp.status == 401, str(resp)
    assert resp.body == UNAUTHENTICATED, str(resp)
    assert resp.header("content-type") == "application/json", str(resp)
    assert resp.header("www-authenticate") == "Bearer", str(resp)
    assert resp.upstream == [], str(resp)


def test_the_readme_walkthrough_runs_as_written(colleckt):
    walkthrough.run(EXAMPLE / "README.md", colleckt, {})


def test_a_token_has_full_access_within_its_workspace(colleckt):
    workspace = str(uuid.uuid4())
    token = token_for(colleckt, workspace)["token"]
    for method, path in [("GET", "/api/v1/flows"), ("POST", "/api/v1/contacts/import"), ("DELETE", "/api/v1/flows/9")]:
        resp = colleckt.request(method, path, bearer(token))
        assert resp.status == 200, f"{method} {path}:\n{resp}"
        assert resp.upstream_headers("x-tenant-id") == [workspace], str(resp)
        assert resp.upstream_headers("authorization") == [], "the token reached the API"
    # Another workspace is not its own.
    resp = colleckt.request("GET", "/api/v1/flows", bearer(token) + [("x-tenant-id", str(uuid.uuid4()))])
    assert resp.status == 403, str(resp)


def test_a_token_is_shown_once_and_only_its_hash_is_kept(colleckt, redis):
    key = token_for(colleckt, str(uuid.uuid4()))
    got = colleckt.keygate.cli("keys", "get", key["key_id"], "--json")
    assert got.code == 0 and key["token"] not in got.stdout, str(got)
    secret = key["token"].rsplit("_", 1)[1]
    dump = subprocess_dump(redis)
    assert key["key_id"] in dump, "the record is in Redis"
    assert secret not in dump and key["token"] not in dump, "the token is stored in Redis"
    assert "$argon2id$" in dump


def subprocess_dump(redis) -> str:
    import subprocess

    cli = harness.shutil.which("redis-cli")
    keys = subprocess.run([cli, "-p", str(redis.port), "--scan", "--pattern", "colleckt:*"], capture_output=True, text=True).stdout.split()
    out = []
    for k in keys:
        kind = subprocess.run([cli, "-p", str(redis.port), "type", k], capture_output=True, text=True).stdout.strip()
        if kind == "hash":
            out.append(subprocess.run([cli, "-p", str(redis.port), "hgetall", k], capture_output=True, text=True).stdout)
    return "\n".join(out)


def test_tokens_expire_after_180_days_by_default(colleckt):
    key = token_for(colleckt, str(uuid.uuid4()))
    expires = datetime.datetime.fromisoformat(key["expires_at"].replace("Z", "+00:00"))
    days = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 86400
    assert 179.9 < days <= 180.0, key["expires_at"]


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong secret", "another header"])
def test_a_missing_or_invalid_token_is_401_unauthenticated(colleckt, case):
    valid = token_for(colleckt, str(uuid.uuid4()))["token"]
    headers = {
        "missing": [],
        "garbage": bearer("1|abc123def456ghi789jkl012mno345pqr678stu901vwx234yz"),
        "wrong secret": bearer(with_wrong_secret(valid)),
        "another header": [("x-api-key", valid)],
    }[case]
    assert_unauthenticated(colleckt.request("GET", "/api/v1/flows", headers))


def test_an_expired_token_is_401_unauthenticated_and_stays_listed(colleckt):
    workspace = str(uuid.uuid4())
    key = token_for(colleckt, workspace, "--expires-in", "1s")

    def expired():
        return colleckt.keygate.cli("keys", "get", key["key_id"], "--json").json()["status"] == "expired"

    wait_for("the token to expire", expired, timeout=15, interval=0.1)
    assert_unauthenticated(colleckt.request("GET", "/api/v1/flows", bearer(key["token"])))
    listed = colleckt.keygate.cli("keys", "list", "--tenant", workspace, "--json").json()["keys"]
    assert [(k["key_id"], k["status"]) for k in listed] == [(key["key_id"], "expired")]


def test_a_revoked_token_is_401_at_once_on_every_replica_and_leaves_the_list(colleckt):
    workspace = str(uuid.uuid4())
    key = token_for(colleckt, workspace)
    other = colleckt.keygate.replica("colleckt-replica-2")
    try:
        assert colleckt.request("GET", "/api/v1/flows", bearer(key["token"])).status == 200
        on_other = lambda: run_check(colleckt, other, key["token"])  # noqa: E731
        assert on_other().code == 0, str(on_other())
        assert colleckt.keygate.cli("keys", "revoke", key["key_id"]).code == 0
        assert_unauthenticated(colleckt.request("GET", "/api/v1/flows", bearer(key["token"])))
        wait_for("the second replica to refuse the revoked token", lambda: on_other().code == 3, timeout=10)
    finally:
        other.stop()
    listed = colleckt.keygate.cli("keys", "list", "--tenant", workspace, "--json").json()["keys"]
    assert listed == [], listed


def run_check(stack, replica, token: str):
    return harness.run_cli(
        ["check", "--url", replica.grpc_url, "--token", token, "--path", "/api/v1/flows", "--json"],
        stack.keygate.cli_env(),
    )
