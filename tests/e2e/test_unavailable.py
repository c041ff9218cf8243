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


@pytest.fixture(scope="module")
def doomed(workdir, redis, upstream):
    s = harness.Stack("doomed", workdir, redis, upstream)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def doomed_redis(workdir):
    r = harness.Redis(workdir / "doomed-redis")
    yield r
    r.stop()


@pytest.fixture(scope="module")
def storeless(workdir, doomed_redis, upstream):
    s = harness.Stack("storeless", workdir, doomed_redis, upstream)
    yield s
    s.stop()


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
