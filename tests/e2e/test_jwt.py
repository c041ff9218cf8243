"""JWTs through the real Envoy: keygate configured (by environment overrides alone) with
one HS256 issuer, its shared secret from the environment. A valid token passes in
`x-access-token` or `authorization: Bearer`; an unsigned, expired or wrongly addressed one
is 401 `invalid_token` and never reaches the upstream. `keygate tokens revoke` stops a
token through Envoy at once: by subject before a time (a dashboard rotation), or by
`jti`."""

import base64
import datetime
import hashlib
import hmac
import json
import time
import uuid

import pytest

import harness
from harness import assert_allowed, assert_denied

ISSUER = "https://login.e2e.example/"
AUDIENCE = "https://api.e2e.example"
SECRET = "e2e-shared-secret-of-more-than-32-bytes"
TENANT = str(uuid.uuid4())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims: dict, alg: str = "HS256") -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    if alg == "none":
        return f"{head}.{body}."
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def claims(**over) -> dict:
    now = int(time.time())
    c = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "user-7",
        "tenant_id": TENANT,
        "scope": "contacts:read",
        "iat": now,
        "exp": now + 1800,
    }
    c.update(over)
    return c


@pytest.fixture(scope="module")
def jwt_stack(workdir, redis, upstream):
    issuers = (
        f"[{{name: e2e, issuer: '{ISSUER}', audiences: ['{AUDIENCE}'], "
        "algorithms: [HS256], secret_env: KEYGATE_E2E_JWT_SECRET, leeway: 5s}]"
    )
    env = {"KEYGATE_JWT__ISSUERS": issuers, "KEYGATE_E2E_JWT_SECRET": SECRET}
    yield from harness.running(harness.Stack("jwt", workdir, redis, upstream, keygate_env=env))


@pytest.mark.parametrize("header", ["x-access-token", "authorization"])
def test_a_valid_jwt_passes_with_its_identity_and_without_itself(jwt_stack, header):
    token = jwt(claims())
    value = f"Bearer {token}" if header == "authorization" else token
    resp = jwt_stack.request("GET", "/v1/contacts/42", [(header, value)])
    assert_allowed(resp)
    assert resp.upstream_headers("x-keygate-subject") == ["user-7"], str(resp)
    assert resp.upstream_headers("x-tenant-id") == [TENANT], str(resp)
    assert resp.upstream_headers("x-keygate-kind") == ["jwt"], str(resp)
    assert resp.upstream_headers("x-keygate-key-id") == [], str(resp)
    for name, v in resp.upstream[0]["headers"]:
        assert token not in v, f"the JWT reached the upstream in {name}:\n{resp}"


@pytest.mark.parametrize(
    "what,token",
    [
        ("alg none", jwt(claims(), alg="none")),
        ("expired", jwt(claims(exp=int(time.time()) - 3600))),
        ("wrong audience", jwt(claims(aud="https://elsewhere.example"))),
    ],
)
def test_a_bad_jwt_is_invalid_token(jwt_stack, what, token):
    resp = jwt_stack.request("GET", "/v1/contacts/42", [("x-access-token", token)])
    assert_denied(resp, 401, "invalid_token")


def rfc3339(unix: int) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_rotation_revokes_the_old_token_and_the_new_one_passes(jwt_stack):
    now = int(time.time())
    old = jwt(claims(sub="dashboard-1", iat=now - 600))
    newer = jwt(claims(sub="dashboard-1", iat=now - 10))
    other = jwt(claims(sub="dashboard-2", iat=now - 600))
    for token in (old, newer, other):
        assert_allowed(jwt_stack.request("GET", "/v1/contacts/1", [("x-access-token", token)]))
    cut = rfc3339(now - 60)
    result = jwt_stack.keygate.cli(
        "tokens", "revoke", "--issuer", "e2e", "--subject", "dashboard-1", "--before", cut, "--json"
    )
    assert result.code == 0, str(result)
    revocation = result.json()
    assert revocation["issuer"] == "e2e", str(result)
    assert revocation["subject"] == "dashboard-1", str(result)
    assert revocation["issued_before"] == cut, str(result)
    assert revocation["jti"] is None, str(result)
    # Cached a moment ago, denied now: the revocation reaches the cached answer.
    assert_denied(jwt_stack.request("GET", "/v1/contacts/1", [("x-access-token", old)]), 401, "invalid_token")
    assert_allowed(jwt_stack.request("GET", "/v1/contacts/1", [("x-access-token", newer)]))
    assert_allowed(jwt_stack.request("GET", "/v1/contacts/1", [("x-access-token", other)]))


def test_a_token_revoked_by_jti_is_denied_and_its_siblings_pass(jwt_stack):
    doomed = jwt(claims(sub="user-jti", jti="tok-doomed"))
    sibling = jwt(claims(sub="user-jti", jti="tok-kept"))
    for token in (doomed, sibling):
        assert_allowed(jwt_stack.request("GET", "/v1/contacts/2", [("authorization", f"Bearer {token}")]))
    result = jwt_stack.keygate.cli("tokens", "revoke", "--issuer", "e2e", "--jti", "tok-doomed")
    assert result.code == 0, str(result)
    assert "tok-doomed" in result.stdout, str(result)
    assert_denied(
        jwt_stack.request("GET", "/v1/contacts/2", [("authorization", f"Bearer {doomed}")]), 401, "invalid_token"
    )
    assert_allowed(jwt_stack.request("GET", "/v1/contacts/2", [("authorization", f"Bearer {sibling}")]))


@pytest.mark.parametrize(
    "args,names",
    [
        (["--issuer", "nobody", "--jti", "x"], "issuer"),
        (["--issuer", "e2e", "--jti", "x", "--subject", "y"], "--subject"),
        (["--issuer", "e2e"], "--jti"),
        (["--issuer", "e2e", "--jti", "x", "--before", "1700000000"], "before: only with subject"),
        (["--issuer", "e2e", "--subject", "y", "--before", "yesterday"], "--before"),
        (["--issuer", "e2e", "--subject", "y", "--before", "4102444800"], "before"),
    ],
)
def test_a_bad_revocation_names_what_is_wrong(jwt_stack, args, names):
    result = jwt_stack.keygate.cli("tokens", "revoke", *args)
    assert result.code != 0, str(result)
    assert names in result.stderr, str(result)
