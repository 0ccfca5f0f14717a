"""Benchmark 7: N clients pulling one cold image at once through one mirror, over a WAN.

The setting of benchmark 2 (bench/wanlink.py: the Docker Hub stand-in in namespace
``wan``, mirrors and clients in ``lan``, the link shaped to 200 Mbit with 40 or 150 ms
RTT). Per profile, registry version and N (1, 4, 16, 32), interleaved per run:

- ``direct``: one client pulls the image straight from the stand-in (anonymous token);
- ``hub_mirror``: N clients at once through a mirror with its front (the real supervisor
  running nginx and the registry as the service user, tests/support/supervised.py), cold;
- ``distribution``: the same through the registry alone (``front: none``), cold.

A client is what a container runtime does: the manifest by tag, then the config and the
layers three at a time (sizes checked; digests by the first client). Reported: upstream blob GETs per
distinct blob, upstream bytes per image byte, the last client's time over the direct
pull's, and the first-byte time of each blob request (median and max over clients: a
client that waits for another's fill gets its first byte when that fill ends).

zot (its on-demand sync is the other anchor the issue names) is not measured: the Go
module proxy refuses every zot module path (docs/benchmarks.md).
"""

import hashlib
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import requests

from bench.common import HUB_TOKEN, HUB_USER, MB, log, mirror_addresses, ratio, rmtree, summary
from bench.upstream import Upstream
from bench.wanlink import WAN_ADDR, WanLink
from tests.support import oci
from tests.support.release import REGISTRY_VERSIONS, registry_binary
from tests.support.supervised import SupervisedMirror

PROFILES = (
    {"name": "40ms-200mbit", "rate_mbit": 200, "rtt_ms": 40},
    {"name": "150ms-200mbit", "rate_mbit": 200, "rtt_ms": 150},
)
IMAGE = (10 * MB,) * 4
QUICK_IMAGE = (2 * MB,) * 4
FAN_IN = (1, 4, 16, 32)
QUICK_FAN_IN = (1, 8)
SUBJECTS = ("hub_mirror", "distribution")
ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
CHUNK = 1 << 20
TIMEOUT = 600


class Client:
    """One registry client: a session, and a bearer token when the registry asks."""

    def __init__(self, base):
        self.base = base
        self.session = requests.Session()
        self.session.trust_env = False

    def get(self, path, **kwargs):
        response = self.session.get(self.base + path, timeout=TIMEOUT, **kwargs)
        if response.status_code == 401:
            response.close()
            self._login(response.headers.get("WWW-Authenticate", ""))
            response = self.session.get(self.base + path, timeout=TIMEOUT, **kwargs)
        response.raise_for_status()
        return response

    def _login(self, challenge):
        fields = dict(part.split("=", 1) for part in challenge.split(" ", 1)[1].split(","))
        fields = {key.strip(): value.strip('"') for key, value in fields.items()}
        realm = fields.pop("realm")
        token = self.session.get(f"{realm}?{urllib.parse.urlencode(fields)}", timeout=TIMEOUT).json()
        self.session.headers["Authorization"] = f"Bearer {token.get('token') or token.get('access_token')}"

    def blob(self, repo, descriptor, started, verify):
        """Fetch one blob, check its size (and with ``verify`` its digest); its first byte's
        time after ``started``."""
        with self.get(f"/v2/{repo}/blobs/{descriptor['digest']}", stream=True) as response:
            sha, first, size = hashlib.sha256(), None, 0
            for chunk in response.iter_content(CHUNK):
                if first is None:
                    first = time.perf_counter() - started
                size += len(chunk)
                if verify:
                    sha.update(chunk)
        if size != descriptor["size"] or (verify and "sha256:" + sha.hexdigest() != descriptor["digest"]):
            raise RuntimeError(f"{repo} blob {descriptor['digest']} arrived corrupt")
        return first

    def pull(self, repo, tag, start, verify=True):
        """Pull ``repo:tag`` once ``start`` (a barrier) lets every client go; (seconds,
        manifest digest, first-byte times of its blobs)."""
        start.wait()
        began = time.perf_counter()
        manifest = self.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        digest = "sha256:" + hashlib.sha256(manifest.content).hexdigest()
        descriptors = [manifest.json()["config"], *manifest.json()["layers"]]
        with ThreadPoolExecutor(3) as pool:
            firsts = list(pool.map(lambda d: self.blob(repo, d, time.perf_counter(), verify), descriptors))
        seconds = time.perf_counter() - began
        self.session.close()
        return seconds, digest, firsts


def fan_in(url, repo, tag, clients):
    """``clients`` pulls at once; the results of each. The first client checks every
    digest, the others every size: 32 clients hashing on the benchmark's two cores would
    measure hashlib, not the mirror (tests/reliability/test_fan_in.py checks every digest
    of every client)."""
    start = threading.Barrier(clients)
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda i: Client(url).pull(repo, tag, start, verify=i == 0), range(clients)))


def run(ctx):
    work = ctx.dir("work")
    sizes = QUICK_IMAGE if ctx.quick else IMAGE
    counts = QUICK_FAN_IN if ctx.quick else FAN_IN
    info = oci.build_image(work / "layout", tag="fanin", layer_sizes=sizes)
    blob_sizes = {info["config_digest"]: None, **dict(zip(info["layer_digests"], info["layer_sizes"]))}
    link = WanLink(ctx.netns_name("f")).create()
    ctx.defer(link.delete)
    upstream = Upstream(link.wan, work, WAN_ADDR, HUB_USER, HUB_TOKEN)
    ctx.defer(upstream.stop)
    upstream.push(work / "layout", "fanin", "bench/fanin")
    layer_bytes = sum(info["layer_sizes"])

    results = {"image_bytes": info["total_size"], "blobs": len(blob_sizes), "profiles": {}}
    with link.lan.entered():
        for profile in PROFILES:
            one_way = link.shape(profile["rate_mbit"], profile["rtt_ms"])
            upstream.set_delay(one_way)
            log(f"fanin: profile {profile['name']}")
            figures = {}
            for version in REGISTRY_VERSIONS:
                binary = registry_binary(version, ctx.dir("binary", version))
                for clients in counts:
                    figures[f"{version} x{clients}"] = _measure(
                        ctx, upstream, binary, version, clients, blob_sizes, layer_bytes, info["manifest_digest"]
                    )
            results["profiles"][profile["name"]] = {**profile, "relay_one_way_ms": one_way * 1000, "figures": figures}
        link.shape(None, 0)
    return results


def _measure(ctx, upstream, binary, version, clients, blob_sizes, layer_bytes, manifest_digest):
    times = {"direct": [], **{subject: [] for subject in SUBJECTS}}
    gets = {subject: [] for subject in SUBJECTS}
    pulled = {subject: [] for subject in SUBJECTS}
    firsts = {subject: [] for subject in SUBJECTS}
    for run_index in range(ctx.runs):
        upstream.reset()
        (seconds, digest, _), = fan_in(upstream.url, "bench/fanin", "fanin", 1)
        times["direct"].append(seconds)
        for subject in SUBJECTS:
            workdir = ctx.dir(f"{subject}-{version}-{clients}-{run_index}")
            mirror = SupervisedMirror(
                workdir,
                "fanin",
                {"upstream": upstream.url, **_addresses(), "storage": str(workdir / "storage")},
                version,
                binary,
                front=subject == "hub_mirror",
            ).start()
            try:
                upstream.reset()
                results = fan_in(mirror.url, "bench/fanin", "fanin", clients)
                time.sleep(1 if version.startswith("3") else 3)  # 2.8 stores each blob from a second fetch
                requests_ = upstream.requests()
            finally:
                mirror.stop()
                rmtree(workdir)
            if {digest for _, digest, _ in results} != {manifest_digest}:
                raise RuntimeError(f"{subject} x{clients} served another manifest")
            blob_gets = [r for r in requests_ if r["kind"] == "blob" and r["method"] == "GET" and r["status"] == 200]
            times[subject].append(max(seconds for seconds, _, _ in results))
            gets[subject].append(len(blob_gets) / len(blob_sizes))
            pulled[subject].append(sum(blob_sizes.get(r["ref"]) or 0 for r in blob_gets) / layer_bytes)
            firsts[subject].extend(first for _, _, blob_firsts in results for first in blob_firsts)
            log(f"fanin:   {version} x{clients} run {run_index + 1} {subject}: last {times[subject][-1]:.2f}s, "
                f"direct {times['direct'][-1]:.2f}s, {gets[subject][-1]:.2f} GETs/blob")
    return {
        "clients": clients,
        "direct_s": summary(times["direct"]),
        **{
            subject: {
                "last_client_s": summary(times[subject]),
                "last_vs_direct": ratio(times[subject], times["direct"]),
                "upstream_gets_per_blob": summary(gets[subject], 2),
                "upstream_layer_bytes_per_image": summary(pulled[subject], 2),
                "first_byte_s": summary(firsts[subject], 3) | {"samples": None},
            }
            for subject in SUBJECTS
        },
    }


def _addresses():
    addresses = mirror_addresses()
    return {"listen": addresses["listen"], "debug_listen": addresses["debug_listen"]}
