"""keygate inside Envoy (envoy-module/, examples/envoy-module.yaml): the module answers
what keygate has already answered for the same credential, in Envoy, and hands the rest
to ext_authz.

- Its answers equal the service's over the scenario list of test_http_authz.py (plus a
  JWT): status, body, the client's headers, what the upstream gets and the dynamic
  metadata — both the first time (handed to keygate) and once learned (its own); and
  over 300 generated requests, ordinary and odd. WebSocket upgrades too: a session
  token's through keygate, a learned key's answered by the module.
- A revoked key is denied by the module within 10 ms (p99) of the admin call returning,
  and never allowed after.
- Without its Watch stream, it decides nothing: requests go to ext_authz.
- It reads keygate's configuration file again when it changes, as keygate does: both
  answer by the new rules within 2 s; a file that does not load changes nothing. With
  other settings than keygate's, it learns nothing.
- A panic inside its decision sends the request to ext_authz, and Envoy keeps serving.
- What it answers itself is in the key's usage (`keys get`), as keygate's own answers are.
- Envoy's counters say what it did with each request: allowed, denied by code, or handed
  over and why (`keygate_module_*`).

Which door answered is read off Envoy's own counters: a request the module decides
never reaches ext_authz's check (`ModuleEnvoy.checks`)."""

import base64
import hashlib
import hmac
import json
import random
import subprocess
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

import harness
from harness import assert_allowed, assert_denied
from test_http_authz import ROUTES, answer, bearer, scenario_keys, scenarios

WATCH_TOKEN = "e2e-watch-token-0123456789"
ISSUER = "https://login.e2e-module.example/"
AUDIENCE = "https://api.e2e-module.example"
JWT_SECRET = "e2e-module-shared-secret-of-more-than-32-bytes"
PANIC_HEADER = "x-e2e-module-panic"

# test_http_authz.py's routes, and an internal one (runtime keys only).
MODULE_ROUTES = ROUTES[:-1] + (
    ",{name: internal-jobs, methods: [GET], path: '/internal/**', scope: 'jobs:run', internal: true}]"
)

ENV = {
    "KEYGATE_WATCH_TOKEN": WATCH_TOKEN,
    "KEYGATE_POLICY__ROUTES": MODULE_ROUTES,
    "KEYGATE_POLICY__PARTNER_SCOPES": "['billing:partner:*']",
    "KEYGATE_POLICY__PLANS": "{trial: {requests_per_minute: 2}}",
    "KEYGATE_SESSIONS__SIGNING_KEYS": "[{kid: e2e-1, key_env: KEYGATE_E2E_SESSION_KEY}]",
    "KEYGATE_E2E_SESSION_KEY": harness.ed25519_pem(),
    "KEYGATE_JWT__ISSUERS": (
        f"[{{name: e2e, issuer: '{ISSUER}', audiences: ['{AUDIENCE}'], "
        "algorithms: [HS256], secret_env: KEYGATE_E2E_JWT_SECRET, leeway: 5s}]"
    ),
    "KEYGATE_E2E_JWT_SECRET": JWT_SECRET,
    # Usage (keygate's and what the module reports) is written within a fifth of a second.
    "KEYGATE_API_KEYS__USAGE_FLUSH_INTERVAL": "200ms",
}

# Envoy hands the upstream what ext_authz's namespace of dynamic metadata holds, so that
# both doors' metadata can be compared.
METADATA_HEADER = "x-e2e-metadata"
# Envoy's own field (how long ext_authz took) and the module's channel (what it learns,
# on a request it handed over): the rest must be equal.
METADATA_NOT_COMPARED = ("ext_authz_duration", "learn")


def show_metadata(text: str) -> str:
    marker = "                route: { cluster: upstream }\n"
    assert text.count(marker) == 1, "the example's route changed: update show_metadata()"
    return text.replace(
        marker,
        marker
        + "                request_headers_to_add:\n"
        + f"                - header: {{ key: {METADATA_HEADER}, value: '%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%' }}\n"
        + "                  append_action: OVERWRITE_IF_EXISTS_OR_ADD\n",
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(tenant: str, scope: str = "contacts:read") -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-7", "tenant_id": tenant,
              "scope": scope, "iat": now, "exp": now + 1800, "jti": uuid.uuid4().hex}
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture(scope="module")
def doors(workdir, redis, upstream):
    """{"envoy-grpc": Envoy → ext_authz → keygate, "module": Envoy with the module in
    front of ext_authz → the same keygate}."""
    started = []
    try:
        grpc = harness.Stack("module-grpc", workdir, redis, upstream, keygate_env=ENV,
                             edit_envoy_config=show_metadata)
        started.append(grpc)
        module = harness.ModuleEnvoy("module-envoy", workdir, grpc.keygate, upstream,
                                     env={"KEYGATE_MODULE_TEST_PANIC_HEADER": PANIC_HEADER},
                                     edit_config=show_metadata)
        started.append(module)
        yield {"envoy-grpc": grpc, "module": module}
    finally:
        for door in reversed(started):
            door.stop()


@pytest.fixture(scope="module")
def keygate(doors):
    return doors["envoy-grpc"].keygate


@pytest.fixture(scope="module")
def keys(doors, keygate):
    k = scenario_keys(keygate)
    runtime = keygate.cli("keys", "create", "--json", "--kind", "runtime", "--service", "jobs-runner",
                          "--scopes", "jobs:run,contacts:read")
    assert runtime.code == 0, str(runtime)
    minted = doors["envoy-grpc"].request("POST", "/v1/sessions", [bearer(k["reader"]["token"])])
    assert_allowed(minted)
    return {**k, "jwt": jwt(k["tenant"]), "runtime": runtime.json(),
            "session": minted.header("x-keygate-session-token")}


def metadata(resp: harness.Response) -> dict | None:
    """ext_authz's dynamic metadata as the upstream saw it, less what is not compared."""
    if not resp.upstream:
        return None
    seen = dict(resp.upstream[0]["headers"]).get(METADATA_HEADER)
    if not seen:
        return {}
    fields = json.loads(seen)
    return {k: v for k, v in fields.items() if k not in METADATA_NOT_COMPARED}


def seen(resp: harness.Response) -> dict:
    a = answer(resp)
    if a["upstream"] is not None:
        a["upstream"] = [(k, v) for k, v in a["upstream"] if k != METADATA_HEADER]
    a["metadata"] = metadata(resp)
    return a


def through_module(door: harness.ModuleEnvoy, method, path, headers) -> tuple[harness.Response, bool]:
    """The module door's answer, and whether the module gave it itself."""
    before = door.checks()
    resp = door.request(method, path, headers)
    return resp, door.checks() == before


def all_scenarios(k: dict):
    runtime = k["runtime"]["token"]
    return scenarios(k) + [
        ("jwt", "GET", "/v1/contacts/1", [bearer(k["jwt"])], 200, None),
        ("session token on the stream route", "GET", "/v1/stream/calls/7", [bearer(k["session"])], 200, None),
        ("runtime key on an internal route", "GET", "/internal/jobs/nightly", [bearer(runtime)], 200, None),
        ("runtime key on a customer route", "GET", "/v1/contacts/1", [bearer(runtime)], 403,
         "insufficient_permissions"),
        ("tenant key on an internal route", "GET", "/internal/jobs/nightly", [bearer(k["reader"]["token"])], 403,
         "insufficient_permissions"),
        ("jwt on a write without the scope", "POST", "/v1/contacts/1",
         [bearer(k["jwt"]), ("x-tenant-id", k["tenant"])], 403, "insufficient_permissions"),
    ]


# What keygate's answers taught the module by the second pass, and what it must still
# hand over: a wrong secret, a revoked key, a tenant it never saw delegated and a JWT
# that does not validate are never learned (only allows are; the module validates no
# JWT itself), and a session token is judged on its key's state, which only keygate
# holds.
HANDED_OVER = {"invalid_api_key (secret)", "revoked_api_key", "partner for another tenant", "invalid_token",
               "session token on the stream route"}


def test_the_module_answers_every_scenario_as_the_service_does(doors, keys):
    decided = {}
    for attempt in ("first", "learned"):
        for name, method, path, headers, status, code in all_scenarios(keys):
            reference = doors["envoy-grpc"].request(method, path, headers)
            resp, here = through_module(doors["module"], method, path, headers)
            assert seen(resp) == seen(reference), (
                f"{name} ({attempt}): the module door answered otherwise than ext_authz:\n"
                f"module: {seen(resp)}\next_authz: {seen(reference)}\n--- module ---\n{resp}"
            )
            if status is not None:
                if code is None:
                    assert_allowed(resp)
                else:
                    assert_denied(resp, status, code)
            decided[name] = here
    # The second pass: which the module decided itself.
    names = {s[0] for s in all_scenarios(keys)}
    assert {n for n in names if not decided[n]} == HANDED_OVER, decided


def generated_requests(k: dict, count: int, seed: int) -> list[tuple[str, str, list]]:
    """`count` requests (method, path, headers), half as a client that read the docs sends
    them (a route family, a key the module learned, in its place, perhaps a tenant or an
    identity header of the client's own), half odd: any method, paths that normalise or
    are refused, credentials repeated, misplaced or mistyped, tenants in every form."""
    rng = random.Random(seed)
    learned_tokens = [k["reader"]["token"], k["writer"]["token"], k["partner"]["token"]]
    tokens = learned_tokens + [
        k["revoked"]["token"], harness.with_bad_checksum(k["reader"]["token"]),
        harness.with_wrong_secret(k["reader"]["token"]), "sk_live_notakey", k["jwt"], "",
    ]
    tenants = [k["tenant"], k["tenant"].upper(), f" {k['tenant']}", f"{k['tenant']},{k['tenant']}",
               k["delegated"], k["other"], "acme", ""]
    others = [("x-http-method-override", "DELETE"), ("x-http-method-override", "GET, DELETE"),
              ("x-keygate-subject", "key:admin"), ("x-keygate-scopes", "*"),
              ("x-forwarded-for", "203.0.113.7")]

    def placed(token: str) -> tuple[str, str]:
        return rng.choice([("authorization", f"Bearer {token}"), ("x-api-key", token)])

    def extra() -> tuple[str, str]:
        return ("x-tenant-id", rng.choice(tenants)) if rng.random() < 0.6 else rng.choice(others)

    def path(segments: list[str], prefix: str) -> str:
        return prefix + "".join("/" + rng.choice(segments) for _ in range(rng.randrange(3)))

    plain = ["1", "42", "invoices", "%41", "%7e"]
    odd = plain * 3 + ["..", ".", "%2e%2e", "", "a%2Fb", "a%5cb", "%00", "x;y=1"]
    requests = []
    for i in range(count):
        if i % 2 == 0:
            method, prefix = rng.choice(
                [("GET", "/v1/contacts")] * 6 + [("POST", "/v1/contacts"), ("DELETE", "/v1/contacts"),
                 ("GET", "/v1/billing/partner"), ("GET", "/public"), ("GET", "/v2")])
            headers = [placed(rng.choice(learned_tokens))]
            headers += [extra() for _ in range(rng.randrange(2))]
            requests.append((method, path(plain, prefix), headers))
        else:
            method = rng.choice(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
            prefix = rng.choice(["/v1/contacts"] * 4 + ["/v1/billing/partner", "/public", "/V1/contacts",
                                                        "//v1/contacts", "/v2"])
            query = rng.choice(["", "", "", "?page=2", "?next=/../admin"])
            headers = []
            for _ in range(rng.randrange(4)):
                if rng.random() < 0.6:
                    token = rng.choice(tokens)
                    headers.append(placed(token) if rng.random() < 0.7 else (
                        rng.choice(["authorization", "x-api-key"]),
                        rng.choice(["bearer ", "Basic ", "", "Bearer  "]) + token))
                else:
                    headers.append(extra())
            requests.append((method, path(odd, prefix) + query, headers))
    return requests


def test_on_generated_requests_the_module_door_answers_as_ext_authz(doors, keys):
    """300 generated requests (`generated_requests`) through both doors, once the module
    has learned the keys it may answer: the same status, body, client and upstream
    headers and dynamic metadata each time, whichever answered; and the module answered
    most of them itself, allows among them."""
    module = doors["module"]
    for token in (keys["reader"]["token"], keys["writer"]["token"]):
        learned(module, token)
    harness.wait_for(
        "the module to answer the partner for its delegated tenant",
        lambda: through_module(module, "GET", "/v1/contacts/1",
                               [bearer(keys["partner"]["token"]), ("x-tenant-id", keys["delegated"])])[1],
        timeout=10)
    here = allowed = 0
    requests = generated_requests(keys, 300, seed=31)
    for method, path, headers in requests:
        reference = doors["envoy-grpc"].request(method, path, headers)
        resp, by_module = through_module(module, method, path, headers)
        assert seen(resp) == seen(reference), (
            f"{method} {path} {headers}: the module door answered otherwise than ext_authz:\n"
            f"module: {seen(resp)}\next_authz: {seen(reference)}")
        here += by_module
        allowed += by_module and resp.status == 200
    assert here * 2 >= len(requests) and allowed * 5 >= len(requests), (
        f"of {len(requests)} requests the module answered {here} itself, {allowed} of them allows")


def open_ws(door: harness.ModuleEnvoy, path: str, token: str):
    """A WebSocket through `door`, tagged so that its upgrade can be found upstream."""
    marker = uuid.uuid4().hex
    ws = connect(f"ws://127.0.0.1:{door.port}{path}", open_timeout=10, close_timeout=5,
                 additional_headers={"authorization": f"Bearer {token}", harness.MARKER: marker})
    return ws, marker


def test_websockets_through_the_module_door(doors, keys):
    """An upgrade is a request like any other to the module: a session token (keygate's to
    judge) opens the stream route through ext_authz; a key the module learned opens a
    socket on a read route with the identity the module set, the upgrade never reaching
    ext_authz, and is refused on the sessions-only route by the module itself."""
    module = doors["module"]
    reader = keys["reader"]
    learned(module, reader["token"])

    before = module.checks()
    ws, marker = open_ws(module, "/v1/stream/calls/7", keys["session"])
    with ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
    assert module.checks() == before + 1, "a session token is keygate's to judge"
    upgrade = dict(module.upstream.seen_with_marker(marker)[0]["headers"])
    assert upgrade.get("x-keygate-kind") == "session", upgrade

    before = module.checks()
    ws, marker = open_ws(module, "/v1/contacts/live", reader["token"])
    with ws:
        ws.send("hi")
        assert ws.recv(timeout=5) == "hi"
    assert module.checks() == before, "the module should have answered the learned key's upgrade"
    upgrade = dict(module.upstream.seen_with_marker(marker)[0]["headers"])
    assert upgrade.get("x-keygate-key-id") == reader["key_id"], upgrade
    assert upgrade.get("x-tenant-id") == keys["tenant"], upgrade
    assert "authorization" not in upgrade, "the key reached the upstream"

    with pytest.raises(InvalidStatus) as refused:
        ws, _ = open_ws(module, "/v1/stream/calls/7", reader["token"])
        ws.close()
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"]["code"] == "insufficient_permissions"
    assert module.checks() == before, "the module should have refused the key on the stream route"


def test_a_rate_limited_plan_and_a_session_mint_go_to_keygate(doors, keygate, keys):
    module = doors["module"]
    key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"], "--plan", "trial")
    answers = [through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])]) for _ in range(3)]
    assert [r.status for r, _ in answers] == [200, 200, 429], [str(r) for r, _ in answers]
    assert not any(here for _, here in answers), "a limited plan is counted by keygate alone"
    for _ in range(2):
        minted, here = through_module(module, "POST", "/v1/sessions", [bearer(keys["reader"]["token"])])
        assert_allowed(minted)
        assert minted.header("x-keygate-session-token"), str(minted)
        assert not here, "a session is minted by keygate alone"


def learned(module: harness.ModuleEnvoy, token: str) -> None:
    """Until the module answers `token` itself (the first request teaches it)."""
    def answered_here():
        resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(token)])
        assert_allowed(resp)
        return here
    harness.wait_for("the module to answer a key it learned", answered_here, timeout=10)


def test_requests_the_module_answers_are_in_the_keys_usage(doors, keygate):
    """A key used only through the module door: each request, whether keygate or the
    module answered it, is in `keys get`'s counts once the module has reported (every
    `api_keys.usage_flush_interval`)."""
    module = doors["module"]
    key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    read = [bearer(key["token"])]
    write = [bearer(key["token"]), ("x-tenant-id", key["tenant_id"])]
    by_module = {"allowed": 0, "denied": 0}
    sent = {"allowed": 0, "denied": 0}
    for _ in range(50):
        resp, here = through_module(module, "GET", "/v1/contacts/1", read)
        assert_allowed(resp)
        sent["allowed"] += 1
        by_module["allowed"] += here
        if by_module["allowed"] >= 5:
            break
    assert by_module["allowed"] == 5, "the module never answered the key itself"
    for _ in range(2):
        resp, here = through_module(module, "POST", "/v1/contacts/1", write)
        assert_denied(resp, 403, "insufficient_permissions")
        assert here, "a key the module holds is denied by the module"
        sent["denied"] += 1

    def counted():
        got = keygate.cli("keys", "get", key["key_id"], "--json")
        assert got.code == 0, str(got)
        k = got.json()
        return (k["requests_allowed"], k["requests_denied"]) == (sent["allowed"], sent["denied"]) and k
    k = harness.wait_for("the module's usage to reach the key's record", counted, timeout=10)
    assert k["last_used_at"], k


def test_a_revoked_key_is_denied_by_the_module_within_ten_milliseconds(doors, keygate):
    """For each of 100 keys the module answers itself: revoke it through the admin API,
    then ask through the module door until it is denied. The time from the admin call's
    return to the first denial is the propagation; p99 under 10 ms. After the denial,
    the key is never allowed again (20 more requests)."""
    module = doors["module"]
    waits = []
    for _ in range(100):
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        learned(module, key["token"])
        result = keygate.cli("keys", "revoke", key["key_id"])
        assert result.code == 0, str(result)
        revoked_at = time.monotonic()
        while True:
            resp = module.request("GET", "/v1/contacts/1", [bearer(key["token"])])
            if resp.status != 200:
                waits.append(time.monotonic() - revoked_at)
                assert_denied(resp, 401, "revoked_api_key")
                break
            assert time.monotonic() - revoked_at < 5, "the revocation never reached the module"
        for _ in range(20):
            resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])])
            assert_denied(resp, 401, "revoked_api_key")
            assert here, "the module should answer the revoked key itself (its tombstone)"
    waits.sort()
    p99 = waits[98]
    assert p99 < 0.010, f"revocation reached the module in {[round(w * 1000, 2) for w in waits]} ms"


def warned(module: harness.ModuleEnvoy, event: str, timeout: float = 10) -> list[str]:
    """The lines of Envoy's log (its last 200) with keygate's `event`, once there is one:
    each a warning, as keygate logged it."""
    def lines():
        return [l for l in module.proc.tail(200).splitlines() if event in l] or None
    found = harness.wait_for(f"{event} in Envoy's log", lines, timeout=timeout)
    assert all("[warning]" in l for l in found), found
    return found


def test_without_its_watch_stream_the_module_decides_nothing(workdir, redis, upstream, keygate):
    """The module follows a second replica's Watch stream; with that replica stopped, a key
    the module answered before goes to ext_authz (the first replica) again — and is
    still allowed there."""
    watched = harness.Keygate("module-watched", workdir, redis, ENV, pepper=keygate.pepper,
                              admin_token=keygate.admin_token)
    module = None
    try:
        module = harness.ModuleEnvoy("module-cut", workdir, keygate, upstream, watch=watched)
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        learned(module, key["token"])
        watched.stop()
        def handed_over():
            resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])])
            assert_allowed(resp)
            return not here
        harness.wait_for("the module to hand requests to ext_authz once its Watch is gone",
                         handed_over, timeout=10)
        for _ in range(10):
            resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])])
            assert_allowed(resp)
            assert not here, "the module decided without its Watch stream"
        # Envoy's counters say why.
        assert counted(module, "GET", "/v1/contacts/1", [bearer(key["token"])]) == {
            "keygate_module_handed_over_not_following": 1}
        # The operator sees why, in Envoy's own log: keygate's warning, as a warning.
        lines = warned(module, "revocation.stream_lost")
        assert all("lost the revocation stream" in l for l in lines), lines
    finally:
        if module:
            module.stop()
        watched.stop()


# keygate and its module read the configuration file again within this of a change
# (both look at it every 0.5 s), as test_reload.py holds replicas to.
RELOAD_WITHIN = 2.0


def test_a_changed_configuration_file_reaches_the_module_as_it_reaches_keygate(workdir, redis, upstream):
    """keygate and the module read one file. Once the module answers a key itself, the
    file gives the key's route another scope and its denial another message: within 2 s
    the module denies the key itself, with the new message, as keygate does. A file
    that does not load changes nothing in the module either, and Envoy's log names the
    field; the first file back, the module allows the key itself again."""
    keygate = harness.Keygate("module-reload", workdir, redis, {"KEYGATE_WATCH_TOKEN": WATCH_TOKEN})
    module = None
    try:
        module = harness.ModuleEnvoy("module-reload-envoy", workdir, keygate, upstream)
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        read = [bearer(key["token"])]
        learned(module, key["token"])
        first = keygate.config_path.read_text()
        message = "This key may not read contacts any more."
        changed = first.replace('scope: "contacts:read"', 'scope: "contacts:list"').replace(
            "errors: { opaque: false }",
            f'errors: {{ opaque: false, codes: {{ insufficient_permissions: {{ message: "{message}" }} }} }}',
        )
        assert changed.count("contacts:list") == 1 and message in changed, changed

        def denied_by_both():
            resp, here = through_module(module, "GET", "/v1/contacts/1", read)
            by_keygate = keygate.check(key["token"], "GET", "/v1/contacts/1")
            return (resp.status == 403 and here and by_keygate.code == 3) and (resp, by_keygate)

        keygate.config_path.write_text(changed)
        resp, by_keygate = harness.wait_for("keygate and the module to take the new file", denied_by_both,
                                            timeout=RELOAD_WITHIN)
        assert_denied(resp, 403, "insufficient_permissions")
        assert resp.json()["error"]["message"] == message, str(resp)
        assert by_keygate.json()["code"] == "insufficient_permissions", str(by_keygate)

        keygate.config_path.write_text(changed.replace("unmatched: deny", "unmatched: sometimes"))

        lines = warned(module, "config.reload_failed", timeout=RELOAD_WITHIN)
        assert all("policy.unmatched" in l for l in lines), lines
        resp, here = through_module(module, "GET", "/v1/contacts/1", read)
        assert_denied(resp, 403, "insufficient_permissions")
        assert here and resp.json()["error"]["message"] == message, "the module kept its rules"

        keygate.config_path.write_text(first)

        def allowed_here():
            resp, here = through_module(module, "GET", "/v1/contacts/1", read)
            return resp.status == 200 and here
        harness.wait_for("the module to allow the key itself again", allowed_here, timeout=RELOAD_WITHIN)
    finally:
        if module:
            module.stop()
        keygate.stop()


def test_a_module_with_other_settings_than_keygate_learns_nothing(workdir, upstream, keygate):
    """An override in Envoy's environment that keygate does not have (here: opaque
    errors): the module would answer by other rules than keygate's, so it learns
    nothing, every request goes to keygate, and Envoy's log says why."""
    module = None
    try:
        module = harness.ModuleEnvoy("module-other-rules", workdir, keygate, upstream,
                                     env={"KEYGATE_ERRORS__OPAQUE": "true"})
        key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
        for _ in range(5):
            resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])])
            assert_allowed(resp)
            assert not here, "the module answered by settings keygate does not decide by"
        # Envoy's counters say why, for an operator to alert on.
        assert counted(module, "GET", "/v1/contacts/1", [bearer(key["token"])]) == {
            "keygate_module_handed_over_unknown_credential": 1,
            "keygate_module_not_learned.reason.other_rules": 1,
        }

        lines = warned(module, "module.other_rules")
        assert all("decides by other settings than this module" in l for l in lines), lines
    finally:
        if module:
            module.stop()


def test_a_panic_in_the_module_sends_the_request_to_ext_authz(doors, keygate):
    module = doors["module"]
    key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    learned(module, key["token"])
    resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"]), (PANIC_HEADER, "1")])
    assert_allowed(resp)
    assert not here, "the panicking request should have been decided by ext_authz"
    # One line in Envoy's log, no backtrace printed on Envoy's worker.
    def panic_logged():
        tail = module.proc.tail(50)
        return tail if "keygate module: panic: " in tail else None
    log = harness.wait_for("the panic in Envoy's log", panic_logged, timeout=10)
    assert "stack backtrace" not in log, log
    # Envoy goes on serving, and the module deciding.
    resp, here = through_module(module, "GET", "/v1/contacts/1", [bearer(key["token"])])
    assert_allowed(resp)
    assert here, str(resp)
    denied, _ = through_module(module, "GET", "/v1/contacts/1", [(PANIC_HEADER, "1")])
    assert_denied(denied, 401, "missing_credentials")


def counted(module: harness.ModuleEnvoy, method, path, headers) -> dict[str, int]:
    """Which of the module's counters one request moved, and by how much."""
    before = module.module_counts()
    module.request(method, path, headers)
    after = module.module_counts()
    return {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()
            if after.get(k, 0) != before.get(k, 0)}


def test_envoy_counts_what_the_module_answered_and_why_it_handed_the_rest_over(doors, keygate):
    """Envoy's counters say, request by request, what the module did: allowed, denied
    (by code), or handed to ext_authz (by why). Every request moves exactly one (and an
    answer not learned `keygate_module_not_learned`: test_a_module_with_other_settings_…)."""
    module = doors["module"]
    fresh = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    assert counted(module, "GET", "/v1/contacts/1", [bearer(fresh["token"])]) == {
        "keygate_module_handed_over_unknown_credential": 1}

    key = keygate.create_key(str(uuid.uuid4()), ["contacts:read"])
    learned(module, key["token"])
    assert counted(module, "GET", "/v1/contacts/1", [bearer(key["token"])]) == {"keygate_module_allowed": 1}
    assert counted(module, "POST", "/v1/contacts/1", [bearer(key["token"]), ("x-tenant-id", key["tenant_id"])]) == {
        "keygate_module_denied.code.insufficient_permissions": 1}
    assert counted(module, "GET", "/v1/contacts/1", []) == {"keygate_module_denied.code.missing_credentials": 1}
    assert counted(module, "GET", "/v1/contacts/1", [bearer(key["token"]), (PANIC_HEADER, "1")]) == {
        "keygate_module_handed_over_panic": 1}
    # A header keygate consults that is not UTF-8 (Envoy hands ext_authz `!` in its place):
    # the module does not read the request, keygate judges it as Envoy sends it.
    assert counted(module, "GET", "/v1/contacts/1", [bearer(key["token"]), ("x-tenant-id", "caf\xe9")]) == {
        "keygate_module_handed_over_unread": 1}

    # A rate-limited plan: learned from keygate's first answer, then handed over for
    # keygate to count (its third request is over the plan's 2 a minute: still keygate's).
    limited = keygate.create_key(str(uuid.uuid4()), ["contacts:read"], "--plan", "trial")
    reasons = [counted(module, "GET", "/v1/contacts/1", [bearer(limited["token"])]) for _ in range(3)]
    assert reasons[0] == {"keygate_module_handed_over_unknown_credential": 1}, reasons
    assert reasons[2] == {"keygate_module_handed_over_service_only": 1}, reasons


def validate(workdir, name: str, config_text: str, env: dict[str, str]):
    """`envoy --mode validate` on examples/envoy-module.yaml with the module's
    configuration given inline, at info level: Envoy loads the module and creates the
    filter's configuration, and says how it went."""
    path = workdir / f"{name}.yaml"
    text = harness.render_envoy_config(harness.free_port(), harness.free_port(), harness.free_port(),
                                       harness.EXAMPLE_ENVOY_MODULE)
    assert text.count(harness.EXAMPLE_MODULE_CONFIG) == 1
    path.write_text(text.replace(f'"{harness.EXAMPLE_MODULE_CONFIG}"', json.dumps(config_text)))
    return subprocess.run(
        [harness.envoy_bin(), "--mode", "validate", "-c", str(path), "--log-level", "info",
         "--base-id", str(harness.free_port())],
        env=harness.clean_env(ENVOY_DYNAMIC_MODULES_SEARCH_PATH=harness.module_dir(), **env),
        capture_output=True, text=True, timeout=60,
    )


def test_envoy_loads_the_module_at_the_abi_version_it_targets(workdir):
    done = validate(workdir, "module-validate", "revocation: {watch_url: 'http://127.0.0.1:1'}",
                    {"KEYGATE_WATCH_TOKEN": WATCH_TOKEN})
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Dynamic module ABI version v0.2.0 matched." in out, out[-3000:]


@pytest.mark.parametrize(
    "config, env, field",
    [
        ("revocation: {watch_url: 'http://127.0.0.1:1'}", {}, "KEYGATE_WATCH_TOKEN"),
        ("policy: {routes: []}", {"KEYGATE_WATCH_TOKEN": WATCH_TOKEN}, "revocation.watch_url"),
        ("revocation: {watch_url: 'http://127.0.0.1:1'}\npolicy: {unmatched: sometimes}",
         {"KEYGATE_WATCH_TOKEN": WATCH_TOKEN}, "policy.unmatched"),
    ],
)
def test_a_bad_module_configuration_stops_envoy_naming_the_field(workdir, config, env, field):
    done = validate(workdir, "module-invalid", config, env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    assert "keygate module: invalid configuration" in out and field in out, out[-3000:]
