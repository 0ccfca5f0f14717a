"""Benchmark 4: ``hub_mirror.catalog`` over 10,000 cached repositories.

The storage is laid out directly, the way the registry lays out what it caches: per
repository a tag ``latest`` (``current`` and ``index`` links), the manifest revision
link and the config and layer links, all pointing at one shared image's blobs. A mirror
(the registry with hub_mirror's rendered config, in proxy mode before the Docker Hub
stand-in) serves that storage, and lists it in ``/v2/_catalog`` in pages.

Timed, interleaved per run, each counted and checked to find every repository:

- the baseline: a raw walk of the storage directory (``os.scandir``, as the registry
  walks it: a directory holding ``_manifests`` is a repository);
- the registry's own ``/v2/_catalog``, paged (what ``source=api`` must wait for);
- the exec function called in Python (the module loaded directly), ``source=api``
  and ``source=disk``;
- the exec function through ``salt-call --local`` (both sources), and ``salt-call
  test.true``: the price of starting Salt at all.
"""

import hashlib
import json
import os

from bench.common import (
    HUB_TOKEN,
    HUB_USER,
    bench_minion,
    log,
    mirror_addresses,
    mirror_process,
    ratio,
    summary,
    timed,
)
from tests.support.hub import FakeDockerHub
from tests.support.modules import exec_module
from tests.support.netutil import loopback_session

REPOSITORIES = 10_000
QUICK_REPOSITORIES = 1_000
NAMESPACES = 100
PAGE = 1000
CALL_TIMEOUT = 600


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as fh:
        fh.write(text)


def lay_out(storage, count):
    """Write ``count`` cached repositories into ``storage``; returns their names."""
    v2 = os.path.join(storage, "docker", "registry", "v2")
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = b"bench layer\n"
    config_hex, layer_hex = _sha(config), _sha(layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config_hex}", "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{layer_hex}", "size": len(layer)}],
        }
    ).encode()
    manifest_hex = _sha(manifest)
    for hexdigest, data in ((config_hex, config), (layer_hex, layer), (manifest_hex, manifest)):
        path = os.path.join(v2, "blobs", "sha256", hexdigest[:2], hexdigest, "data")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    names = [f"ns{index % NAMESPACES:02d}/img{index:05d}" for index in range(count)]
    for name in names:
        repo = os.path.join(v2, "repositories", name)
        manifests = os.path.join(repo, "_manifests")
        _write(os.path.join(manifests, "revisions", "sha256", manifest_hex, "link"), f"sha256:{manifest_hex}")
        _write(os.path.join(manifests, "tags", "latest", "current", "link"), f"sha256:{manifest_hex}")
        _write(os.path.join(manifests, "tags", "latest", "index", "sha256", manifest_hex, "link"), f"sha256:{manifest_hex}")
        for hexdigest in (config_hex, layer_hex):
            _write(os.path.join(repo, "_layers", "sha256", hexdigest, "link"), f"sha256:{hexdigest}")
    return sorted(names)


def raw_walk(storage):
    """Every directory under ``repositories`` that holds ``_manifests``: the baseline."""
    root = os.path.join(storage, "docker", "registry", "v2", "repositories")
    found = []
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                if entry.name == "_manifests":
                    found.append(relative)
                elif entry.name[0] != "_" and entry.is_dir(follow_symlinks=False):
                    pending.append(f"{relative}/{entry.name}" if relative else entry.name)
    return found


def api_walk(base_url):
    """The registry's ``/v2/_catalog``, page by page (``Link`` headers)."""
    found = []
    url = f"{base_url}/v2/_catalog?n={PAGE}"
    with loopback_session() as session:
        while url:
            response = session.get(url, timeout=CALL_TIMEOUT)
            response.raise_for_status()
            found += response.json()["repositories"]
            link = response.headers.get("Link", "")
            url = base_url + link[1 : link.index(">")] if link else None
    return found


def run(ctx):
    work = ctx.dir("work")
    count = QUICK_REPOSITORIES if ctx.quick else REPOSITORIES
    storage = work / "storage"
    log(f"catalog: laying out {count} repositories")
    seconds, names = timed(lay_out, str(storage), count)
    log(f"catalog: laid out in {seconds:.1f}s")

    hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None).start()
    ctx.defer(hub.stop)
    addresses = mirror_addresses()
    registry = mirror_process("catalog", work / "mirror", hub.url, addresses, storage)
    ctx.defer(registry.stop)
    registry.start()

    mirror = {
        "upstream": hub.url,
        "listen": addresses["listen"],
        "debug_listen": addresses["debug_listen"],
        "storage": str(storage),
    }
    pillar = {"mirrors": {"catalog": mirror}}
    module = exec_module(pillar)
    minion = bench_minion(work / "minion")
    minion.set_pillar(pillar)
    minion.sync()

    def salt_call(*args):
        result = minion.run(*args, timeout=CALL_TIMEOUT)
        if result.returncode != 0:
            raise RuntimeError(f"salt-call {' '.join(args)} failed: {result!r}")
        return result.data

    methods = {
        "raw_walk": lambda: raw_walk(str(storage)),
        "registry_api": lambda: api_walk(registry.url),
        "python_api": lambda: module.catalog(mirror="catalog", source="api"),
        "python_disk": lambda: module.catalog(mirror="catalog", source="disk"),
        "salt_call_api": lambda: salt_call("hub_mirror.catalog", "mirror=catalog"),
        "salt_call_disk": lambda: salt_call("hub_mirror.catalog", "mirror=catalog", "source=disk"),
        "salt_call_test_true": lambda: salt_call("test.true"),
    }
    times = {name: [] for name in methods}
    for run_index in range(ctx.runs):
        for name, method in methods.items():
            seconds, found = timed(method)
            if name != "salt_call_test_true" and sorted(found) != names:
                raise RuntimeError(f"{name} found {len(found)} repositories, not the {count} laid out")
            times[name].append(seconds)
        log(f"catalog: run {run_index + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))

    return {
        "repositories": count,
        "page_size": PAGE,
        "seconds": {name: summary(values) for name, values in times.items()},
        "vs_raw_walk": {
            name: ratio(values, times["raw_walk"]) for name, values in times.items() if name != "raw_walk"
        },
        "python_api_vs_registry_api": ratio(times["python_api"], times["registry_api"]),
        "salt_call_api_vs_test_true": ratio(times["salt_call_api"], times["salt_call_test_true"]),
    }
