"""Paths through an Envoy left at its defaults (no `normalize_path`, no `merge_slashes`,
escaped slashes kept): keygate decides on the path the upstream would route, so a dot
segment cannot walk from a public route to a protected one, and a path that servers read
differently is refused with 400, whatever the proxy in front did."""

import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied

NORMALISING = (
    "          normalize_path: true\n"
    "          merge_slashes: true\n"
    "          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT\n"
)


def envoy_defaults(config: str) -> str:
    assert config.count(NORMALISING) == 1, "examples/envoy.yaml changed: find its path options"
    return config.replace(NORMALISING, "")


@pytest.fixture(scope="module")
def plain_stack(workdir, redis, upstream):
    s = harness.Stack("plain", workdir, redis, upstream, edit_envoy_config=envoy_defaults)
    yield s
    s.stop()


def test_the_envoy_of_this_module_does_not_normalise(plain_stack):
    assert "normalize_path" not in plain_stack.envoy.config_path.read_text()


@pytest.mark.parametrize(
    "path",
    [
        "/public/../v1/contacts/42",
        "/public/%2e%2e/v1/contacts/42",
        "/public/.%2E/v1/contacts/42",
        "/public//../v1/contacts/42",
    ],
)
def test_dot_segments_cannot_reach_a_protected_route_without_a_credential(plain_stack, path):
    resp = plain_stack.request("GET", path)
    assert_denied(resp, 401, "missing_credentials")
    assert resp.upstream == [], f"the upstream was reached:\n{resp}"


@pytest.mark.parametrize(
    "path",
    ["/public/..%2fv1/contacts/42", "/public/..%2Fv1/contacts/42", "/public/..%5cv1/contacts/42"],
)
def test_a_path_servers_read_differently_is_refused(plain_stack, path):
    resp = plain_stack.request("GET", path)
    assert_denied(resp, 400, "invalid_path")
    assert resp.upstream == [], f"the upstream was reached:\n{resp}"


def test_a_public_route_stays_public(plain_stack):
    assert_allowed(plain_stack.request("GET", "/public/health"))


# ---------------------------------------------------------------- path parameters (`;`)

# Servlet containers (Tomcat, Jetty, Spring) cut `;…` off each segment before routing:
# `/v1/admin;x/users` is `/v1/admin/users` to them, a segment `admin;x` to others. With an
# `/v1/admin/**` family and a broader `/v1/**` one, the two readings need different scopes.
PARAMETER_ROUTES = (
    "["
    "{name: health, methods: [GET], path: '/public/**', public: true},"
    "{name: admin, path: '/v1/admin/**', scope: 'admin:all'},"
    "{name: v1, path: '/v1/**', scope: 'v1:read'}"
    "]"
)


@pytest.fixture(scope="module")
def parameters_stack(workdir, redis, upstream):
    s = harness.Stack(
        "parameters",
        workdir,
        redis,
        upstream,
        keygate_env={"KEYGATE_POLICY__ROUTES": PARAMETER_ROUTES},
        edit_envoy_config=envoy_defaults,
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def v1_reader(parameters_stack):
    """A key that may use `/v1/**` but not `/v1/admin/**`."""
    return parameters_stack.keygate.create_key(str(uuid.uuid4()), ["v1:read"])


def test_the_broad_route_serves_and_the_admin_route_needs_its_scope(parameters_stack, v1_reader):
    auth = [("authorization", f"Bearer {v1_reader['token']}")]
    assert_allowed(parameters_stack.request("GET", "/v1/things/1", auth))
    assert_denied(
        parameters_stack.request("GET", "/v1/admin/users", auth), 403, "insufficient_permissions"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/admin;x/users",
        "/v1/admin;/users",
        "/v1/admin/users;jsessionid=0123",
        "/v1/admin%3bx/users",
        "/v1/admin%3Bx/users",
        "/v1;x/admin/users",
    ],
)
def test_a_path_parameter_cannot_move_a_request_to_another_route(parameters_stack, v1_reader, path):
    resp = parameters_stack.request(
        "GET", path, [("authorization", f"Bearer {v1_reader['token']}")]
    )
    assert_denied(resp, 400, "invalid_path")


@pytest.mark.parametrize(
    "path", ["/public;x/../v1/things/1", "/public/..;x/v1/things/1", "/public%3b/../v1/things/1"]
)
def test_a_path_parameter_is_refused_before_any_credential_is_asked_for(parameters_stack, path):
    assert_denied(parameters_stack.request("GET", path), 400, "invalid_path")


def test_a_semicolon_in_the_query_is_not_a_path_parameter(parameters_stack):
    resp = parameters_stack.request("GET", "/public/health?a=1;b=2")
    assert_allowed(resp)
    assert resp.upstream[0]["path"] == "/public/health?a=1;b=2"
