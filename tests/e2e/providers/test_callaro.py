"""examples/callaro as shipped, through its Envoy: Callaro's page, promise by promise.
JWTs on JWT-only routes, tenant keys, partner keys acting for delegated tenants through
X-Tenant-Id, runtime server keys on internal routes only, scopes per route family with
the two opt-in scopes never granted by default, empty scopes allowing nothing, sandbox and
production keys apart (the sandbox: the same files beside production, as README.md's
"Run it" starts it)."""

import re
import secrets
import shlex
import subprocess
import time
import uuid

import pytest

import harness
import walkthrough

EXAMPLE = harness.EXAMPLES / "callaro"
SECRET = secrets.token_hex(32)
ENV = {"CALLARO_JWT_SECRET": SECRET}
PARTNER = "e2e-partner"


callaro = harness.stack_fixture("callaro", keygate_env=ENV, example="callaro")


def run_it() -> list[str]:
    """The commands of README.md's `## Run it` (continued lines joined)."""
    text = (EXAMPLE / "README.md").read_text().split("## Run it", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return commands


def sandbox_commands() -> tuple[dict[str, str], str]:
    """The sandbox keygate's environment (KEYGATE_… assignments before `keygate serve`) and
    its Envoy's configuration (what the `--config-yaml "$(sed …)"` of "Run it" gives)."""
    (serve,) = [c for c in run_it() if "KEYGATE_POLICY__ENVIRONMENTS" in c]
    words = shlex.split(serve)
    env = dict(w.split("=", 1) for w in words[: words.index("keygate")])
    assert words[words.index("keygate"):] == ["keygate", "serve", "--config", "examples/callaro/keygate.yaml", "&"], serve
    (envoy,) = [c for c in run_it() if "--config-yaml" in c]
    sed = re.search(r'--config-yaml "\$\((sed .*?)\)"', envoy).group(1)
    config = subprocess.run(["bash", "-c", sed], cwd=harness.REPO, check=True, capture_output=True, text=True).stdout
    return env, config


@pytest.fixture(scope="module")
def sandbox(callaro):
    """The sandbox deployment as "Run it" starts it: the same files and store, with its
    environment (its listen addresses moved to the test's ports, as every example's are)."""
    env, _ = sandbox_commands()
    env = {k: v for k, v in env.items() if not k.startswith("KEYGATE_LISTEN__")}
    assert env == {"KEYGATE_POLICY__ENVIRONMENTS": "[test]"}, env
    keygate = callaro.keygate.replica("callaro-sandbox-keygate", **env)
    yield from harness.running(harness.Envoy(
        "callaro-sandbox-envoy", keygate.workdir, keygate.grpc_port, callaro.upstream,
        template=EXAMPLE / "envoy.yaml",
    ))
    keygate.stop()


def app_jwt(tenant: str, role: str) -> str:
    now = int(time.time())
    claims = {"iss": "https://app.callaro.example/", "aud": "callaro-api", "sub": f"{role}@t",
              "tenant_id": tenant, "role": role, "iat": now, "exp": now + 3600}
    return harness.hs256(SECRET, claims)


def key(stack, *args) -> str:
    result = stack.keygate.cli("keys", "create", "--quiet", *args)
    assert result.code == 0, str(result)
    return result.stdout.strip()


def status(stack, method, path, token, tenant=None) -> int:
    """The status of one request through `stack` (a stack or an Envoy)."""
    headers = [("authorization", f"Bearer {token}")]
    if tenant:
        headers.append(("x-tenant-id", tenant))
    return stack.request(method, path, headers).status


FAMILIES = [
    ("GET", "/api/v1/bulk-call-campaigns/1", "bulk_call_campaigns:read"),
    ("POST", "/api/v1/bulk-call-campaigns", "bulk_call_campaigns:write"),
    ("GET", "/api/v1/contacts/1", "contacts:read"),
    ("PATCH", "/api/v1/contacts/1", "contacts:write"),
    ("GET", "/api/v1/phone-numbers", "phone_numbers:read"),
    ("POST", "/api/v1/phone-numbers", "phone_numbers:write"),
    ("GET", "/api/v1/voice-sessions/7", "voice_sessions:read"),
    ("GET", "/api/v1/billing/tenant/invoices", "billing:tenant:read"),
]


def test_the_readme_walkthrough_runs_as_written(callaro, sandbox):
    walkthrough.run(EXAMPLE / "README.md", callaro, ENV, ports={10001: sandbox.port})


def ports(envoy_yaml: str) -> list[int]:
    return [int(p) for p in re.findall(r"port_value: (\d+)", envoy_yaml)]


def test_run_it_starts_the_sandbox_beside_production_on_its_own_ports(callaro):
    env, sandbox_envoy = sandbox_commands()
    production_envoy = (EXAMPLE / "envoy.yaml").read_text()
    production_keygate = re.findall(r'"127\.0\.0\.1:(\d+)"', (EXAMPLE / "keygate.yaml").read_text())
    listen = {k: v for k, v in env.items() if k.startswith("KEYGATE_LISTEN__")}
    assert sorted(listen) == ["KEYGATE_LISTEN__ADMIN", "KEYGATE_LISTEN__GRPC", "KEYGATE_LISTEN__HTTP"], env
    sandbox_keygate = [v.rsplit(":", 1)[1] for v in listen.values()]
    # Envoy's admin, listener, keygate, upstream: only the upstream is shared.
    assert ports(production_envoy) == [9901, 10000, 50051, 8080]
    assert ports(sandbox_envoy) == [9902, 10001, int(env["KEYGATE_LISTEN__GRPC"].rsplit(":", 1)[1]), 8080]
    assert not set(sandbox_keygate) & set(production_keygate), (sandbox_keygate, production_keygate)
    # The sandbox's keygate accepts its environment (`serve --check`: the configuration
    # as serve reads it, every override applied); Envoy accepts its configuration.
    checked = harness.run_cli(
        ["serve", "--check", "--config", str(EXAMPLE / "keygate.yaml")],
        harness.clean_env(KEYGATE_PEPPER="p" * 48, KEYGATE_ADMIN_TOKEN="a" * 32, **ENV, **env),
    )
    assert checked.code == 0 and "configuration ok" in checked.stdout, str(checked)
    validated = subprocess.run(
        [harness.envoy_bin(), "--mode", "validate", "--base-id", str(harness.free_port()), "--config-yaml", sandbox_envoy],
        capture_output=True, text=True, timeout=60,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr


def test_each_scope_opens_its_route_family_and_no_other(callaro):
    tenant = str(uuid.uuid4())
    for method, path, scope in FAMILIES:
        k = key(callaro, "--tenant", tenant, "--scopes", scope)
        for m2, p2, s2 in FAMILIES:
            expected = 200 if s2 == scope else 403
            assert status(callaro, m2, p2, k, tenant) == expected, f"{scope} on {m2} {p2}"


def test_empty_scopes_allow_nothing(callaro):
    tenant = str(uuid.uuid4())
    k = key(callaro, "--tenant", tenant)
    assert [status(callaro, m, p, k, tenant) for m, p, _ in FAMILIES] == [403] * len(FAMILIES)


def test_the_opt_in_scopes_are_never_granted_by_a_wildcard(callaro):
    tenant = str(uuid.uuid4())
    wildcard = key(callaro, "--tenant", tenant, "--scopes", "*")
    assert all(status(callaro, m, p, wildcard, tenant) == 200 for m, p, _ in FAMILIES)
    assert status(callaro, "GET", "/api/v1/call-traces/1", wildcard, tenant) == 403
    named = key(callaro, "--tenant", tenant, "--scopes", "call_traces:admin_read")
    assert status(callaro, "GET", "/api/v1/call-traces/1", named, tenant) == 200
    callaro.keygate.cli("partners", "delegate", PARTNER, tenant)
    wide = key(callaro, "--kind", "partner", "--partner", PARTNER, "--scopes", "billing:partner:*,*")
    allocate = "/api/v1/billing/partner/allocations"
    assert status(callaro, "POST", allocate, wide, tenant) == 403
    exact = key(callaro, "--kind", "partner", "--partner", PARTNER, "--scopes", "billing:partner:allocate")
    assert status(callaro, "POST", allocate, exact, tenant) == 200
    # The owner role's `*` does not reach them either.
    assert status(callaro, "GET", "/api/v1/call-traces/1", app_jwt(tenant, "owner"), tenant) == 403
    # Partner scopes are for partner keys only.
    refused = callaro.keygate.cli("keys", "create", "--tenant", tenant, "--scopes", "billing:partner:read")
    assert refused.code != 0 and "billing:partner:read" in refused.stderr, str(refused)


def test_a_partner_acts_for_delegated_tenants_named_in_x_tenant_id(callaro):
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    callaro.keygate.cli("partners", "delegate", PARTNER, tenant)
    k = key(callaro, "--kind", "partner", "--partner", PARTNER, "--scopes", "contacts:read,billing:partner:read")
    resp = callaro.request("GET", "/api/v1/contacts/1", [("authorization", f"Bearer {k}"), ("x-tenant-id", tenant)])
    assert resp.status == 200 and resp.upstream_headers("x-tenant-id") == [tenant], str(resp)
    assert resp.upstream_headers("x-keygate-partner") == [PARTNER]
    assert status(callaro, "GET", "/api/v1/contacts/1", k, other) == 403
    assert status(callaro, "GET", "/api/v1/contacts/1", k) == 400
    assert status(callaro, "GET", "/api/v1/billing/partner/x", k) == 200
    callaro.keygate.cli("partners", "undelegate", PARTNER, tenant)
    assert status(callaro, "GET", "/api/v1/contacts/1", k, tenant) == 403


def test_runtime_keys_serve_internal_routes_only(callaro):
    tenant = str(uuid.uuid4())
    runtime = key(callaro, "--kind", "runtime", "--service", "dialer", "--scopes", "runtime:dispatch,contacts:read")
    customer = key(callaro, "--tenant", tenant, "--scopes", "*,runtime:dispatch")
    assert status(callaro, "POST", "/internal/v1/dispatch", runtime) == 200
    assert status(callaro, "POST", "/internal/v1/dispatch", customer) == 403
    assert status(callaro, "GET", "/api/v1/contacts/1", runtime, tenant) == 403


def test_jwt_only_routes_take_the_apps_jwts_and_nothing_else(callaro):
    tenant = str(uuid.uuid4())
    owner, operator = app_jwt(tenant, "owner"), app_jwt(tenant, "operator")
    assert status(callaro, "GET", "/api/v1/members", owner) == 200
    assert status(callaro, "GET", "/api/v1/members", operator) == 403, "the operator role lacks members:manage"
    api_key = key(callaro, "--tenant", tenant, "--scopes", "*,members:manage")
    assert status(callaro, "GET", "/api/v1/members", api_key) == 403
    # The role's scopes, on ordinary routes.
    assert status(callaro, "GET", "/api/v1/contacts/1", operator, tenant) == 200
    assert status(callaro, "POST", "/api/v1/phone-numbers", operator, tenant) == 403


def test_sandbox_and_production_keys_are_apart(callaro, sandbox):
    tenant = str(uuid.uuid4())
    live = key(callaro, "--tenant", tenant, "--scopes", "contacts:read")
    test = key(callaro, "--tenant", tenant, "--env", "test", "--scopes", "contacts:read")
    assert status(callaro, "GET", "/api/v1/contacts/1", live, tenant) == 200
    assert status(callaro, "GET", "/api/v1/contacts/1", test, tenant) == 403
    assert status(sandbox, "GET", "/api/v1/contacts/1", test, tenant) == 200
    assert status(sandbox, "GET", "/api/v1/contacts/1", live, tenant) == 403
