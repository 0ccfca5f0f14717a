"""A slow upstream (every answer delayed by seconds): cached pulls by digest never wait for
it, pulls by tag do (the registry asks the upstream which digest the tag points at, with
no timeout of its own). Timings are printed, not asserted."""

import time

import pytest

from tests.reliability.conftest import load_repo
from tests.support import oci
from tests.support.integrity import StorageAudit
from tests.support.processes import wait_for

pytestmark = pytest.mark.functional

DELAY = 3.0


def timed_pull(mirror, repo, reference, dest):
    began = time.monotonic()
    digest = oci.pull(mirror.hostport, repo, reference, str(dest))
    return digest, round(time.monotonic() - began, 2)


def test_slow_upstream_leaves_cached_pulls_by_digest_alone(hub, mirror, tmp_path):
    repo = load_repo(3)  # the 3 MB image
    image = hub.images[repo]
    want = image["manifest_digest"]
    assert oci.pull(mirror.hostport, repo, "latest", str(tmp_path / "warm")) == want
    blobs = {image["config_digest"], *image["layer_digests"]}
    wait_for(lambda: blobs <= set(StorageAudit(mirror.storage).blobs), 30, "the image cached")

    timings = {}
    _, timings["digest, fast upstream"] = timed_pull(mirror, repo, want, tmp_path / "d0")
    _, timings["tag, fast upstream"] = timed_pull(mirror, repo, "latest", tmp_path / "t0")

    hub.set_delay(DELAY)
    hub.reset_counts()
    digest, timings[f"digest, upstream +{DELAY}s"] = timed_pull(mirror, repo, want, tmp_path / "d1")
    assert digest == want
    by_digest = hub.counts()
    # By digest, cached: the upstream is not asked anything at all.
    assert by_digest == {"manifest_get": 0, "manifest_head": 0, "blob_get": 0, "blob_head": 0, "token": 0}

    digest, timings[f"tag, upstream +{DELAY}s"] = timed_pull(mirror, repo, "latest", tmp_path / "t1")
    assert digest == want
    by_tag = hub.counts()
    # By tag: one HEAD (after a token), waited for; the content still comes from the cache.
    assert by_tag["manifest_head"] == 1 and by_tag["manifest_get"] == 0 and by_tag["blob_get"] == 0
    assert StorageAudit(mirror.storage).sound
    print(f"\npull times (s): {timings}\nupstream requests of the slow pull by tag: {by_tag}")
