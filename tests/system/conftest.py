"""The system tier's world: one network namespace for the run (only ``lo``), holding the
Docker Hub stand-in, the release file server, a salt-master and the systemd test hosts
(whose minions are that master's), and the clients that pull through the mirrors.

Python servers (the stand-in, the file server) are created by a thread that has entered
the namespace (``NetNS.entered``): their sockets, threads and child processes stay in it.
Tests pull with skopeo the same way, so nothing here can reach beyond the namespace.
"""

import hashlib
import shutil
import tempfile
import time

import pytest
import requests

from tests.support import oci
from tests.support.clients import NetNS
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.nspawn import reap_stale, wait_until
from tests.support.release import FileServer, add_release
from tests.support.sysmaster import NetnsMaster, free_port_in


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


class SystemNet(NetNS):
    """The run's namespace, with what tests do in it."""

    def pull(self, hostport, repo, ref, dest):
        with self.entered():
            return oci.pull(hostport, repo, ref, str(dest))

    def answers(self, url, timeout=1.0):
        """True when ``url`` gives a registry answer (200 or 401) from inside."""
        with self.entered():
            try:
                response = requests.get(url, timeout=timeout, proxies={"http": "", "https": ""})
            except requests.RequestException:
                return False
        return response.status_code in (200, 401)

    def free_port(self):
        return free_port_in(self)


@pytest.fixture(scope="session")
def sysnet():
    reaped = reap_stale()  # test hosts a killed earlier run left behind
    if reaped:
        print(f"\n[system] reaped stale test hosts: {reaped}")
    with SystemNet("hmsys") as net:
        yield net


@pytest.fixture(scope="session")
def sys_hub(sysnet, image_layout, tmp_path_factory):
    """The Docker Hub stand-in, inside the namespace: library/alpine, library/busybox and a
    two-arch library/multi. Unblock it with :func:`unblock`."""
    layout, _ = image_layout
    with sysnet.entered():
        hub = FakeDockerHub(tmp_path_factory.mktemp("syshub"), username=HUB_USER, token=HUB_TOKEN)
        hub.start()
        try:
            hub.push_image(layout, "latest", "library/alpine")
            hub.push_image(layout, "other", "library/busybox", dest_tag="latest")
            hub.push_image(layout, "multi", "library/multi", dest_tag="latest")
        except BaseException:
            hub.stop()
            raise
    yield hub
    hub.stop()


def unblock(net, hub):
    """Let the stand-in listen again: its new socket must be made inside the namespace."""
    with net.entered():
        hub.unblock()


@pytest.fixture(scope="session")
def sys_releases(registry_version, sysnet, tmp_path_factory):
    """GitHub's release downloads, inside the namespace: the assets of one registry version
    (each of the matrix in turn) for amd64 and arm64, each with its ``.sha256``, at the
    release URL layout."""
    root = tmp_path_factory.mktemp("sysreleases")
    assets = {arch: add_release(root, registry_version, arch) for arch in ("amd64", "arm64")}
    with sysnet.entered():
        server = FileServer(root).start()
    server.version = registry_version
    server.assets = assets
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sys_master(sysnet):
    """A salt-master in the namespace; file_roots = [<repo>/salt, <repo>]."""
    root = tempfile.mkdtemp(prefix="hmsys-master-", dir="/tmp")
    master = NetnsMaster(sysnet, root)
    t0 = time.monotonic()
    master.start()
    print(f"\n[system] salt-master up in {time.monotonic() - t0:.1f}s")
    yield master
    master.stop()
    shutil.rmtree(root, ignore_errors=True)


def wait_serving(net, url, timeout, interval=0.05):
    """Seconds until ``url`` answers; TimeoutError after ``timeout``."""
    t0 = time.monotonic()
    wait_until(lambda: net.answers(url, timeout=0.5), timeout, f"{url} to answer", interval)
    return time.monotonic() - t0
