"""Method override headers, through a real Envoy left at its defaults (names with `_`
allowed) to the echo upstream, and against keygate's gRPC Check directly.

Rack's MethodOverride, Express's `method-override`, Symfony and Laravel, ASP.NET and OData
act on `X-HTTP-Method-Override` / `X-HTTP-Method` / `X-Method-Override` instead of the
request's method. By default (`policy.method_override: check`) keygate allows such a
request only if both methods are allowed; `strip` removes the headers before the upstream;
`deny` refuses them. A spelling with `_` or `.` counts as the header (PHP reads
`x_http_method_override` as `HTTP_X_HTTP_METHOD_OVERRIDE`)."""

import json
import uuid

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

import harness
from harness import assert_allowed, assert_denied, check_request
from test_envoy import underscores_allowed

# The same path needs another scope for each kind of method; GET /docs is public, PUT
# /docs is not.
ROUTES = (
    "["
    "{name: docs, methods: [GET], path: '/docs/**', public: true},"
    "{name: docs-edit, methods: [PUT], path: '/docs/**', scope: 'docs:write'},"
    "{name: contacts-read, methods: [GET, HEAD], path: '/v1/contacts/**', scope: 'contacts:read'},"
    "{name: contacts-write, methods: [POST, PUT, PATCH], path: '/v1/contacts/**', scope: 'contacts:write'},"
    "{name: contacts-delete, methods: [DELETE], path: '/v1/contacts/**', scope: 'contacts:delete'}"
    "]"
)
CONTACT = "/v1/contacts/42"

# The headers as frameworks spell them, and spellings of them an upstream reading `_` and
# `.` as `-` takes for them.
OVERRIDE_HEADERS = [
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
    "x_http_method_override",
    "x.http.method",
    "X_Method_Override",
]
# The methods a header names; the request's own (HEAD has no body to read a denial from).
NAMED = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]
OWN = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# What the writer key (contacts:read, contacts:write) may do on CONTACT.
WRITER_MAY = {"GET", "HEAD", "POST", "PUT", "PATCH"}


def stack(name, workdir, redis, upstream, mode=None):
    env = {"KEYGATE_POLICY__ROUTES": ROUTES}
    if mode is not None:
        env["KEYGATE_POLICY__METHOD_OVERRIDE"] = mode
    return harness.Stack(
        name, workdir, redis, upstream, keygate_env=env, edit_envoy_config=underscores_allowed
    )


@pytest.fixture(scope="module")
def check_stack(workdir, redis, upstream):
    """`method_override` left at its default."""
    yield from harness.running(stack("override-check", workdir, redis, upstream))


@pytest.fixture(scope="module")
def strip_stack(workdir, redis, upstream):
    yield from harness.running(stack("override-strip", workdir, redis, upstream, "strip"))


@pytest.fixture(scope="module")
def deny_stack(workdir, redis, upstream):
    yield from harness.running(stack("override-deny", workdir, redis, upstream, "deny"))


def writer_of(s):
    key = s.keygate.create_key(str(uuid.uuid4()), ["contacts:read", "contacts:write"])
    return ("authorization", f"Bearer {key['token']}")


@pytest.fixture(scope="module")
def writer(check_stack):
    return writer_of(check_stack)


@pytest.fixture(scope="module")
def authorization(check_stack):
    channel = grpc.insecure_channel(f"127.0.0.1:{check_stack.keygate.grpc_port}")
    yield external_auth_pb2_grpc.AuthorizationStub(channel)
    channel.close()


def test_the_envoy_of_this_module_allows_underscores(check_stack):
    assert "headers_with_underscores_action" not in check_stack.envoy.config_path.read_text()


# ------------------------------------------------------------------------------- check

@pytest.mark.parametrize("header", OVERRIDE_HEADERS)
def test_through_envoy_an_override_is_allowed_only_if_both_methods_are(check_stack, writer, header):
    for own in OWN:
        for named in NAMED:
            resp = check_stack.request(own, CONTACT, [writer, (header, named)])
            what = f"{own} with {header}: {named}"
            if own in WRITER_MAY and named in WRITER_MAY:
                assert_allowed(resp)
                # Judged on both, it goes upstream as sent.
                assert resp.upstream_headers(header.lower()) == [named], what
            else:
                assert_denied(resp, 403, "insufficient_permissions")


@pytest.mark.parametrize("header", OVERRIDE_HEADERS)
def test_the_grpc_check_judges_an_override_on_both_methods(authorization, writer, header):
    for own in OWN + ["HEAD"]:
        for named in NAMED:
            response = authorization.Check(
                check_request(own, CONTACT, {writer[0]: writer[1], header.lower(): named}),
                timeout=10,
            )
            what = f"{own} with {header}: {named}: {response}"
            if own in WRITER_MAY and named in WRITER_MAY:
                assert response.status.code == 0, what
                assert header.lower() not in response.ok_response.headers_to_remove, what
            else:
                assert response.status.code != 0, what
                assert response.denied_response.status.code == 403, what
                code = json.loads(response.denied_response.body)["error"]["code"]
                assert code == "insufficient_permissions", what


@pytest.mark.parametrize(
    "values",
    [["DELETE, PUT"], ["PUT", "PUT"], ["PUT", "DELETE"], ["DEL ETE"], [""], ["GET/x"], ['"PUT"']],
    ids=["list", "repeated", "repeated-differently", "space", "empty", "slash", "quoted"],
)
def test_a_value_that_is_not_a_method_is_refused(check_stack, writer, values):
    """Two headers of one name reach keygate joined with a comma: which one an upstream
    would act on is anyone's guess."""
    for header in OVERRIDE_HEADERS:
        headers = [(header, v) for v in values]
        assert_denied(check_stack.request("POST", CONTACT, [writer, *headers]), 400, "invalid_request")
        assert_denied(check_stack.request("GET", "/docs/x", headers), 400, "invalid_request")


def test_a_public_route_overridden_to_a_protected_one_needs_its_credential(check_stack):
    assert_allowed(check_stack.request("GET", "/docs/x"))
    override = ("X-HTTP-Method-Override", "PUT")
    assert_denied(check_stack.request("GET", "/docs/x", [override]), 401, "missing_credentials")
    editor = check_stack.keygate.create_key(str(uuid.uuid4()), ["docs:write"])
    resp = check_stack.request(
        "GET", "/docs/x", [("authorization", f"Bearer {editor['token']}"), override]
    )
    assert_allowed(resp)
    assert resp.upstream_headers("x-keygate-scopes") == ["docs:write"], str(resp)


# ------------------------------------------------------------------------------- strip

def test_strip_judges_the_own_method_and_no_override_reaches_the_upstream(strip_stack):
    writer = writer_of(strip_stack)
    headers = [(h, "DELETE") for h in OVERRIDE_HEADERS]
    resp = strip_stack.request("POST", CONTACT, [writer, *headers, ("x_custom", "passed")])
    assert_allowed(resp)
    names = [name for name, _ in resp.upstream[0]["headers"]]
    reached = [h for h in OVERRIDE_HEADERS if h.lower() in names]
    assert reached == [], f"{reached} reached the upstream:\n{resp}"
    assert resp.upstream_headers("x_custom") == ["passed"], str(resp)
    # A public route too, and whatever the value.
    resp = strip_stack.request("GET", "/docs/x", [("x_http_method", "PUT, DELETE")])
    assert_allowed(resp)
    assert resp.upstream_headers("x_http_method") == [], str(resp)


def test_strip_on_the_grpc_check_names_every_spelling_to_remove(strip_stack):
    writer = writer_of(strip_stack)
    channel = grpc.insecure_channel(f"127.0.0.1:{strip_stack.keygate.grpc_port}")
    try:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        headers = {h.lower(): "DELETE" for h in OVERRIDE_HEADERS}
        response = stub.Check(
            check_request("POST", CONTACT, {writer[0]: writer[1], **headers}), timeout=10
        )
    finally:
        channel.close()
    assert response.status.code == 0, response
    removed = set(response.ok_response.headers_to_remove)
    assert set(headers) <= removed, response


# -------------------------------------------------------------------------------- deny

@pytest.mark.parametrize("header", OVERRIDE_HEADERS)
def test_deny_refuses_every_override(deny_stack, header):
    writer = writer_of(deny_stack)
    for value in ["POST", "GET", "DELETE"]:
        resp = deny_stack.request("POST", CONTACT, [writer, (header, value)])
        assert_denied(resp, 400, "invalid_request")
        assert_denied(deny_stack.request("GET", "/docs/x", [(header, value)]), 400, "invalid_request")
    assert_allowed(deny_stack.request("POST", CONTACT, [writer]))
