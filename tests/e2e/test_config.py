"""Starting keygate: a bad configuration or a missing secret stops it at once with a
message naming what is wrong (and never echoing a secret); a good one serves the
operational HTTP endpoints."""

import secrets
import subprocess

import pytest

from harness import clean_env, free_port, http_get, keygate_bin, keygate_config

GOOD_PEPPER = secrets.token_urlsafe(48)


def start_and_expect_failure(tmp_path, config_text: str, **env) -> str:
    path = tmp_path / "keygate.yaml"
    path.write_text(config_text)
    base = {"KEYGATE_PEPPER": GOOD_PEPPER, "KEYGATE_ADMIN_TOKEN": secrets.token_urlsafe(32)}
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    try:
        done = subprocess.run(
            [keygate_bin(), "serve", "--config", str(path)],
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


def test_health_and_metrics_endpoints(keygate):
    assert http_get(keygate.http_url + "/healthz")[0] == 200
    assert http_get(keygate.http_url + "/readyz")[0] == 200
    status, body = http_get(keygate.http_url + "/metrics")
    assert status == 200
    assert "# TYPE" in body, body[:500]
