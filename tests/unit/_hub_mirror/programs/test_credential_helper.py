"""The credential helper registry 3.x runs for proxy.exec, on its own, as the registry
runs it: a program with `get`, the host on stdin, the file named by the environment."""

import json
import os
import subprocess
import sys

from tests.support.modules import program

HELPER = program("credential_helper")


def run_helper(args, stdin, credentials=None):
    env = {k: v for k, v in os.environ.items() if k != "HUB_MIRROR_CREDENTIALS"}
    if credentials is not None:
        env["HUB_MIRROR_CREDENTIALS"] = str(credentials)
    return subprocess.run(
        [sys.executable, str(HELPER), *args], input=stdin, capture_output=True, text=True, env=env, timeout=30
    )


def test_get_prints_the_credential_for_a_host_of_the_site(tmp_path):
    creds = tmp_path / "m.credentials.json"
    creds.write_text(json.dumps({"Username": "bot", "Secret": "dckr_pat_x", "Site": "docker.io"}))
    for host in ("auth.docker.io", "docker.io", "auth.docker.io:443"):
        proc = run_helper(["get"], f"{host}\n", creds)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"ServerURL": host, "Username": "bot", "Secret": "dckr_pat_x"}


def test_a_realm_of_another_site_gets_nothing(tmp_path):
    """3.x asks for whatever realm the upstream names: the token stays with its site."""
    creds = tmp_path / "m.credentials.json"
    creds.write_text(json.dumps({"Username": "bot", "Secret": "dckr_pat_x", "Site": "docker.io"}))
    for host in ("evil.example", "docker.io.evil.example", "notdocker.io", "", "[::1]:5000", "auth.docker.io@evil"):
        proc = run_helper(["get"], host, creds)
        assert proc.returncode == 1, host
        assert "dckr_pat_x" not in proc.stdout + proc.stderr
    creds.write_text(json.dumps({"Username": "bot", "Secret": "dckr_pat_x"}))  # no site: no answer
    assert run_helper(["get"], "auth.docker.io", creds).returncode == 1
    creds.write_text(json.dumps({"Username": "bot", "Secret": "dckr_pat_x", "Site": "127.0.0.1"}))
    assert run_helper(["get"], "127.0.0.1:5000", creds).returncode == 0
    assert run_helper(["get"], "127.0.0.2:5000", creds).returncode == 1


def test_a_rotated_file_is_read_on_the_next_get(tmp_path):
    creds = tmp_path / "m.credentials.json"
    creds.write_text(json.dumps({"Username": "bot", "Secret": "old", "Site": "h"}))
    assert json.loads(run_helper(["get"], "h", creds).stdout)["Secret"] == "old"
    creds.write_text(json.dumps({"Username": "bot", "Secret": "new", "Site": "h"}))
    assert json.loads(run_helper(["get"], "h", creds).stdout)["Secret"] == "new"


def test_missing_or_half_credentials_answer_not_found(tmp_path):
    for credentials in (None, tmp_path / "absent.json"):
        proc = run_helper(["get"], "h", credentials)
        assert proc.returncode == 1
        assert proc.stdout.strip() == "credentials not found in native keychain"
    for half in ({"Username": "bot", "Secret": ""}, {"Username": "", "Secret": "s"}, {"Username": 1, "Secret": "s"}):
        creds = tmp_path / "half.json"
        creds.write_text(json.dumps(half))
        assert run_helper(["get"], "h", creds).returncode == 1, half


def test_an_anonymous_mirror_gets_empty_credentials(tmp_path):
    """Registry 3.x then logs in anonymously: exec without a token keeps it from
    pinging the upstream at start (docs/facts.md)."""
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"Username": "", "Secret": ""}))
    proc = run_helper(["get"], "auth.docker.io", empty)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"ServerURL": "auth.docker.io", "Username": "", "Secret": ""}


def test_store_erase_list_are_refused(tmp_path):
    for verb in ("store", "erase", "list"):
        proc = run_helper([verb], "{}")
        assert proc.returncode == 1
        assert "only 'get'" in proc.stderr
