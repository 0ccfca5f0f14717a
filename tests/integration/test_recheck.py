"""``client:recheck``: the Salt schedule keeps the clients healed without a state run.

A real salt-minion daemon (masterless: ``file_client: local``, ``master_type: disable``)
runs the schedule entry that ``hub_mirror.client`` installed, inside the private network
namespace of tests/integration/test_client.py, beside a real dockerd. The mirror stops:
every client's config drops it, with no state run; it starts again: it is back. Runs that
find nothing changed write nothing and reload nothing, and dockerd is never restarted.
"""

import time

import pytest
import yaml

from tests.integration.test_client import ClientHost, user_daemon_json, world  # noqa: F401  (fixture)
from tests.support.runtimes import RECHECK_JOB as JOB
from tests.support.runtimes import SaltMinionDaemon, masterless_daemon_config
from tests.support.saltcall import Masterless

pytestmark = pytest.mark.integration

RECHECK = 10
# Generous: a wait for something to happen, never a claim about how fast it happens.
FOLLOW_TIMEOUT = 6 * RECHECK + 60


@pytest.fixture
def minion():
    masterless = Masterless.fresh(sync=False)
    # The scheduler needs a running daemon; without a master it must not look for one.
    masterless_daemon_config(masterless)
    masterless.sync()
    yield masterless
    masterless.discard(stop_mirrors=False)


def wait_for(what, condition, daemon, timeout=FOLLOW_TIMEOUT):
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"not within {timeout}s: {what}\n{daemon.log()[-6000:]}"
        time.sleep(0.5)
    return time.monotonic() - start


def snapshot(paths):
    """What a write or a replace would change: bytes, inode, mtime."""
    return {
        path: (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None
        for path in paths
    }


def test_the_schedule_drops_a_dead_mirror_and_takes_it_back_without_a_state_run(world, minion, tmp_path, capsys):
    mirror = world.mirrors[0]
    with world.netns.entered():
        for each in world.mirrors:
            if not each.running:
                each.start()
        host = ClientHost(world, minion, tmp_path)
        daemon = SaltMinionDaemon(world.netns, minion)
        try:
            original = user_daemon_json(host.root)
            dockerd = host.dockerd(original)
            host.set_pillar({"docker.io": mirror.url}, ["docker", "containerd", "podman"], probe_timeout=1)
            pillar = minion.pillar
            pillar["client"]["recheck"] = RECHECK
            minion.set_pillar(pillar)

            applied = host.apply()
            assert applied["result"] is True, applied
            assert set(applied["changes"]) == {"docker", "containerd", "podman", "recheck"}
            assert applied["changes"]["recheck"]["new"]["function"] == "hub_mirror.client_configure"
            assert "no salt-minion runs now" in applied["comment"]
            saved = yaml.safe_load((minion.conf_dir / "minion.d" / "_schedule.conf").read_text())
            assert saved["schedule"][JOB]["function"] == "hub_mirror.client_configure"
            assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]
            files = [host.paths["docker_daemon_json"], host.hosts_toml, host.dropin,
                     host.root / "state" / ".client" / "index.json"]
            before = snapshot(files)

            # The daemon runs the entry at start, then every interval: nothing changed, so
            # nothing is written and dockerd is not reloaded.
            daemon.start()
            assert world.netns.holds(daemon.pid)
            runs = daemon.runs()
            wait_for("a second scheduled run", lambda: daemon.runs() > runs, daemon)
            assert snapshot(files) == before
            assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]

            mirror.stop()
            dropped = wait_for(
                "every client drops the dead mirror",
                lambda: not host.hosts_toml.exists() and not host.dropin.exists() and dockerd.mirrors() == [],
                daemon,
            )
            assert host.paths["docker_daemon_json"].read_text() == original

            mirror.start()
            back = wait_for(
                "every client takes the mirror back",
                lambda: host.hosts_toml.exists() and host.dropin.exists()
                and [m.rstrip("/") for m in dockerd.mirrors()] == [mirror.url],
                daemon,
            )
            assert mirror.url in host.hosts_toml.read_text() and mirror.hostport in host.dropin.read_text()
            # Reloaded every time, never restarted.
            assert dockerd.proc.poll() is None
            assert int(host.paths["docker_pidfile"].read_text()) == dockerd.pid

            # With the daemon running, salt-call changes its schedule live.
            pillar["client"]["recheck"] = RECHECK + 5
            minion.set_pillar(pillar)
            changed = host.apply()
            assert changed["changes"] == {
                "recheck": {
                    "old": {"function": "hub_mirror.client_configure", "seconds": 8, "splay": 2, "maxrunning": 1,
                            "return_job": False},
                    "new": {"function": "hub_mirror.client_configure", "seconds": 12, "splay": 3, "maxrunning": 1,
                            "return_job": False},
                }
            }, changed
            assert "no salt-minion runs now" not in changed["comment"]
            listed = minion.run("schedule.list", "return_yaml=False")
            assert listed.data[JOB]["seconds"] == 12, listed

            # Clean takes the entry out with the rest: no later run puts a mirror back.
            cleaned = host.apply("hub_mirror.client.clean")
            assert cleaned["result"] is True and "recheck" in cleaned["changes"], cleaned
            assert JOB not in (minion.run("schedule.list", "return_yaml=False").data or {})
            assert host.paths["docker_daemon_json"].read_text() == original
            runs = daemon.runs()
            time.sleep(2 * (RECHECK + 5))
            assert daemon.runs() == runs
            assert not host.hosts_toml.exists() and not host.dropin.exists()
            with capsys.disabled():
                print(f"\nrecheck {RECHECK}s: dead mirror out of every client after {dropped:.1f}s, back after {back:.1f}s")
        finally:
            daemon.stop()
            host.stop()
