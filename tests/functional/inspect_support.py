"""Shared pieces of the inspect-and-operate tests: a Docker Hub stand-in of their own (own
quota, own request log) holding a few more images, and a mirror applied with masterless
Salt from the release asset, as a user runs it."""

import json
import shutil
import time
from pathlib import Path

from tests.support import oci
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import Masterless, unique_name, world_traversable_dir


def build_images(layout):
    """The images these tests pull, warm, expire and collect."""
    return {
        "single": oci.build_image(layout, tag="latest", layer_sizes=(2048, 64 * 1024), seed="single"),
        "other": oci.build_image(layout, tag="other", layer_sizes=(4096,), seed="other"),
        "multi": oci.build_index(layout, tag="multi", layer_sizes=(4096,), seed="multi"),
        "warm": oci.build_image(layout, tag="warm", layer_sizes=(8192, 4096), seed="warm"),
        "warmmulti": oci.build_index(layout, tag="warmmulti", layer_sizes=(3000,), seed="warmmulti"),
        "garbage": oci.build_image(layout, tag="garbage", layer_sizes=(32 * 1024,), seed="garbage"),
        "counted": oci.build_image(layout, tag="counted", layer_sizes=(1024,), seed="counted"),
    }


REPOS = {
    "library/alpine": "latest",
    "library/busybox": "other",
    "library/multi": "multi",
    "library/warmme": "warm",
    "library/warmmulti": "warmmulti",
    "library/garbage": "garbage",
    "library/counted": "counted",
    # Docker Hub's rate-limit probe repository.
    "ratelimitpreview/test": "other",
}


def start_hub(workdir):
    layout = Path(workdir) / "layout"
    images = build_images(layout)
    hub = FakeDockerHub(Path(workdir) / "hub", username=HUB_USER, token=HUB_TOKEN).start()
    for repo, tag in REPOS.items():
        hub.push_image(layout, tag, repo, dest_tag="latest")
    return hub, images


class Mirror:
    """A mirror on a masterless minion: ``.call(fn, *args)`` runs ``salt-call``."""

    def __init__(self, minion, name, port, hub):
        self.minion = minion
        self.name = name
        self.port = port
        self.hub = hub
        self.hostport = f"127.0.0.1:{port}"
        self.url = f"http://{self.hostport}"

    def call(self, function, *args):
        return self.minion.run(function, *args, f"mirror={self.name}")

    def data(self, function, *args):
        result = self.call(function, *args)
        assert result.returncode == 0, result
        assert HUB_TOKEN not in result.output
        return result.data

    def pillar(self, **extra):
        """This mirror's pillar, with ``extra`` keys."""
        return self.hub.mirror_pillar(self.hostport, **extra)

    def set_mirror_pillar(self, release_server, **extra):
        self.minion.set_pillar(archive_pillar(release_server, {self.name: self.pillar(**extra)}))

    @property
    def storage(self):
        return Path(self.minion.lookup["state_dir"]) / self.name

    def scheduled(self):
        try:
            return json.loads((self.storage / "scheduler-state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_scheduled(self, repos, timeout=20):
        """Wait until the registry has saved expiry entries for ``repos`` (it saves every 5 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keys = self.scheduled()
            if all(any(key.startswith(f"{repo}@") for key in keys) for repo in repos):
                return keys
            time.sleep(0.5)
        raise AssertionError(f"no scheduler entries for {repos} after {timeout}s: {sorted(self.scheduled())}")


def applied_mirror(hub, release_server, **extra):
    """A fresh minion with one mirror of ``hub``, applied; the caller calls ``teardown``."""
    root = world_traversable_dir(f"/tmp/hm-{unique_name('')}")
    minion = Masterless(root)
    minion.sync()
    mirror = Mirror(minion, unique_name("m"), free_port(), hub)
    mirror.set_mirror_pillar(release_server, **extra)
    first = minion.apply()
    assert first.returncode == 0, first
    mirror.root = root
    return mirror


def teardown(mirror):
    mirror.minion.teardown()
    shutil.rmtree(mirror.root, ignore_errors=True)
