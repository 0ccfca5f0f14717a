"""``hub_mirror.catalog`` at 10,000 repositories, against a real registry serving a storage
directory written directly in the registry's layout (fast: no pushes), compared with a
plain directory walk of the same storage. Complete through the API's pagination, also when
the server's ``catalog.maxentries`` is below the page size asked for, and from the disk;
repositories whose content has expired are left out. Prints the timings (no assertion on
them): ``pytest -s`` shows them."""

import hashlib
import json
import os
import re
import time

import pytest

from tests.support.modules import exec_module, lib
from tests.support.netutil import free_port
from tests.support.registry import RegistryProcess, default_config
from tests.support.saltcall import Masterless

registry_api = lib("registry_api")

pytestmark = pytest.mark.functional

COUNT = 10_000
EXPIRED = 20  # of each kind: unlinked by the registry, and overdue in its scheduler state


def _blob(v2, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = v2 / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _link(path, digest):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "link"), "w", encoding="ascii") as handle:
        handle.write(digest)


def write_storage(root, count=COUNT, expired=EXPIRED):
    """``count`` cached repositories sharing one image, plus ``expired`` repositories whose
    manifest the registry already unlinked and ``expired`` whose expiry is overdue.
    Returns (cached names, expired names)."""
    v2 = root / "docker" / "registry" / "v2"
    config = _blob(v2, json.dumps({"os": "linux", "architecture": "amd64", "rootfs": {}}).encode())
    layer = _blob(v2, b"\x1f\x8b" + os.urandom(4096))
    manifest = _blob(
        v2,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 1}],
            }
        ).encode(),
    )

    def repository(name, revision=True):
        base = os.path.join(v2, "repositories", name)
        _link(os.path.join(base, "_manifests", "tags", "latest", "current"), manifest)
        _link(os.path.join(base, "_manifests", "tags", "latest", "index", "sha256", manifest[7:]), manifest)
        for blob in (config, layer):
            _link(os.path.join(base, "_layers", "sha256", blob[7:]), blob)
        if revision:
            _link(os.path.join(base, "_manifests", "revisions", "sha256", manifest[7:]), manifest)

    cached = [f"org{i % 100:02d}/repo{i:05d}" for i in range(count)]
    for name in cached:
        repository(name)
    unlinked = [f"zz-expired/unlinked{i:02d}" for i in range(expired)]
    overdue = [f"zz-expired/overdue{i:02d}" for i in range(expired)]
    for name in unlinked:
        # What the registry leaves after expiring a manifest: tags, no revision link.
        repository(name, revision=False)
    schedule = {}
    for name in overdue:
        repository(name)
        key = f"{name}@{manifest}"
        schedule[key] = {"Key": key, "ExpiryData": "2001-01-01T00:00:00Z", "EntryType": 1}
    (root / "scheduler-state.json").write_text(json.dumps(schedule))
    return cached, unlinked + overdue


def directory_walk(storage):
    """The plain walk: every directory holding ``_manifests``."""
    root = os.path.join(storage, "docker", "registry", "v2", "repositories")
    found = []
    for path, dirs, _ in os.walk(root):
        if "_manifests" in dirs:
            found.append(os.path.relpath(path, root))
        dirs[:] = [d for d in dirs if not d.startswith("_")]
    return found


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalog-scale")
    began = time.monotonic()
    cached, expired = write_storage(root / "storage")
    print(f"\nwrote {len(cached) + len(expired)} repositories in {time.monotonic() - began:.1f}s")
    return root, cached, expired


@pytest.fixture(scope="module", params=[None, 100], ids=["maxentries-default", "maxentries-100"])
def registry(request, storage):
    """A plain registry serving the storage; with ``catalog.maxentries`` 1000 (its default,
    the page size catalog asks for) or 100 (below it)."""
    root, _, _ = storage
    port = free_port()
    config = default_config(root / "storage", port)
    if request.param:
        config["catalog"] = {"maxentries": request.param}
    with RegistryProcess(root / f"registry-{request.param}", config=config) as registry:
        registry.maxentries = request.param or 1000
        yield registry


@pytest.fixture(scope="module")
def minion(storage):
    minion = Masterless.fresh()
    yield minion
    minion.discard()


@pytest.fixture
def module(registry, storage):
    """The execution module in this process, for timings without salt-call's start-up."""
    return exec_module({"mirrors": {"scale": {"listen": registry.hostport, "storage": str(storage[0] / "storage")}}})


def timed(function, *args, **kwargs):
    began = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - began


def test_catalog_lists_all_10000_repositories_and_no_expired_one(registry, storage, minion, module):
    root, cached, expired = storage
    minion.set_pillar(
        {"mirrors": {"scale": {"listen": registry.hostport, "storage": str(root / "storage")}}}
    )
    walked, walk_seconds = timed(directory_walk, str(root / "storage"))
    assert sorted(walked) == sorted(cached + expired)

    # The registry itself lists the expired ones too: its directories stay.
    listed, api_seconds = timed(registry_api.repositories_api, registry.url)
    assert sorted(listed) == sorted(cached + expired)

    via_api, catalog_api_seconds = timed(module.catalog, "scale")
    via_disk, catalog_disk_seconds = timed(module.catalog, "scale", source="disk")
    assert via_api == via_disk == sorted(cached)
    sized, sized_seconds = timed(module.catalog, "scale", sizes=True, tags=True, source="disk")
    assert len(sized) == COUNT
    assert len({json.dumps(entry, sort_keys=True) for entry in sized.values()}) == 1

    began = time.perf_counter()
    result = minion.run("hub_mirror.catalog", "mirror=scale")
    salt_call_seconds = time.perf_counter() - began
    assert result.returncode == 0, result
    assert result.data == sorted(cached)
    began = time.perf_counter()
    result = minion.run("hub_mirror.catalog", "mirror=scale", "source=disk")
    salt_call_disk_seconds = time.perf_counter() - began
    assert result.data == sorted(cached)

    print(
        "\n"
        + json.dumps(
            {
                "repositories": COUNT,
                "expired_left_out": len(expired),
                "server_maxentries": registry.maxentries,
                "directory_walk_s": round(walk_seconds, 3),
                "registry_catalog_api_pages_s": round(api_seconds, 3),
                "catalog_api_s": round(catalog_api_seconds, 3),
                "catalog_disk_s": round(catalog_disk_seconds, 3),
                "catalog_disk_tags_sizes_s": round(sized_seconds, 3),
                "salt_call_catalog_api_s": round(salt_call_seconds, 3),
                "salt_call_catalog_disk_s": round(salt_call_disk_seconds, 3),
            },
            indent=1,
        )
    )


def test_catalog_pages_at_the_servers_limit(registry, storage, module):
    """Once the server has refused a page size, every page asks for its maximum."""
    _, cached, expired = storage
    start = len(registry.log_text())
    listed = registry_api.repositories_api(registry.url)
    assert len(listed) == len(cached) + len(expired)
    # The access log: "GET /v2/_catalog?...n=N HTTP/1.1" STATUS
    asked = [
        (int(n), int(status))
        for n, status in re.findall(r'"GET /v2/_catalog\?\S*?n=(\d+) HTTP/1.1" (\d+)', registry.log_text()[start:])
    ]
    assert all((status == 400) == (n > registry.maxentries) for n, status in asked), asked
    full_pages = -(-len(listed) // registry.maxentries)
    assert [n for n, _ in asked[-full_pages:]] == [registry.maxentries] * full_pages, asked
    # Finding the limit costs a few first pages, not smaller pages all along.
    assert len(asked) - full_pages <= 12, asked
