"""The fleet view through a salt-master, as an operator runs it: ``salt-run hub_mirror.fleet``
asks two real minions for their mirrors' status and cached images and adds them up:
which images are cached where, total bytes, hit ratio per mirror, mirrors that are down.

Needs the saltfactories plugin: run without ``-p no:saltfactories``.
"""


import time

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN, stocked_hub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import unique_name
from tests.support.saltmaster import SALT_TIMEOUT, SaltCluster

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]


@pytest.fixture(scope="module")
def own_hub(tmp_path_factory):
    with stocked_hub(tmp_path_factory.mktemp("fleet-hub")) as hub:
        yield hub


def add_mirror_minion(cluster, hub, release_server):
    name, port = unique_name("m"), free_port()
    return cluster.add_minion(archive_pillar(release_server, {name: hub.mirror_pillar(port)}))


@pytest.fixture(scope="module")
def fleet(salt_factories, own_hub, release_server):
    cluster = SaltCluster(salt_factories, f"/tmp/hm-{unique_name('')}")
    busy = add_mirror_minion(cluster, own_hub, release_server)
    idle = add_mirror_minion(cluster, own_hub, release_server)
    with cluster.running():
        for minion in (busy, idle):
            synced = cluster.salt(minion, "saltutil.sync_all")
            assert synced.returncode == 0, synced
            applied = cluster.salt(minion, "state.apply", "hub_mirror")
            assert applied.returncode == 0, applied
        yield cluster, busy, idle


def test_fleet_shows_what_is_cached_where_bytes_ratios_and_the_mirror_that_is_down(fleet, own_hub, tmp_path):
    cluster, busy, idle = fleet
    for attempt in ("miss", "hit"):
        oci.pull(busy.mirror_listen, "library/alpine", "latest", str(tmp_path / attempt))
        time.sleep(1.5)  # apart: within a second the front answers the same tag itself
    stopped = cluster.salt(idle, "hub_mirror.stop", f"mirror={idle.mirror_name}")
    assert stopped.returncode == 0 and stopped.data is True, stopped

    salt_run = cluster.master.salt_run_cli(timeout=SALT_TIMEOUT)
    synced = salt_run.run("saltutil.sync_runners")
    assert synced.returncode == 0, synced
    assert "runners.hub_mirror" in synced.data, synced.data
    result = salt_run.run("hub_mirror.fleet", "timeout=120")
    assert result.returncode == 0, result
    assert HUB_TOKEN not in result.stdout + result.stderr
    fleet = result.data

    busy_mirror = f"{busy.id}/{busy.mirror_name}"
    idle_mirror = f"{idle.id}/{idle.mirror_name}"
    assert fleet["images"] == {"library/alpine:latest": [busy_mirror]}
    assert set(fleet["mirrors"]) == {busy_mirror, idle_mirror}
    assert fleet["mirrors"][busy_mirror]["hit_ratio"]["manifests"] == 0.5
    assert fleet["mirrors"][busy_mirror]["repositories"] == 1
    assert fleet["mirrors"][busy_mirror]["used"]["bytes"] > own_hub.images["single"]["total_size"]
    assert fleet["total"]["bytes"] == sum(m["used"]["bytes"] for m in fleet["mirrors"].values())
    assert set(fleet["down"]) == {idle_mirror}
    assert "not running" in fleet["down"][idle_mirror]
    assert fleet["no_answer"] == {}

    nobody = salt_run.run("hub_mirror.fleet", "tgt=no-such-minion*")
    assert nobody.returncode == 0, nobody
    assert nobody.data["mirrors"] == {} and nobody.data["total"]["bytes"] == 0
