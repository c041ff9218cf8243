"""Paths through an Envoy left at its defaults (no `normalize_path`, no `merge_slashes`,
escaped slashes kept): keygate decides on the path the upstream would route, so a dot
segment cannot walk from a public route to a protected one, and a path that servers read
differently is refused with 400, whatever the proxy in front did."""

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
