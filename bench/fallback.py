"""Benchmark 6: what a dead mirror costs a pull, per client runtime, and how long it stays
configured once ``client:recheck`` is on.

All inside one private network namespace with only ``lo`` up (tests/support/clients.py):
there the Docker Hub stand-in *is* ``registry-1.docker.io`` (TLS on 443, a private
/etc/hosts), so each client's real fallback to Docker Hub is exercised and nothing can
leave the machine. The runtimes: dockerd (Debian), ctr with containerd 1.6 (Debian) and
2.x, crictl through containerd 2.x's CRI plugin, podman, skopeo, and buildkitd building
``FROM`` the image (containerd 2.x, buildkit and crictl from .ci/build-go-tools).

Two ways a mirror dies:

- ``refused``: the mirror's port on 127.0.0.1 has no listener (connect fails at once);
- ``blackhole``: the mirror's address (10.99.0.2) is routed into ``lo`` after the mirror
  is gone, where the kernel drops every packet without an answer (no forwarding), so a
  connect hangs until the client gives up, as behind a firewall that drops.

Pull cost: for each kind, a live mirror at that address, ``state.apply hub_mirror.client``
(salt-call, in the namespace) points every runtime at it, then the mirror dies: that host
is "dead mirror configured". A host with no mirror configured is the baseline. Runs
alternate baseline and subject; each pull starts from nothing where the runtime lets it
(docker rmi, a fresh ctr namespace, crictl rmi, fresh podman storage, a new skopeo
directory, buildctl --no-cache).

Time to drop: with ``client:recheck`` on and a real masterless salt-minion running the
schedule, the mirror dies at a random point of the interval; the figure is the time until
every runtime's config has dropped it (dockerd reports no mirror, hosts.toml, the
registries.conf.d drop-in and the buildkitd.toml block are gone), and then, after it
answers again, until every one has it back.
"""

import concurrent.futures
import json
import shutil
import socket
import subprocess
import time

from bench.common import HUB_TOKEN, HUB_USER, bench_minion, log, ratio, summary, timed
from tests.support import oci
from tests.support.clients import (
    Containerd,
    Dockerd,
    NetNS,
    TLSFront,
    client_env,
    client_etc,
    make_hub_identity,
    skopeo_copy,
)
from tests.support.hub import FakeDockerHub
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.runtimes import (
    Buildkitd,
    Containerd2,
    SaltMinionDaemon,
    go_tools,
    masterless_daemon_config,
    podman_pull,
)

IMAGE = "library/benchfall"
REF = f"docker.io/{IMAGE}:latest"
BLACKHOLE_ADDR = "10.99.0.2"
PULL_TIMEOUT = 600
# A black-holed mirror costs each pull the clients' connect timeouts (up to minutes):
# fewer runs of those, unless asked for more.
BLACKHOLE_RUNS = 1
RUNTIMES = ("docker", "ctr_1_6", "ctr_2", "crictl", "podman", "skopeo", "buildkit")
RECHECK = 20
DROP_TIMEOUT = 10 * RECHECK


def _ip(netns, *args):
    subprocess.run(["ip", "-n", netns.name, *args], check=True, capture_output=True, text=True, timeout=30)


def _dead_port():
    """A loopback port in the current namespace with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Host:
    """One build host's client config files under ``root``, and the daemons that read
    them at start (dockerd, buildkitd, containerd 2.x with its CRI plugin)."""

    def __init__(self, root, ca_file, netns, tools):
        self.root = root
        self.netns = netns
        self.tools = tools
        self.etc_hosts, self.containers = client_etc(root / "etc")
        self.certs_d = root / "certs.d"
        self.certs_d.mkdir(parents=True, exist_ok=True)
        self.env = client_env(root / "client", ca_file)
        self.binds = {"/etc/hosts": self.etc_hosts}
        self.paths = {
            "containerd_config": root / "containerd2" / "config.toml",
            "containerd_certs_d": self.certs_d,
            "registries_conf": self.containers / "registries.conf",
            "registries_conf_d": self.containers / "registries.conf.d",
            "docker_daemon_json": root / "docker" / "daemon.json",
            "docker_pidfile": root / "dockerd" / "docker.pid",
            "buildkitd_toml": root / "buildkit" / "buildkitd.toml",
            "k3s_registries": root / "k3s" / "registries.yaml",
            "rke2_registries": root / "rke2" / "registries.yaml",
        }
        self.paths["docker_daemon_json"].parent.mkdir(parents=True)
        self.paths["docker_daemon_json"].write_text(json.dumps(Dockerd.base_config(root / "docker-data"), indent=2))
        self.paths["buildkitd_toml"].parent.mkdir(parents=True)
        self.paths["buildkitd_toml"].write_text("")
        self.dockerd = self.buildkitd = self.cri = None

    def client_pillar(self, mirror_url, state_dir, recheck=0):
        return {
            "client": {
                "mirrors": {"docker.io": [mirror_url]},
                "runtimes": ["docker", "containerd", "podman", "buildkit"],
                "probe_timeout": 2,
                "recheck": recheck,
                "paths": {
                    **{key: str(value) for key, value in self.paths.items()},
                    "docker_socket": str(self.dockerd.socket if self.dockerd else self.root / "no-dockerd.sock"),
                },
            },
            "lookup": {"state_dir": str(state_dir)},
        }

    def start_dockerd(self):
        self.dockerd = Dockerd(self.netns, self.paths["docker_pidfile"].parent, self.paths["docker_daemon_json"], self.env, self.binds)
        self.dockerd.start()

    def start_daemons(self):
        """The daemons that read their config at start, after it is written."""
        if not self.dockerd:
            self.start_dockerd()
        self.buildkitd = Buildkitd(self.netns, self.root / "buildkitd", self.env, self.binds, self.tools, self.paths["buildkitd_toml"])
        self.buildkitd.start()
        self.cri = Containerd2(
            self.netns, self.root / "containerd2", self.env, self.binds, self.tools,
            config_file=self.paths["containerd_config"], cri_config_path=self.certs_d,
        )
        self.cri.start()

    def stop(self):
        for daemon in (self.cri, self.buildkitd, self.dockerd):
            if daemon:
                daemon.stop()

    def pulls(self, containerd16, containerd2, work, image):
        """{runtime: function returning the seconds of one pull from nothing}."""

        def docker():
            self.dockerd.remove_image(REF)
            return timed(self.dockerd.pull, REF)[0]

        def crictl():
            self.cri.crictl("rmi", REF, check=False)
            return timed(self.cri.crictl, "pull", REF, timeout=PULL_TIMEOUT)[0]

        def skopeo():
            dest = work / f"skopeo-{time.monotonic_ns()}"
            seconds, _ = timed(skopeo_copy, self.netns, REF, dest, self.env, {**self.binds, "/etc/containers": self.containers}, timeout=PULL_TIMEOUT)
            digest = oci.read_tag(dest, "pulled")["digest"]
            shutil.rmtree(dest, ignore_errors=True)
            if digest != image["manifest_digest"]:
                raise RuntimeError(f"skopeo pulled {digest}, not {image['manifest_digest']}")
            return seconds

        return {
            "docker": docker,
            "ctr_1_6": lambda: timed(containerd16.pull, REF, self.certs_d)[0],
            "ctr_2": lambda: timed(containerd2.pull, REF, self.certs_d)[0],
            "crictl": crictl,
            "podman": lambda: timed(
                podman_pull, self.netns, REF, work / "podman", self.env,
                {**self.binds, "/etc/containers": self.containers}, timeout=PULL_TIMEOUT,
            )[0],
            "skopeo": skopeo,
            "buildkit": lambda: self.buildkitd.build(f"FROM {REF}\n", timeout=PULL_TIMEOUT).seconds,
        }

    def mirror_gone(self, mirror_host):
        """True when no runtime's config names ``mirror_host`` any more."""
        hosts_toml = self.certs_d / "docker.io" / "hosts.toml"
        dropin = self.paths["registries_conf_d"] / "50-hub-mirror.conf"
        return (
            not hosts_toml.exists()
            and not dropin.exists()
            and mirror_host not in self.paths["buildkitd_toml"].read_text()
            and self.dockerd.mirrors() == []
        )

    def mirror_back(self, mirror_host):
        hosts_toml = self.certs_d / "docker.io" / "hosts.toml"
        dropin = self.paths["registries_conf_d"] / "50-hub-mirror.conf"
        return (
            hosts_toml.exists() and mirror_host in hosts_toml.read_text()
            and dropin.exists() and mirror_host in dropin.read_text()
            and mirror_host in self.paths["buildkitd_toml"].read_text()
            and [m.rstrip("/").split("//")[1] for m in self.dockerd.mirrors()] == [mirror_host]
        )


def _apply_client(minion, host, mirror_url, state_dir, recheck=0):
    minion.set_pillar(host.client_pillar(mirror_url, state_dir, recheck))
    seconds, result = timed(minion.apply, "hub_mirror.client")
    if result.returncode != 0 or not result.states:
        raise RuntimeError(f"state.apply hub_mirror.client failed: {result!r}")
    ((_, ret),) = result.states.items()
    if ret["result"] is not True:
        raise RuntimeError(f"hub_mirror.client: {ret}")
    return seconds, ret


class DyingMirror:
    """A proxy mirror of the stand-in that can die ``refused`` or ``blackhole`` and come
    back at the same URL."""

    def __init__(self, work, netns, hub, kind, name):
        self.netns, self.kind = netns, kind
        port = _dead_port()
        if kind == "refused":
            listen, self.url = f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"
        else:
            listen, self.url = f"0.0.0.0:{port}", f"http://{BLACKHOLE_ADDR}:{port}"
        self.hostport = self.url.split("//")[1]
        config = proxy_config(work / f"mirror-{name}", hub.url, HUB_USER, HUB_TOKEN)
        config["http"]["addr"] = listen
        config["log"]["level"] = "warn"
        self.process = RegistryProcess(work / f"mirror-{name}-run", config=config)

    def live(self):
        if self.kind == "blackhole":
            self.clear()
            _ip(self.netns, "addr", "add", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
        self.process.start()

    def die(self):
        self.process.stop()
        if self.kind == "blackhole":
            _ip(self.netns, "addr", "del", f"{BLACKHOLE_ADDR}/32", "dev", "lo")
            # Not local any more, routed into lo: dropped on the way in, no answer at all.
            _ip(self.netns, "route", "add", f"{BLACKHOLE_ADDR}/32", "dev", "lo")

    def clear(self):
        if self.kind == "blackhole":
            subprocess.run(["ip", "-n", self.netns.name, "route", "del", f"{BLACKHOLE_ADDR}/32", "dev", "lo"], capture_output=True, check=False, timeout=30)


def run(ctx):
    tools = go_tools()
    work = ctx.dir("work")
    layout = work / "layout"
    image = oci.build_image(layout, tag="latest", layer_sizes=(256 * 1024,))
    netns = NetNS(prefix=ctx.netns_name("f")).create()
    ctx.defer(netns.delete)
    recheck = 10 if ctx.quick else RECHECK
    result = {"kinds": {}, "time_to_drop": {}, "recheck_s": recheck}
    with netns.entered():
        hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None).start()
        ctx.defer(hub.stop)
        hub.push_image(layout, "latest", IMAGE)
        cert, key = make_hub_identity(work / "tls")
        front = TLSFront(hub.port, cert, key).start()
        ctx.defer(front.stop)
        etc_hosts, _ = client_etc(work / "containerd-etc")
        env = client_env(work / "containerd-client", cert)
        containerd16 = Containerd(netns, work / "containerd16", env, {"/etc/hosts": etc_hosts})
        containerd16.start()
        ctx.defer(containerd16.stop)
        containerd2 = Containerd2(netns, work / "containerd2", env, {"/etc/hosts": etc_hosts}, tools)
        containerd2.start()
        ctx.defer(containerd2.stop)
        minion = bench_minion(ctx.dir("minion"))
        masterless_daemon_config(minion)
        minion.sync()
        baseline = Host(ctx.dir("host-none"), cert, netns, tools)
        ctx.defer(baseline.stop)
        baseline.start_daemons()

        for kind in ("refused", "blackhole"):
            log(f"fallback: {kind}")
            result["kinds"][kind] = _measure_kind(ctx, work, netns, hub, cert, tools, containerd16, containerd2, minion, baseline, kind, image)
        for kind in ("refused", "blackhole"):
            log(f"fallback: time to drop, {kind}")
            result["time_to_drop"][kind] = _measure_drop(ctx, work, netns, hub, cert, tools, minion, kind, recheck)
    return result


def _measure_kind(ctx, work, netns, hub, cert, tools, containerd16, containerd2, minion, baseline, kind, image):
    state_dir = ctx.dir(f"state-{kind}")
    host = Host(ctx.dir(f"host-{kind}"), cert, netns, tools)
    ctx.defer(host.stop)
    mirror = DyingMirror(work, netns, hub, kind, kind)
    mirror.live()
    try:
        _, applied = _apply_client(minion, host, mirror.url, state_dir)
        if set(applied["changes"]) != {"docker", "containerd", "podman", "buildkit"}:
            raise RuntimeError(f"the client state did not configure every runtime with a live mirror: {applied}")
    finally:
        mirror.die()
    host.start_daemons()
    if [m.rstrip("/") for m in host.dockerd.mirrors()] != [mirror.url]:
        raise RuntimeError(f"dockerd does not report the mirror: {host.dockerd.mirrors()}")

    runs = ctx.runs if kind == "refused" else min(ctx.runs, BLACKHOLE_RUNS)
    times = {runtime: {"no_mirror": [], "dead_mirror": []} for runtime in RUNTIMES}
    for run_index in range(runs):
        for name, pull_host in (("no_mirror", baseline), ("dead_mirror", host)):
            pulls = pull_host.pulls(containerd16, containerd2, work / "pulls", image)
            if kind == "blackhole" and name == "dead_mirror":
                # Each only waits out its own timeouts: side by side they cost the slowest
                # one's wait, not the sum.
                with concurrent.futures.ThreadPoolExecutor(max_workers=len(pulls)) as pool:
                    futures = {runtime: pool.submit(pull) for runtime, pull in pulls.items()}
                    seconds = {runtime: future.result() for runtime, future in futures.items()}
            else:
                seconds = {runtime: pull() for runtime, pull in pulls.items()}
            for runtime, value in seconds.items():
                times[runtime][name].append(value)
            log(f"fallback: {kind} run {run_index + 1} {name}: " + ", ".join(f"{r} {s:.2f}s" for r, s in seconds.items()))
    mirror.clear()
    out = {"mirror_url": mirror.url, "runs": runs}
    for runtime, by_host in times.items():
        out[runtime] = {
            **{f"{name}_s": summary(values) for name, values in by_host.items()},
            "dead_vs_none": ratio(by_host["dead_mirror"], by_host["no_mirror"]),
        }
    return out


def _wait(condition, what):
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > DROP_TIMEOUT:
            raise RuntimeError(f"not within {DROP_TIMEOUT}s: {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def _measure_drop(ctx, work, netns, hub, cert, tools, minion, kind, recheck):
    state_dir = ctx.dir(f"state-drop-{kind}")
    host = Host(ctx.dir(f"host-drop-{kind}"), cert, netns, tools)
    ctx.defer(host.stop)
    host.start_dockerd()
    mirror = DyingMirror(work, netns, hub, kind, f"drop-{kind}")
    mirror.live()
    ctx.defer(mirror.clear)
    ctx.defer(mirror.process.stop)
    _, applied = _apply_client(minion, host, mirror.url, state_dir, recheck=recheck)
    if "recheck" not in applied["changes"]:
        raise RuntimeError(f"the client state installed no schedule entry: {applied}")
    daemon = SaltMinionDaemon(netns, minion)
    daemon.start()
    try:
        dropped, back = [], []
        for run_index in range(ctx.runs):
            _wait(lambda: host.mirror_back(mirror.hostport), "every runtime has the mirror")
            # Die at a random point of the interval, as a real mirror would.
            time.sleep(recheck * ((run_index * 0.37) % 1))
            mirror.die()
            dropped.append(_wait(lambda: host.mirror_gone(mirror.hostport), "every runtime drops the dead mirror"))
            mirror.live()
            back.append(_wait(lambda: host.mirror_back(mirror.hostport), "every runtime takes the mirror back"))
            log(f"fallback: drop {kind} run {run_index + 1}: dropped after {dropped[-1]:.1f}s, back after {back[-1]:.1f}s")
        scheduled_runs = daemon.runs()
    finally:
        daemon.stop()
        # The schedule entry must not outlive the benchmark in the shared minion's config.
        minion.apply("hub_mirror.client.clean")
    return {
        "dropped_s": summary(dropped),
        "back_s": summary(back),
        "dropped_vs_interval": summary([value / recheck for value in dropped], 3),
        "scheduled_runs": scheduled_runs,
    }
