"""What a careful attacker and a careless operator do to a host, applied with masterless
`salt-call --local` and the init-script supervisor: hub_mirror owns only what is its own,
cannot leave a registry serving unsupervised, is green only when it serves, overwrites
local edits, and keeps every secret of an install URL out of output and records.

(Bad values that validation refuses are in test_bad_input.py; the same faults under
systemd are in tests/system/test_mirror_on_systemd.py.)"""

import json
import os
import pwd
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port
from tests.support.processes import alive, cmdline, parent_pid, registry_pids, wait_for
from tests.support.release import archive_pillar
from tests.support.saltcall import unique_name

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]

SERVICE_USER = "hub-mirror"


class Mirror:
    """One mirror of a masterless minion, and where its parts live."""

    def __init__(self, minion, release_server, hub, name, **settings):
        self.minion, self.release_server, self.hub, self.name = minion, release_server, hub, name
        self.port = free_port()
        self.settings = hub.mirror_pillar(self.port, **settings)
        lookup = minion.lookup
        self.config = Path(lookup["config_dir"]) / f"{name}.yml"
        self.storage = Path(self.settings.get("storage") or Path(lookup["state_dir"]) / name)
        self.binary = Path(lookup["prefix"]) / "bin" / "registry"

    def pillar(self, **changes):
        return archive_pillar(
            self.release_server,
            {self.name: {**self.settings, **changes}},
            probe_timeout=20,
            lookup={"supervisor": "sysv"},
        )

    def apply(self, **changes):
        self.minion.set_pillar(self.pillar(**changes))
        return self.minion.apply()

    def state(self, result, function):
        (ret,) = [ret for sid, ret in result.states.items() if sid.endswith(f"-{self.name}-{function}")]
        return ret

    def serves(self):
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/v2/", timeout=2).status_code in (200, 401)
        except requests.RequestException:
            return False

    def pull(self, dest, repo="library/alpine"):
        return oci.pull(f"127.0.0.1:{self.port}", repo, "latest", str(dest))

    def status(self):
        return self.minion.run("hub_mirror.status", f"mirror={self.name}").data[self.name]

    def start_unsupervised(self):
        """A registry serving this mirror's config with no supervisor of ours above it: what a
        supervisor killed under an older hub_mirror (without PR_SET_PDEATHSIG) left behind."""
        account = pwd.getpwnam(SERVICE_USER)
        orphan = subprocess.Popen(  # pylint: disable=consider-using-with
            [str(self.binary), "serve", str(self.config)],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.serves, 30, "the unsupervised registry to serve")
        return orphan


@pytest.fixture
def mirror(masterless, release_server, clean_hub, mirror_name):
    return Mirror(masterless, release_server, clean_hub, mirror_name)


def applied(result):
    assert result.returncode == 0, result
    return result


def test_a_killed_supervisor_takes_its_registry_along_and_an_apply_heals(mirror, tmp_path):
    applied(mirror.apply())
    (registry,) = registry_pids(mirror.config)
    supervisor = parent_pid(registry)
    assert any(arg.endswith("hub-mirror-supervise") for arg in cmdline(supervisor))

    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not alive(registry), 15, "the registry to die with its supervisor")
    status = mirror.status()
    assert (status["running"], status["serving"]) == (False, False), status

    again = applied(mirror.apply())
    assert mirror.state(again, "running")["changes"].get("started") is True
    (new,) = registry_pids(mirror.config)
    assert any(arg.endswith("hub-mirror-supervise") for arg in cmdline(parent_pid(new)))
    assert mirror.pull(tmp_path / "healed")


def test_a_registry_serving_without_its_supervisor_is_stopped_and_healed(mirror, tmp_path):
    # What older versions left: a registry on the listen address itself (no front).
    mirror.settings["front"] = "none"
    applied(mirror.apply())
    assert mirror.minion.run("hub_mirror.stop", f"mirror={mirror.name}").data is True

    orphan = mirror.start_unsupervised()
    status = mirror.status()
    assert status["running"] is False and status["serving"] is True
    assert "serves without its supervisor" in status["comment"], status
    # stop stops what serves, not only what the service manager knows of.
    assert mirror.minion.run("hub_mirror.stop", f"mirror={mirror.name}").data is True
    assert orphan.wait(timeout=30) is not None
    assert not mirror.serves()

    orphan = mirror.start_unsupervised()
    healed = applied(mirror.apply())
    running = mirror.state(healed, "running")
    assert "unsupervised" in running["changes"] and running["changes"].get("started") is True, running
    assert orphan.wait(timeout=30) is not None
    (registry,) = registry_pids(mirror.config)
    assert any(arg.endswith("hub-mirror-supervise") for arg in cmdline(parent_pid(registry)))
    assert mirror.pull(tmp_path / "after-heal")

    # clean stops an unsupervised registry too, and proves the port closed.
    assert mirror.minion.run("hub_mirror.stop", f"mirror={mirror.name}").data is True
    orphan = mirror.start_unsupervised()
    removed = mirror.minion.run("hub_mirror.remove", f"mirror={mirror.name}")
    assert removed.returncode == 0 and removed.data["changes"].get("stopped") is True, removed
    assert orphan.wait(timeout=30) is not None
    assert not mirror.serves()


def test_storage_taken_from_the_service_user_is_handed_back(mirror, tmp_path):
    applied(mirror.apply())
    # What a restore from backup, or a chown -R by hand, leaves behind.
    os.chown(mirror.storage, 0, 0)
    os.chmod(mirror.storage, 0o700)
    again = applied(mirror.apply())
    assert "storage" in mirror.state(again, "configured")["changes"], again
    info = mirror.storage.stat()
    assert info.st_uid == pwd.getpwnam(SERVICE_USER).pw_uid and info.st_mode & 0o700 == 0o700
    assert mirror.pull(tmp_path / "written", repo="library/busybox")
    assert applied(mirror.apply()).changes == {}


def test_a_directory_of_someone_elses_is_not_taken_over(mirror):
    foreign = mirror.minion.root / "srv-data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not a cache\n")
    result = mirror.apply(storage=str(foreign))
    assert result.returncode != 0, result
    assert f"hub_mirror:mirrors:{mirror.name}:storage" in result.output
    assert "will not take over a directory it did not create" in result.output
    assert (foreign / "precious.txt").read_text() == "not a cache\n"
    assert foreign.stat().st_uid == 0 and sorted(os.listdir(foreign)) == ["precious.txt"]


def test_an_existing_login_account_is_never_taken_over(mirror):
    login = unique_name("hml")
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--comment", "A person", login], check=True)
    try:
        before = pwd.getpwnam(login)
        mirror.minion.set_pillar({**mirror.pillar(), "lookup": {"supervisor": "sysv", "user": login}})
        result = mirror.minion.apply()
        assert result.returncode != 0, result
        assert "hub_mirror:lookup:user" in result.output and "existing login account" in result.output
        assert pwd.getpwnam(login) == before
    finally:
        subprocess.run(["userdel", "--remove", login], check=False, capture_output=True)


def test_a_token_pasted_as_a_block_scalar_logs_in(mirror, tmp_path):
    pillar = mirror.pillar()
    pillar["mirrors"][mirror.name]["token"] = HUB_TOKEN + "\n"  # what `token: |` gives
    mirror.minion.set_pillar(pillar)
    applied(mirror.minion.apply())
    assert mirror.pull(tmp_path / "pulled")
    logins = [req for req in mirror.hub.token_requests if not req["anonymous"]]
    assert logins and all(req["password_ok"] for req in logins), logins


def test_a_refused_token_changes_nothing(mirror):
    applied(mirror.apply())
    # The token lives in the config (2.8) or in the credentials file beside it (3.x).
    files = [mirror.config, mirror.config.with_name(f"{mirror.name}.credentials.json")]
    before = {path: path.read_bytes() if path.exists() else None for path in files}
    assert HUB_TOKEN.encode() in b"".join(data for data in before.values() if data)
    pids = registry_pids(mirror.config)
    result = mirror.apply(token="dckr_pat_WRONG0000000000000000")
    assert result.returncode != 0, result
    assert f"hub_mirror:mirrors:{mirror.name}:token" in result.output and "refuses the credential" in result.output
    assert "dckr_pat_WRONG" not in result.output and HUB_TOKEN not in result.output
    assert {path: path.read_bytes() if path.exists() else None for path in files} == before
    assert registry_pids(mirror.config) == pids


def test_an_upstream_that_does_not_answer_is_a_warning_not_a_silent_green(mirror):
    dead = free_port()
    result = applied(mirror.apply(upstream=f"http://127.0.0.1:{dead}"))
    warnings = mirror.state(result, "configured").get("warnings", [])
    assert any(f"127.0.0.1:{dead} does not answer" in warning for warning in warnings), result
    assert mirror.serves()  # the cache, read-only


def test_local_edits_of_the_config_are_overwritten(mirror, tmp_path):
    applied(mirror.apply())
    rendered = mirror.config.read_bytes()
    for edit in (b"- a\n- list\n", b"version: [unclosed\n", b"", b"\xff\xfe not utf-8"):
        mirror.config.write_bytes(edit)
        again = applied(mirror.minion.apply())
        assert "config" in mirror.state(again, "configured")["changes"]
        assert mirror.config.read_bytes() == rendered
    assert mirror.pull(tmp_path / "pulled")


def test_widening_the_listen_address_keeps_our_own_port(mirror, tmp_path):
    applied(mirror.apply())
    (before,) = registry_pids(mirror.config)
    widened = applied(mirror.apply(listen=f"0.0.0.0:{mirror.port}"))
    assert mirror.state(widened, "running")["changes"].get("restarted") is True
    (after,) = registry_pids(mirror.config)
    assert after != before
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    # The front (nginx, the registry's sibling under the supervisor) holds the address.
    front = [line for line in out.splitlines() if f"0.0.0.0:{mirror.port} " in line]
    assert front and all('"nginx"' in line for line in front), out
    assert mirror.pull(tmp_path / "pulled")
    # Another process on the port is still refused.
    applied(mirror.minion.run("hub_mirror.stop", f"mirror={mirror.name}"))
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the pull's TIME_WAITs
        holder.bind(("127.0.0.1", mirror.port))
        holder.listen()
        result = mirror.apply()
    assert result.returncode != 0 and "is already in use by another process" in result.output


def test_only_configs_hub_mirror_wrote_are_orphans(mirror):
    applied(mirror.apply())
    config_dir = mirror.config.parent
    ours = mirror.config.read_text()
    keep = {
        "notes.yml": "remember: the milk\n",
        "dockerhub-backup.yml": ours,  # a copy of ours, under a name that is not a mirror's
        "config.yml": "version: 0.1\nhttp:\n  addr: :5000\n",  # a package's own config
    }
    for name, text in keep.items():
        (config_dir / name).write_text(text)
    (config_dir / "gone.yml").write_text(ours.replace(f"mirror {mirror.name})", "mirror gone)", 1))
    assert mirror.minion.run("hub_mirror.orphans").data == ["gone"]
    applied(mirror.minion.apply())
    for name, text in keep.items():
        assert (config_dir / name).read_text() == text
    assert not (config_dir / "gone.yml").exists()


def test_a_purge_deletes_only_what_the_registry_wrote(mirror, tmp_path):
    applied(mirror.apply())
    assert mirror.pull(tmp_path / "pulled")
    (mirror.storage / "keep.txt").write_text("the operator's\n")
    purged = mirror.minion.run("hub_mirror.remove", f"mirror={mirror.name}", "purge_storage=True")
    assert purged.returncode == 0 and purged.data["changes"].get(str(mirror.storage)) == "purged", purged
    assert sorted(os.listdir(mirror.storage)) == ["keep.txt"]

    (mirror.storage / "keep.txt").unlink()
    applied(mirror.apply())
    assert mirror.pull(tmp_path / "again")
    (mirror.storage / ".hub-mirror-cache").unlink()  # no longer provably ours
    kept = mirror.minion.run("hub_mirror.remove", f"mirror={mirror.name}", "purge_storage=True")
    assert kept.returncode == 0 and "not marked as a hub_mirror cache" in kept.data["comment"], kept
    assert (mirror.storage / "docker" / "registry" / "v2").is_dir()


def test_secrets_in_install_urls_stay_out_of_output_and_records(mirror):
    secret = "s3cr3tInstallT0ken"
    template = mirror.release_server.template
    pillar = mirror.pillar()
    pillar["install"] = {
        "method": "archive",
        "source": template.replace("://", f"://deploy:{secret}@") + f"?private_token={secret}",
        "source_hash": template + f".sha256?private_token={secret}",
    }
    mirror.minion.set_pillar(pillar)
    result = applied(mirror.minion.apply())
    assert secret not in result.output
    record = Path(mirror.minion.lookup["prefix"]) / "install.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600 and secret not in record.read_text()
    assert json.loads(record.read_text())["source"].startswith("http://<redacted>@127.0.0.1:")
    settings = mirror.minion.run("hub_mirror.settings")
    assert secret not in settings.output

    pillar["install"]["source"] = pillar["install"]["source"].replace("/v{version}/", "/gone/v{version}/")
    pillar["install"]["source_hash"] = "0" * 64
    pillar["version"] = "2.8.3"
    mirror.minion.set_pillar(pillar)
    failed = mirror.minion.apply()
    assert failed.returncode != 0 and "downloading http://<redacted>@127.0.0.1:" in failed.output, failed
    assert secret not in failed.output
    for path in Path(mirror.minion.root).rglob("*"):
        if path.is_relative_to(mirror.minion.pillar_dir):
            continue  # the pillar itself, as the test wrote it
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o004:
            assert secret.encode() not in path.read_bytes(), f"{path} is world-readable and holds the secret"
