"""Benchmark 3: cache-hit blob downloads from the mirror against nginx, on loopback.

A 500 MB blob is pulled through a mirror (registry 2.8.2, Debian's, with the config
hub_mirror renders, in proxy mode before the Docker Hub stand-in) until it is in the
mirror's storage. Then 1 and 16 concurrent ``curl`` clients download it from:

- hub_mirror as it runs, with its front, on 2.8.2 and on 3.0.0 (the supervisor running
  nginx and the registry as the service user, tests/support/supervised.py, each on a
  hard link of that storage): the figures;
- the registry alone on 2.8.2 and on 3.0.0 (``GET /v2/<repo>/blobs/<digest>``; both on
  that storage, a proxy each), as hub_mirror ran before its front;
- nginx serving that very file (``sendfile``): the practical limit of this machine;
- a plain registry (no proxy) on the same storage, read-only: tells the proxy layer's
  cost apart from the registry's own.

Throughput is bytes delivered over wall time; every download is checked for status 200
and the full size, and the stand-in's log must show no blob GET while the mirror serves
(they are cache hits). The servers' CPU seconds per GB served say where the time goes.
"""

import os
import pathlib
import signal
import subprocess
import time
from functools import partial

from bench.common import (
    HUB_TOKEN,
    HUB_USER,
    MB,
    log,
    mirror_addresses,
    mirror_process,
    ratio,
    summary,
)
from tests.support import oci
from tests.support.hub import FakeDockerHub
from tests.support.netutil import free_port, wait_http
from tests.support.processes import cpu_seconds, process_group
from tests.support.registry import RegistryProcess, default_config
from tests.support.release import REGISTRY_VERSIONS, registry_binary
from tests.support.supervised import SupervisedMirror

BLOB_BYTES = 500 * MB
QUICK_BLOB_BYTES = 50 * MB
CLIENTS = (1, 16)
REPO = "bench/big"
CURL_TIMEOUT = 600

NGINX_CONF = """\
worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /blob {{ alias {blob}; }}
    }}
}}
"""


class Nginx:
    """Debian's nginx with a private config and prefix (never the system service)."""

    def __init__(self, work, blob_path):
        self.work = pathlib.Path(work)
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/blob"
        self.conf = self.work / "nginx.conf"
        self.conf.write_text(
            NGINX_CONF.format(workers="auto", work=self.work, port=self.port, blob=blob_path)
        )
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.work), "-c", str(self.conf), "-g", "daemon off; master_process on;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "stderr.log", "ab"),  # pylint: disable=consider-using-with
            start_new_session=True,
        )
        wait_http(self.url, timeout=20, ok=(200,))
        return self

    def cpu(self):
        """CPU seconds of nginx's master and workers (its own process group)."""
        return sum(cpu_seconds(pid) or 0.0 for pid in process_group(self.proc.pid))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            # Its own session: the master and its workers, nothing else.
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _download(url, clients, size):
    """``clients`` concurrent curls of ``url``; (wall seconds, bytes). Each must get all."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    outputs = [proc.communicate(timeout=CURL_TIMEOUT) for proc in procs]
    seconds = time.perf_counter() - start
    for proc, (out, err) in zip(procs, outputs):
        status, _, got = out.partition(" ")
        if proc.returncode != 0 or status != "200" or int(got or 0) != size:
            raise RuntimeError(f"download of {url} failed: rc={proc.returncode} {out!r} {err.strip()!r}")
    return seconds, clients * size


def _wait_stored(path, size, timeout=300):
    """The mirror commits the blob in the background after serving it: wait for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size == size:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} not stored with {size} bytes after {timeout}s")


def run(ctx):
    work = ctx.dir("work")
    raw_bytes = QUICK_BLOB_BYTES if ctx.quick else BLOB_BYTES
    log(f"serve: building a {raw_bytes // MB} MB layer")
    info = oci.build_image(work / "layout", tag="big", layer_sizes=(raw_bytes,))
    digest, size = info["layer_digests"][0], info["layer_sizes"][0]

    hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None).start()
    ctx.defer(hub.stop)
    hub.push_image(work / "layout", "big", REPO)

    storage = work / "mirror-storage"
    mirrors = {}
    for version in REGISTRY_VERSIONS:
        mirror = mirror_process(f"serve-{version.replace('.', '-')}", work / f"mirror-{version}", hub.url, mirror_addresses(), storage, version)
        ctx.defer(mirror.stop)
        mirror.start()
        mirrors[version] = (f"{mirror.url}/v2/{REPO}/blobs/{digest}", mirror)
        if len(mirrors) == 1:
            log(f"serve: pulling the blob through the {version} mirror (cold)")
            _download(mirrors[version][0], 1, size)
            blob_path = storage / "docker/registry/v2/blobs/sha256" / digest[7:9] / digest[7:] / "data"
            _wait_stored(blob_path, size)

    nginx = Nginx(work / "nginx", blob_path).start()
    ctx.defer(nginx.stop)
    plain_config = default_config(storage, free_port())
    plain_config["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    plain = RegistryProcess(work / "plain", config=plain_config)
    ctx.defer(plain.stop)
    plain.start()
    plain_url = f"{plain.url}/v2/{REPO}/blobs/{digest}"

    fronted = {}
    for version in REGISTRY_VERSIONS:
        # The same blob file (a hard link), in a storage of its own: two fronts cannot
        # share a front directory.
        own = work / f"front-storage-{version}"
        subprocess.run(["cp", "-al", str(storage), str(own)], check=True)
        binary = registry_binary(version, work / f"front-{version}" / "binary")
        addresses = mirror_addresses()
        pillar = {"upstream": hub.url, "listen": addresses["listen"], "debug_listen": addresses["debug_listen"],
                  "storage": str(own), "username": HUB_USER, "token": HUB_TOKEN}
        front = SupervisedMirror(work / f"front-{version}", "serve", pillar, version, binary).start()
        ctx.defer(front.stop)
        fronted[version] = (f"{front.url}/v2/{REPO}/blobs/{digest}", front.cpu)

    servers = {
        "nginx": (nginx.url, nginx.cpu),
        **{f"hub_mirror_{version}": entry for version, entry in fronted.items()},
        **{f"mirror_{version}": (url, partial(cpu_seconds, proc.pid)) for version, (url, proc) in mirrors.items()},
        "plain_registry": (plain_url, lambda: cpu_seconds(plain.pid)),
    }
    # Every server once before timing: the file in the page cache, connections warm.
    for url, _ in servers.values():
        _download(url, 1, size)

    throughput = {name: {c: [] for c in CLIENTS} for name in servers}
    cpu_per_gb = {name: {c: [] for c in CLIENTS} for name in servers}
    hub.reset_counts()
    for run_index in range(ctx.runs):
        for clients in CLIENTS:
            for name, (url, cpu) in servers.items():
                before = cpu()
                seconds, moved = _download(url, clients, size)
                used = cpu() - before
                throughput[name][clients].append(moved / seconds / MB)
                cpu_per_gb[name][clients].append(used / (moved / 1e9))
                log(f"serve: run {run_index + 1} {name} x{clients}: {moved / seconds / MB:.0f} MB/s")
    upstream = hub.counts()

    result = {"blob_bytes": size, "upstream_during_hits": upstream, "figures": {}}
    for clients in CLIENTS:
        key = f"{clients}_client" + ("s" if clients > 1 else "")
        result["figures"][key] = {
            **{f"{name}_mb_s": summary(throughput[name][clients], 1) for name in servers},
            **{
                f"{name}_vs_nginx": ratio(throughput[name][clients], throughput["nginx"][clients])
                for name in servers
                if name != "nginx"
            },
            "server_cpu_s_per_gb": {name: summary(cpu_per_gb[name][clients], 2) for name in servers},
        }
    if upstream["blob_get"]:
        result["warning"] = "the stand-in saw blob GETs while the mirror served: not all were cache hits"
    return result
