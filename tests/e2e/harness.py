"""Real processes for the end-to-end tests: redis-server, keygate, Envoy and the echo
upstream, each on free loopback ports, each awaited until it answers (never a fixed
sleep), each stopped at teardown.

Nothing here knows a test; conftest.py turns these into fixtures, and `stack_fixture`
gives a test module a stack of its own.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_ENVOY = REPO / "examples" / "envoy.yaml"

# The three addresses examples/envoy.yaml is written for; the tests rewrite them.
EXAMPLE_LISTENER_PORT = 10000
EXAMPLE_KEYGATE_PORT = 50051
EXAMPLE_UPSTREAM_PORT = 8080
# examples/envoy-http.yaml asks keygate's HTTP authorization listener instead.
EXAMPLE_ENVOY_HTTP = REPO / "examples" / "envoy-http.yaml"
EXAMPLE_ENVOY_MODULE = REPO / "examples" / "envoy-module.yaml"
# The configuration examples/envoy-module.yaml gives keygate's module.
EXAMPLE_MODULE_CONFIG = "file:config/dev.yaml"
EXAMPLE_HTTP_AUTHZ_PORT = 9191

# Every wait is bounded. Generous, because a debug build on a busy CI box is slow to start.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
POLL_INTERVAL = 0.05

MARKER = "x-e2e-request"
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-access-token")
IDENTITY_HEADERS = ("x-tenant-id", "x-keygate-subject", "x-keygate-key-id", "x-keygate-scopes")


def _binary(env_name: str, default: str | None, what: str) -> str:
    value = os.environ.get(env_name) or default
    if not value:
        raise RuntimeError(f"{what}: set {env_name}")
    path = Path(value)
    if not path.is_absolute() and os.sep in value:
        path = REPO / path
    elif not path.is_absolute():
        found = shutil.which(value)
        if found is None:
            raise RuntimeError(f"{what}: {value!r} is not on PATH (set {env_name})")
        path = Path(found)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise RuntimeError(f"{what}: {path} is not an executable file (set {env_name})")
    return str(path)


def keygate_bin() -> str:
    return _binary("KEYGATE_BIN", "target/debug/keygate", "keygate binary")


def envoy_bin() -> str:
    return _binary("ENVOY_BIN", ".venv/bin/envoy", "envoy binary")


def redis_bin() -> str:
    return _binary("REDIS_SERVER", "redis-server", "redis-server binary")


def nginx_bin() -> str:
    return _binary("NGINX_BIN", "nginx", "nginx binary")


# --------------------------------------------------------------------------- waiting

def wait_for(what: str, probe, timeout: float = START_TIMEOUT, interval: float = POLL_INTERVAL):
    """Polls `probe()` until it returns something truthy; returns that. `probe` may raise
    `Fatal` to stop waiting at once (a process that died will never become ready)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except Fatal:
            raise
        except Exception as e:  # noqa: BLE001 - "not yet" comes in many shapes
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


class Fatal(Exception):
    """Waiting is pointless: what we wait for can no longer happen."""


# --------------------------------------------------------------------------- ports

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now, never the same one twice in a run."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# --------------------------------------------------------------------------- processes

_running: list["Proc"] = []


class Proc:
    """A child process with stdout and stderr captured to files."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path):
        self.name = name
        self.argv = argv
        logdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logdir / f"{name}.stdout"
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.popen = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=logdir,
                start_new_session=True,
            )
        _running.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def ensure_alive(self):
        if not self.alive():
            raise Fatal(
                f"{self.name} exited with status {self.popen.returncode}:\n{self.tail()}"
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def tail(self, lines: int = 30) -> str:
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = [
                line if len(line) <= 300 else line[:300] + " …"
                for line in path.read_text(errors="replace").splitlines()[-lines:]
            ]
            if text:
                parts.append(f"--- {self.name} {label} ({path}) ---\n" + "\n".join(text))
        return "\n".join(parts) or f"--- {self.name}: no output ---"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Signals the process and waits for it to exit; SIGKILL if it will not."""
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self in _running:
            _running.remove(self)
        return self.popen.returncode


def running_processes() -> list[Proc]:
    return list(_running)


@atexit.register
def _kill_leftovers():
    for proc in list(_running):
        proc.stop(signal.SIGKILL, timeout=5)


def running(server):
    """Yields `server` to the test and stops it after, whatever the test did: the body of
    every fixture that starts a server (`yield from harness.running(harness.Redis(...))`)."""
    try:
        yield server
    finally:
        server.stop()


def stack_fixture(name: str, redis: str = "redis", **options):
    """A module-scoped fixture: a Stack `name` of the module's own, on the Redis of the
    fixture named `redis` (the session's unless told), with `options` as Stack takes them
    (keygate_env, edit_envoy_config, example). Assign it to the fixture's name:
    `raw_stack = harness.stack_fixture("raw", edit_envoy_config=raw_headers)`."""
    import pytest

    @pytest.fixture(scope="module")
    def stack(request, workdir, upstream):
        server = request.getfixturevalue(redis)
        yield from running(Stack(name, workdir, server, upstream, **options))

    return stack


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without anything that would configure keygate
    behind a test's back (KEYGATE_*, RUST_LOG), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_") and k != "RUST_LOG"}
    env.update(extra)
    return env


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


# --------------------------------------------------------------------------- redis

class Redis:
    def __init__(self, workdir: Path, tls: dict[str, Path] | None = None, user: tuple[str, str] | None = None):
        """`tls`: `cert`, `key` and `ca` files: TLS only (no plain-text port). `user`: an
        ACL user and password, the default user switched off."""
        self.port = free_port()
        self.tls = tls
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [redis_bin(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        if tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls["cert"]),
                     "--tls-key-file", str(tls["key"]), "--tls-ca-cert-file", str(tls["ca"]),
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if user:
            # Each word its own argument: redis-server joins them into the config line.
            argv += ["--user", user[0], "on", f">{user[1]}", "~*", "&*", "+@all", "--user", "default", "off"]
        self.proc = Proc("redis-tls" if tls else "redis", argv, clean_env(), workdir)
        wait_for(f"redis-server on port {self.port} to answer", self._answers)

    def _answers(self) -> bool:
        self.proc.ensure_alive()
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
            s = raw
            if self.tls:
                import ssl

                ctx = ssl.create_default_context(cafile=str(self.tls["ca"]))
                s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(b"PING\r\n")
            # +PONG, or -NOAUTH when only an ACL user may talk: either way it answers.
            return s.recv(64)[:1] in (b"+", b"-")

    def stop(self):
        self.proc.stop()


# --------------------------------------------------------------------------- upstream

def _example_module(name: str):
    """examples/<name>.py, imported: the tests use the examples' own code."""
    spec = importlib.util.spec_from_file_location(f"keygate_example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_upstream_module():
    return _example_module("upstream")


def ed25519_pem() -> str:
    """A new Ed25519 private key, PKCS#8 PEM, as an operator makes one with openssl."""
    return subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519"], check=True, capture_output=True, text=True
    ).stdout


def hs256(secret: str, claims: dict) -> str:
    """An HS256 JWT of `claims`, signed as examples/jwt.py signs."""
    return _example_module("jwt").sign(secret, claims)


class Upstream:
    """examples/upstream.py's echo server, on a thread of the test process."""

    def __init__(self):
        self.server = _load_upstream_module().serve("127.0.0.1", 0)
        self.port = self.server.server_address[1]

    def seen_with_marker(self, marker: str) -> list[dict]:
        return [
            r for r in self.server.requests()
            if any(name == MARKER and value == marker for name, value in r["headers"])
        ]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- keygate

# Argon2 parameters of the contract's example. A debug build is slower than a release
# build; the e2e tests still use the real parameters so they see what production sees.
KEYGATE_CONFIG = """\
listen:
  grpc: "127.0.0.1:{grpc}"
  admin: "127.0.0.1:{admin}"
  http: "127.0.0.1:{http}"
store:
  backend: redis
  redis_url: "{redis_url}"
api_keys:
  prefix: sk
  default_lifetime: 180d
  argon2: {{ memory_kib: 19456, iterations: 2, parallelism: 1 }}
cache: {{ ttl: 60s, negative_ttl: 5s }}
errors: {{ opaque: false }}
logging: {{ level: info, format: text }}
policy:
  credential_headers:
    - {{ header: authorization, scheme: Bearer }}
    - {{ header: x-access-token }}
    - {{ header: x-api-key }}
  strip_credential_headers: true
  require_tenant_header: false
  unmatched: deny
  routes:
    - {{ name: health, methods: [GET], path: /public/**, public: true }}
    - {{ name: contacts-read, methods: [GET], path: "/v1/contacts/**", scope: "contacts:read" }}
    - {{ name: contacts-write, methods: [POST, PUT, PATCH, DELETE], path: "/v1/contacts/**", scope: "contacts:write", tenant: required }}
"""


def keygate_config(grpc: int, admin: int, http: int, redis_url: str) -> str:
    return KEYGATE_CONFIG.format(grpc=grpc, admin=admin, http=http, redis_url=redis_url)


class CliResult:
    def __init__(self, argv: list[str], completed: subprocess.CompletedProcess):
        self.argv = argv
        self.code = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr

    def json(self):
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"not JSON on stdout ({e}):\n{self}") from None

    def __str__(self):
        return (
            f"$ {' '.join(self.argv)}\nexit {self.code}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def run_cli(args: list[str], env: dict[str, str], timeout: float = CLI_TIMEOUT) -> CliResult:
    argv = [keygate_bin(), *args]
    completed = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    return CliResult(argv, completed)


class Keygate:
    """`keygate serve --config FILE` against a Redis, with its own secrets and ports."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        redis: Redis,
        env: dict[str, str] | None = None,
        config=keygate_config,
        pepper: str | None = None,
        admin_token: str | None = None,
    ):
        """`config(grpc, admin, http, redis_url)` gives the YAML to run. Replicas of one
        deployment share `pepper` and `admin_token`."""
        self.name = name
        self.workdir = workdir
        self.grpc_port, self.admin_port, self.http_port = free_port(), free_port(), free_port()
        self.grpc_url = f"http://127.0.0.1:{self.grpc_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.pepper = pepper or secrets.token_urlsafe(48)
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.env = env or {}
        self.config = config
        self.redis = redis
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(config(self.grpc_port, self.admin_port, self.http_port, redis.url))
        self.proc = Proc(
            name,
            [keygate_bin(), "serve", "--config", str(self.config_path)],
            clean_env(KEYGATE_PEPPER=self.pepper, KEYGATE_ADMIN_TOKEN=self.admin_token, **self.env),
            workdir,
        )
        wait_for(f"{name} to answer GET /readyz with 200", self._ready)

    def _ready(self) -> bool:
        self.proc.ensure_alive()
        return http_get(self.http_url + "/readyz", timeout=1)[0] == 200

    def cli_env(self, **extra) -> dict[str, str]:
        return clean_env(
            **{
                "KEYGATE_ADMIN_URL": self.admin_url,
                "KEYGATE_ADMIN_TOKEN": self.admin_token,
                "KEYGATE_URL": self.grpc_url,
                **extra,
            }
        )

    def cli(self, *args: str) -> CliResult:
        return run_cli(list(args), self.cli_env())

    def create_key(self, tenant: str, scopes=(), *extra: str) -> dict:
        args = ["keys", "create", "--tenant", tenant, "--json", *extra]
        if scopes:
            args += ["--scopes", ",".join(scopes)]
        result = self.cli(*args)
        assert result.code == 0, f"keys create failed:\n{result}"
        key = result.json()
        for field_name in ("key_id", "token", "expires_at", "tenant_id", "scopes"):
            assert field_name in key, f"keys create --json lacks {field_name!r}:\n{result}"
        return key

    def check(self, token: str, method: str, path: str, tenant: str | None = None) -> CliResult:
        args = ["check", "--token", token, "--method", method, "--path", path, "--json"]
        if tenant is not None:
            args += ["--tenant", tenant]
        return self.cli(*args)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.proc.stop(sig)

    def replica(self, name: str, **env: str) -> "Keygate":
        """Another replica of this deployment: the same configuration (with `env` over
        it), secrets and store."""
        return Keygate(
            name, self.workdir, self.redis, {**self.env, **env}, self.config, self.pepper, self.admin_token
        )


# --------------------------------------------------------------------------- examples

EXAMPLES = REPO / "examples"


def example_keygate_config(provider: str):
    """`examples/<provider>/keygate.yaml` as shipped, its listeners and Redis moved to the
    test's (each named exactly once there), as a `Keygate` config function."""

    def render(grpc: int, admin: int, http: int, redis_url: str) -> str:
        text = (EXAMPLES / provider / "keygate.yaml").read_text()
        for old, new in (
            ("127.0.0.1:50051", f"127.0.0.1:{grpc}"),
            ("127.0.0.1:50052", f"127.0.0.1:{admin}"),
            ("127.0.0.1:9090", f"127.0.0.1:{http}"),
            ("redis://127.0.0.1:6379", redis_url),
        ):
            count = text.count(old)
            if count != 1:
                raise AssertionError(f"examples/{provider}/keygate.yaml should name {old} once, found {count}")
            text = text.replace(old, new)
        return text

    return render


# --------------------------------------------------------------------------- envoy

def render_envoy_config(listener: int, keygate: int, upstream: int, template: Path = EXAMPLE_ENVOY) -> str:
    """An Envoy example (examples/envoy.yaml by default) with its three addresses moved to
    the given ports."""
    text = template.read_text()
    keygate_port = EXAMPLE_HTTP_AUTHZ_PORT if template == EXAMPLE_ENVOY_HTTP else EXAMPLE_KEYGATE_PORT
    moves = {EXAMPLE_LISTENER_PORT: listener, keygate_port: keygate, EXAMPLE_UPSTREAM_PORT: upstream}
    for old in moves:
        count = len(re.findall(rf"\bport_value: {old}\b", text))
        if count != 1:
            raise AssertionError(
                f"{template.relative_to(REPO)} should name port {old} exactly once, found {count}"
            )
    # All at once: a new port may be one of the old ones.
    pattern = r"\bport_value: (" + "|".join(str(p) for p in moves) + r")\b"
    return re.sub(pattern, lambda m: f"port_value: {moves[int(m.group(1))]}", text)


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    # What the upstream received for this request (normally zero or one entries).
    upstream: list[dict] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"{name} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self):
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as e:
            raise AssertionError(f"body is not JSON ({e}): {self.body[:500]!r}") from None

    def upstream_headers(self, name: str) -> list[str]:
        """Every value of `name` the upstream received (asserts it was reached once)."""
        assert len(self.upstream) == 1, f"upstream saw this request {len(self.upstream)} times"
        return [v for k, v in self.upstream[0]["headers"] if k == name]

    def __str__(self):
        hdrs = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return f"HTTP {self.status}\n{hdrs}\n\n{self.body[:1000].decode(errors='replace')}\nupstream saw: {self.upstream}"


class Envoy:
    """Envoy running examples/envoy.yaml in front of `keygate_port` and `upstream`."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        keygate_port: int,
        upstream: Upstream,
        edit_config=None,
        template: Path = EXAMPLE_ENVOY,
        env: dict[str, str] | None = None,
    ):
        """`env`: what Envoy's environment adds to the test runner's (clean_env)."""
        self.name = name
        self.upstream = upstream
        self.port = free_port()
        self.admin_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"{name}.yaml"
        config = render_envoy_config(self.port, keygate_port, upstream.port, template)
        if edit_config is not None:
            config = edit_config(config)
        self.config_path.write_text(config)
        # The admin address is not one of the example's three: move it with --config-yaml,
        # which Envoy merges over the file.
        admin = (
            "admin: {address: {socket_address: "
            f"{{address: 127.0.0.1, port_value: {self.admin_port}}}}}}}"
        )
        self.proc = Proc(
            name,
            [
                envoy_bin(),
                "-c", str(self.config_path),
                "--config-yaml", admin,
                # Each Envoy of the run (and of a parallel run) gets its own shared-memory
                # and socket namespace; the admin port is unique, so is this.
                "--base-id", str(self.admin_port),
                "--log-level", "warn",
                "--concurrency", "2",
            ],
            clean_env(**(env or {})),
            workdir,
        )
        wait_for(f"{name} admin /ready", self._admin_ready)
        wait_for(f"{name} listener on port {self.port} to answer HTTP", self._listener_answers)

    def _admin_ready(self) -> bool:
        self.proc.ensure_alive()
        return http_get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1)[0] == 200

    def _listener_answers(self) -> bool:
        self.proc.ensure_alive()
        self.request("GET", "/public/e2e-readiness-probe")
        return True

    def request(self, method: str, path: str, headers=(), body: bytes | None = None) -> Response:
        """Sends one request through Envoy with exactly the given headers (repeats
        allowed), tagged so that what the upstream received can be told apart."""
        marker = uuid.uuid4().hex
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.putheader(MARKER, marker)
            for name, value in headers:
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("content-length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            resp = Response(
                status=r.status,
                headers=[(k.lower(), v) for k, v in r.getheaders()],
                body=r.read(),
            )
        finally:
            conn.close()
        resp.upstream = self.upstream.seen_with_marker(marker)
        return resp

    def stop(self):
        self.proc.stop()


# --------------------------------------------------------------------------- module

def module_dir() -> str:
    """Where keygate's Envoy module (libkeygate_envoy.so) is: KEYGATE_MODULE_DIR, else
    beside the keygate binary (cargo builds both into one target directory)."""
    found = os.environ.get("KEYGATE_MODULE_DIR") or str(Path(keygate_bin()).parent)
    if not (Path(found) / "libkeygate_envoy.so").is_file():
        raise RuntimeError(f"libkeygate_envoy.so is not in {found}: cargo build --workspace (or set KEYGATE_MODULE_DIR)")
    return found


class ModuleEnvoy(Envoy):
    """Envoy running examples/envoy-module.yaml: keygate's module in front of ext_authz
    to `keygate`. The module reads `keygate`'s own configuration file and KEYGATE_…
    environment, and follows the Watch stream of `watch` (default: `keygate`)."""

    def __init__(self, name: str, workdir: Path, keygate, upstream: Upstream, watch=None, env=None,
                 edit_config=None):
        watch = watch or keygate
        config = f"file:{keygate.config_path}"

        def use_keygates_config(text: str) -> str:
            if text.count(EXAMPLE_MODULE_CONFIG) != 1:
                raise AssertionError(f"examples/envoy-module.yaml should give the module {EXAMPLE_MODULE_CONFIG} once")
            text = text.replace(EXAMPLE_MODULE_CONFIG, config)
            return edit_config(text) if edit_config else text

        super().__init__(
            name,
            workdir,
            keygate.grpc_port,
            upstream,
            use_keygates_config,
            EXAMPLE_ENVOY_MODULE,
            env={
                **keygate.env,
                "KEYGATE_REVOCATION__WATCH_URL": watch.grpc_url,
                "ENVOY_DYNAMIC_MODULES_SEARCH_PATH": module_dir(),
                **(env or {}),
            },
        )

    def stats(self) -> dict[str, int]:
        """Envoy's counters, by name."""
        status, text = http_get(f"http://127.0.0.1:{self.admin_port}/stats?format=json", timeout=2)
        assert status == 200, text
        return {s["name"]: s.get("value", 0) for s in json.loads(text)["stats"] if "value" in s}

    def module_counts(self) -> dict[str, int]:
        """The module's own counters (`keygate_module_…`), by name with their labels as
        Envoy writes them (`keygate_module_denied.code.invalid_api_key`), without the
        metrics namespace in front."""
        return {name[name.index("keygate_module_"):]: value for name, value in self.stats().items()
                if "keygate_module_" in name}

    def checks(self) -> int:
        """Requests ext_authz asked keygate about (whatever the answer). One the module
        decided never reaches ext_authz's check: its allows count as `disabled`, its
        denials not at all."""
        stats = self.stats()
        return sum(
            stats.get(f"http.ingress_http.ext_authz.{name}", 0)
            for name in ("ok", "denied", "error", "failure_mode_allowed")
        )


# --------------------------------------------------------------------------- nginx

EXAMPLE_NGINX = EXAMPLES / "nginx" / "nginx.conf"
# The three addresses examples/nginx/nginx.conf is written for: itself, keygate's HTTP
# authorization listener, the upstream.
EXAMPLE_NGINX_ADDRESSES = ("127.0.0.1:10080", f"127.0.0.1:{EXAMPLE_HTTP_AUTHZ_PORT}", "127.0.0.1:8080")


class Nginx(Envoy):
    """nginx running examples/nginx/nginx.conf (auth_request) in front of keygate's HTTP
    authorization listener and `upstream`; requests go through it as through `Envoy`."""

    def __init__(self, name: str, workdir: Path, http_authz_port: int, upstream: Upstream):
        self.name = name
        self.upstream = upstream
        self.port = free_port()
        prefix = workdir / name
        prefix.mkdir(parents=True, exist_ok=True)
        text = EXAMPLE_NGINX.read_text()
        for old, new in zip(EXAMPLE_NGINX_ADDRESSES, (self.port, http_authz_port, upstream.port)):
            # Only the `listen` and `server` lines: the comments name the addresses too.
            pattern = rf"(?m)^(\s*(?:listen|server) ){re.escape(old)};"
            text, count = re.subn(pattern, rf"\g<1>127.0.0.1:{new};", text)
            if count != 1:
                raise AssertionError(f"examples/nginx/nginx.conf should listen on or name {old} once, found {count}")
        self.config_path = prefix / "nginx.conf"
        self.config_path.write_text(text)
        self.proc = Proc(
            name,
            [nginx_bin(), "-p", str(prefix), "-c", str(self.config_path), "-e", "stderr",
             "-g", "daemon off; pid nginx.pid;"],
            clean_env(),
            workdir,
        )
        wait_for(f"{name} listener on port {self.port} to answer HTTP", self._listener_answers)


# --------------------------------------------------------------------------- tokens

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CHECKSUM_LEN = 6


def token_checksum(body: str) -> str:
    """The checksum keygate appends to `<prefix>_<env>_<key_id>_<secret>`: CRC-32 of it,
    as six base62 digits (src/apikey/token.rs)."""
    n = zlib.crc32(body.encode())
    out = []
    for _ in range(CHECKSUM_LEN):
        out.append(BASE62[n % 62])
        n //= 62
    return "".join(reversed(out))


def token_parts(token: str) -> tuple[str, str]:
    """(`<prefix>_<env>_<key_id>`, `<secret><checksum>`) of a token."""
    public, _, tail = token.rpartition("_")
    return public, tail


def with_wrong_secret(token: str) -> str:
    """The same key id with another secret, and a checksum that is right for it: a token
    that passes every shape check and fails only at argon2."""
    body = token[:-CHECKSUM_LEN]
    assert token_checksum(body) == token[-CHECKSUM_LEN:], (
        "the token checksum is no longer CRC-32/base62 of the body; update token_checksum()"
        " so wrong-secret tokens still reach the secret check"
    )
    public, tail = token_parts(body)
    secret = tail
    wrong = "".join(secrets.choice(BASE62) for _ in secret)
    forged = f"{public}_{wrong}"
    return forged + token_checksum(forged)


def with_bad_checksum(token: str) -> str:
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


# --------------------------------------------------------------------------- stack

class Stack:
    """keygate (on the shared Redis) with an Envoy in front of it and the shared upstream
    behind it."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        redis: Redis,
        upstream: Upstream,
        keygate_env=None,
        edit_envoy_config=None,
        example: str | None = None,
    ):
        """`edit_envoy_config`: a function from examples/envoy.yaml's text (ports already
        moved) to the text Envoy runs. `example`: run `examples/<example>/`'s keygate.yaml
        and envoy.yaml as shipped (ports moved) instead of the test configuration."""
        self.upstream = upstream
        config = example_keygate_config(example) if example else keygate_config
        template = EXAMPLES / example / "envoy.yaml" if example else EXAMPLE_ENVOY
        self.keygate = Keygate(f"{name}-keygate", workdir, redis, keygate_env, config)
        try:
            self.envoy = Envoy(
                f"{name}-envoy",
                workdir,
                self.keygate.grpc_port,
                upstream,
                edit_envoy_config,
                template,
            )
        except BaseException:
            self.keygate.stop()
            raise

    def request(self, method: str, path: str, headers=(), body: bytes | None = None) -> Response:
        return self.envoy.request(method, path, headers, body)

    def stop(self):
        self.envoy.stop()
        self.keygate.stop()


# --------------------------------------------------------------------------- assertions

def assert_allowed(resp: Response):
    assert resp.status == 200, f"expected the request to pass:\n{resp}"
    assert len(resp.upstream) == 1, f"the upstream should have seen it once:\n{resp}"


def assert_denied(resp: Response, status: int, code: str):
    """keygate's denial, as the client sees it through Envoy, and the upstream untouched."""
    assert resp.status == status, f"expected {status} {code}:\n{resp}"
    assert resp.upstream == [], f"a denied request reached the upstream:\n{resp}"
    content_type = resp.header("content-type") or ""
    assert content_type.split(";")[0].strip() == "application/json", f"content-type:\n{resp}"
    error = resp.json().get("error")
    assert isinstance(error, dict), f"body has no error object:\n{resp}"
    assert error.get("code") == code, f"expected code {code}:\n{resp}"
    assert isinstance(error.get("message"), str) and error["message"], f"no message:\n{resp}"
    if status == 401:
        challenge = resp.header("www-authenticate") or ""
        assert challenge.split(" ")[0] == "Bearer", f"401 without www-authenticate: Bearer:\n{resp}"


# --------------------------------------------------------------------------- ext_authz

def check_request(method: str, path: str, headers: dict[str, str]):
    """A CheckRequest shaped like the ones Envoy 1.40 sends."""
    all_headers = {
        ":authority": "api.example.test",
        ":method": method,
        ":path": path,
        ":scheme": "http",
        "x-request-id": "e2e-direct-check",
        **headers,
    }
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        id="1234567890",
        method=method,
        path=path,
        host="api.example.test",
        scheme="http",
        protocol="HTTP/1.1",
        headers=all_headers,
    )
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )
