"""`state.apply hub_mirror.cache`: the pillar's warm list is pulled into the cache once,
then the state has nothing to do; the cap state is quiet while the cache is under it."""

import pytest

from tests.support.netutil import free_port
from tests.support.release import archive_pillar

pytestmark = pytest.mark.integration


def test_cache_sls_warms_once_and_then_changes_nothing(masterless, release_server, clean_hub, mirror_name):
    port = free_port()
    mirror = {
        "upstream": clean_hub.url,
        "listen": f"127.0.0.1:{port}",
        "warm": ["library/alpine:latest", "library/busybox"],
        "max_size": "1G",
    }
    masterless.set_pillar(archive_pillar(release_server, {mirror_name: mirror}))
    predicted = masterless.apply("hub_mirror.cache", test=True)
    first = masterless.apply("hub_mirror.cache")
    assert first.returncode == 0, first
    cached_id = f"hub_mirror-cache-{mirror_name}-warmed"
    assert cached_id in first.changes and cached_id in predicted.changes
    assert f"hub_mirror-cache-{mirror_name}-pruned" not in first.changes
    assert sorted(masterless.run("hub_mirror.catalog", f"mirror={mirror_name}").data) == [
        "library/alpine",
        "library/busybox",
    ]
    clean_hub.reset_counts()
    again = masterless.apply("hub_mirror.cache")
    assert again.returncode == 0, again
    assert again.changes == {}
    assert clean_hub.counts()["blob_get"] == 0
