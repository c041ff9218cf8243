"""Deploying keygate: the Helm chart (lint, template with the defaults and with every
optional part on, the manifests validated against Kubernetes' schemas, the ConfigMap a
configuration keygate accepts), the Dockerfile (parsed: it builds and copies the binary
`cargo build --release` makes, and runs it as non-root), the Envoy and Istio examples
beside the chart (the Envoy one run for real), and SIGTERM under load (no in-flight check
dropped, NOT_SERVING before the listener closes)."""

import json
import os
import signal
import subprocess
import threading
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import kubernetes_validate
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc

import harness
from harness import check_request, http_get, wait_for

CHART = harness.REPO / "helm" / "keygate"
HELM_EXAMPLES = harness.REPO / "helm" / "examples"
K8S_VERSION = "1.30.0"
# Kinds whose schemas are CRDs (Prometheus Operator, Istio): checked here by hand.
CRDS = {"ServiceMonitor", "AuthorizationPolicy"}

ALL_ON = {
    "autoscaling.enabled": "true",
    "podDisruptionBudget.enabled": "true",
    "serviceMonitor.enabled": "true",
    "networkPolicy.enabled": "true",
    "secrets.watchToken.name": "keygate-watch",
    "secrets.redisPassword.name": "keygate-redis",
    "secrets.extra[0].env": "KEYGATE_SESSION_KEY",
    "secrets.extra[0].name": "keygate-session",
    "secrets.extra[0].key": "ed25519.pem",
    "httpAuthz.enabled": "true",
    # A Redis Cluster instead of one Redis.
    "config.store.cluster_nodes[0]": "redis://redis-cluster-0.redis-cluster:6379",
    "config.store.cluster_nodes[1]": "redis://redis-cluster-1.redis-cluster:6379",
}


def helm(*args: str) -> subprocess.CompletedProcess:
    binary = os.environ.get("HELM_BIN") or str(harness.REPO / ".tools/node_modules/.bin/helm")
    if not os.path.exists(binary):
        raise harness.Fatal(f"helm not found at {binary}: run scripts/test, which installs it")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def set_args(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def rendered(values: dict[str, str]) -> list[dict]:
    done = helm("template", "kg", str(CHART), *set_args(values))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "everything-on"])
def test_the_chart_lints_and_renders_valid_kubernetes_manifests(values):
    lint = helm("lint", "--strict", str(CHART), *set_args(values))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = rendered(values)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    if values:
        expected += ["NetworkPolicy", "ServiceMonitor"]
    assert kinds == sorted(expected), kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            assert doc["spec"]["endpoints"][0]["port"] == "http-metrics"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_pod_is_locked_down_and_probed_natively():
    (deployment,) = [d for d in rendered(ALL_ON) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["affinity"]["podAntiAffinity"]
    assert pod["topologySpreadConstraints"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert container["readinessProbe"]["grpc"] == {"port": 50051}
    assert pod["terminationGracePeriodSeconds"] > 5, "longer than listen.drain_delay"
    # Every secret is a reference mounted as a file, never a value.
    env = {e["name"]: e["value"] for e in container["env"]}
    for name in ["KEYGATE_PEPPER", "KEYGATE_ADMIN_TOKEN", "KEYGATE_WATCH_TOKEN",
                 "KEYGATE_REDIS_PASSWORD", "KEYGATE_SESSION_KEY"]:
        assert env[f"{name}_FILE"] == f"/var/run/keygate/secrets/{name}"
    sources = pod["volumes"][1]["projected"]["sources"]
    assert {s["secret"]["name"] for s in sources} == {"keygate", "keygate-watch", "keygate-redis", "keygate-session"}
    (service,) = [d for d in rendered({}) if d["kind"] == "Service"]
    assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]} == {
        "grpc-authz": "grpc", "http-metrics": "http"}


def test_http_authz_is_served_on_its_own_named_port_when_enabled():
    docs = rendered({"httpAuthz.enabled": "true"})
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "http-authz", "containerPort": 9191, "protocol": "TCP"} in container["ports"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["http-authz"] == 9191
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert yaml.safe_load(configmap["data"]["keygate.yaml"])["listen"]["http_authz"] == "0.0.0.0:9191"


def pod_config_checksum(values: dict[str, str]) -> str:
    (deployment,) = [d for d in rendered(values) if d["kind"] == "Deployment"]
    return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]


def test_a_policy_change_reaches_the_pods_without_rolling_them_and_a_store_change_rolls_them():
    route = "config.policy.routes[0].path"
    before = pod_config_checksum({})
    assert pod_config_checksum({route: "/livez"}) == before
    assert pod_config_checksum({"config.errors.opaque": "true"}) == before
    assert pod_config_checksum({"config.store.redis_url": "redis://other:6379"}) != before
    assert pod_config_checksum({"config.api_keys.prefix": "eng"}) != before
    assert pod_config_checksum({"httpAuthz.enabled": "true"}) != before
    assert pod_config_checksum({"rollOnAnyConfigChange": "true", route: "/livez"}) != pod_config_checksum(
        {"rollOnAnyConfigChange": "true"}
    )
    # kubelet updates a ConfigMap mounted as a directory, never one mounted by subPath.
    (deployment,) = [d for d in rendered({}) if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount and mount["mountPath"] == "/etc/keygate"


def test_a_missing_required_secret_fails_the_schema():
    done = helm("template", "kg", str(CHART), "--set", "secrets.pepper.name=")
    assert done.returncode != 0 and "secrets.pepper" in done.stderr, done.stderr


def keygate_check(config_text: str, tmp_path) -> harness.CliResult:
    path = tmp_path / f"{uuid.uuid4().hex}.yaml"
    path.write_text(config_text)
    # The chart's secrets, as the pod gets them: --check reads them as serve does.
    env = harness.clean_env(KEYGATE_PEPPER=uuid.uuid4().hex * 2, KEYGATE_ADMIN_TOKEN=uuid.uuid4().hex)
    return harness.run_cli(["serve", "--config", str(path), "--check"], env)


@pytest.mark.parametrize("values", [{}, ALL_ON], ids=["defaults", "everything-on"])
def test_the_configmap_is_a_configuration_keygate_accepts(values, tmp_path):
    (configmap,) = [d for d in rendered(values) if d["kind"] == "ConfigMap"]
    result = keygate_check(configmap["data"]["keygate.yaml"], tmp_path)
    assert result.code == 0 and result.stdout.strip() == "configuration ok", str(result)


def test_a_bad_configuration_in_the_values_is_caught_by_the_check(tmp_path):
    (configmap,) = [d for d in rendered({"config.policy.unmatched": "sometimes"}) if d["kind"] == "ConfigMap"]
    result = keygate_check(configmap["data"]["keygate.yaml"], tmp_path)
    assert result.code != 0 and "policy.unmatched" in result.stderr, str(result)


def test_the_dockerfile_builds_and_ships_the_release_binary_as_non_root():
    text = (harness.REPO / "Dockerfile").read_text()
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    instructions = [(l.split()[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    known = {"FROM", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL"}
    assert all(i in known for i, _ in instructions), instructions
    stages = [a for i, a in instructions if i == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build"), stages
    package = tomllib.loads((harness.REPO / "Cargo.toml").read_text())["package"]["name"]
    assert f"cargo build --release --locked --bin {package}" in [a for i, a in instructions if i == "RUN"]
    copies = [a for i, a in instructions if i == "COPY" and a.startswith("--from=build")]
    assert copies == [f"--from=build /src/target/release/{package} /usr/local/bin/{package}"], copies
    users = [a for i, a in instructions if i == "USER"]
    assert users and not users[-1].startswith(("0", "root")), users
    (values,) = [yaml.safe_load((CHART / "values.yaml").read_text())]
    assert values["image"]["repository"] == package
    ignored = (harness.REPO / ".dockerignore").read_text().split()
    assert "target" in ignored and ".venv" in ignored


def test_the_istio_example_sends_custom_policies_to_keygate():
    docs = [d for d in yaml.safe_load_all((HELM_EXAMPLES / "istio.yaml").read_text()) if d]
    (mesh_cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    kubernetes_validate.validate(mesh_cm, K8S_VERSION, strict=True)
    grpc_provider, http_provider = yaml.safe_load(mesh_cm["data"]["mesh"])["extensionProviders"]
    ext = grpc_provider["envoyExtAuthzGrpc"]
    assert ext["port"] == 50051 and ext["failOpen"] is False and ext["timeout"] == "0.25s"
    # The HTTP provider asks the chart's http-authz port, under keygate's Envoy prefix,
    # and passes keygate's identity headers upstream.
    http_ext = http_provider["envoyExtAuthzHttp"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert http_ext["port"] == values["httpAuthz"]["port"] and http_ext["pathPrefix"] == "/envoy"
    assert http_ext["failOpen"] is False and http_ext["timeout"] == "0.25s"
    assert {"authorization", "x-tenant-id"} <= set(http_ext["includeRequestHeadersInCheck"])
    assert {"x-tenant-id", "x-keygate-*"} <= set(http_ext["headersToUpstreamOnAllow"])
    (policy,) = [d for d in docs if d["kind"] == "AuthorizationPolicy"]
    assert policy["spec"]["action"] == "CUSTOM"
    assert policy["spec"]["provider"]["name"] == grpc_provider["name"]


def test_the_envoy_example_beside_the_chart_runs(workdir, redis, upstream, keygate, reader):
    def to_loopback(text: str) -> str:
        text = text.replace("keygate.keygate.svc.cluster.local", "127.0.0.1")
        return text.replace("app.default.svc.cluster.local", "127.0.0.1")

    envoy = harness.Envoy("helm-example-envoy", workdir, keygate.grpc_port, upstream,
                          edit_config=to_loopback, template=HELM_EXAMPLES / "envoy.yaml")
    try:
        text = envoy.config_path.read_text()
        assert "status_on_error: { code: ServiceUnavailable }" in text and "timeout: 0.25s" in text
        ok = envoy.request("GET", "/v1/contacts/1", [("authorization", f"Bearer {reader['token']}")])
        assert ok.status == 200 and len(ok.upstream) == 1, str(ok)
        assert envoy.request("GET", "/v1/contacts/1").status == 401
    finally:
        envoy.stop()


def test_sigterm_under_load_drops_no_in_flight_check(workdir, redis):
    kg = harness.Keygate("drain-keygate", workdir, redis, {"KEYGATE_LISTEN__DRAIN_DELAY": "1s"})
    key = kg.create_key(str(uuid.uuid4()), ["contacts:read"])
    channel = grpc.insecure_channel(f"127.0.0.1:{kg.grpc_port}")
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    request = check_request("GET", "/v1/contacts/1", {"authorization": f"Bearer {key['token']}"})
    results, lock, stop = [], threading.Lock(), threading.Event()

    def load():
        while not stop.is_set():
            try:
                code = stub.Check(request, timeout=5).status.code
                outcome = "allowed" if code == 0 else f"denied {code}"
            except grpc.RpcError as e:
                outcome = f"error {e.code().name}: {e.details()}"
            with lock:
                results.append((outcome, kg.proc.alive()))

    try:
        assert stub.Check(request, timeout=5).status.code == 0
        with ThreadPoolExecutor(8) as pool:
            workers = [pool.submit(load) for _ in range(8)]
            wait_for("some load", lambda: len(results) > 50, timeout=30)
            os.kill(kg.proc.pid, signal.SIGTERM)
            # NOT_SERVING first, while checks are still answered.
            wait_for("/readyz to say draining", lambda: http_get(kg.http_url + "/readyz")[0] == 503, timeout=5, interval=0.02)
            assert http_get(kg.http_url + "/readyz")[1].startswith("not ready: draining")
            assert stub.Check(request, timeout=5).status.code == 0, "still serving while draining"
            code = kg.proc.stop(signal.SIGTERM, timeout=15)
            stop.set()
            for w in workers:
                w.result()
    finally:
        stop.set()
        channel.close()
    assert code == 0, f"keygate exited {code}"
    outcomes = [o for o, _ in results]
    assert outcomes.count("allowed") > 50, outcomes[:5]
    # Every check that reached keygate was answered. The only errors: a new connection
    # refused once the listener had closed, never a check cut off half-way.
    refused = [o for o in outcomes if o != "allowed"]
    cut_off = [o for o in refused if not o.startswith("error UNAVAILABLE") or "connect" not in o.lower()]
    assert not cut_off, cut_off[:10]


def test_the_chart_readme_lists_every_value():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()

    def leaves(node, path):
        # `config` is keygate.yaml itself (docs/configuration.md), `resources` Kubernetes'
        # own, and a Secret reference `{name, key}` one value each.
        whole = path in ("config", "resources") or (isinstance(node, dict) and set(node) == {"name", "key"})
        if isinstance(node, dict) and node and not whole:
            for k, v in node.items():
                yield from leaves(v, f"{path}.{k}" if path else k)
        else:
            yield path

    missing = [p for p in leaves(values, "") if f"`{p}`" not in readme]
    assert not missing, f"helm/keygate/README.md does not list: {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) == set(schema["properties"]), "values.schema.json covers every top-level value"
