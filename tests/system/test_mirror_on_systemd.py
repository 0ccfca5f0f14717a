"""hub_mirror on a real systemd host, managed from a salt-master.

One Debian 12 test host (systemd as PID 1, under systemd-nspawn) runs a salt-minion of a
salt-master; both, the Docker Hub stand-in and the release server share the run's network
namespace. The extension reaches the host by ``saltutil.sync_all`` and the pillar comes
from the master, as users ship it. The tests run in order on that one host: apply and
serve, crash recovery, hardening, token rotation, reboot, upstream down at boot.

Figures (printed, not asserted): restart time after ``kill -9``, the ``systemd-analyze
security`` exposure of the unit and of a root unit, boot-to-serving time with the
upstream down.
"""

import re
import subprocess
import time
import uuid

import pytest

from tests.support.hub import HUB_TOKEN
from tests.support.nspawn import TestHost, ensure_root, wait_until
from tests.support.release import CREDENTIAL_LIFETIME_S, archive_pillar
from tests.support.sysmaster import start_minion
from tests.system.conftest import sha256, unblock, wait_serving

pytestmark = pytest.mark.system

MIRROR = "dockerhub"
UNIT = f"hub-mirror-{MIRROR}.service"
NEW_TOKEN = "dckr_pat_ROTATED9876543210zyxwvu"
REGISTRY = "/opt/hub-mirror/bin/registry"
CONFIG = f"/etc/hub-mirror/{MIRROR}.yml"
STORAGE = f"/var/lib/hub-mirror/{MIRROR}"
# The unit's RestartSec.
RESTART_SEC = 2
# Files (besides the journal) a token could end up in.
SECRET_SCAN_DIRS = ("/etc", "/var", "/opt", "/run", "/tmp", "/root", "/srv", "/home")


class Site:
    """The host under test and what the tests share about it."""

    def __init__(self, net, hub, releases, master, host, port):
        self.net, self.hub, self.releases, self.master, self.host = net, hub, releases, master, host
        self.hostport = f"127.0.0.1:{port}"
        self.url = f"http://{self.hostport}/v2/"
        self.token = HUB_TOKEN

    def pillar(self, token):
        return archive_pillar(self.releases, {MIRROR: self.hub.mirror_pillar(self.hostport, token=token)})

    def salt(self, *args, **kwargs):
        return self.master.salt(self.host.name, *args, **kwargs)

    def apply(self):
        return self.salt("state.apply", "hub_mirror")

    def pull(self, repo, ref, tmp_path):
        return self.net.pull(self.hostport, repo, ref, tmp_path / f"pull-{uuid.uuid4().hex[:6]}")

    def show(self, *props):
        out = self.host.run(["systemctl", "show", UNIT, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal_count(self, text):
        out = self.host.run(["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]).stdout
        return out.count(text)

    def registry_pid(self, supervisor_pid):
        return int(self.host.sh(f"pgrep -P {supervisor_pid} -x registry"))

    def blobs(self):
        return sorted(p.parent.name for p in self.host.path(STORAGE).glob(
            "docker/registry/v2/blobs/sha256/*/*/data"))


@pytest.fixture(scope="module")
def site(sysnet, sys_hub, sys_releases, sys_master):
    host = TestHost(ensure_root("amd64"), network=sysnet.path, name=f"hmsys-{uuid.uuid4().hex[:6]}")
    host.start(timeout=90)
    try:
        seconds = start_minion(host, sys_master)
        print(f"\n[system] {host.name} booted in {host.boot_seconds:.1f}s; minion answers "
              f"after {seconds:.1f}s")
        site = Site(sysnet, sys_hub, sys_releases, sys_master, host, sysnet.free_port())
        sys_master.set_pillar(host.name, site.pillar(HUB_TOKEN))
        yield site
    finally:
        sys_hub.token = HUB_TOKEN
        unblock(sysnet, sys_hub)
        host.stop()


@pytest.fixture
def alpine(image_layout):
    """The digest of library/alpine:latest on the stand-in."""
    return image_layout[1]["single"]["manifest_digest"]


@pytest.fixture(scope="module")
def deployed(site):
    """``salt <host> saltutil.sync_all`` then ``salt <host> state.apply hub_mirror``."""
    synced = site.salt("saltutil.sync_all")
    assert synced.returncode == 0, synced
    assert "modules.hub_mirror" in synced.data["modules"], synced
    assert "states.hub_mirror" in synced.data["states"], synced
    first = site.apply()
    return site, first


def test_apply_runs_the_unit_enabled_and_serves_and_a_second_apply_changes_nothing(
        deployed, alpine, tmp_path):
    site, first = deployed
    assert first.returncode == 0 and first.all_true, first
    assert "hub_mirror-install-registry-installed" in first.changes, first
    assert first.changes[f"hub_mirror-service-{MIRROR}-running"]["started"] is True, first
    assert site.host.sh(f"systemctl is-active {UNIT}") == "active"
    assert site.host.sh(f"systemctl is-enabled {UNIT}") == "enabled"
    # systemd itself supervises it: the unit file is what hub_mirror wrote, no init script.
    assert site.show("FragmentPath")["FragmentPath"] == f"/etc/systemd/system/{UNIT}"
    assert not site.host.path(f"/etc/init.d/hub-mirror-{MIRROR}").exists()
    assert site.releases.assets["amd64"]["url_path"] in site.releases.requests

    assert site.pull("library/alpine", "latest", tmp_path) == alpine

    again = site.apply()
    assert again.returncode == 0 and again.all_true, again
    assert again.changes == {}, again


def test_kill_9_of_registry_and_of_supervisor_serves_again_with_the_cache(deployed, alpine, tmp_path):
    site, _ = deployed
    host = site.host
    assert site.pull("library/alpine", "latest", tmp_path) == alpine
    blobs = site.blobs()
    assert blobs, "nothing cached before the crash"
    before = site.show("MainPID", "NRestarts")
    supervisor = int(before["MainPID"])

    # The registry dies: the supervisor (the unit's main process) starts it again.
    registry = site.registry_pid(supervisor)
    t0 = time.monotonic()
    host.run(["kill", "-9", str(registry)])
    wait_until(lambda: not site.net.answers(site.url, 0.3), 10, "the killed registry to stop answering", 0.02)
    wait_serving(site.net, site.url, RESTART_SEC + 30)
    registry_restart = time.monotonic() - t0
    after = site.show("MainPID", "NRestarts")
    assert int(after["MainPID"]) == supervisor and after["NRestarts"] == before["NRestarts"]
    assert site.registry_pid(supervisor) != registry

    # The supervisor dies: systemd stops what is left of the unit and starts it again.
    t0 = time.monotonic()
    host.run(["kill", "-9", str(supervisor)])
    wait_until(lambda: not site.net.answers(site.url, 0.3), 10, "the unit to stop answering", 0.02)
    wait_serving(site.net, site.url, RESTART_SEC + 30)
    unit_restart = time.monotonic() - t0
    after = site.show("MainPID", "NRestarts", "ActiveState")
    assert after["ActiveState"] == "active"
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert int(after["MainPID"]) not in (0, supervisor)

    print(f"\n[system] kill -9 registry: serving again after {registry_restart:.2f}s "
          f"(supervisor restart); kill -9 supervisor: serving again after {unit_restart:.2f}s "
          f"(systemd Restart=always, RestartSec={RESTART_SEC})")

    # Nothing cached is lost, and a pull by digest needs nothing from upstream.
    assert site.blobs() == blobs
    site.hub.reset_counts()
    assert site.pull("library/alpine", alpine, tmp_path) == alpine
    assert site.hub.counts()["blob_get"] == 0


def test_storage_taken_away_and_a_config_edited_by_hand_are_put_back(deployed, tmp_path):
    """The init-script host's faults (tests/integration/test_hostile_pillar.py) under systemd:
    an apply hands the storage back to the service user and overwrites a local edit."""
    site, _ = deployed
    host = site.host
    config = host.path(CONFIG)
    rendered = config.read_bytes()
    host.run(["chown", "root:root", STORAGE])
    host.run(["chmod", "0700", STORAGE])
    config.write_text("- edited\n- by hand\n")

    healed = site.apply()
    assert healed.returncode == 0 and healed.all_true, healed
    configured = healed.changes[f"hub_mirror-config-{MIRROR}-configured"]
    assert "storage" in configured and "config" in configured, configured
    assert config.read_bytes() == rendered
    assert host.sh(f"stat -c '%U %a' {STORAGE}") == "hub-mirror 750"
    # Writing new content proves the registry (in its sandbox) has its storage back.
    assert site.pull("library/busybox", "latest", tmp_path)
    again = site.apply()
    assert again.returncode == 0 and again.changes == {}, again


def _exposure(host, unit):
    out = host.run(["systemd-analyze", "security", "--no-pager", unit]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    return float(match.group(1)), out


BASELINE_UNIT = """\
[Unit]
Description=The registry as root, no hardening (baseline for systemd-analyze security)

[Service]
ExecStart={registry} serve {config}
Restart=always
"""


def test_hardening_user_sandbox_exposure_and_secret_files(deployed):
    site, _ = deployed
    host = site.host
    props = site.show("User", "Group", "MainPID")
    assert (props["User"], props["Group"]) == ("hub-mirror", "hub-mirror")
    supervisor = int(props["MainPID"])
    front = int(host.sh(f"pgrep -P {supervisor} -x nginx"))  # the front's master
    workers = [int(pid) for pid in host.sh(f"pgrep -P {front}").split()]
    assert workers, "the front has no workers"
    for pid in (supervisor, site.registry_pid(supervisor), front, *workers):
        assert host.sh(f"ps -o user= -p {pid}") == "hub-mirror"
        status = host.sh(f"cat /proc/{pid}/status")
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # the system-call filter
    unit = host.path(f"/etc/systemd/system/{UNIT}").read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateIPC=yes",
                    "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service"):
        assert setting in unit, setting
    # ProtectSystem=strict: outside its storage, the service's view is read-only.
    mounts = host.sh(f"cat /proc/{supervisor}/mountinfo")
    assert re.search(r"^\S+ \S+ \S+ \S+ / \S*\bro\b", mounts, re.M), mounts

    host.path("/etc/systemd/system/hm-baseline-root.service").write_text(
        BASELINE_UNIT.format(registry=REGISTRY, config=CONFIG))
    host.run(["systemctl", "daemon-reload"])
    baseline, _ = _exposure(host, "hm-baseline-root.service")
    ours, report = _exposure(host, UNIT)
    open_items = [line for line in report.splitlines() if line.startswith("✗")]
    print(f"\n[system] systemd-analyze security: {UNIT} {ours} vs root unit {baseline}\n"
          "[system] what still counts against it:\n" + "\n".join(open_items))
    assert ours < baseline

    # Every file holding the token: readable by root and the service user only.
    token_files = host.run(["grep", "-rlsF", "--", site.token, *SECRET_SCAN_DIRS],
                           check=False).stdout.split()
    token_files = [f for f in token_files if not f.startswith("/run/log/journal")]
    # 2.8 reads it from its config; 3.x from the credential helper's file.
    token_file = f"{MIRROR}.yml" if site.releases.version.startswith("2.") else f"{MIRROR}.credentials.json"
    assert f"/etc/hub-mirror/{token_file}" in token_files
    for path in token_files:
        owner, group, mode = host.sh(f"stat -c '%U %G %a' {path}").split()
        assert owner in ("root", "hub-mirror") and group in ("root", "hub-mirror"), (path, owner, group)
        assert int(mode, 8) & 0o077 == 0, (path, mode)
    print(f"[system] files holding the token: {token_files}")
    assert site.token not in host.sh("ps -eo args")


def test_token_rotation_restarts_only_on_2_8_and_upstream_sees_the_new_token(deployed, tmp_path):
    site, _ = deployed
    before = site.show("InvocationID")
    starts = site.journal_count("Started hub-mirror-")
    serving = site.journal_count("serving in proxy mode")

    site.hub.token = NEW_TOKEN  # Docker Hub now accepts only the new token
    site.master.set_pillar(site.host.name, site.pillar(NEW_TOKEN))
    rotated = site.apply()
    assert rotated.returncode == 0 and rotated.all_true, rotated
    site.token = NEW_TOKEN
    configured = rotated.changes[f"hub_mirror-config-{MIRROR}-configured"]
    restarts = 1 if site.releases.version.startswith("2.") else 0
    if restarts:
        assert configured == {"config": {"proxy.password": {"old": "<redacted>", "new": "<redacted>"}}}
        assert rotated.changes[f"hub_mirror-service-{MIRROR}-running"] == {"restarted": True}
    else:
        # 3.x's credential helper reads the new file at the next login: no restart.
        assert configured == {"credentials": {"old": "<redacted>", "new": "<redacted>"}}
        assert f"hub_mirror-service-{MIRROR}-running" not in rotated.changes
        time.sleep(CREDENTIAL_LIFETIME_S + 1)  # the registry asks its helper again after this

    # Exactly the restarts it needs: a new invocation, started once, and the registry came
    # up once. (NRestarts counts only systemd's own restarts, and a restart job resets it.)
    assert (site.show("InvocationID")["InvocationID"] != before["InvocationID"]) is bool(restarts)
    assert site.journal_count("Started hub-mirror-") == starts + restarts
    assert site.journal_count("serving in proxy mode") == serving + restarts

    site.hub.reset_counts()
    site.pull("library/busybox", "latest", tmp_path)
    used = [req for req in site.hub.token_requests if not req["anonymous"]]
    assert used and all(r["password_sha256"] == sha256(NEW_TOKEN) and r["password_ok"] for r in used)

    again = site.apply()
    assert again.returncode == 0 and again.changes == {}, again

    # No output shows either token: salt CLI outputs, the host's journal, the logs.
    journal = site.host.run(["journalctl", "--no-pager", "-o", "cat"]).stdout
    minion_log = site.host.path("/var/log/salt/minion").read_text(errors="replace")
    master_log = site.master.log_file.read_text(errors="replace")
    assert "[DEBUG" in minion_log and "hub_mirror" in journal
    for text in (*site.master.outputs, journal, minion_log, master_log):
        assert HUB_TOKEN not in text
        assert NEW_TOKEN not in text


def test_reboot_brings_the_mirror_back_with_its_cache(deployed, alpine, tmp_path):
    site, _ = deployed
    host = site.host
    blobs = site.blobs()
    host.poweroff()
    host.boot(timeout=90)
    seconds = wait_serving(site.net, site.url, 60)
    print(f"\n[system] after reboot: serving {seconds:.1f}s after systemd was up "
          f"(boot took {host.boot_seconds:.1f}s)")
    assert host.sh(f"systemctl is-enabled {UNIT}") == "enabled"
    assert host.sh(f"systemctl is-active {UNIT}") == "active"
    assert site.blobs() == blobs

    site.hub.reset_counts()
    assert site.pull("library/alpine", alpine, tmp_path) == alpine
    assert site.hub.counts()["blob_get"] == 0
    site.master.wait_for_minion(host.name)
    catalog = site.salt("hub_mirror.catalog", f"mirror={MIRROR}")
    assert catalog.returncode == 0, catalog
    assert "library/alpine" in catalog.data, catalog


def test_upstream_down_at_boot_serves_the_cache_then_catches_up(deployed, alpine, tmp_path):
    site, _ = deployed
    host = site.host
    host.poweroff()
    site.hub.block()
    try:
        t0 = time.monotonic()
        host.boot(timeout=90)
        wait_serving(site.net, site.url, 60)
        boot_to_serving = time.monotonic() - t0
        print(f"\n[system] upstream down: serving {boot_to_serving:.1f}s after the boot started "
              f"(systemd up after {host.boot_seconds:.1f}s)")
        assert site.pull("library/alpine", "latest", tmp_path) == alpine
        assert site.pull("library/alpine", alpine, tmp_path) == alpine
        with pytest.raises(subprocess.CalledProcessError):
            site.pull("library/multi", "latest", tmp_path)
        assert site.journal_count("serving the cache read-only") == 1
    finally:
        unblock(site.net, site.hub)
    t0 = time.monotonic()

    def new_pull():
        try:
            return site.pull("library/multi", "latest", tmp_path)
        except subprocess.CalledProcessError:
            return None

    # Back in proxy mode within the supervisor's recheck interval (15 s) plus a start.
    digest = wait_until(new_pull, 60, "a new pull after the upstream returned", 1)
    print(f"[system] upstream back: a new image pulled {time.monotonic() - t0:.1f}s later")
    assert digest
    assert site.journal_count("upstream answers again: back to proxy mode") == 1
    site.master.wait_for_minion(host.name)
    again = site.apply()
    assert again.returncode == 0 and again.changes == {}, again
