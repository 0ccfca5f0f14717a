"""The front (nginx before the registry), applied with masterless Salt and run by the real
supervisor, against a stand-in whose blob link is slow enough that the clients overlap.

- N clients pulling one cold image at once cost one upstream GET per blob: two on 2.8,
  whose registry fetches every miss twice whoever asks (docs/architecture.md). Every byte
  is verified, and the front's counters account for every request but the fills.
- A client that goes away mid-fill does not abort it: the blob is stored, and the next
  client gets it without the upstream.
- A tag is served from the cache when the upstream answers 429 or 5xx.
- ``manifest_check_interval`` answers a tag from the front for that long; without it the
  registry asks the upstream (a HEAD) on every pull but those within a second.
"""

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability.conftest import MIB
from tests.support.integrity import http_pull
from tests.support.netutil import loopback_session
from tests.support.processes import wait_for

pytestmark = pytest.mark.functional

CLIENTS = 16
BIG = "fault/big"


def fills_per_blob(version):
    return 2 if version.startswith("2.") else 1


def blob_file(storage, digest):
    hex_ = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def stored(mirror, digests, timeout=60):
    return wait_for(lambda: all(blob_file(mirror.storage, d).exists() for d in digests), timeout, "the blobs stored")


def test_clients_pulling_one_cold_image_at_once_cost_one_upstream_get_per_blob(hub, salt_mirror_factory, registry_version):
    mirror = salt_mirror_factory()
    image = hub.images[BIG]
    blobs = [image["config_digest"], *image["layer_digests"]]
    hub.reset_counts()
    hub.set_blob_rate(2 * MIB)  # the 4 MB layer takes 2 s: every client arrives mid-fill
    start = threading.Barrier(CLIENTS)

    def pull(_):
        session = loopback_session()
        try:
            start.wait()
            return http_pull(session, mirror.url, BIG, "latest", timeout=120)
        finally:
            session.close()

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(pull, range(CLIENTS)))
    assert {digest for digest, _ in results} == {image["manifest_digest"]}
    assert stored(mirror, blobs)
    time.sleep(1)  # 2.8's second fetch is its own: let it finish before counting
    counts = hub.counts()
    assert counts["blob_get"] == fills_per_blob(registry_version) * len(blobs), hub.requests
    # The tag too: one check and one counted pull of the manifest, not one per client.
    assert counts["manifest_head"] == counts["manifest_get"] == 1, hub.requests
    front = mirror.call("hub_mirror.status").data[mirror.name]["front"]
    assert front["blob_files"] + front["coalesced"] == (CLIENTS - 1) * len(blobs), front
    print(f"\nfan-in {CLIENTS}: upstream {counts}, front {front}")


def test_a_client_that_goes_away_mid_fill_does_not_abort_it(hub, salt_mirror_factory, registry_version):
    mirror = salt_mirror_factory()
    layer = hub.images[BIG]["layer_digests"][0]
    hub.reset_counts()
    hub.set_blob_rate(1 * MIB)
    url = f"{mirror.url}/v2/{BIG}/blobs/{layer}"
    session = loopback_session()
    with session.get(url, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        assert next(resp.iter_content(64 * 1024))
    session.close()  # gone, 4 s before the fill ends
    assert stored(mirror, [layer])
    hub.set_blob_rate(None)
    with loopback_session() as again:
        body = again.get(url, timeout=60).content
    assert "sha256:" + hashlib.sha256(body).hexdigest() == layer
    assert hub.counts()["blob_get"] == fills_per_blob(registry_version), hub.requests


@pytest.mark.parametrize("status", [429, 503])
def test_a_tag_is_served_from_the_cache_when_the_upstream_answers(hub, salt_mirror_factory, status):
    mirror = salt_mirror_factory()
    with loopback_session() as session:
        digest, _ = http_pull(session, mirror.url, "load/img01", "latest")
        hub.manifest_status = status
        hub.reset_counts()
        time.sleep(2)  # past the second in which the front answers the same tag itself
        assert http_pull(session, mirror.url, "load/img01", "latest")[0] == digest
    assert hub.counts()["manifest_head"] + hub.counts()["manifest_get"] >= 1  # it asked, and was refused


@pytest.mark.one_registry  # the front's own cache answers: the registry's version does not reach it
def test_manifest_check_interval_answers_a_tag_from_the_front(hub, salt_mirror_factory):
    checked = salt_mirror_factory(manifest_check_interval="1h")
    default = salt_mirror_factory()
    with loopback_session() as session:
        for mirror in (checked, default):
            http_pull(session, mirror.url, "load/img02", "latest")
        hub.reset_counts()
        time.sleep(12)  # idle past the transient fill cache's 10 s: tags are kept apart
        http_pull(session, checked.url, "load/img02", "latest")
        assert hub.counts()["manifest_head"] == hub.counts()["manifest_get"] == 0, hub.requests
        http_pull(session, default.url, "load/img02", "latest")
        assert hub.counts()["manifest_head"] >= 1 and hub.counts()["manifest_get"] == 0, hub.requests
