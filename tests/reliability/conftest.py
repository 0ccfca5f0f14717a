"""The reliability suite's Docker Hub stand-in (with blob faults) and its mirrors.

One stand-in serves the whole suite: 20 repositories of mixed sizes for the load, and a
few bigger images whose transfers the fault scenarios interrupt. Each scenario gets a
mirror of its own with an empty cache: a ``registry`` running the config hub_mirror
renders from pillar (``render_config``), or, where the supervisor or an exec function is
part of the scenario, a mirror applied with masterless Salt.
"""

import shutil
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.faults import FaultyHub
from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.integrity import StorageAudit
from tests.support.modules import registry_files
from tests.support.netutil import free_port
from tests.support.processes import registry_pids
from tests.support.registry import RegistryProcess
from tests.support.release import archive_pillar
from tests.support.saltcall import Masterless, unique_name, world_traversable_dir

KIB = 1024
MIB = 1024 * KIB
# 16 distinct images, a few KB to 3 MB; repositories 16-19 hold copies of images 0-3
# under other names (the same layers in two repositories, as on Docker Hub).
LOAD_LAYER_SIZES = ((4 * KIB,), (64 * KIB, 8 * KIB), (512 * KIB, 16 * KIB), (3 * MIB, 32 * KIB))
LOAD_DISTINCT = 16
LOAD_REPOS = 20
# A layer big enough to be caught in the middle of its transfer.
BIG_LAYER = 4 * MIB
# Storage-full images: three fit in the 20 MB filesystem, the fourth does not.
FULL_LAYER = 6 * MIB
FULL_IMAGES = ("a", "b", "c", "d", "e")


def load_repo(index):
    return f"load/img{index:02d}"


@pytest.fixture(scope="package")
def fault_hub(tmp_path_factory):
    """The stand-in for the whole suite; ``.images`` maps each repository to its image."""
    workdir = tmp_path_factory.mktemp("reliability")
    layout = workdir / "layout"
    hub = FaultyHub(workdir / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None).start()
    try:
        images = {}
        for index in range(LOAD_DISTINCT):
            sizes = LOAD_LAYER_SIZES[index % len(LOAD_LAYER_SIZES)]
            images[load_repo(index)] = oci.build_image(layout, tag=f"img{index}", layer_sizes=sizes, seed=f"load{index}")
            hub.push_image(layout, f"img{index}", load_repo(index), dest_tag="latest")
        for index in range(LOAD_DISTINCT, LOAD_REPOS):
            source = index - LOAD_DISTINCT
            images[load_repo(index)] = images[load_repo(source)]
            hub.push_image(layout, f"img{source}", load_repo(index), dest_tag="latest")
        images["fault/big"] = oci.build_image(layout, tag="big", layer_sizes=(BIG_LAYER, 2 * KIB), seed="big")
        hub.push_image(layout, "big", "fault/big", dest_tag="latest")
        for name in FULL_IMAGES:
            images[f"full/{name}"] = oci.build_image(layout, tag=f"full{name}", layer_sizes=(FULL_LAYER,), seed=f"full{name}")
            hub.push_image(layout, f"full{name}", f"full/{name}", dest_tag="latest")
        hub.images = images
        yield hub
    finally:
        hub.stop()


@pytest.fixture
def hub(fault_hub):
    """The suite's stand-in, up, at full speed, with empty logs and no fault armed."""
    fault_hub.unblock()
    fault_hub.set_delay(0)
    fault_hub.set_blob_rate(None)
    fault_hub.cut_blob(None)
    fault_hub.manifest_status = None
    fault_hub.reset_counts()
    yield fault_hub
    fault_hub.manifest_status = None
    fault_hub.unblock()
    fault_hub.set_delay(0)
    fault_hub.set_blob_rate(None)


@pytest.fixture
def mirror(hub, registry_version, registry_binary_path, tmp_path):
    """A registry of ``registry_version`` on the config hub_mirror renders, with an empty
    cache; ``.storage`` is its root."""
    storage = tmp_path / "storage"
    pillar = hub.mirror_pillar(free_port(), storage=str(storage))
    config, env = registry_files("reliability", pillar, registry_version, tmp_path / "helper")
    proc = RegistryProcess(tmp_path / "mirror", config=config, binary=registry_binary_path, env=env)
    proc.storage = storage
    proc.start()
    yield proc
    proc.stop()


class SaltMirror:
    """A mirror applied with masterless Salt: runs under the real service and supervisor."""

    def __init__(self, minion, name, port, hub, storage=None):
        self.minion = minion
        self.name = name
        self.hub = hub
        self.hostport = f"127.0.0.1:{port}"
        self.url = f"http://{self.hostport}"
        self.storage = Path(storage) if storage else Path(minion.lookup["state_dir"]) / name
        self.config_path = Path(minion.lookup["config_dir"]) / f"{name}.yml"
        self.log_path = Path(minion.lookup["log_dir"]) / f"{name}.log"

    def set_pillar(self, **extra):
        mirror = self.hub.mirror_pillar(self.hostport)
        if self.storage != Path(self.minion.lookup["state_dir"]) / self.name:
            mirror["storage"] = str(self.storage)
        self.minion.set_pillar(archive_pillar(self.release_server, {self.name: {**mirror, **extra}}))

    def call(self, function, *args, timeout=300):
        result = self.minion.run(function, *args, f"mirror={self.name}", timeout=timeout)
        assert HUB_TOKEN not in result.output
        return result

    def registry_pid(self):
        """The pid of the registry serving this mirror's proxy config, from /proc (or None)."""
        serving = registry_pids(self.config_path)
        return serving[0] if serving else None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def audit(self):
        return StorageAudit(self.storage)


@pytest.fixture
def salt_mirror_factory(hub, release_server):
    """Apply a mirror of ``hub`` with masterless Salt; everything is stopped and removed after."""
    made = []

    def make(storage=None, **extra):
        root = world_traversable_dir(f"/tmp/hm-{unique_name('')}")
        minion = Masterless(root)
        made.append((minion, root))
        minion.sync()
        mirror = SaltMirror(minion, unique_name("r"), free_port(), hub, storage)
        mirror.release_server = release_server
        mirror.set_pillar(**extra)
        first = minion.apply()
        assert first.returncode == 0, first
        assert all(ret["result"] for ret in first.states.values()), first
        return mirror

    yield make
    for minion, root in made:
        minion.teardown()
        shutil.rmtree(root, ignore_errors=True)
