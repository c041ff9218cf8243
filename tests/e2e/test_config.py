"""Starting keygate: a bad configuration or a missing secret stops it at once with a
message naming what is wrong (and never echoing a secret); `serve --check` refuses
exactly what `serve` refuses, with the same message, without a store or a port; a good
one serves the operational HTTP endpoints."""

import secrets
import socket
import subprocess

import pytest

from harness import clean_env, free_port, http_get, keygate_bin, keygate_config
from test_tls import make_ca, make_cert

GOOD_PEPPER = secrets.token_urlsafe(48)


def start_and_expect_failure(tmp_path, config_text: str, *args: str, **env) -> str:
    path = tmp_path / "keygate.yaml"
    path.write_text(config_text)
    base = {"KEYGATE_PEPPER": GOOD_PEPPER, "KEYGATE_ADMIN_TOKEN": secrets.token_urlsafe(32)}
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    try:
        done = subprocess.run(
            [keygate_bin(), "serve", "--config", str(path), *args],
            env=clean_env(**base),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("keygate kept running with a configuration it should have refused")
    output = done.stdout + done.stderr
    assert done.returncode != 0, f"keygate accepted the configuration:\n{output}"
    return output


@pytest.fixture
def config(redis):
    return keygate_config(free_port(), free_port(), free_port(), redis.url)


def test_unknown_field_is_an_error_naming_it(tmp_path, config):
    output = start_and_expect_failure(tmp_path, config.replace("cache:", "cahce_ttl: 5s\ncache:", 1))
    assert "cahce_ttl" in output, output


def test_bad_route_path_is_an_error_naming_the_route(tmp_path, config):
    broken = config.replace('path: "/v1/contacts/**", scope: "contacts:read"',
                            'path: "/v1/**/contacts", scope: "contacts:read"')
    assert broken != config
    output = start_and_expect_failure(tmp_path, broken)
    assert "policy.routes[1].path" in output, output


def test_env_override_is_validated_like_the_file(tmp_path, config):
    output = start_and_expect_failure(tmp_path, config, KEYGATE_LISTEN__GRPC="not-an-address")
    assert "listen.grpc" in output or "KEYGATE_LISTEN__GRPC" in output, output


def test_short_pepper_is_refused_without_being_echoed(tmp_path, config):
    pepper = "short-pepper-" + secrets.token_hex(4)
    output = start_and_expect_failure(tmp_path, config, KEYGATE_PEPPER=pepper)
    assert "KEYGATE_PEPPER" in output, output
    assert pepper not in output, output


def test_missing_admin_token_is_refused(tmp_path, config):
    output = start_and_expect_failure(tmp_path, config, KEYGATE_ADMIN_TOKEN=None)
    assert "KEYGATE_ADMIN_TOKEN" in output, output


def the_error(output: str) -> str:
    """The one line keygate stops with (log lines aside)."""
    (line,) = [l for l in output.splitlines() if l.startswith("keygate: ")]
    return line


ISSUER = "{name: corp, issuer: https://issuer.test, audiences: [api]"

# What serve refuses before it binds a port or reaches its store: (environment, given the
# test's directory, and the field the refusal names).
REFUSED = {
    "missing-pepper": (lambda d: {"KEYGATE_PEPPER": None}, "KEYGATE_PEPPER"),
    "missing-admin-token": (lambda d: {"KEYGATE_ADMIN_TOKEN": None}, "KEYGATE_ADMIN_TOKEN"),
    "missing-watch-token": (
        lambda d: {"KEYGATE_REVOCATION__SOURCE": "watch", "KEYGATE_REVOCATION__WATCH_URL": "http://127.0.0.1:1"},
        "KEYGATE_WATCH_TOKEN",
    ),
    "missing-hs256-secret": (
        lambda d: {"KEYGATE_JWT__ISSUERS": f"[{ISSUER}, algorithms: [HS256], secret_env: KEYGATE_E2E_UNSET_SECRET}}]"},
        "KEYGATE_E2E_UNSET_SECRET",
    ),
    "unreadable-jwks-file": (
        lambda d: {"KEYGATE_JWT__ISSUERS": f"[{ISSUER}, algorithms: [RS256], jwks_file: {d}/absent.json}}]"},
        "jwt.issuers[0].jwks_file",
    ),
    "missing-session-key": (
        lambda d: {"KEYGATE_SESSIONS__SIGNING_KEYS": "[{kid: k1, key_env: KEYGATE_E2E_UNSET_SESSION_KEY}]"},
        "sessions.signing_keys[0].key_env",
    ),
    "missing-tls-certificate": (
        lambda d: {"KEYGATE_LISTEN__GRPC_TLS": f"{{cert_file: {d}/absent.pem, key_file: {d}/absent.key}}"},
        "listen.grpc_tls.cert_file",
    ),
    "client-ca-not-a-certificate": (
        lambda d: {"KEYGATE_LISTEN__ADMIN_TLS":
                   f"{{cert_file: {d}/server.pem, key_file: {d}/server.key, client_ca_file: {d}/server.key}}"},
        "listen.admin_tls.client_ca_file",
    ),
    "bad-route": (lambda d: {"KEYGATE_POLICY__ROUTES": "[{name: r, path: /v1/**/x, public: true}]"},
                  "policy.routes[0].path"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_check_refuses_what_serve_refuses_with_the_same_message(tmp_path, config, case):
    make_ca(tmp_path, "ca")
    make_cert(tmp_path, "server", "ca", server=True)
    env, field = REFUSED[case]
    served = the_error(start_and_expect_failure(tmp_path, config, **env(tmp_path)))
    checked = the_error(start_and_expect_failure(tmp_path, config, "--check", **env(tmp_path)))
    assert field in served, served
    assert checked == served


def test_check_accepts_a_good_configuration_without_its_store_or_its_ports(tmp_path):
    # Nothing answers on the store's port, and the gRPC port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = keygate_config(taken.getsockname()[1], free_port(), free_port(), f"redis://127.0.0.1:{free_port()}")
        path = tmp_path / "keygate.yaml"
        path.write_text(config)
        done = subprocess.run(
            [keygate_bin(), "serve", "--config", str(path), "--check"],
            env=clean_env(KEYGATE_PEPPER=GOOD_PEPPER, KEYGATE_ADMIN_TOKEN=secrets.token_urlsafe(32)),
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
    assert done.returncode == 0 and done.stdout.strip() == "configuration ok", done.stdout + done.stderr


def test_health_and_metrics_endpoints(keygate):
    assert http_get(keygate.http_url + "/healthz")[0] == 200
    assert http_get(keygate.http_url + "/readyz")[0] == 200
    status, body = http_get(keygate.http_url + "/metrics")
    assert status == 200
    assert "# TYPE" in body, body[:500]


def test_check_against_the_running_file_names_what_needs_a_restart(tmp_path, config):
    running = tmp_path / "running.yaml"
    running.write_text(config)
    env = clean_env(KEYGATE_PEPPER=GOOD_PEPPER, KEYGATE_ADMIN_TOKEN=secrets.token_urlsafe(32))

    def check(text: str) -> subprocess.CompletedProcess:
        path = tmp_path / "next.yaml"
        path.write_text(text)
        return subprocess.run(
            [keygate_bin(), "serve", "--config", str(path), "--check", "--against", str(running)],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )

    live = check(config.replace("unmatched: deny", "unmatched: authenticated"))
    assert live.returncode == 0 and "takes it live" in live.stdout, live.stdout + live.stderr
    restart = check(config.replace("ttl: 60s", "ttl: 30s"))
    assert restart.returncode != 0 and "cache needs a restart" in restart.stderr, restart.stdout + restart.stderr
