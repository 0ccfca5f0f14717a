"""Benchmark 2: pulls through the mirror over an emulated WAN.

The Docker Hub stand-in sits in namespace ``wan``; the mirrors (hub_mirror's supervisor
running its front and registry 2.8.2 or 3.0.0, as the service runs them,
tests/support/supervised.py) and the client (skopeo) sit in namespace ``lan``; the veth
between them is shaped (bench/wanlink.py). Per profile, image and
registry version, interleaved per run: a direct pull from the stand-in, a cold pull
through a mirror with empty storage, and a warm pull through the same mirror. Every
pull's manifest digest is checked, and the stand-in's access log gives the upstream
requests each pull cost.
"""

import pathlib
import time
import uuid

from bench.common import HUB_TOKEN, HUB_USER, MB, log, mirror_addresses, ratio, rmtree, summary, timed
from bench.upstream import Upstream
from bench.wanlink import WAN_ADDR, WanLink
from tests.support import oci
from tests.support.release import REGISTRY_VERSIONS, registry_binary
from tests.support.supervised import SupervisedMirror

PROFILES = (
    # The stand-in's own capacity, one run: if direct pulls here are far faster than the
    # shaped link, the Python front is not what limits the shaped profiles.
    {"name": "unshaped", "rate_mbit": None, "rtt_ms": 0, "runs": 1},
    {"name": "40ms-200mbit", "rate_mbit": 200, "rtt_ms": 40},
    # A far region: the same bandwidth behind almost four times the RTT.
    {"name": "150ms-200mbit", "rate_mbit": 200, "rtt_ms": 150},
)
IMAGES = {
    "1x100MB": (100 * MB,),
    "10x10MB": (10 * MB,) * 10,
}
QUICK_IMAGES = {
    "1x20MB": (20 * MB,),
    "10x2MB": (2 * MB,) * 10,
}
PULL_TIMEOUT = 600


def _pull(hostport, repo, tag, dest):
    """skopeo copy docker://HOSTPORT/REPO:TAG oci:DEST, anonymous, plain HTTP; the digest.

    The registry is across the emulated link (not loopback), so this is not
    ``oci.pull``, which refuses anything but loopback.
    """
    args = [
        "--override-arch", "amd64", "--override-os", "linux",
        "copy", "--retry-times", "0", "--src-tls-verify=false", "--src-no-creds", "--quiet",
        f"docker://{hostport}/{repo}:{tag}", f"oci:{dest}:{tag}",
    ]
    pathlib.Path(dest).mkdir(parents=True, exist_ok=True)
    oci.run_skopeo(args, timeout=PULL_TIMEOUT)
    return oci.read_tag(dest, tag)["digest"]


class _Mirror:
    """The mirror in ``lan``, front and registry, emptied at will."""

    def __init__(self, workdir, upstream_url, version):
        self.workdir = workdir
        self.version = version
        self.storage = workdir / "storage"
        addresses = mirror_addresses()
        pillar = {
            "upstream": upstream_url,
            "listen": addresses["listen"],
            "debug_listen": addresses["debug_listen"],
            "storage": str(self.storage),
            "username": HUB_USER,
            "token": HUB_TOKEN,
        }
        binary = registry_binary(version, workdir / "binary")
        self.process = SupervisedMirror(workdir / "supervised", "wan", pillar, version, binary)
        self.hostport = self.process.hostport

    def wait_committed(self, digests, timeout=300):
        """Seconds until every blob in ``digests`` is in storage (renamed into place on
        commit, so there means complete)."""
        start = time.monotonic()
        paths = [self.storage / "docker/registry/v2/blobs/sha256" / d[7:9] / d[7:] / "data" for d in digests]
        while not all(path.exists() for path in paths):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the mirror did not commit {digests} within {timeout}s")
            time.sleep(0.05)
        return time.monotonic() - start

    def empty(self):
        self.process.stop()
        rmtree(self.storage)
        self.process.start()

    def stop(self):
        self.process.stop()


def run(ctx):
    work = ctx.dir("work")
    images = QUICK_IMAGES if ctx.quick else IMAGES
    layout = work / "layout"
    built = {}
    for name, sizes in images.items():
        log(f"wan: building image {name}")
        built[name] = oci.build_image(layout, tag=name, layer_sizes=sizes)

    link = WanLink(ctx.netns_name("w")).create()
    ctx.defer(link.delete)
    upstream = Upstream(link.wan, work, WAN_ADDR, HUB_USER, HUB_TOKEN)
    ctx.defer(upstream.stop)
    for name in images:
        upstream.push(layout, name, f"bench/{name.lower()}")

    results = {"emulator": link.emulator, "profiles": {}}
    with link.lan.entered():
        mirrors = {version: _Mirror(ctx.dir(f"mirror-{version}"), upstream.url, version) for version in REGISTRY_VERSIONS}
        try:
            for mirror in mirrors.values():
                mirror.process.start()
            for profile in PROFILES:
                one_way = link.shape(profile["rate_mbit"], profile["rtt_ms"])
                upstream.set_delay(one_way)
                log(f"wan: profile {profile['name']} ({link.emulator})")
                results["profiles"][profile["name"]] = {
                    **profile,
                    "qdiscs": link.qdiscs(),
                    "relay_one_way_ms": one_way * 1000,
                    "images": {
                        name: {
                            version: _measure(profile.get("runs", ctx.runs), work, upstream, mirror, name, built[name])
                            for version, mirror in mirrors.items()
                        }
                        for name in images
                    },
                }
        finally:
            for mirror in mirrors.values():
                mirror.stop()
            link.shape(None, 0)
    return results


def _measure(runs, work, upstream, mirror, image, info):
    repo, tag = f"bench/{image.lower()}", image
    times = {"direct": [], "cold": [], "warm": []}
    requests = {"direct": [], "cold": [], "warm": []}
    commit_lag = []
    blobs = [info["config_digest"], *info["layer_digests"]]
    for run in range(runs):
        mirror.empty()
        for kind, hostport in (("direct", upstream.hostport), ("cold", mirror.hostport), ("warm", mirror.hostport)):
            dest = work / "pulls" / uuid.uuid4().hex[:8]
            upstream.reset()
            seconds, digest = timed(_pull, hostport, repo, tag, dest)
            rmtree(dest)
            if digest != info["manifest_digest"]:
                raise RuntimeError(f"{kind} pull of {repo}:{tag} got {digest}, pushed {info['manifest_digest']}")
            if kind == "cold":
                # 2.8 commits each blob from a second upstream fetch of its own, in the
                # background (3.x from the same fetch): a pull before that ends misses
                # again. Warm means committed, and the cold pull's count includes those
                # fetches.
                commit_lag.append(mirror.wait_committed(blobs))
                # The front keeps a tag's answer for a second: a warm pull is a later one,
                # which asks the upstream (a HEAD), as a pull the next day would.
                time.sleep(1.5)
            times[kind].append(seconds)
            requests[kind].append(upstream.counts())
            log(f"wan:   {image} on {mirror.version} run {run + 1} {kind}: {seconds:.2f}s")
    size = info["total_size"]
    return {
        "runs": runs,
        "bytes": size,
        "direct_s": summary(times["direct"]),
        "cold_s": summary(times["cold"]),
        "warm_s": summary(times["warm"]),
        "direct_mbit_s": round(size * 8 / 1e6 / summary(times["direct"])["median"], 1),
        "cold_vs_direct": ratio(times["cold"], times["direct"]),
        "warm_vs_direct": ratio(times["warm"], times["direct"]),
        "upstream_requests_per_pull": {
            kind: {key: [c[key] for c in counts] for key in counts[0]} for kind, counts in requests.items()
        },
        "cache_commit_after_cold_pull_s": summary(commit_lag),
        "warm_upstream_gets": sum(c["manifest_get"] + c["blob_get"] for c in requests["warm"]),
    }
