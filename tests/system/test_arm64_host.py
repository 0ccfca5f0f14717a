"""An arm64 minion (a Debian 12 arm64 root under qemu-user emulation via binfmt_misc,
systemd as PID 1) installs the arm64 release asset from the release server, runs it under
systemd and serves a pull. Grains alone do not count: ``uname -m`` inside is aarch64, the
installed binary is an aarch64 ELF and it is what answers.

The same host, before its first sync, shows the message a minion that never ran
``saltutil.sync_all`` gets for ``state.apply hub_mirror``.
"""

import json
import time
import uuid

import pytest

from tests.support.nspawn import TestHost, ensure_root
from tests.support.release import archive_pillar, reported_version
from tests.support.sysmaster import start_minion
from tests.system.conftest import wait_serving

pytestmark = pytest.mark.system

MIRROR = "dockerhub"
UNIT = f"hub-mirror-{MIRROR}.service"
REGISTRY = "/opt/hub-mirror/bin/registry"
# Under qemu every Python start is slow: the Salt jobs get room.
SLOW = 600
EM_AARCH64 = 183


def elf_machine(path):
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


@pytest.fixture(scope="module")
def arm_host(sysnet, sys_master):
    t0 = time.monotonic()
    root = ensure_root("arm64")  # ~16 min cold, cached after (.ci/run builds it)
    host = TestHost(root, network=sysnet.path, name=f"hmarm-{uuid.uuid4().hex[:6]}")
    host.start(timeout=180)
    try:
        seconds = start_minion(host, sys_master, timeout=SLOW)
        print(f"\n[system] arm64 {host.name}: root ready + boot {time.monotonic() - t0 - seconds:.1f}s, "
              f"minion answers after {seconds:.1f}s")
        yield host
    finally:
        # Under qemu, stopping the minion and the mirror's unit takes longer than the
        # default 20 s (measured: registry 3.0.0's unit did not stop within it). Past
        # systemd's own 90 s stop timeout, so that a process it waits for is its problem
        # to end, not a failed teardown.
        host.stop(timeout=150)


def test_arm64_minion_installs_the_arm64_asset_runs_it_and_serves_a_pull(
        arm_host, sysnet, sys_hub, sys_releases, sys_master, image_layout, tmp_path):
    host = arm_host
    assert host.sh("uname -m") == "aarch64"
    hostport = f"127.0.0.1:{sysnet.free_port()}"
    sys_master.set_pillar(host.name, archive_pillar(sys_releases, {MIRROR: sys_hub.mirror_pillar(hostport)}))

    # A minion that has never synced is told what to do, before anything changes.
    unsynced = sys_master.salt(host.name, "state.apply", "hub_mirror", timeout=SLOW)
    assert unsynced.returncode != 0, unsynced
    assert unsynced.states == {}, unsynced
    assert "the hub_mirror execution module is not on this minion" in unsynced.output
    assert "saltutil.sync_all" in unsynced.output and "sync_mods=all" in unsynced.output
    assert not host.path(REGISTRY).exists()

    synced = sys_master.salt(host.name, "saltutil.sync_all", timeout=SLOW)
    assert synced.returncode == 0 and "modules.hub_mirror" in synced.data["modules"], synced
    sys_releases.requests.clear()
    t0 = time.monotonic()
    applied = sys_master.salt(host.name, "state.apply", "hub_mirror", timeout=SLOW)
    print(f"\n[system] arm64 state.apply hub_mirror: {time.monotonic() - t0:.1f}s")
    assert applied.returncode == 0 and applied.all_true, (
        f"{applied}\n--- {UNIT}:\n{host.run(['systemctl', 'cat', UNIT], check=False).stdout}"
        f"\n--- journal:\n{host.journal(30, unit=UNIT)}")

    # The arm64 asset (and its .sha256), not the amd64 one, and an aarch64 binary.
    asset = sys_releases.assets["arm64"]
    assert asset["url_path"] in sys_releases.requests
    assert asset["url_path"] + ".sha256" in sys_releases.requests
    assert sys_releases.assets["amd64"]["url_path"] not in sys_releases.requests
    record = json.loads(host.path("/opt/hub-mirror/install.json").read_text())
    assert (record["arch"], record["tarball_sha256"]) == ("arm64", asset["sha256"]), record
    assert elf_machine(host.path(REGISTRY)) == EM_AARCH64
    assert host.sh(f"systemctl is-active {UNIT}") == "active"
    # systemd itself is emulated here, and qemu-user cannot give a unit an IPC namespace:
    # the unit goes without PrivateIPC= on such hosts only (amd64 hosts keep it).
    assert host.sh("readlink /proc/1/exe").rsplit("/", 1)[-1].startswith("qemu-")
    assert "PrivateIPC" not in host.path(f"/etc/systemd/system/{UNIT}").read_text()
    assert host.sh(f"systemctl is-enabled {UNIT}") == "enabled"
    version = sys_master.salt(host.name, "hub_mirror.version", timeout=SLOW)
    assert version.data == reported_version(sys_releases.version), version  # the binary ran (under qemu) and answered

    # What serves is that binary: the unit's registry process executes /opt/hub-mirror/bin/registry.
    supervisor = int(host.sh(f"systemctl show -P MainPID {UNIT}"))
    registry_pid = host.sh(f"pgrep -P {supervisor} -f {REGISTRY}")
    assert registry_pid, host.sh("ps -ef")
    wait_serving(sysnet, f"http://{hostport}/v2/", 60)
    digest = sysnet.pull(hostport, "library/alpine", "latest", tmp_path / "pulled")
    assert digest == image_layout[1]["single"]["manifest_digest"]
    assert list(host.path(f"/var/lib/hub-mirror/{MIRROR}").glob("docker/registry/v2/blobs/sha256/*/*/data"))
