"""`state.apply hub_mirror.client` with real clients: Debian's dockerd, containerd + ctr
and skopeo pull through the mirror it configures, and keep pulling when that mirror dies.

Everything runs in a private network namespace with only `lo` up (tests/support/clients.py):
the Docker Hub stand-in is `registry-1.docker.io` there (TLS on 443, a private /etc/hosts),
so each client's own fallback to Docker Hub is real, and nothing can leave the machine.
salt-call runs in the namespace too, so its probe sees the mirrors the clients see.
"""

import json
import socket
import statistics
import types

import pytest

from tests.support.clients import (
    Containerd,
    Dockerd,
    NetNS,
    TLSFront,
    client_env,
    client_etc,
    make_hub_identity,
    skopeo_copy,
    timed,
)
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.saltcall import Masterless, unique_name

pytestmark = pytest.mark.integration

IMAGE = "library/alpine"
REF = f"docker.io/{IMAGE}:latest"
STATE_ID = "hub_mirror-client-clients-configured"
CLEAN_ID = "hub_mirror-client-clean-clients-absent"
SAMPLES = 3


@pytest.fixture(scope="module")
def world(tmp_path_factory, image_layout):
    """The namespace with the stand-in (as registry-1.docker.io), two mirrors of it and a
    black hole: a port that takes connections and never answers."""
    layout, _ = image_layout
    work = tmp_path_factory.mktemp("clients")
    netns = NetNS().create()
    started = []
    blackhole = None
    try:
        with netns.entered():
            hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN).start()
            started.append(hub)
            hub.push_image(layout, "latest", IMAGE)
            cert, key = make_hub_identity(work / "tls")
            started.append(TLSFront(hub.port, cert, key).start())
            mirrors = []
            for index in (1, 2):
                mirror = RegistryProcess(
                    work / f"mirror{index}", config=proxy_config(work / f"cache{index}", hub.url, HUB_USER, HUB_TOKEN)
                ).start()
                started.append(mirror)
                mirrors.append(mirror)
            # Created in the namespace: a socket belongs to the namespace it was made in.
            blackhole = socket.socket()
            blackhole.bind(("127.0.0.1", 0))
            blackhole.listen(1)
        yield types.SimpleNamespace(
            netns=netns,
            hub=hub,
            cert=cert,
            mirrors=mirrors,
            blackhole_url=f"http://127.0.0.1:{blackhole.getsockname()[1]}",
        )
    finally:
        with netns.entered():
            for server in reversed(started):
                server.stop()
            if blackhole is not None:
                blackhole.close()
        netns.delete()


@pytest.fixture(scope="module")
def minion():
    """One masterless minion for the module (a sync costs seconds); each test gets its own
    client paths and record directory through pillar."""
    masterless = Masterless.fresh()
    yield masterless
    masterless.discard(stop_mirrors=False)


class ClientHost:
    """One build host's client config, all under a test's tmp_path."""

    def __init__(self, world, minion, root):
        self.world = world
        self.minion = minion
        self.root = root
        self.etc_hosts, self.containers = client_etc(root / "etc")
        self.env = client_env(root / "client", world.cert)
        self.paths = {
            "docker_daemon_json": root / "docker" / "daemon.json",
            "docker_pidfile": root / "dockerd" / "docker.pid",
            "containerd_config": root / "containerd-config.toml",
            "containerd_certs_d": root / "certs.d",
            "registries_conf": self.containers / "registries.conf",
            "registries_conf_d": self.containers / "registries.conf.d",
            "buildkitd_toml": root / "buildkit" / "buildkitd.toml",
            "k3s_registries": root / "rancher-k3s" / "registries.yaml",
            "rke2_registries": root / "rancher-rke2" / "registries.yaml",
            # Not the host's docker.service: a test host has only what a test writes.
            "systemd_units": root / "units",
            "docker_default": root / "default-docker",
        }
        self.daemons = []

    @property
    def docker_socket(self):
        dockerds = [daemon for daemon in self.daemons if isinstance(daemon, Dockerd)]
        return dockerds[0].socket if dockerds else self.root / "no-dockerd.sock"

    @property
    def hosts_toml(self):
        return self.paths["containerd_certs_d"] / "docker.io" / "hosts.toml"

    @property
    def dropin(self):
        return self.paths["registries_conf_d"] / "50-hub-mirror.conf"

    def set_pillar(self, mirrors, runtimes, probe_timeout=2):
        self.minion.set_pillar(
            {
                "client": {
                    "mirrors": mirrors,
                    "runtimes": runtimes,
                    "probe_timeout": probe_timeout,
                    "paths": {
                        **{key: str(value) for key, value in self.paths.items()},
                        "docker_socket": str(self.docker_socket),
                    },
                },
                "lookup": {"state_dir": str(self.root / "state")},
            }
        )

    def apply(self, sls="hub_mirror.client", test=False):
        """The single state's return; the run itself must succeed."""
        result = self.minion.apply(sls, test=test)
        assert result.returncode == 0, result
        (ret,) = result.states.values()
        return ret

    def dockerd(self, daemon_json_text, *extra_args):
        self.paths["docker_daemon_json"].parent.mkdir(parents=True, exist_ok=True)
        self.paths["docker_daemon_json"].write_text(daemon_json_text)
        daemon = Dockerd(
            self.world.netns,
            self.paths["docker_pidfile"].parent,
            self.paths["docker_daemon_json"],
            self.env,
            {"/etc/hosts": self.etc_hosts},
        )
        self.daemons.append(daemon)
        daemon.start(*extra_args)
        assert self.world.netns.holds(daemon.pid)
        return daemon

    def containerd(self):
        daemon = Containerd(self.world.netns, self.root / "containerd", self.env, {"/etc/hosts": self.etc_hosts})
        self.daemons.append(daemon)
        daemon.start()
        assert self.world.netns.holds(daemon.pid)
        return daemon

    def ctr_pull(self, daemon):
        return daemon.pull(REF, self.paths["containerd_certs_d"])

    def skopeo_pull(self):
        dest = self.root / f"oci-{unique_name('')}"
        return skopeo_copy(
            self.world.netns, REF, dest, self.env, {"/etc/hosts": self.etc_hosts, "/etc/containers": self.containers}
        )

    def stop(self):
        for daemon in reversed(self.daemons):
            daemon.stop()


@pytest.fixture
def host(world, minion, tmp_path):
    """A fresh client host, the test thread inside the namespace, both mirrors up."""
    with world.netns.entered():
        for mirror in world.mirrors:
            if not mirror.running:
                mirror.start()
        world.hub.reset_counts()
        client_host = ClientHost(world, minion, tmp_path)
        try:
            yield client_host
        finally:
            client_host.stop()


def gets(mirror, kind="blobs"):
    """How many GETs of library/alpine ``kind`` (blobs or manifests) the mirror served."""
    return mirror.log_text().count(f'"GET /v2/{IMAGE}/{kind}/')


# A daemon.json as a user writes it: four-space indent, nested values, keys in their order.
USER_DAEMON_JSON = """{
    "log-driver": "json-file",
    "log-opts": { "max-size": "10m", "max-file": "3" },
    "insecure-registries": [ "127.0.0.1:9999" ],
%s
}
"""


def user_daemon_json(root):
    base = Dockerd.base_config(root / "docker-data")
    return USER_DAEMON_JSON % ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in base.items())


def test_docker_pulls_through_the_mirror_and_gets_its_daemon_json_back(host, world):
    mirror = world.mirrors[0]
    original = user_daemon_json(host.root)
    dockerd = host.dockerd(original)
    host.set_pillar({"docker.io": mirror.url}, ["docker"])

    predicted = host.apply(test=True)
    applied = host.apply()
    assert applied["result"] is True, applied
    assert predicted["result"] is None
    assert predicted["changes"] == applied["changes"]
    daemon_json = str(host.paths["docker_daemon_json"])
    assert applied["changes"]["docker"][daemon_json] == {"old": {}, "new": {"docker.io": [mirror.url]}}
    assert applied["changes"]["docker"]["reload"] == f"SIGHUP to dockerd (pid {dockerd.pid})"
    assert f"docker: configured docker.io -> {mirror.url}" in applied["comment"]

    # Every byte the user wrote is still there; only the mirror line was added.
    text = host.paths["docker_daemon_json"].read_text()
    assert text.replace(f'    "registry-mirrors": ["{mirror.url}"],\n', "", 1) == original
    # Reloaded, not restarted: the same process now reports the mirror and the user's keys.
    assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]
    info = dockerd.info()
    assert info["LoggingDriver"] == "json-file"
    assert info["DockerRootDir"] == str(host.root / "docker-data")
    assert "127.0.0.1:9999/32" in info["RegistryConfig"]["InsecureRegistryCIDRs"] or (
        "127.0.0.1:9999" in info["RegistryConfig"]["IndexConfigs"]
    )
    assert dockerd.proc.poll() is None

    dockerd.pull(IMAGE)
    assert gets(mirror, "manifests") >= 1 and gets(mirror) >= 1
    dockerd.remove_image(IMAGE)
    world.hub.reset_counts()
    served = gets(mirror)
    dockerd.pull(IMAGE)
    assert world.hub.counts()["blob_get"] == 0, world.hub.requests
    assert gets(mirror) > served

    again = host.apply()
    assert again["result"] is True and again["changes"] == {}, again

    cleaned = host.apply("hub_mirror.client.clean")
    assert cleaned["result"] is True, cleaned
    assert cleaned["changes"]["docker"]["reload"].startswith("SIGHUP")
    assert host.paths["docker_daemon_json"].read_text() == original
    assert dockerd.wait_mirrors([]) == []


def test_docker_started_with_a_mirror_flag_is_left_alone(host, world):
    """dockerd refuses a daemon.json key that is also a flag, at reload and at start:
    writing registry-mirrors there would break it on its next restart."""
    original = user_daemon_json(host.root)
    dockerd = host.dockerd(original, "--registry-mirror=http://127.0.0.1:1")
    host.set_pillar({"docker.io": world.mirrors[0].url}, ["docker"])
    applied = host.apply()
    assert applied["result"] is True, applied
    assert applied["changes"] == {}
    assert "docker: left alone (dockerd runs with --registry-mirror" in applied["comment"]
    assert host.paths["docker_daemon_json"].read_text() == original
    assert dockerd.mirrors() == ["http://127.0.0.1:1/"]


def test_containerd_pulls_through_the_mirror_and_falls_back_to_the_upstream(host, world):
    mirror = world.mirrors[0]
    certs_d = host.paths["containerd_certs_d"]
    host.paths["containerd_config"].write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{certs_d}"\n'
    )
    containerd = host.containerd()
    host.set_pillar({"docker.io": [mirror.url]}, ["containerd"])
    applied = host.apply()
    assert applied["result"] is True, applied
    assert f"the CRI plugin reads {certs_d}: nothing to restart" in applied["comment"]
    assert host.hosts_toml.read_text().count("[host.") == 1
    assert 'server = "https://registry-1.docker.io"' in host.hosts_toml.read_text()

    served = gets(mirror)
    host.ctr_pull(containerd)
    assert gets(mirror) > served

    # The mirror dies after the apply: containerd skips it and pulls from `server`.
    mirror.stop()
    world.hub.reset_counts()
    result = host.ctr_pull(containerd)
    assert "trying next host" in result.stderr + result.stdout
    assert world.hub.counts()["blob_get"] >= 1


def test_skopeo_pulls_through_the_drop_in_and_falls_back_to_the_upstream(host, world):
    mirror = world.mirrors[0]
    host.set_pillar({"docker.io": mirror.url}, ["podman"])
    applied = host.apply()
    assert applied["result"] is True, applied
    assert f"podman: configured docker.io -> {mirror.url}" in applied["comment"]
    assert f'location = "{mirror.hostport}"' in host.dropin.read_text()

    served = gets(mirror)
    host.skopeo_pull()
    assert gets(mirror) > served

    mirror.stop()
    world.hub.reset_counts()
    host.skopeo_pull()
    assert world.hub.counts()["blob_get"] >= 1


def test_mirror_down_at_apply_configures_nothing_and_pulls_go_direct(host, world):
    mirror = world.mirrors[0]
    mirror.stop()
    original = user_daemon_json(host.root)
    dockerd = host.dockerd(original)
    containerd = host.containerd()
    host.set_pillar({"docker.io": mirror.url}, ["docker", "containerd", "podman"])

    applied = host.apply()
    assert applied["result"] is True, applied
    assert applied["changes"] == {}
    assert f"{mirror.url} connection refused" in applied["comment"]
    for runtime in ("docker", "containerd", "podman"):
        assert f"{runtime}: no mirror answers for it, pulls go direct" in applied["comment"]
    assert host.paths["docker_daemon_json"].read_text() == original
    assert not host.hosts_toml.exists() and not host.dropin.exists()
    assert not (host.root / "state" / ".client" / "index.json").exists()

    dockerd.pull(IMAGE)
    host.ctr_pull(containerd)
    host.skopeo_pull()
    assert world.hub.counts()["manifest_get"] >= 3


def test_mirrors_keep_their_order_and_a_dead_one_is_left_out_then_taken_out(host, world):
    first, second = world.mirrors
    containerd = host.containerd()
    host.set_pillar(
        {"docker.io": [world.blackhole_url, first.url, second.url]}, ["containerd", "podman"], probe_timeout=1
    )
    applied = host.apply()
    assert applied["result"] is True, applied
    assert f"{world.blackhole_url} no answer within 1s" in applied["comment"]
    hosts = host.hosts_toml.read_text()
    assert world.blackhole_url not in hosts
    assert hosts.index(first.url) < hosts.index(second.url)
    dropin = host.dropin.read_text()
    assert world.blackhole_url.split("//")[1] not in dropin
    assert dropin.index(first.hostport) < dropin.index(second.hostport)

    # One dead mirror among several does not stop pulls: the next one serves them.
    first.stop()
    served = gets(second)
    host.ctr_pull(containerd)
    host.skopeo_pull()
    assert gets(second) >= served + 2

    # The next run takes the dead one out, so no pull pays for it any more.
    again = host.apply()
    assert again["result"] is True, again
    assert again["changes"]["containerd"][str(host.hosts_toml)] == {
        "old": {"docker.io": [first.url, second.url]},
        "new": {"docker.io": [second.url]},
    }
    assert first.url not in host.hosts_toml.read_text()
    assert first.hostport not in host.dropin.read_text()
    assert second.hostport in host.dropin.read_text()


def test_merge_into_the_users_files_skip_absent_runtimes_and_clean_after_user_edits(host, world):
    mirror = world.mirrors[0]
    buildkitd = host.paths["buildkitd_toml"]
    buildkitd.parent.mkdir(parents=True)
    original_buildkitd = "debug = true\n\n[worker.oci]\n  gc = true\n"
    buildkitd.write_text(original_buildkitd)
    daemon_json = host.paths["docker_daemon_json"]
    daemon_json.parent.mkdir(parents=True)
    original_daemon_json = user_daemon_json(host.root)
    daemon_json.write_text(original_daemon_json)
    # k3s is "installed" (its config directory exists); rke2 is not.
    host.paths["k3s_registries"].parent.mkdir(parents=True)
    # A containerd config whose CRI plugin does not read certs.d.
    host.paths["containerd_config"].write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = "/usr/lib/cni"\n'
    )
    host.set_pillar(
        {"docker.io": mirror.url, "ghcr.io": mirror.url},
        ["docker", "containerd", "podman", "buildkit", "k3s", "rke2"],
    )

    applied = host.apply()
    assert applied["result"] is True, applied
    comment = applied["comment"]
    assert "rke2: skipped: not installed" in comment
    assert "docker mirrors only docker.io; ghcr.io is left to the other runtimes" in comment
    assert "dockerd is not running: it reads daemon.json when it starts" in comment
    assert "the CRI plugin does not read" in comment and "restart containerd" in comment
    assert "buildkitd reads buildkitd.toml at start" in comment
    assert "k3s reads registries.yaml at start" in comment
    assert set(applied["changes"]) == {"docker", "containerd", "podman", "buildkit", "k3s"}
    text = buildkitd.read_text()
    assert text.startswith(original_buildkitd + "\n# BEGIN hub_mirror")
    assert f'mirrors = ["{mirror.hostport}"]' in text and "http = true" in text
    assert (host.paths["containerd_certs_d"] / "ghcr.io" / "hosts.toml").exists()
    assert f"- {mirror.url}" in host.paths["k3s_registries"].read_text()
    index = host.root / "state" / ".client" / "index.json"
    assert oct(index.stat().st_mode & 0o777) == "0o600"
    assert oct(index.parent.stat().st_mode & 0o777) == "0o700"

    # The user edits their files after the apply: clean keeps the edits.
    daemon_json.write_text(daemon_json.read_text().replace('"10m"', '"20m"'))
    buildkitd.write_text(buildkitd.read_text() + "\n[grpc]\n  uid = 0\n")

    predicted = host.apply("hub_mirror.client.clean", test=True)
    cleaned = host.apply("hub_mirror.client.clean")
    assert cleaned["result"] is True, cleaned
    assert predicted["changes"] == cleaned["changes"] and predicted["result"] is None
    assert set(cleaned["changes"]) == {"docker", "containerd", "podman", "buildkit", "k3s"}
    assert daemon_json.read_text() == original_daemon_json.replace('"10m"', '"20m"')
    assert buildkitd.read_text() == original_buildkitd + "\n[grpc]\n  uid = 0\n"
    assert not host.dropin.exists() and not host.paths["k3s_registries"].exists()
    # The certs.d directories hub_mirror created go too; the ones it found stay.
    assert not host.paths["containerd_certs_d"].exists()
    assert host.paths["registries_conf_d"].is_dir() and host.paths["k3s_registries"].parent.is_dir()
    assert host.apply("hub_mirror.client.clean")["changes"] == {}


def test_a_dead_mirror_costs_pulls_little_and_the_next_run_takes_it_out(host, world, capsys):
    """Per runtime: pull time with the configured mirror dead (port refused) versus with
    no mirror configured. Printed, not asserted: the figures are for the record."""
    mirror = world.mirrors[0]
    original = user_daemon_json(host.root)
    dockerd = host.dockerd(original)
    containerd = host.containerd()
    host.set_pillar({"docker.io": mirror.url}, ["docker", "containerd", "podman"])
    applied = host.apply()
    assert set(applied["changes"]) == {"docker", "containerd", "podman"}, applied
    assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]

    def docker_pull():
        dockerd.remove_image(IMAGE)
        return dockerd.pull(IMAGE)

    pulls = {"docker": docker_pull, "containerd": lambda: host.ctr_pull(containerd), "skopeo": host.skopeo_pull}
    mirror.stop()
    dead = {name: [timed(pull)[0] for _ in range(SAMPLES)] for name, pull in pulls.items()}
    assert world.hub.counts()["blob_get"] >= 3 * SAMPLES  # every pull went to the upstream

    predicted = host.apply(test=True)
    again = host.apply()
    assert again["result"] is True, again
    assert predicted["changes"] == again["changes"]
    assert f"{mirror.url} connection refused" in again["comment"]
    assert set(again["changes"]) == {"docker", "containerd", "podman"}
    assert host.paths["docker_daemon_json"].read_text() == original
    assert not host.hosts_toml.exists() and not host.dropin.exists()
    assert dockerd.wait_mirrors([]) == []
    assert host.apply()["changes"] == {}

    direct = {name: [timed(pull)[0] for _ in range(SAMPLES)] for name, pull in pulls.items()}
    figures = {
        name: {
            "dead_mirror_configured_s": round(statistics.median(dead[name]), 3),
            "no_mirror_configured_s": round(statistics.median(direct[name]), 3),
            "samples": SAMPLES,
        }
        for name in pulls
    }
    with capsys.disabled():
        print("\npull time, dead (refused) mirror configured vs none:", json.dumps(figures, indent=2))
    assert all(figure["no_mirror_configured_s"] > 0 for figure in figures.values())


def test_bad_client_pillar_fails_the_render_and_changes_nothing(host, world):
    host.minion.write_raw_pillar(
        "hub_mirror:\n"
        f"  lookup: {{state_dir: {host.root / 'state'}}}\n"
        "  client:\n"
        "    mirrors: {docker.io: '192.168.128.1:5000'}\n"
        f"    paths: {{registries_conf_d: {host.paths['registries_conf_d']}}}\n"
    )
    result = host.minion.apply("hub_mirror.client")
    assert result.returncode != 0
    assert "hub_mirror:client:mirrors:docker.io" in result.output
    assert "write it like http://192.168.128.1:5000" in result.output
    assert not host.dropin.exists()


def test_without_mirrors_in_pillar_nothing_changes(host, world):
    daemon_json = host.paths["docker_daemon_json"]
    daemon_json.parent.mkdir(parents=True)
    daemon_json.write_text('{"debug": true}')
    host.set_pillar({}, ["docker", "containerd", "podman"])
    applied = host.apply()
    assert applied["result"] is True and applied["changes"] == {}, applied
    assert "hub_mirror:client:mirrors is empty" in applied["comment"]
    assert "docker: no mirror for it in hub_mirror:client:mirrors" in applied["comment"]
    assert daemon_json.read_text() == '{"debug": true}'
