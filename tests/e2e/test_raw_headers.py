"""The same decisions through an Envoy that sends the request's headers as `header_map`
(`encode_raw_headers: true`: raw bytes, repeated headers kept apart)
instead of the `headers` map: keygate reads both off the wire itself
(src/api/envoy_wire.rs), so both must give the same answers."""

import json

import pytest

import harness
from harness import CREDENTIAL_HEADERS, assert_allowed, assert_denied, with_wrong_secret

CONTACT = "/v1/contacts/42"
ANCHOR = "              include_peer_certificate: false\n"


def raw_headers(config: str) -> str:
    assert config.count(ANCHOR) == 1, "examples/envoy.yaml changed: find the ext_authz block"
    return config.replace(ANCHOR, ANCHOR + "              encode_raw_headers: true\n")


raw_stack = harness.stack_fixture("raw", edit_envoy_config=raw_headers)


@pytest.fixture(scope="module")
def key(raw_stack):
    return raw_stack.keygate.create_key(
        "9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11", ["contacts:read", "contacts:write"]
    )


def running_ext_authz(envoy: harness.Envoy) -> dict:
    """The ext_authz filter configuration the running Envoy holds, as its admin
    interface's /config_dump reports it (not as the file it was started with says)."""
    status, body = harness.http_get(
        f"http://127.0.0.1:{envoy.admin_port}/config_dump?resource=static_listeners"
    )
    assert status == 200, f"{envoy.name} /config_dump answered {status}:\n{body[:1000]}"
    filters = [
        http_filter["typed_config"]
        for config in json.loads(body)["configs"]
        for chain in config["listener"]["filter_chains"]
        for network_filter in chain["filters"]
        for http_filter in network_filter["typed_config"].get("http_filters", [])
        if http_filter["name"] == "envoy.filters.http.ext_authz"
    ]
    assert len(filters) == 1, f"{envoy.name} runs {len(filters)} ext_authz filters: {filters}"
    return filters[0]


# Nothing the client or the upstream sees tells `header_map` from `headers`: keygate
# reads both into the same request on purpose (joined repeats, any-case names). So what
# is checked is what the running Envoy was configured to send.
def test_the_envoy_of_this_module_runs_ext_authz_with_raw_headers(raw_stack):
    assert running_ext_authz(raw_stack.envoy).get("encode_raw_headers") is True


def test_the_default_envoy_runs_ext_authz_with_the_headers_map(stack):
    # Envoy leaves a false field out of the dump; either way, not raw headers.
    assert running_ext_authz(stack.envoy).get("encode_raw_headers", False) is False


@pytest.mark.parametrize("name", ["Authorization", "X-Api-Key"])
def test_an_allowed_request_gets_identity_headers_and_loses_its_credential(
    raw_stack, key, name
):
    value = f"Bearer {key['token']}" if name == "Authorization" else key["token"]
    resp = raw_stack.request(
        "GET", CONTACT, [(name, value), ("X-Keygate-Subject", "forged")]
    )
    assert_allowed(resp)
    assert resp.upstream_headers("x-tenant-id") == [key["tenant_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-key-id") == [key["key_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-subject") != ["forged"], str(resp)
    assert len(resp.upstream_headers("x-keygate-subject")) == 1, str(resp)
    for header in CREDENTIAL_HEADERS:
        assert resp.upstream_headers(header) == [], f"{header} reached the upstream:\n{resp}"


def test_denials_are_the_same(raw_stack, key):
    assert_denied(raw_stack.request("GET", CONTACT), 401, "missing_credentials")
    wrong = with_wrong_secret(key["token"])
    assert_denied(
        raw_stack.request("GET", CONTACT, [("Authorization", f"Bearer {wrong}")]),
        401,
        "invalid_api_key",
    )
    # A write names its tenant in a header sent in its own case.
    token = ("Authorization", f"Bearer {key['token']}")
    assert_denied(
        raw_stack.request("POST", CONTACT, [token, ("X-Tenant-Id", "not-a-uuid")], b"{}"),
        400,
        "invalid_tenant",
    )
    resp = raw_stack.request("POST", CONTACT, [token, ("X-Tenant-Id", key["tenant_id"])], b"{}")
    assert_allowed(resp)
