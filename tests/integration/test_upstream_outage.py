"""A mirror that starts while its upstream is down still serves its cache, and catches up
when the upstream returns. The registry alone panics at start in that case
(distribution issue 4038); the supervisor serves the storage read-only meanwhile."""

import subprocess

import pytest
import requests

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port
from tests.support.processes import wait_for
from tests.support.release import archive_pillar

pytestmark = pytest.mark.integration


def pull_ok(port, repo, dest):
    try:
        oci.pull(f"127.0.0.1:{port}", repo, "latest", str(dest))
        return True
    except subprocess.CalledProcessError:
        return False


def test_start_during_outage_serves_cache_then_catches_up(
    masterless, release_server, clean_hub, mirror_name, image_layout, tmp_path
):
    port = free_port()
    masterless.set_pillar(
        archive_pillar(release_server, {mirror_name: clean_hub.mirror_pillar(port)})
    )
    assert masterless.apply().returncode == 0
    cached = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "a"))

    clean_hub.block()
    try:
        assert masterless.run("hub_mirror.stop", f"mirror={mirror_name}").data is True
        # The host "boots" with Docker Hub unreachable: the apply still succeeds.
        again = masterless.apply()
        assert again.returncode == 0, again
        assert again.changes[f"hub_mirror-service-{mirror_name}-running"] == {"started": True}

        # Cached content by tag and by digest, with no upstream at all.
        assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "b")) == cached
        assert oci.pull(f"127.0.0.1:{port}", "library/alpine", cached, str(tmp_path / "c")) == cached
        # Nothing new can come in, and nothing can be pushed.
        assert not pull_ok(port, "library/busybox", tmp_path / "d")
        upload = requests.post(f"http://127.0.0.1:{port}/v2/library/x/blobs/uploads/", timeout=5)
        assert upload.status_code >= 400
        log = (masterless.root / "log" / f"{mirror_name}.log").read_text()
        assert "serving the cache read-only" in log
        assert HUB_TOKEN not in log
    finally:
        clean_hub.unblock()

    # Back in proxy mode within the supervisor's recheck interval (15 s) plus a restart.
    wait_for(lambda: pull_ok(port, "library/busybox", tmp_path / "e"), 60, "a new pull after the outage", interval=0.5)
    assert clean_hub.counts()["blob_get"] > 0
