"""`salt-call --local state.apply hub_mirror`, as a user runs it, with real processes:
the release asset from a loopback server, the registry as a supervised service, a pull
through it with skopeo, and `hub_mirror.catalog` listing what was pulled."""

import os

import pytest

from tests.support import oci
from tests.support.hub import HUB_USER
from tests.support.netutil import free_port
from tests.support.release import archive_pillar, reported_version

pytestmark = pytest.mark.integration


@pytest.fixture
def applied(masterless, release_server, clean_hub, mirror_name):
    """A fresh minion's test=True prediction, then the live first apply."""
    port = free_port()
    masterless.set_pillar(
        archive_pillar(release_server, {mirror_name: clean_hub.mirror_pillar(port)})
    )
    predicted = masterless.apply(test=True)
    first = masterless.apply()
    assert first.returncode == 0, first
    return masterless, port, predicted, first


def test_apply_serves_pulls_and_catalog_lists_them(applied, clean_hub, image_layout, tmp_path):
    minion, port, _, first = applied
    name = minion.mirror_names()[0]
    assert all(ret["result"] for ret in first.states.values()), first

    digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "pulled"))
    assert digest == image_layout[1]["single"]["manifest_digest"]

    catalog = minion.run("hub_mirror.catalog", f"mirror={name}")
    assert catalog.returncode == 0, catalog
    assert catalog.data == ["library/alpine"]
    with_tags = minion.run("hub_mirror.catalog", f"mirror={name}", "tags=True")
    assert with_tags.data == {"library/alpine": {"latest": digest}}


def test_mirror_authenticates_with_exactly_the_pillar_credential(applied, clean_hub, tmp_path):
    _, port, _, _ = applied
    oci.pull(f"127.0.0.1:{port}", "library/busybox", "latest", str(tmp_path / "pulled"))
    used = [req for req in clean_hub.token_requests if not req["anonymous"]]
    assert used, clean_hub.token_requests
    assert all(req["username"] == HUB_USER and req["password_ok"] for req in used)
    assert not [req for req in clean_hub.token_requests if req["anonymous"]]


def test_second_apply_changes_nothing(applied):
    minion, _, _, _ = applied
    again = minion.apply()
    assert again.returncode == 0, again
    assert again.changes == {}
    assert all(ret["result"] is True for ret in again.states.values())
    predicted = minion.apply(test=True)
    assert predicted.changes == {}
    assert all(ret["result"] is True for ret in predicted.states.values())


def test_test_mode_predicts_the_live_run(applied):
    _, _, predicted, first = applied
    assert predicted.returncode == 0, predicted
    assert set(predicted.changes) == set(first.changes)
    for sid, changes in first.changes.items():
        assert set(predicted.changes[sid]) == set(changes), sid
    assert {sid for sid, ret in predicted.states.items() if ret["result"] is None} == set(
        first.changes
    )


def test_installed_version_and_rendered_config(applied, release_server):
    minion, port, _, _ = applied
    name = minion.mirror_names()[0]
    assert minion.run("hub_mirror.version").data == reported_version(release_server.version)
    config = minion.run("hub_mirror.config", f"mirror={name}").data
    # Behind the front, which listens on the port: the registry on its unix socket.
    assert config["http"]["net"] == "unix" and config["http"]["addr"] == "registry.sock"
    if release_server.version.startswith("2."):
        assert config["proxy"]["password"] == "<redacted>"
    else:
        assert set(config["proxy"]) == {"remoteurl", "exec", "ttl"}  # the token is in no config
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["http"]["debug"]["addr"].startswith("127.0.0.1:")
    assert set(config["health"]) == {"storagedriver"}


def test_front_none_and_back_keeps_serving_the_cache_and_leaves_no_front_behind(applied, clean_hub, image_layout, tmp_path):
    minion, port, _, _ = applied
    name = minion.mirror_names()[0]
    digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "cold"))
    storage = minion.run("hub_mirror.settings").data["mirrors"][name]["storage"]
    front_dir = os.path.join(storage, ".hub-mirror-front")
    assert os.path.isdir(front_dir)

    def switch(front):
        minion.set_pillar({**minion.pillar, "mirrors": {name: {**minion.pillar["mirrors"][name], "front": front}}})
        predicted = minion.apply(test=True)
        live = minion.apply()
        assert live.returncode == 0, live
        assert set(predicted.changes) == set(live.changes), (predicted.changes, live.changes)
        assert minion.apply().changes == {}

    # Without a front the registry listens on the port itself; the front's directory (its
    # fill cache can hold gigabytes) goes once the registry serves without it.
    switch("none")
    assert not os.path.lexists(front_dir)
    assert minion.run("hub_mirror.config", f"mirror={name}").data["http"]["addr"] == f"127.0.0.1:{port}"
    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "unfronted")) == digest
    switch("nginx")
    assert os.path.isdir(front_dir)
    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "fronted")) == digest
    assert minion.run("hub_mirror.status", f"mirror={name}").data[name]["front"]["blob_files"] > 0
