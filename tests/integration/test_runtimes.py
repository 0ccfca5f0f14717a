"""The runtimes tests/integration/test_client.py does not run: podman, containerd 2.x with
ctr, the CRI path (containerd 2.x's CRI plugin with ``config_path``, driven by crictl) and
buildkitd. Each pulls through the mirror ``hub_mirror.client`` configured, then falls back
to the upstream when that mirror is dead (refused, or black-holed: SYNs dropped).

Same world as test_client.py: a private network namespace with only ``lo`` (plus a dummy
link that swallows the black-holed address), where ``registry-1.docker.io`` is the
stand-in. containerd 2.x, buildkit and crictl come from .ci/build-go-tools.
"""

import socket
import types

import pytest

# host and minion: test_client's client host and minion, on this module's world (its
# mirrors, its namespace).
from tests.integration.test_client import gets, host, minion  # noqa: F401
from tests.support.clients import NetNS, TLSFront, make_hub_identity
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.runtimes import Buildkitd, Containerd2, blackhole_url, go_tools, podman_pull

pytestmark = pytest.mark.integration

ALPINE = "docker.io/library/alpine:latest"
BUSYBOX = "docker.io/library/busybox:latest"


@pytest.fixture(scope="module")
def tools():
    return go_tools()


@pytest.fixture(scope="module")
def world(tmp_path_factory, image_layout):
    layout, _ = image_layout
    work = tmp_path_factory.mktemp("runtimes")
    netns = NetNS().create()
    started = []
    try:
        with netns.entered():
            hub = FakeDockerHub(work / "hub", username=HUB_USER, token=HUB_TOKEN).start()
            started.append(hub)
            hub.push_image(layout, "latest", "library/alpine")
            hub.push_image(layout, "other", "library/busybox", dest_tag="latest")
            cert, key = make_hub_identity(work / "tls")
            started.append(TLSFront(hub.port, cert, key).start())
            mirror = RegistryProcess(work / "mirror", config=proxy_config(work / "cache", hub.url, HUB_USER, HUB_TOKEN)).start()
            started.append(mirror)
            refused = socket.socket()
            refused.bind(("127.0.0.1", 0))
            refused_url = f"http://127.0.0.1:{refused.getsockname()[1]}"
            refused.close()
        yield types.SimpleNamespace(
            netns=netns, hub=hub, cert=cert, mirrors=[mirror], refused_url=refused_url,
            blackhole_url=blackhole_url(netns),
        )
    finally:
        with netns.entered():
            for server in reversed(started):
                server.stop()
        netns.delete()


def configure(host, mirror_url, runtime):
    host.set_pillar({"docker.io": mirror_url}, [runtime], probe_timeout=1)
    applied = host.apply()
    assert applied["result"] is True, applied
    return applied


def test_podman_pulls_through_the_drop_in_and_falls_back(host, world):
    mirror = world.mirrors[0]
    applied = configure(host, mirror.url, "podman")
    assert f"podman: configured docker.io -> {mirror.url}" in applied["comment"]
    binds = {"/etc/hosts": host.etc_hosts, "/etc/containers": host.containers}

    served = gets(mirror)
    podman_pull(world.netns, ALPINE, host.root / "podman", host.env, binds)
    assert gets(mirror) > served

    mirror.stop()
    world.hub.reset_counts()
    podman_pull(world.netns, BUSYBOX, host.root / "podman", host.env, binds)
    assert world.hub.counts()["blob_get"] >= 1


def test_containerd_2_pulls_through_hosts_toml_and_falls_back(host, world, tools):
    mirror = world.mirrors[0]
    containerd = Containerd2(world.netns, host.root / "containerd2", host.env, {"/etc/hosts": host.etc_hosts}, tools)
    host.daemons.append(containerd.start())
    assert "Server:\n  Version:  2." in containerd.version()
    configure(host, mirror.url, "containerd")

    served = gets(mirror)
    containerd.pull(ALPINE, host.paths["containerd_certs_d"])
    assert gets(mirror) > served

    mirror.stop()
    world.hub.reset_counts()
    containerd.pull(ALPINE, host.paths["containerd_certs_d"])
    assert world.hub.counts()["blob_get"] >= 1


def test_cri_plugin_pulls_through_config_path_and_falls_back(host, world, tools):
    """crictl -> containerd 2.x's CRI image service, which finds the mirror only through
    the ``config_path`` in its config.toml: the path a kubelet's pulls take."""
    mirror = world.mirrors[0]
    certs_d = host.paths["containerd_certs_d"]
    containerd = Containerd2(
        world.netns, host.root / "containerd2", host.env, {"/etc/hosts": host.etc_hosts}, tools,
        config_file=host.paths["containerd_config"], cri_config_path=certs_d,
    )
    host.daemons.append(containerd.start())
    applied = configure(host, mirror.url, "containerd")
    # hub_mirror reads the same config.toml the daemon runs with.
    assert f"the CRI plugin reads {certs_d}: nothing to restart" in applied["comment"]

    served = gets(mirror)
    containerd.crictl("pull", ALPINE)
    assert gets(mirror) > served
    assert "library/alpine" in containerd.crictl("images").stdout

    mirror.stop()
    world.hub.reset_counts()
    containerd.crictl("pull", BUSYBOX)
    assert world.hub.counts()["blob_get"] >= 1


def test_buildkit_builds_from_the_mirror_and_falls_back(host, world, tools):
    mirror = world.mirrors[0]
    toml = host.paths["buildkitd_toml"]
    toml.parent.mkdir(parents=True)
    toml.write_text("debug = true\n")
    configure(host, mirror.url, "buildkit")
    buildkitd = Buildkitd(world.netns, host.root / "buildkitd", host.env, {"/etc/hosts": host.etc_hosts}, tools, toml)
    host.daemons.append(buildkitd.start())

    served = gets(mirror)
    buildkitd.build(f"FROM {ALPINE}\nCOPY hello.txt /\n")
    assert gets(mirror) > served

    mirror.stop()
    world.hub.reset_counts()
    buildkitd.build(f"FROM {BUSYBOX}\nCOPY hello.txt /\n")
    assert world.hub.counts()["blob_get"] >= 1
