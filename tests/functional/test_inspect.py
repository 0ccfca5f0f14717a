"""Inspect and operate a running mirror through ``salt-call``, with real processes: the
mirror applied from the release asset, a Docker Hub stand-in with its own request log,
skopeo pulling through the mirror.

tags of a multi-arch index of which one platform was pulled; status counters after a miss
and a hit; warm, then a pull that the stand-in does not see; the ``hub_mirror.warmed``
state; gc, then a pull; the rate limit read without a pull."""

import time

import pytest
import requests

from tests.functional.inspect_support import applied_mirror
from tests.support import oci
from tests.support.hub import HUB_TOKEN, HUB_USER, stocked_hub
from tests.support.release import reported_version

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def own_hub(tmp_path_factory):
    with stocked_hub(tmp_path_factory.mktemp("inspect-hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def mirror(own_hub, release_server):
    with applied_mirror(own_hub, release_server, warm=["library/busybox"]) as mirror:
        yield mirror


@pytest.fixture
def hub(own_hub):
    own_hub.unblock()
    own_hub.reset_counts()
    return own_hub


def pull(mirror, repo, tmp_path, **kwargs):
    return oci.pull(mirror.hostport, repo, "latest", str(tmp_path / f"pulled-{time.monotonic_ns()}"), **kwargs)


def test_tags_of_an_index_show_the_one_platform_pulled(mirror, hub, tmp_path):
    multi = hub.images["multi"]
    assert pull(mirror, "library/multi", tmp_path) == multi["manifests"]["linux/amd64"]

    tags = mirror.data("hub_mirror.tags", "library/multi")
    assert set(tags) == {"latest"}
    latest = tags["latest"]
    assert latest["digest"] == multi["index_digest"]
    assert latest["media_type"] == "application/vnd.oci.image.index.v1+json"
    assert latest["platforms"] == ["linux/amd64"]
    assert latest["platforms_available"] == ["linux/amd64", "linux/arm64"]
    amd64 = multi["images"]["linux/amd64"]
    assert latest["size"]["bytes"] == multi["size"] + amd64["total_size"]
    assert latest["cached"].endswith("Z")

    # The catalog agrees, from the API and from the disk.
    assert "library/multi" in mirror.data("hub_mirror.catalog")
    sizes = mirror.data("hub_mirror.catalog", "sizes=True", "tags=True", "source=disk")
    assert sizes["library/multi"] == {
        "tags": {"latest": multi["index_digest"]},
        "size": latest["size"],
    }


def test_status_counters_move_after_a_miss_and_a_hit(mirror, hub, release_server, tmp_path):
    def manifests():
        state = mirror.data("hub_mirror.status")[mirror.name]
        return state, state["proxy"]["manifests"]

    state, before = manifests()
    before_blobs = state["proxy"]["blobs"]
    assert state["running"] is True and state["serving"] is True
    assert state["mode"] == "proxy"
    assert state["health"] == "ok"
    assert state["upstream_reachable"] is True
    assert state["credential"] is True
    assert state["version"] == reported_version(release_server.version)
    assert state["listen"] == mirror.hostport
    assert state["disk"]["free"]["bytes"] > 0
    assert state["over_cap"] is False

    pull(mirror, "library/counted", tmp_path)
    assert hub.counts()["manifest_get"] == 1
    state, missed = manifests()
    assert missed["misses"] == before["misses"] + 1
    assert missed["hits"] == before["hits"]
    assert missed["pulled"]["bytes"] > before["pulled"]["bytes"]

    pull(mirror, "library/counted", tmp_path)
    assert hub.counts()["manifest_get"] == 1
    state, hit = manifests()
    assert hit["hits"] == missed["hits"] + 1
    assert hit["misses"] == missed["misses"]
    assert hit["hit_ratio"] == round(hit["hits"] / hit["requests"], 3)
    assert state["repositories"] >= 1
    assert state["disk"]["used"]["bytes"] > 0
    blobs = state["proxy"]["blobs"]
    if release_server.version.startswith("2."):
        # 2.8 counts no blob misses: status says so instead of showing a made-up ratio.
        assert blobs["hit_ratio"] is None
        assert "2.8" in blobs["note"]
    else:
        # 3.x's Prometheus counters: the second pull's blobs were all hits, so half of
        # this image's blob requests were.
        image = hub.images["counted"]
        count = len(image["layer_digests"]) + 1  # and the config blob
        start = before_blobs or {"hits": 0, "misses": 0, "pulled": {"bytes": 0}}
        assert (blobs["misses"] - start["misses"], blobs["hits"] - start["hits"]) == (count, count), blobs
        assert blobs["hit_ratio"] == round(blobs["hits"] / blobs["requests"], 3)
        assert blobs["pulled"]["bytes"] - start["pulled"]["bytes"] == image["total_size"] - image["size"]


def test_warm_then_pull_is_a_cache_hit(mirror, hub, tmp_path):
    image = hub.images["warm"]
    warmed = mirror.data("hub_mirror.warm", "library/warmme")
    report = warmed["images"]["library/warmme"]
    assert report["already_cached"] is False
    assert report["digest"] == image["manifest_digest"]
    assert report["fetched"]["bytes"] == image["total_size"]
    assert set(warmed["changes"]) == {"library/warmme"}

    hub.reset_counts()
    assert pull(mirror, "library/warmme", tmp_path) == image["manifest_digest"]
    counts = hub.counts()
    assert counts["blob_get"] == 0, hub.requests
    assert counts["manifest_get"] == 0, hub.requests

    again = mirror.data("hub_mirror.warm", "library/warmme")
    assert again["changes"] == {}
    assert again["images"]["library/warmme"]["already_cached"] is True
    assert again["images"]["library/warmme"]["fetched"]["bytes"] == 0


def test_warm_chosen_platforms_of_an_index_then_the_rest(mirror, hub, tmp_path):
    index = hub.images["warmmulti"]
    first = mirror.data("hub_mirror.warm", "library/warmmulti", "platforms=linux/arm64", "parallel=2")
    report = first["images"]["library/warmmulti"]
    assert report["platforms"] == ["linux/arm64"]
    arm64 = index["images"]["linux/arm64"]
    assert report["fetched"]["bytes"] == index["size"] + arm64["total_size"]
    assert mirror.data("hub_mirror.tags", "library/warmmulti")["latest"]["platforms"] == ["linux/arm64"]

    rest = mirror.data("hub_mirror.warm", "library/warmmulti")
    report = rest["images"]["library/warmmulti"]
    assert report["already_cached"] is False
    assert report["fetched"]["bytes"] == index["images"]["linux/amd64"]["total_size"]
    tags = mirror.data("hub_mirror.tags", "library/warmmulti")["latest"]
    assert tags["platforms"] == ["linux/amd64", "linux/arm64"]

    hub.reset_counts()
    pull(mirror, "library/warmmulti", tmp_path, all_platforms=True)
    assert hub.counts()["blob_get"] == 0, hub.requests


def test_warm_reports_a_missing_image_and_still_warms_the_rest(mirror, hub):
    result = mirror.call("hub_mirror.warm", "library/nosuchimage,library/alpine")
    assert result.returncode != 0, result
    assert "library/nosuchimage" in result.output
    assert "Traceback" not in result.output
    assert "library/alpine" in mirror.data("hub_mirror.catalog")


def test_cached_state_keeps_the_pillar_list_warm(mirror, hub):
    state = ["state.single", "hub_mirror.warmed", f"name={mirror.name}"]
    predicted = mirror.minion.run(*state, "test=True")
    assert predicted.returncode == 0, predicted
    (ret,) = predicted.data.values()
    assert ret["result"] is None
    assert set(ret["changes"]) == {"library/busybox"}

    live = mirror.minion.run(*state)
    assert live.returncode == 0, live
    (ret,) = live.data.values()
    assert ret["result"] is True
    assert ret["changes"]["library/busybox"]["digest"] == hub.images["other"]["manifest_digest"]

    for args in (state, [*state, "test=True"]):
        again = mirror.minion.run(*args)
        (ret,) = again.data.values()
        assert ret["result"] is True and ret["changes"] == {}, again


def test_gc_frees_unreferenced_blobs_and_a_pull_after_it_works(mirror, hub, tmp_path):
    alpine = hub.images["single"]
    assert pull(mirror, "library/alpine", tmp_path) == alpine["manifest_digest"]
    # A layer fetched through the mirror without its manifest: nothing references it.
    layer = hub.images["garbage"]["layer_digests"][0]
    fetched = requests.get(f"{mirror.url}/v2/library/garbage/blobs/{layer}", timeout=30)
    assert fetched.status_code == 200
    blob = mirror.storage / "docker/registry/v2/blobs/sha256" / layer[7:9] / layer[7:] / "data"
    deadline = time.monotonic() + 30
    while not blob.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    size = blob.stat().st_size
    assert size == len(fetched.content)

    # A manifest fetched alone leaves a repository without a layer directory, which
    # stops 3.x's garbage-collect: gc gives it an empty one first.
    accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
    manifest = requests.get(
        f"{mirror.url}/v2/ratelimitpreview/test/manifests/latest", headers={"Accept": accept}, timeout=30
    )
    assert manifest.status_code == 200
    repo = mirror.storage / "docker/registry/v2/repositories/ratelimitpreview/test"
    deadline = time.monotonic() + 30
    while not (repo / "_manifests").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (repo / "_layers").exists()

    usage = mirror.data("hub_mirror.usage")
    assert usage["reclaimable"]["bytes"] >= size

    dry = mirror.data("hub_mirror.gc")
    assert dry["layer_dirs_added"] == ["ratelimitpreview/test"]
    assert dry["dry_run"] is True
    assert dry["freed"] == usage["reclaimable"]
    assert dry["blobs"] >= 1
    assert blob.exists()
    assert mirror.data("hub_mirror.status")[mirror.name]["serving"] is True

    live = mirror.data("hub_mirror.gc", "dry_run=False")
    assert live["dry_run"] is False
    assert live["freed"]["bytes"] >= size
    assert not blob.exists()
    assert live["serving"] is True
    assert live["stopped"] > 0
    assert mirror.data("hub_mirror.usage")["reclaimable"]["bytes"] == 0

    # Every tagged image survived: a pull is still served from the cache.
    tags = mirror.data("hub_mirror.catalog", "tags=True")
    assert tags["library/alpine"] == {"latest": alpine["manifest_digest"]}
    hub.reset_counts()
    assert pull(mirror, "library/alpine", tmp_path) == alpine["manifest_digest"]
    assert hub.counts()["blob_get"] == 0, hub.requests


def test_ratelimit_reads_the_quota_without_using_a_pull(mirror, hub):
    hub.set_ratelimit(100, 42)
    report = mirror.data("hub_mirror.ratelimit")
    assert report["limit"] == 100
    assert report["remaining"] == 42
    assert report["window"] == {"seconds": 21600, "human": "6h"}
    assert report["authenticated"] is True
    assert report["source"] == "127.0.0.1"
    assert report["checked"].endswith("Z")
    assert "42 of 100" in report["comment"]

    counts = hub.counts()
    assert counts["manifest_get"] == 0, hub.requests
    assert counts["manifest_head"] == 1, hub.requests
    assert [r["path"] for r in hub.requests if r["authorized"]] == [
        "/v2/ratelimitpreview/test/manifests/latest"
    ]
    assert hub.ratelimit_remaining == 42
    used = [req for req in hub.token_requests if not req["anonymous"]]
    assert used and all(req["username"] == HUB_USER and req["password_ok"] for req in used)
    assert HUB_TOKEN not in str(report)

    hub.set_ratelimit(None, None)
    silent = mirror.data("hub_mirror.ratelimit")
    assert silent["limit"] is None and "no rate-limit headers" in silent["comment"]
    hub.set_ratelimit(100, 97)
