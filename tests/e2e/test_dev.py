"""`keygate serve --dev`: zero setup. Memory store, built-in sample policy, generated
secrets, and a dev.json through which the CLI finds the server by itself."""

import json
import uuid

from harness import Proc, clean_env, free_port, http_get, keygate_bin, run_cli, wait_for


def test_dev_server_is_found_by_the_cli_and_allows_a_sample_route(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    grpc, admin, http = free_port(), free_port(), free_port()
    proc = Proc(
        "dev-keygate",
        [keygate_bin(), "serve", "--dev"],
        clean_env(
            KEYGATE_STATE_DIR=str(state),
            KEYGATE_LISTEN__GRPC=f"127.0.0.1:{grpc}",
            KEYGATE_LISTEN__ADMIN=f"127.0.0.1:{admin}",
            KEYGATE_LISTEN__HTTP=f"127.0.0.1:{http}",
        ),
        tmp_path,
    )
    try:
        def ready():
            proc.ensure_alive()
            return http_get(f"http://127.0.0.1:{http}/readyz", timeout=1)[0] == 200

        wait_for("keygate --dev to be ready", ready)
        dev = wait_for("dev.json", lambda: json.loads((state / "dev.json").read_text()))
        assert dev["admin_url"].endswith(f":{admin}"), dev
        assert dev["grpc_url"].endswith(f":{grpc}"), dev
        assert dev["admin_token"], dev

        # No admin URL, token or server URL given: all of it comes from dev.json.
        env = clean_env(KEYGATE_STATE_DIR=str(state))
        created = run_cli(
            ["keys", "create", "--tenant", str(uuid.uuid4()), "--scopes", "contacts:read", "--json"],
            env,
        )
        assert created.code == 0, str(created)
        token = created.json()["token"]

        allowed = run_cli(
            ["check", "--token", token, "--method", "GET", "--path", "/v1/contacts/1", "--json"], env
        )
        assert allowed.code == 0, str(allowed)
        assert allowed.json()["allowed"] is True, str(allowed)

        denied = run_cli(
            ["check", "--token", token, "--method", "DELETE", "--path", "/v1/contacts/1", "--json"], env
        )
        assert denied.code == 3, str(denied)
        assert denied.json()["allowed"] is False, str(denied)
    finally:
        proc.stop()
