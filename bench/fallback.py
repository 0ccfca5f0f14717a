"""Benchmark 6: what a dead mirror costs a pull, for containerd (``ctr --hosts-dir``) and
skopeo (``registries.conf``).

All inside one private network namespace with only ``lo`` up (tests/support/clients.py):
there the Docker Hub stand-in *is* ``registry-1.docker.io`` (TLS on 443, a private
/etc/hosts), so each client's real fallback to Docker Hub is exercised and nothing can
leave the machine.

Two ways a mirror dies:

- ``refused``: the mirror's port on 127.0.0.1 has no listener (connect fails at once);
- ``blackhole``: the mirror's address (10.99.0.2) is routed into ``lo`` after the mirror
  is gone, where the kernel drops every packet without an answer (no forwarding), so a
  connect hangs until the client gives up, as behind a firewall that drops.

For each: a live mirror at that address, ``state.apply hub_mirror.client`` (salt-call,
in the namespace) points both clients at it; the files it wrote are copied aside (the
"dead mirror configured" host); the mirror dies; the client state runs again, probes,
and takes the mirror out (the "removed after probing" host). A third host has no mirror
configured at all: the baseline. Pulls alternate between the three hosts' config files;
each pull starts from nothing (ctr: a fresh containerd namespace; skopeo: a new OCI dir).
"""

import concurrent.futures
import shutil
import socket
import subprocess

from bench.common import HUB_TOKEN, HUB_USER, BenchMinion, log, ratio, summary, timed
from tests.support import oci
from tests.support.clients import (
    Containerd,
    NetNS,
    TLSFront,
    client_env,
    client_etc,
    make_hub_identity,
    skopeo_copy,
)
from tests.support.hub import FakeDockerHub
from tests.support.registry import RegistryProcess

IMAGE = "library/benchfall"
REF = f"docker.io/{IMAGE}:latest"
BLACKHOLE_ADDR = "10.99.0.2"
PULL_TIMEOUT = 600
# A black-holed mirror costs each pull the clients' connect timeouts (tens of seconds):
# fewer runs of those, unless asked for more.
BLACKHOLE_RUNS = 1


def _ip(netns, *args):
    subprocess.run(["ip", "-n", netns.name, *args], check=True, capture_output=True, text=True, timeout=30)


def _dead_port():
    """A loopback port in the current namespace with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Host:
    """One build host's client config files under ``root`` (certs.d, /etc/containers)."""

    def __init__(self, root, ca_file):
        self.root = root
        self.etc_hosts, self.containers = client_etc(root / "etc")
        self.certs_d = root / "certs.d"
        self.certs_d.mkdir(parents=True, exist_ok=True)
        self.env = client_env(root / "client", ca_file)

    def copy_to(self, root, ca_file):
        """A host whose config files are this one's, as they are now."""
        shutil.copytree(self.root / "etc", root / "etc")
        shutil.copytree(self.certs_d, root / "certs.d")
        other = Host.__new__(Host)
        other.root = root
        other.etc_hosts = root / "etc" / "hosts"
        other.containers = root / "etc" / "containers"
        other.certs_d = root / "certs.d"
        other.env = client_env(root / "client", ca_file)
        return other

    def client_pillar(self, mirror_url, state_dir):
        paths = {
            "containerd_config": self.root / "containerd-config.toml",
            "containerd_certs_d": self.certs_d,
            "registries_conf": self.containers / "registries.conf",
            "registries_conf_d": self.containers / "registries.conf.d",
            "docker_daemon_json": self.root / "docker" / "daemon.json",
            "docker_pidfile": self.root / "docker.pid",
            "docker_socket": self.root / "docker.sock",
            "buildkitd_toml": self.root / "buildkit" / "buildkitd.toml",
            "k3s_registries": self.root / "k3s" / "registries.yaml",
            "rke2_registries": self.root / "rke2" / "registries.yaml",
        }
        return {
            "client": {
                "mirrors": {"docker.io": [mirror_url]},
                "runtimes": ["containerd", "podman"],
                "probe_timeout": 2,
                "paths": {key: str(value) for key, value in paths.items()},
            },
            "lookup": {"state_dir": str(state_dir)},
        }

    def ctr_pull(self, containerd):
        return containerd.pull(REF, self.certs_d)

    def skopeo_pull(self, netns, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        skopeo_copy(
            netns,
            REF,
            dest,
            self.env,
            {"/etc/hosts": self.etc_hosts, "/etc/containers": self.containers},
            timeout=PULL_TIMEOUT,
        )
        return oci.read_tag(dest, "pulled")["digest"]


def _timed_skopeo(host, netns, dest, image):
    seconds, digest = timed(host.skopeo_pull, netns, dest)
    shutil.rmtree(dest, ignore_errors=True)
    if digest != image["manifest_digest"]:
        raise RuntimeError(f"skopeo pulled {digest}, not {image['manifest_digest']}")
    return seconds


def _apply_client(minion, host, mirror_url, state_dir):
    minion.set_pillar(host.client_pillar(mirror_url, state_dir))
    seconds, result = timed(minion.apply, "hub_mirror.client")
    if result.returncode != 0 or not result.states:
        raise RuntimeError(f"state.apply hub_mirror.client failed: {result!r}")
    ((_, ret),) = result.states.items()
    if ret["result"] is not True:
        raise RuntimeError(f"hub_mirror.client: {ret}")
    return seconds, ret


def run(ctx):
    work = ctx.dir("work")
    layout = work / "layout"
    image = oci.build_image(layout, tag="latest", layer_sizes=(256 * 1024,))
    netns = NetNS(prefix=ctx.netns_name("f")).create()
    ctx.defer(netns.delete)
    result = {"kinds": {}}
    with netns.entered():
        hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None).start()
        ctx.defer(hub.stop)
        hub.push_image(layout, "latest", IMAGE)
        cert, key = make_hub_identity(work / "tls")
        front = TLSFront(hub.port, cert, key).start()
        ctx.defer(front.stop)
        etc_hosts, _ = client_etc(work / "containerd-etc")
        containerd = Containerd(netns, work / "containerd", client_env(work / "containerd-client", cert), {"/etc/hosts": etc_hosts})
        containerd.start()
        ctx.defer(containerd.stop)
        minion = BenchMinion(ctx.dir("minion"))
        minion.sync()
        baseline = Host(ctx.dir("host-none"), cert)

        for kind in ("refused", "blackhole"):
            log(f"fallback: {kind}")
            result["kinds"][kind] = _measure_kind(ctx, work, netns, hub, cert, containerd, minion, baseline, kind, image)
    return result


def _measure_kind(ctx, work, netns, hub, cert, containerd, minion, baseline, kind, image):
    state_dir = ctx.dir(f"state-{kind}")
    host = Host(ctx.dir(f"host-{kind}"), cert)
    if kind == "refused":
        port = _dead_port()
        listen, mirror_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
    else:
        port = _dead_port()
        _ip(netns, "addr", "add", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
        listen, mirror_url = f"0.0.0.0:{port}", f"http://{BLACKHOLE_ADDR}:{port}"
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(work / f"mirror-{kind}")}},
        "http": {"addr": listen},
        "proxy": {"remoteurl": hub.url, "username": HUB_USER, "password": HUB_TOKEN},
    }
    mirror = RegistryProcess(work / f"mirror-{kind}-run", config=config)
    mirror.start()
    try:
        alive_s, applied = _apply_client(minion, host, mirror_url, state_dir)
        if not applied["changes"]:
            raise RuntimeError(f"the client state configured nothing with a live mirror: {applied}")
    finally:
        mirror.stop()
    if kind == "blackhole":
        _ip(netns, "addr", "del", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
        # Not local any more, routed into lo: dropped on the way in, no answer at all.
        _ip(netns, "route", "add", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
    dead = host.copy_to(ctx.dir(f"host-{kind}-dead"), cert)
    removed_s, removed = _apply_client(minion, host, mirror_url, state_dir)
    if not removed["changes"]:
        raise RuntimeError(f"the client state did not take the dead mirror out: {removed}")

    hosts = {"no_mirror": baseline, "dead_mirror": dead, "removed_after_probe": host}
    runs = ctx.runs if kind == "refused" else min(ctx.runs, BLACKHOLE_RUNS)
    times = {client: {name: [] for name in hosts} for client in ("containerd", "skopeo")}
    for run_index in range(runs):
        for name, pull_host in hosts.items():
            dest = work / "pulls" / f"{kind}-{name}-{run_index}"
            pulls = {
                "containerd": lambda pull_host=pull_host: timed(pull_host.ctr_pull, containerd)[0],
                "skopeo": lambda pull_host=pull_host, dest=dest: _timed_skopeo(pull_host, netns, dest, image),
            }
            if kind == "blackhole" and name == "dead_mirror":
                # Both only wait out connect timeouts: side by side, they cost the
                # slower one's wait instead of the sum.
                with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
                    futures = {client: pool.submit(pull) for client, pull in pulls.items()}
                    seconds = {client: future.result() for client, future in futures.items()}
            else:
                seconds = {client: pull() for client, pull in pulls.items()}
            for client, value in seconds.items():
                times[client][name].append(value)
            log(f"fallback: {kind} run {run_index + 1} {name}: ctr {seconds['containerd']:.2f}s, skopeo {seconds['skopeo']:.2f}s")
    if kind == "blackhole":
        _ip(netns, "route", "del", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
    out = {
        "mirror_url": mirror_url,
        "runs": runs,
        "client_state_apply_s": {"mirror_alive": round(alive_s, 3), "mirror_dead_probe_and_remove": round(removed_s, 3)},
        "client_state_comment": removed["comment"],
    }
    for client, by_host in times.items():
        out[client] = {
            **{f"{name}_s": summary(values) for name, values in by_host.items()},
            "dead_vs_none": ratio(by_host["dead_mirror"], by_host["no_mirror"]),
            "removed_vs_none": ratio(by_host["removed_after_probe"], by_host["no_mirror"]),
        }
    return out
