"""The disk cap, with real processes: a mirror over its pillar ``max_size`` says so in
``hub_mirror.status``, and the ``hub_mirror.pruned`` state brings it under the cap by the
registry's own means (its expiry, then ``registry garbage-collect``), oldest image first,
with the registry stopped meanwhile; the images that stay are still cache hits."""

import time

import pytest

from tests.functional.inspect_support import applied_mirror
from tests.support import oci
from tests.support.hub import stocked_hub

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with stocked_hub(tmp_path_factory.mktemp("cap-hub")) as hub:
        yield hub


@pytest.fixture
def mirror(hub, release_server):
    hub.reset_counts()
    with applied_mirror(hub, release_server) as mirror:
        yield mirror


def pull(mirror, repo, tmp_path):
    return oci.pull(mirror.hostport, repo, "latest", str(tmp_path / f"p-{time.monotonic_ns()}"))


def pruned(mirror, *args):
    result = mirror.minion.run("state.single", "hub_mirror.pruned", f"name={mirror.name}", *args)
    assert "Traceback" not in result.output, result
    (ret,) = result.data.values()
    return ret


def test_pruned_expires_the_oldest_image_and_keeps_the_rest_cached(mirror, hub, release_server, tmp_path):
    alpine = hub.images["single"]
    pull(mirror, "library/alpine", tmp_path)
    time.sleep(1)
    pull(mirror, "library/busybox", tmp_path)
    pull(mirror, "library/multi", tmp_path)
    mirror.wait_scheduled(["library/alpine", "library/busybox", "library/multi"])

    used = mirror.data("hub_mirror.usage")["used"]["bytes"]
    # Half of alpine (the oldest and the biggest) must go: alpine alone is enough.
    cap = used - alpine["total_size"] // 2
    assert pruned(mirror)["comment"].endswith("has no max_size: nothing to enforce")
    mirror.set_mirror_pillar(release_server, max_size=str(cap))

    state = mirror.data("hub_mirror.status")[mirror.name]
    assert state["over_cap"] is True
    assert state["max_size"]["bytes"] == cap
    assert "exceeds max_size" in state["comment"]
    usage = mirror.data("hub_mirror.usage")
    assert usage["over_by"]["bytes"] == used - cap

    expired = [f"library/alpine@{alpine['manifest_digest']}"]
    predicted = pruned(mirror, "test=True")
    assert predicted["result"] is None, predicted
    assert predicted["changes"]["expired"] == expired
    assert mirror.data("hub_mirror.catalog", "source=disk") == [
        "library/alpine",
        "library/busybox",
        "library/multi",
    ]

    live = pruned(mirror)
    assert live["result"] is True, live
    assert live["changes"]["expired"] == expired
    after = live["changes"]["used"]["new"]["bytes"]
    assert after <= cap
    assert live["changes"]["freed"]["bytes"] == used - after >= alpine["total_size"]
    assert "stopped for" in live["comment"]

    state = mirror.data("hub_mirror.status")[mirror.name]
    assert state["serving"] is True and state["over_cap"] is False
    assert mirror.data("hub_mirror.catalog") == ["library/busybox", "library/multi"]
    gone = mirror.call("hub_mirror.tags", "library/alpine")
    assert gone.returncode != 0
    assert "has expired" in gone.output and "Traceback" not in gone.output
    for digest in [alpine["manifest_digest"], alpine["config_digest"], *alpine["layer_digests"]]:
        assert not (mirror.storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:]).exists()

    again = pruned(mirror)
    assert again["result"] is True and again["changes"] == {}, again

    # What stayed is still a cache hit; what went is fetched again.
    hub.reset_counts()
    pull(mirror, "library/busybox", tmp_path)
    assert hub.counts()["blob_get"] == 0, hub.requests
    assert pull(mirror, "library/alpine", tmp_path) == alpine["manifest_digest"]
    assert hub.counts()["blob_get"] > 0


def test_prune_without_the_registry_running_leaves_it_stopped(mirror, hub, tmp_path):
    pull(mirror, "library/alpine", tmp_path)
    mirror.wait_scheduled(["library/alpine"])
    assert mirror.data("hub_mirror.stop") is True
    pruned = mirror.data("hub_mirror.prune", "max_size=1K")
    assert pruned["changes"]["expired"] == [f"library/alpine@{hub.images['single']['manifest_digest']}"]
    assert "stopped for" not in pruned["comment"]
    assert mirror.data("hub_mirror.catalog", "source=disk") == []
    state = mirror.data("hub_mirror.status")[mirror.name]
    assert state["running"] is False and state["serving"] is False
