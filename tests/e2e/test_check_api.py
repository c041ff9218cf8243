"""envoy.service.auth.v3.Authorization/Check called directly with Envoy's own Python stubs
(xds-protos): the wire details Envoy relies on, which a test through Envoy cannot see."""

import json

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2_grpc

from harness import IDENTITY_HEADERS, check_request, with_bad_checksum

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@pytest.fixture(scope="module")
def authorization(keygate):
    channel = grpc.insecure_channel(f"127.0.0.1:{keygate.grpc_port}")
    yield external_auth_pb2_grpc.AuthorizationStub(channel)
    channel.close()


def headers_of(options) -> dict[str, base_pb2.HeaderValueOption]:
    out = {}
    for option in options:
        name = option.header.key.lower()
        assert name not in out, f"{name} set twice: {options}"
        out[name] = option
    return out


def test_allow_sets_status_ok_and_overwrites_identity_headers(authorization, reader):
    response = authorization.Check(
        check_request("GET", "/v1/contacts/42", {"authorization": f"Bearer {reader['token']}"}),
        timeout=10,
    )
    # Envoy reads a missing status as OK; keygate must set it either way.
    assert response.HasField("status"), response
    assert response.status.code == grpc.StatusCode.OK.value[0], response
    assert response.HasField("ok_response"), response
    headers = headers_of(response.ok_response.headers)
    for name in IDENTITY_HEADERS:
        assert name in headers, f"{name} missing from ok_response: {response}"
        option = headers[name]
        assert option.append_action == OVERWRITE, f"{name} is not OVERWRITE_IF_EXISTS_OR_ADD: {option}"
        # The deprecated `append` flag, if set at all, must not ask for appending.
        assert not (option.HasField("append") and option.append.value), option
    assert headers["x-tenant-id"].header.value == reader["tenant_id"]
    assert headers["x-keygate-key-id"].header.value == reader["key_id"]
    assert "authorization" in [h.lower() for h in response.ok_response.headers_to_remove], response


def test_deny_sets_a_non_ok_status_and_a_denied_response(authorization):
    response = authorization.Check(check_request("GET", "/v1/contacts/42", {}), timeout=10)
    assert response.HasField("status"), response
    assert response.status.code != grpc.StatusCode.OK.value[0], response
    assert response.HasField("denied_response"), response
    denied = response.denied_response
    assert denied.status.code == 401, response
    assert json.loads(denied.body)["error"]["code"] == "missing_credentials", response
    headers = {o.header.key.lower(): o.header.value for o in denied.headers}
    assert headers.get("www-authenticate", "").startswith("Bearer"), response
    assert headers.get("content-type", "").startswith("application/json"), response


def test_deny_for_a_wrong_key_is_a_denial_not_a_grpc_error(authorization, reader):
    # A gRPC error would hand the decision to Envoy's status_on_error (503): a bad
    # credential must come back as a verdict instead.
    token = with_bad_checksum(reader["token"])
    response = authorization.Check(
        check_request("GET", "/v1/contacts/42", {"x-api-key": token}), timeout=10
    )
    assert response.status.code != grpc.StatusCode.OK.value[0], response
    assert response.denied_response.status.code == 401, response
    assert json.loads(response.denied_response.body)["error"]["code"] == "invalid_api_key"
