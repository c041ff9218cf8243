"""When keygate cannot answer, Envoy fails closed with 503 (status_on_error) and the
upstream sees nothing. Each test here breaks a stack of its own, so the session's stack
is unaffected."""

import signal

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

import harness
from harness import assert_allowed, check_request

CONTACT = "/v1/contacts/42"


doomed = harness.stack_fixture("doomed")


@pytest.fixture(scope="module")
def doomed_redis(workdir):
    yield from harness.running(harness.Redis(workdir / "doomed-redis"))


storeless = harness.stack_fixture("storeless", redis="doomed_redis")


def test_envoy_answers_503_when_keygate_is_stopped(doomed, tenant):
    key = doomed.keygate.create_key(tenant, ["contacts:read"])
    bearer = ("authorization", f"Bearer {key['token']}")
    assert_allowed(doomed.request("GET", CONTACT, [bearer]))

    status = doomed.keygate.stop(signal.SIGTERM)
    assert status != -signal.SIGKILL, "keygate did not exit on SIGTERM and had to be killed"

    for path, headers in ((CONTACT, [bearer]), (CONTACT, []), ("/public/health", [])):
        resp = doomed.request("GET", path, headers)
        assert resp.status == 503, f"GET {path} with keygate stopped:\n{resp}"
        assert resp.upstream == [], f"GET {path} reached the upstream with keygate stopped:\n{resp}"


def test_store_down_is_unavailable_never_a_verdict(storeless, doomed_redis, tenant):
    # Created but never used: keygate has nothing cached and must ask the store.
    key = storeless.keygate.create_key(tenant, ["contacts:read"])
    bearer = ("authorization", f"Bearer {key['token']}")
    doomed_redis.stop()

    resp = storeless.request("GET", CONTACT, [bearer])
    assert resp.status == 503, f"with the store down:\n{resp}"
    assert resp.upstream == [], str(resp)

    # On the wire: a gRPC error (so Envoy's status_on_error decides), not a denial.
    with grpc.insecure_channel(f"127.0.0.1:{storeless.keygate.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            response = stub.Check(check_request("GET", CONTACT, {"authorization": bearer[1]}), timeout=5)
            pytest.fail(f"Check answered instead of failing: {response}")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value


# --------------------------------------------------------------------------- Redis refusing

# Every request of a key with a plan asks the store for its admission (a budget of one),
# and a store that cannot be asked lets the request pass (counted): the one case where an
# outage is an allow, so the one where keygate's answer must beat Envoy's 250 ms timeout.
ALLOW_ON_STORE_ERROR = {
    "KEYGATE_POLICY__PLANS": "{roomy: {requests_per_minute: 100000}}",
    "KEYGATE_POLICY__DEFAULT_PLANS": "{live: roomy}",
    "KEYGATE_RATE_LIMITS__ON_STORE_ERROR": "allow",
    "KEYGATE_RATE_LIMITS__MAX_RESERVATION": "1",
}


@pytest.fixture(scope="module")
def refusing_redis(workdir):
    yield from harness.running(harness.Redis(workdir / "refusing-redis"))


allowing = harness.stack_fixture("allowing", redis="refusing_redis", keygate_env=ALLOW_ON_STORE_ERROR)


# Envoy's counters that say who answered a check: keygate (an HTTP/2 200 carrying the
# gRPC answer, OK or UNAVAILABLE alike) or Envoy itself, when its ext_authz timeout ran out.
ENVOY_COUNTERS = (
    "http.ingress_http.ext_authz.ok",
    "http.ingress_http.ext_authz.error",
    "http.ingress_http.ext_authz.denied",
    "cluster.keygate.upstream_rq_200",
    "cluster.keygate.upstream_rq_timeout",
)


def envoy_counters(envoy) -> dict[str, int]:
    """ENVOY_COUNTERS off Envoy's admin page (each must be there: a counter that does not
    exist cannot show that nothing timed out)."""
    status, body = harness.http_get(f"http://127.0.0.1:{envoy.admin_port}/stats")
    assert status == 200, body
    counters = {}
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if name in ENVOY_COUNTERS:
            counters[name] = int(value)
    missing = set(ENVOY_COUNTERS) - counters.keys()
    assert not missing, f"Envoy has no counter {missing}"
    return counters


def keygate_metric(keygate, series: str) -> float:
    status, body = harness.http_get(keygate.http_url + "/metrics")
    assert status == 200, body
    for line in body.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    return 0.0


def test_with_redis_refusing_keygate_answers_before_envoys_timeout(allowing, refusing_redis, tenant):
    """Redis killed: each check that needs it is answered by keygate (the store is marked
    down after the first refusal, and everything after fails at once), not by Envoy's
    250 ms timeout. A warm key's rate limit cannot be checked and the request passes, as
    `on_store_error: allow` says (no x-ratelimit-* headers: nothing was counted); a cold
    key is keygate's UNAVAILABLE (503 through status_on_error), which Envoy's own timeout
    would also be: Envoy's counters tell them apart (every check answered by keygate,
    `upstream_rq_200`; none timed out, `upstream_rq_timeout`)."""
    warm = allowing.keygate.create_key(tenant, ["contacts:read"])
    cold = allowing.keygate.create_key(tenant, ["contacts:read"])
    warm_bearer = [("authorization", f"Bearer {warm['token']}")]
    cold_bearer = [("authorization", f"Bearer {cold['token']}")]
    resp = allowing.request("GET", CONTACT, warm_bearer)
    assert_allowed(resp)
    assert resp.header("x-ratelimit-limit") == "100000", f"the plan applies while Redis answers:\n{resp}"

    refusing_redis.proc.stop(signal.SIGKILL)
    envoy_before = envoy_counters(allowing.envoy)
    store_errors = 'keygate_rate_limit_store_errors_total'
    unavailable = 'keygate_decisions_total{result="unavailable"}'
    limit_errors_before = keygate_metric(allowing.keygate, store_errors)
    unavailable_before = keygate_metric(allowing.keygate, unavailable)

    rounds = 5
    for i in range(rounds):
        resp = allowing.request("GET", CONTACT, warm_bearer)
        assert_allowed(resp)
        assert resp.header("x-ratelimit-limit") is None, f"round {i}: the limit was not checked:\n{resp}"
        resp = allowing.request("GET", CONTACT, cold_bearer)
        assert resp.status == 503, f"round {i}: a cold key with Redis down:\n{resp}"
        assert resp.upstream == [], str(resp)

    envoy_after = envoy_counters(allowing.envoy)
    moved = {k.rsplit(".", 1)[1]: envoy_after[k] - envoy_before[k] for k in ENVOY_COUNTERS}
    assert moved == {"ok": rounds, "error": rounds, "denied": 0, "upstream_rq_200": 2 * rounds, "upstream_rq_timeout": 0}, (
        f"Envoy's counters over the outage: {moved} (a timeout is Envoy answering, not keygate)"
    )
    assert keygate_metric(allowing.keygate, store_errors) - limit_errors_before == rounds
    assert keygate_metric(allowing.keygate, unavailable) - unavailable_before == rounds
    assert keygate_metric(allowing.keygate, "keygate_store_marked_down") == 1
