"""Requests through the real Envoy (examples/envoy.yaml) to the echo upstream, with keygate
deciding: what the client gets back, and what the upstream gets to see."""

import re
import uuid

import pytest

import harness
from harness import (
    CREDENTIAL_HEADERS,
    IDENTITY_HEADERS,
    assert_allowed,
    assert_denied,
    http_get,
    wait_for,
    with_bad_checksum,
    with_wrong_secret,
)

CONTACT = "/v1/contacts/42"


def credential(style: str, token: str) -> tuple[str, str]:
    return {
        "authorization": ("authorization", f"Bearer {token}"),
        "x-access-token": ("x-access-token", token),
        "x-api-key": ("x-api-key", token),
    }[style]


def bearer(token: str) -> tuple[str, str]:
    return credential("authorization", token)


@pytest.fixture(scope="module")
def reader_principal(keygate, reader):
    result = keygate.check(reader["token"], "GET", CONTACT)
    assert result.code == 0, f"the reader key should be allowed:\n{result}"
    principal = result.json()["principal"]
    assert principal.get("subject"), f"check --json has no principal.subject:\n{result}"
    return principal


def assert_identity(resp, key, principal):
    """The upstream saw keygate's identity headers, once each, and no credential."""
    assert resp.upstream_headers("x-tenant-id") == [key["tenant_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-key-id") == [key["key_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-subject") == [principal["subject"]], str(resp)
    scopes = resp.upstream_headers("x-keygate-scopes")
    assert len(scopes) == 1, str(resp)
    assert sorted(scopes[0].split(",")) == sorted(key["scopes"]), str(resp)
    for name in CREDENTIAL_HEADERS:
        assert resp.upstream_headers(name) == [], f"{name} reached the upstream:\n{resp}"
    for name, value in resp.upstream[0]["headers"]:
        assert key["token"] not in value, f"the token reached the upstream in {name}:\n{resp}"


# ------------------------------------------------------------------------------ allow

@pytest.mark.parametrize("style", ["authorization", "x-access-token", "x-api-key"])
def test_allowed_request_reaches_upstream_with_identity_and_without_credential(
    stack, reader, reader_principal, style
):
    resp = stack.request("GET", CONTACT, [credential(style, reader["token"])])
    assert_allowed(resp)
    assert resp.upstream[0]["method"] == "GET"
    assert resp.upstream[0]["path"] == CONTACT
    assert_identity(resp, reader, reader_principal)


def test_forged_identity_headers_are_overwritten_not_appended(stack, reader, reader_principal):
    resp = stack.request(
        "GET",
        CONTACT,
        [
            bearer(reader["token"]),
            ("x-tenant-id", reader["tenant_id"]),
            ("x-keygate-subject", "forged-subject"),
            ("x-keygate-subject", "forged-again"),
            ("x-keygate-key-id", "forged-key"),
            ("x-keygate-scopes", "contacts:write,admin:all"),
        ],
    )
    assert_allowed(resp)
    assert_identity(resp, reader, reader_principal)


def test_tenant_header_naming_another_tenant_is_forbidden(stack, reader):
    resp = stack.request(
        "GET",
        CONTACT,
        [
            bearer(reader["token"]),
            ("x-tenant-id", str(uuid.uuid4())),
            ("x-keygate-subject", "forged-subject"),
            ("x-keygate-key-id", "forged-key"),
        ],
    )
    assert_denied(resp, 403, "tenant_forbidden")


def test_identity_headers_spelled_with_underscores_are_rejected_by_envoy(stack, reader):
    # Upstreams that map `_` to `-` (CGI, WSGI) would read these as keygate's headers.
    resp = stack.request(
        "GET", CONTACT, [bearer(reader["token"]), ("x_keygate_subject", "forged-subject")]
    )
    assert resp.status == 400, str(resp)
    assert resp.upstream == [], str(resp)


# ------------------------------------------- aliases of owned headers, Envoy at its defaults

def underscores_allowed(config: str) -> str:
    """examples/envoy.yaml without `headers_with_underscores_action: REJECT_REQUEST`: Envoy
    at its default, ALLOW, as many deployments run it."""
    block = re.compile(
        r"^ *common_http_protocol_options:\n(?: *#.*\n)* *headers_with_underscores_action: REJECT_REQUEST\n",
        re.MULTILINE,
    )
    edited, n = block.subn("", config)
    assert n == 1, "examples/envoy.yaml changed: find its headers_with_underscores_action"
    return edited


underscores_stack = harness.stack_fixture("underscores", edit_envoy_config=underscores_allowed)


# Every header keygate owns, by the spelling it reads or sets: the tenant header, the
# identity headers, and the credential headers of the test policy (`authorization` has no
# other spelling).
OWNED = (
    "x-tenant-id",
    "x-keygate-subject",
    "x-keygate-key-id",
    "x-keygate-scopes",
    "x-keygate-kind",
    "x-keygate-environment",
    "x-keygate-partner",
    "x-keygate-lease-id",
    "x-keygate-session-token",
    "x-keygate-session-expires-at",
    "x-api-key",
    "x-access-token",
)


def aliases_of(name: str) -> list[str]:
    """Spellings an upstream reading `_` and `.` as `-` (CGI, WSGI, PHP) takes for `name`."""
    first, rest = name.split("-", 1)
    return [
        name.replace("-", "_"),
        name.replace("-", "."),
        name.replace("-", "_").upper(),
        f"{first}_{rest}",
        f"{first}-{rest.replace('-', '.')}",
    ]


# Each alias of each owned header, with a value that would mislead an upstream taking it
# for the real one. Names arrive at the upstream lower-cased.
TWINS = [
    (alias, str(uuid.uuid4()) if name == "x-tenant-id" else f"smuggled-{name}")
    for name in OWNED
    for alias in aliases_of(name)
]


def assert_no_twin_and_custom_kept(resp):
    names = [name for name, _ in resp.upstream[0]["headers"]]
    reached = [twin for twin, _ in TWINS if twin.lower() in names]
    assert reached == [], f"{reached} reached the upstream:\n{resp}"
    assert resp.upstream_headers("x_custom") == ["passed"], str(resp)


def test_the_envoy_of_the_twin_tests_allows_underscores(underscores_stack):
    assert "headers_with_underscores_action" not in underscores_stack.envoy.config_path.read_text()


@pytest.mark.parametrize("style", CREDENTIAL_HEADERS)
def test_aliases_of_owned_headers_never_reach_the_upstream(underscores_stack, tenant, style):
    key = underscores_stack.keygate.create_key(tenant, ["contacts:read"])
    resp = underscores_stack.request(
        "GET", CONTACT, [credential(style, key["token"]), *TWINS, ("x_custom", "passed")]
    )
    assert_allowed(resp)
    assert_no_twin_and_custom_kept(resp)
    assert resp.upstream_headers("x-tenant-id") == [key["tenant_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-key-id") == [key["key_id"]], str(resp)
    assert resp.upstream_headers("x-keygate-scopes") == ["contacts:read"], str(resp)
    # The configured spelling goes by `strip_credential_headers` (on here).
    assert resp.upstream_headers(style) == [], str(resp)


def test_aliases_of_owned_headers_never_reach_the_upstream_of_a_public_route(underscores_stack):
    resp = underscores_stack.request("GET", "/public/health", [*TWINS, ("x_custom", "passed")])
    assert_allowed(resp)
    assert_no_twin_and_custom_kept(resp)
    for name in IDENTITY_HEADERS:
        assert resp.upstream_headers(name) == [], f"{name} reached the upstream:\n{resp}"


def test_aliases_spelled_with_dots_pass_the_examples_envoy_and_are_removed(stack, reader):
    """examples/envoy.yaml refuses names with `_`; names with `.` pass it all the same."""
    dotted = [(name, value) for name, value in TWINS if "_" not in name]
    assert len(dotted) == 2 * len(OWNED), dotted
    resp = stack.request("GET", CONTACT, [bearer(reader["token"]), *dotted])
    assert_allowed(resp)
    names = [name for name, _ in resp.upstream[0]["headers"]]
    reached = [name for name, _ in dotted if name.lower() in names]
    assert reached == [], f"{reached} reached the upstream:\n{resp}"


def test_write_with_own_tenant_header_is_allowed(stack, writer):
    resp = stack.request(
        "POST",
        CONTACT,
        [bearer(writer["token"]), ("x-tenant-id", writer["tenant_id"])],
        body=b'{"name": "Ada"}',
    )
    assert_allowed(resp)
    assert resp.upstream[0]["method"] == "POST"
    assert resp.upstream_headers("x-tenant-id") == [writer["tenant_id"]]
    assert resp.upstream_headers("x-keygate-key-id") == [writer["key_id"]]


def test_public_route_needs_no_credential(stack):
    resp = stack.request("GET", "/public/health")
    assert_allowed(resp)
    assert resp.upstream[0]["path"] == "/public/health"
    assert resp.upstream_headers("x-keygate-key-id") == []


def test_public_route_drops_client_sent_identity_headers(stack):
    # No principal to vouch for, so nothing the client claims may pass as keygate's word.
    resp = stack.request(
        "GET",
        "/public/health",
        [(name, "forged") for name in IDENTITY_HEADERS if name != "x-tenant-id"]
        + [("x-tenant-id", str(uuid.uuid4()))],
    )
    assert_allowed(resp)
    for name in IDENTITY_HEADERS:
        assert resp.upstream_headers(name) == [], f"client-sent {name} reached the upstream:\n{resp}"


# ------------------------------------------------------------------------- matching

def test_trailing_double_star_matches_zero_segments(stack, reader):
    assert_allowed(stack.request("GET", "/v1/contacts", [bearer(reader["token"])]))


def test_query_string_is_ignored_for_matching(stack, reader):
    resp = stack.request("GET", CONTACT + "?page=2&next=/v2/admin", [bearer(reader["token"])])
    assert_allowed(resp)
    assert resp.upstream[0]["path"] == CONTACT + "?page=2&next=/v2/admin"
    # ...in both directions: a protected path does not become public by its query.
    resp = stack.request("GET", "/v2/admin?/public/x", [bearer(reader["token"])])
    assert_denied(resp, 403, "insufficient_permissions")


def test_request_matching_no_route_is_forbidden(stack, reader):
    assert_denied(stack.request("GET", "/v2/anything", [bearer(reader["token"])]), 403,
                  "insufficient_permissions")
    # A route's path is matched segment by segment, not as a string prefix.
    assert_denied(stack.request("GET", "/v1/contactsX/42", [bearer(reader["token"])]), 403,
                  "insufficient_permissions")


def test_dot_segments_do_not_turn_a_protected_path_public(stack):
    # Envoy normalises the path before ext_authz (examples/envoy.yaml: normalize_path).
    resp = stack.request("GET", "/public/../v1/contacts/42")
    assert_denied(resp, 401, "missing_credentials")


# ----------------------------------------------------------------------------- deny

def test_missing_credentials(stack):
    assert_denied(stack.request("GET", CONTACT), 401, "missing_credentials")


@pytest.mark.parametrize(
    "variant",
    ["not-a-key", "key-shaped-garbage", "bad-checksum", "wrong-secret", "other-prefix"],
)
def test_invalid_api_key(stack, reader, variant):
    token = {
        "not-a-key": lambda t: "not-a-key",
        "key-shaped-garbage": lambda t: "sk_live_abc_def",
        "bad-checksum": with_bad_checksum,
        "wrong-secret": with_wrong_secret,
        "other-prefix": lambda t: "xx" + t[2:],
    }[variant](reader["token"])
    # The right key is used first, so a cached verification is in place to be confused.
    assert_allowed(stack.request("GET", CONTACT, [bearer(reader["token"])]))
    assert_denied(stack.request("GET", CONTACT, [bearer(token)]), 401, "invalid_api_key")


def test_deleted_key_is_unknown(stack, keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read"])
    assert_allowed(stack.request("GET", CONTACT, [bearer(key["token"])]))
    result = keygate.cli("keys", "delete", key["key_id"])
    assert result.code == 0, str(result)
    assert_denied(stack.request("GET", CONTACT, [bearer(key["token"])]), 401, "invalid_api_key")


def test_expired_key(stack, keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read"], "--expires-in", "1s")

    def denied_as_expired():
        result = keygate.check(key["token"], "GET", CONTACT)
        if result.code == 0:
            return False
        assert result.code == 3, str(result)
        assert result.json()["code"] == "expired_api_key", str(result)
        return True

    wait_for("the 1s key to be reported expired", denied_as_expired, timeout=15, interval=0.1)
    assert_denied(stack.request("GET", CONTACT, [bearer(key["token"])]), 401, "expired_api_key")


def test_revoked_key_is_denied_at_once(stack, keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:read"])
    # Allowed first, so keygate holds a cached verification the revocation must drop.
    assert_allowed(stack.request("GET", CONTACT, [bearer(key["token"])]))
    result = keygate.cli("keys", "revoke", key["key_id"], "--json")
    assert result.code == 0, str(result)
    assert result.json()["status"] == "revoked", str(result)
    assert_denied(stack.request("GET", CONTACT, [bearer(key["token"])]), 401, "revoked_api_key")


def test_key_without_the_routes_scope_is_forbidden(stack, keygate, tenant):
    key = keygate.create_key(tenant, ["contacts:write"])
    assert_denied(stack.request("GET", CONTACT, [bearer(key["token"])]), 403,
                  "insufficient_permissions")


def test_key_with_no_scopes_may_do_nothing(stack, keygate, tenant):
    key = keygate.create_key(tenant, [])
    assert_denied(stack.request("GET", CONTACT, [bearer(key["token"])]), 403,
                  "insufficient_permissions")


def test_write_lacking_write_scope_is_forbidden(stack, reader):
    resp = stack.request(
        "POST", CONTACT, [bearer(reader["token"]), ("x-tenant-id", reader["tenant_id"])], b"{}"
    )
    assert_denied(resp, 403, "insufficient_permissions")


def test_write_without_tenant_header_needs_one(stack, writer):
    resp = stack.request("POST", CONTACT, [bearer(writer["token"])], b"{}")
    assert_denied(resp, 400, "tenant_required")


def test_write_with_malformed_tenant_header(stack, writer):
    resp = stack.request(
        "POST", CONTACT, [bearer(writer["token"]), ("x-tenant-id", "not-a-uuid")], b"{}"
    )
    assert_denied(resp, 400, "invalid_tenant")


def test_write_for_another_tenant_is_forbidden(stack, writer):
    resp = stack.request(
        "DELETE", CONTACT, [bearer(writer["token"]), ("x-tenant-id", str(uuid.uuid4()))]
    )
    assert_denied(resp, 403, "tenant_forbidden")


# ---------------------------------------------------------------------------- cache

CACHE_COUNTERS = {
    "hit": 'keygate_credential_cache_requests_total{result="hit"}',
    "miss": 'keygate_credential_cache_requests_total{result="miss"}',
    "argon2": "keygate_argon2_verifications_total",
}


def cache_counters(keygate) -> dict[str, float]:
    """keygate's cache and argon2 counters, read off its /metrics."""
    status, body = http_get(keygate.http_url + "/metrics")
    assert status == 200, f"/metrics answered {status}:\n{body[:500]}"
    samples = dict(
        line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#")
    )
    missing = [series for series in CACHE_COUNTERS.values() if series not in samples]
    assert not missing, f"/metrics lacks {missing}:\n{body}"
    return {name: float(samples[series]) for name, series in CACHE_COUNTERS.items()}


def added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def test_repeated_allows_of_a_warm_key_are_cache_hits_without_argon2(stack, keygate, tenant):
    # How fast an answer leaves keygate is not asserted here: that an allow answer is one
    # socket write is pinned by tests/server.rs (an_allow_answer_leaves_in_one_write).
    # TCP_NODELAY on keygate's listener (src/transport.rs) has no test of its own there.
    #
    # A key of its own, so its first sight through Envoy is known to be cold: that the
    # counters move for it is what makes their standing still afterwards mean something.
    # (The single shared keygate answers one test at a time, so nothing else counts.)
    key = keygate.create_key(tenant, ["contacts:read"])
    headers = [bearer(key["token"])]
    before = cache_counters(keygate)
    assert_allowed(stack.request("GET", CONTACT, headers))
    warm = cache_counters(keygate)
    assert added(before, warm) == {"hit": 0, "miss": 1, "argon2": 1}, "first sight of the key"
    repeats = 20
    for _ in range(repeats):
        assert_allowed(stack.request("GET", CONTACT, headers))
    assert added(warm, cache_counters(keygate)) == {"hit": repeats, "miss": 0, "argon2": 0}, (
        f"{repeats} allows of the warm key"
    )
