"""What differs between registry 2.8 and 3.x, measured on the real binaries of the matrix:
each test runs on every version, on the config hub_mirror renders, and asserts what that
version does (docs/facts.md, "Registry 2.8 and 3.x, measured"). 3.1.2, the newest 3.1.x,
runs here too, beside the matrix."""

import datetime
import json
import time

import pytest
import requests

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.modules import registry_files
from tests.support.netutil import free_port
from tests.support.registry import RegistryProcess
from tests.support.release import NEWEST_3, registry_binary

pytestmark = pytest.mark.functional


def is_3(version):
    return not version.startswith("2.")


def blob_path(storage, digest):
    hex_ = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def start_mirror(hub, version, binary, workdir, **pillar):
    """A registry of ``version`` on hub_mirror's rendered config for a mirror of ``hub``."""
    storage = workdir / "storage"
    mirror = hub.mirror_pillar(free_port(), storage=str(storage), **pillar)
    config, env = registry_files("versions", mirror, version, workdir / "helper")
    proc = RegistryProcess(workdir / "registry", config=config, binary=binary, env=env)
    proc.storage = storage
    proc.debug = f"http://{config['http']['debug']['addr']}"
    return proc


@pytest.fixture
def mirror(clean_hub, registry_version, registry_binary_path, tmp_path):
    proc = start_mirror(clean_hub, registry_version, registry_binary_path, tmp_path)
    proc.start()
    yield proc
    proc.stop()


def scheduled(storage, repo, digests, timeout=20):
    """{key: expiry} of the registry's saved expiry entries for ``repo``, once those of
    every blob in ``digests`` are saved (every 5 s, blobs as they are stored)."""
    wanted = {f"{repo}@{digest}" for digest in digests}
    deadline = time.monotonic() + timeout
    while True:
        try:
            entries = json.loads((storage / "scheduler-state.json").read_text())
        except (OSError, ValueError):
            entries = {}
        found = {key: entry["ExpiryData"] for key, entry in entries.items() if key.startswith(f"{repo}@")}
        if wanted <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def committed(storage, digests, timeout=30):
    """Wait until every blob in ``digests`` is in storage: 2.8 stores each with a second,
    background fetch after serving it, so the upstream's count is final only then."""
    deadline = time.monotonic() + timeout
    while not all(blob_path(storage, digest).exists() for digest in digests):
        assert time.monotonic() < deadline, f"blobs not stored after {timeout}s"
        time.sleep(0.2)


def expiry_in(stamp):
    """Seconds from now to an expiry the registry saved (RFC 3339, nanoseconds)."""
    whole, _, rest = stamp.partition(".")
    zone = rest.lstrip("0123456789") if rest else whole[19:]
    moment = datetime.datetime.fromisoformat(whole[:19] + (zone.replace("Z", "+00:00") or "+00:00"))
    return (moment - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def test_a_cold_pull_fetches_each_blob_once_on_3_and_twice_on_2_8(mirror, clean_hub, registry_version, tmp_path):
    """3.0 writes a missed blob to the client and the store together; 2.8 fetched it again
    to store it. Counted at the stand-in: authorized blob GETs."""
    digest = oci.pull(mirror.hostport, "library/alpine", "latest", str(tmp_path / "pulled"))
    blobs = oci.image_blobs(tmp_path / "pulled")
    layout_blobs = len(blobs)
    assert layout_blobs >= 3  # two layers and a config
    committed(mirror.storage, blobs)
    time.sleep(1)  # 2.8's background fetch renames its blob into place when done
    gets = clean_hub.counts()["blob_get"]
    assert gets == (layout_blobs if is_3(registry_version) else 2 * layout_blobs), clean_hub.requests
    assert digest


def test_the_rendered_keys_take_effect(mirror, clean_hub, registry_version, tmp_path):
    """3.x ignores unknown keys without a word: each key hub_mirror renders is checked by
    what it does, not by the file."""
    oci.pull(mirror.hostport, "library/alpine", "latest", str(tmp_path / "pulled"))
    # http.headers
    assert requests.get(f"{mirror.url}/v2/", timeout=5).headers["X-Content-Type-Options"] == "nosniff"
    # http.debug.addr and its prometheus endpoint; health.storagedriver
    metrics = requests.get(f"{mirror.debug}/metrics", timeout=5).text
    assert "registry_storage_action_seconds" in metrics or "registry_http_requests_total" in metrics
    assert ("registry_proxy_requests_total" in metrics) is is_3(registry_version)
    health = requests.get(f"{mirror.debug}/debug/health", timeout=5)
    assert health.status_code == 200 and health.json() == {}
    # log.fields, log.formatter
    assert "mirror=versions" in mirror.log_path.read_text()
    # storage.filesystem.rootdirectory
    assert any((mirror.storage / "docker/registry/v2/repositories/library/alpine").iterdir())
    # proxy.ttl: 168h, hub_mirror's default (2.8 has no ttl key and schedules 168h itself)
    expiries = scheduled(mirror.storage, "library/alpine", oci.image_blobs(tmp_path / "pulled"))
    assert expiries, "no expiry entries saved"
    for stamp in expiries.values():
        assert 167 * 3600 < expiry_in(stamp) <= 168 * 3600 + 60, stamp
    # proxy.exec (3.x): the helper was asked and the stand-in saw the token
    used = [req for req in clean_hub.token_requests if not req["anonymous"]]
    assert used and all(req["password_ok"] for req in used)


def test_a_hit_does_not_push_the_expiry_back(mirror, registry_version, tmp_path):
    """The TTL counts from first caching, on 2.8 and 3.x alike: a hot image expires and is
    fetched again (a HEAD decides whether it changed), whatever the traffic."""
    oci.pull(mirror.hostport, "library/busybox", "latest", str(tmp_path / "first"))
    blobs = oci.image_blobs(tmp_path / "first")
    first = scheduled(mirror.storage, "library/busybox", blobs)
    assert {f"library/busybox@{digest}" for digest in blobs} <= set(first)
    time.sleep(2)
    oci.pull(mirror.hostport, "library/busybox", "latest", str(tmp_path / "again"))
    time.sleep(6)  # past the registry's next save of its expiry entries
    assert scheduled(mirror.storage, "library/busybox", blobs) == first


@pytest.mark.registry_dialect("3")
def test_expiry_frees_the_disk(clean_hub, registry_version, registry_binary_path, tmp_path):
    """proxy.ttl really expires, and with storage.delete enabled the expired blobs leave
    the disk (without delete, 3.x drops the entry and leaks the blob)."""
    proc = start_mirror(clean_hub, registry_version, registry_binary_path, tmp_path, ttl="6s")
    with proc:
        oci.pull(proc.hostport, "library/busybox", "latest", str(tmp_path / "pulled"))
        blobs = [blob_path(proc.storage, digest) for digest in oci.image_blobs(tmp_path / "pulled")]
        assert all(path.exists() for path in blobs)
        deadline = time.monotonic() + 60
        while any(path.exists() for path in blobs) and time.monotonic() < deadline:
            time.sleep(1)
        assert not any(path.exists() for path in blobs), blobs


def test_start_with_the_upstream_down(clean_hub, registry_version, registry_binary_path, tmp_path):
    """With the upstream refusing: 2.8 panics at start; 3.x starts with proxy.exec (as
    rendered, token or not) but panics without it (distribution issue 4038)."""
    refused = f"http://127.0.0.1:{free_port()}"
    rendered = start_mirror(clean_hub, registry_version, registry_binary_path, tmp_path / "rendered", upstream=refused)
    bare = start_mirror(
        clean_hub, registry_version, registry_binary_path, tmp_path / "bare", upstream=refused, username="", token=""
    )
    bare.config["proxy"].pop("exec", None)
    for proc, starts in ((rendered, is_3(registry_version)), (bare, False)):
        try:
            proc.start(timeout=15)
            started = True
        except RuntimeError:
            started = False
        finally:
            proc.stop()
        assert started is starts, proc.log_path.read_text()[-2000:]
        if not starts:
            assert "panic" in proc.log_path.read_text()


def test_the_newest_3_1_serves_through_its_helper_counts_and_starts_with_the_upstream_down(clean_hub, tmp_path):
    """3.1.2 on the same rendered config: a pull through its credential helper (one
    upstream GET per blob), the Prometheus counters status reads, and the start with the
    upstream down."""
    binary = registry_binary(NEWEST_3, tmp_path / "binary")
    proc = start_mirror(clean_hub, NEWEST_3, binary, tmp_path / "mirror")
    with proc:
        oci.pull(proc.hostport, "library/alpine", "latest", str(tmp_path / "first"))
        oci.pull(proc.hostport, "library/alpine", "latest", str(tmp_path / "second"))
        metrics = requests.get(f"{proc.debug}/metrics", timeout=5).text
        assert 'registry_proxy_hits_total{type="blob"}' in metrics
        used = [req for req in clean_hub.token_requests if not req["anonymous"]]
        assert used and all(req["password_ok"] for req in used)
        assert clean_hub.counts()["blob_get"] == len(oci.image_blobs(tmp_path / "first"))
    down = start_mirror(clean_hub, NEWEST_3, binary, tmp_path / "down", upstream=f"http://127.0.0.1:{free_port()}")
    with down:
        assert requests.get(f"{down.url}/v2/", timeout=5).status_code == 200
    assert HUB_TOKEN not in proc.log_path.read_text()


@pytest.mark.registry_dialect("3")
def test_a_token_realm_of_another_site_never_gets_the_token(clean_hub, registry_version, registry_binary_path, tmp_path):
    """3.x hands its credential helper whatever realm the upstream names: the helper
    answers only for the upstream's own site, so the registry logs in anonymously."""
    proc = start_mirror(clean_hub, registry_version, registry_binary_path, tmp_path)
    clean_hub.realm = clean_hub.realm.replace("127.0.0.1", "localhost")  # same server, another site
    try:
        with proc:
            oci.pull(proc.hostport, "library/alpine", "latest", str(tmp_path / "pulled"))
        assert clean_hub.token_requests
        assert all(req["anonymous"] for req in clean_hub.token_requests), clean_hub.token_requests
    finally:
        clean_hub.realm = clean_hub.realm.replace("localhost", "127.0.0.1")


def test_an_anonymous_mirror_pulls_as_anonymous(clean_hub, registry_version, registry_binary_path, tmp_path):
    """On 3.x an anonymous mirror has proxy.exec too (so it starts with the upstream
    down): its helper's empty credentials make the registry fetch anonymous tokens."""
    proc = start_mirror(clean_hub, registry_version, registry_binary_path, tmp_path, username="", token="")
    assert ("exec" in proc.config["proxy"]) is is_3(registry_version)
    with proc:
        oci.pull(proc.hostport, "library/alpine", "latest", str(tmp_path / "pulled"))
    assert clean_hub.token_requests
    assert all(req["anonymous"] for req in clean_hub.token_requests), clean_hub.token_requests
