"""examples/callaba as shipped, through its Envoy: Callaba's page, promise by promise.
The dashboard-issued JWT in `x-access-token` on every call; without it, or in another
header, refused; after a rotation the old token stops on every replica at once while the
new one works."""

import secrets
import time
import uuid

import pytest

import harness
import walkthrough
from harness import wait_for

EXAMPLE = harness.EXAMPLES / "callaba"
SECRET = secrets.token_hex(32)
ENV = {"CALLABA_JWT_SECRET": SECRET}


callaba = harness.stack_fixture("callaba", keygate_env=ENV, example="callaba")


def api_token(instance: str, jti: str, sub: str = "instance-admin", secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"iss": "https://dashboard.callaba.example/", "aud": "callaba-engine", "sub": sub,
              "tenant_id": instance, "iat": now, "exp": now + 365 * 86400, "jti": jti}
    return harness.hs256(secret, claims)


def call(stack, headers, path="/api/streams"):
    return stack.request("GET", path, headers)


def test_the_readme_walkthrough_runs_as_written(callaba):
    walkthrough.run(EXAMPLE / "README.md", callaba, ENV)


def test_the_token_in_x_access_token_works_on_every_call(callaba):
    instance = str(uuid.uuid4())
    token = api_token(instance, "t-" + uuid.uuid4().hex)
    for path in ["/api/streams", "/api/ingests/7", "/api/delivery/config"]:
        resp = call(callaba, [("x-access-token", token)], path)
        assert resp.status == 200, str(resp)
        assert resp.upstream_headers("x-tenant-id") == [instance]
        assert resp.upstream_headers("x-access-token") == [], "the token reached the engine"


@pytest.mark.parametrize("header", [None, "authorization", "x-api-key", "x-access-token-2"])
def test_without_x_access_token_the_request_is_refused(callaba, header):
    token = api_token(str(uuid.uuid4()), "t-" + uuid.uuid4().hex)
    headers = []
    if header == "authorization":
        headers = [("authorization", f"Bearer {token}")]
    elif header:
        headers = [(header, token)]
    resp = call(callaba, headers)
    assert resp.status == 401 and resp.json()["error"]["code"] == "missing_credentials", str(resp)
    assert resp.upstream == []


def test_a_rotation_stops_the_old_token_on_every_replica_at_once(callaba):
    instance = str(uuid.uuid4())
    old_jti = "old-" + uuid.uuid4().hex
    old, new = api_token(instance, old_jti), api_token(instance, "new-" + uuid.uuid4().hex)
    replica = callaba.keygate.replica("callaba-replica-2")
    envoy2 = harness.Envoy(
        "callaba-envoy-2", callaba.keygate.workdir, replica.grpc_port, callaba.upstream,
        template=EXAMPLE / "envoy.yaml",
    )
    try:
        for stack_envoy in (callaba.envoy, envoy2):
            assert stack_envoy.request("GET", "/api/streams", [("x-access-token", old)]).status == 200
        revoked = callaba.keygate.cli("tokens", "revoke", "--issuer", "callaba-dashboard", "--jti", old_jti)
        assert revoked.code == 0, str(revoked)
        assert callaba.envoy.request("GET", "/api/streams", [("x-access-token", old)]).status == 401
        wait_for(
            "the second replica to refuse the old token",
            lambda: envoy2.request("GET", "/api/streams", [("x-access-token", old)]).status == 401,
            timeout=10,
        )
        for stack_envoy in (callaba.envoy, envoy2):
            resp = stack_envoy.request("GET", "/api/streams", [("x-access-token", new)])
            assert resp.status == 200, str(resp)
    finally:
        envoy2.stop()
        replica.stop()


def test_a_token_of_another_dashboard_is_refused(callaba):
    forged = api_token(str(uuid.uuid4()), "t-1", secret="another-dashboard-secret")
    resp = call(callaba, [("x-access-token", forged)])
    assert resp.status == 401 and resp.json()["error"]["code"] == "invalid_token", str(resp)
