"""hub_mirror through a salt-master, as a user runs it: real salt-master and salt-minion
daemons, the ``salt`` CLI on the master, ``saltutil.sync_all`` shipping the modules from the
state tree, the release asset from a loopback server and a pull through the mirror.

Needs the saltfactories plugin: run without ``-p no:saltfactories``.
"""

from pathlib import Path

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.results import changes_of, states_of
from tests.support.saltcall import unique_name
from tests.support.saltmaster import SaltCluster

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]


def mirror_pillar(hub, release_server):
    """One mirror with a unique name and port, its release from the loopback server."""
    return archive_pillar(release_server, {unique_name("m"): hub.mirror_pillar(free_port())})


@pytest.fixture(scope="module")
def cluster(salt_factories, hub, release_server):
    """A master and two minions: ``main`` (synced, applied by the tests) and ``fresh``
    (started, never synced), each with its own mirror name, port and lookup paths."""
    hub.unblock()
    hub.set_delay(0)
    cluster = SaltCluster(salt_factories, f"/tmp/hm-{unique_name('')}")
    cluster.main = cluster.add_minion(mirror_pillar(hub, release_server))
    cluster.fresh = cluster.add_minion(mirror_pillar(hub, release_server))
    with cluster.running():
        yield cluster


@pytest.fixture(scope="module")
def deployed(cluster):
    """``salt <main> saltutil.sync_all`` then ``salt <main> state.apply hub_mirror``."""
    main = cluster.main
    synced = cluster.salt(main, "saltutil.sync_all")
    assert synced.returncode == 0, synced
    assert "modules.hub_mirror" in synced.data["modules"], synced.data
    assert "states.hub_mirror" in synced.data["states"], synced.data
    first = cluster.salt(main, "state.apply", "hub_mirror")
    assert first.returncode == 0, first
    return cluster, first


def test_sync_then_apply_serves_pulls_and_catalog_lists_them(deployed, image_layout, tmp_path):
    cluster, first = deployed
    main = cluster.main
    name = main.mirror_name
    states = states_of(first.data)
    assert f"hub_mirror-service-{name}-running" in states, first.data
    assert all(ret["result"] is True for ret in states.values()), first.data
    assert "hub_mirror-install-registry-installed" in changes_of(first.data)

    digest = oci.pull(main.mirror_listen, "library/alpine", "latest", str(tmp_path / "pulled"))
    assert digest == image_layout[1]["single"]["manifest_digest"]

    catalog = cluster.salt(main, "hub_mirror.catalog", f"mirror={name}")
    assert catalog.returncode == 0, catalog
    assert catalog.data == ["library/alpine"]


def test_second_apply_changes_nothing(deployed):
    cluster, _ = deployed
    again = cluster.salt(cluster.main, "state.apply", "hub_mirror")
    assert again.returncode == 0, again
    assert states_of(again.data), again.data
    assert changes_of(again.data) == {}
    assert all(ret["result"] is True for ret in states_of(again.data).values())


def test_unsynced_minion_is_told_to_sync_and_sync_mods_all_applies(cluster, image_layout, tmp_path):
    fresh = cluster.fresh
    unsynced = cluster.salt(fresh, "state.apply", "hub_mirror")
    assert unsynced.returncode != 0, unsynced
    assert states_of(unsynced.data) == {}, unsynced.data
    assert "the hub_mirror execution module is not on this minion" in unsynced.stdout
    assert "saltutil.sync_all" in unsynced.stdout
    assert "sync_mods=all" in unsynced.stdout

    applied = cluster.salt(fresh, "state.apply", "hub_mirror", "sync_mods=all")
    assert applied.returncode == 0, applied
    states = states_of(applied.data)
    assert f"hub_mirror-service-{fresh.mirror_name}-running" in states, applied.data
    assert all(ret["result"] is True for ret in states.values()), applied.data
    digest = oci.pull(fresh.mirror_listen, "library/busybox", "latest", str(tmp_path / "pulled"))
    assert digest == image_layout[1]["other"]["manifest_digest"]


def test_token_is_in_no_cli_output_and_no_daemon_log(deployed):
    """Runs after the applies above: every salt CLI output so far and the daemons' debug logs."""
    cluster, _ = deployed
    settings = cluster.salt(cluster.main, "hub_mirror.settings")
    assert settings.data["mirrors"][cluster.main.mirror_name]["token"] == "<redacted>"
    logs = {path: Path(path).read_text(errors="replace") for path in cluster.log_files()}
    # Debug logs of the jobs that rendered the pillar and ran hub_mirror.
    assert "[DEBUG   ]" in logs[cluster.master.config["log_file"]]
    assert "hub_mirror.settings" in logs[cluster.main.log_file]
    assert len(cluster.outputs) >= 3
    for output in cluster.outputs:
        assert HUB_TOKEN not in output
    for path, text in logs.items():
        assert HUB_TOKEN not in text, path
