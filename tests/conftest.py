"""Fixtures shared by every tier: the Docker Hub stand-in, release assets, masterless Salt."""

import os
import shutil
import sys

import pytest

from tests.support import oci
from tests.support.hub import FakeDockerHub
from tests.support.release import FileServer, make_release_asset
from tests.support.saltcall import Masterless, unique_name, world_traversable_dir

HUB_USER = "hubuser"
HUB_TOKEN = "dckr_pat_SECRET0123456789abcdefXYZ"
# Debian's docker-registry stands in for the release binary: it reports 2.8.2.
REGISTRY_BINARY = "/usr/bin/docker-registry"
RELEASE_VERSION = "2.8.2"


def pytest_sessionstart(session):
    missing = [tool for tool in ("skopeo", REGISTRY_BINARY, "start-stop-daemon") if not shutil.which(tool)]
    if missing or os.geteuid() != 0:
        # Loud, not skipped: .ci/run provides all of this.
        sys.exit(
            f"hub_mirror tests need root and {', '.join(missing) or 'nothing else'}: "
            "run them through .ci/run, which installs what they need"
        )


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory):
    """Small images in one OCI layout: a single-arch 'latest' and a two-arch 'multi'."""
    layout = tmp_path_factory.mktemp("layout")
    images = {
        "single": oci.build_image(layout, tag="latest", layer_sizes=(2048, 64 * 1024), seed="single"),
        "other": oci.build_image(layout, tag="other", layer_sizes=(4096,), seed="other"),
        "multi": oci.build_index(layout, tag="multi", layer_sizes=(4096,), seed="multi"),
    }
    return layout, images


@pytest.fixture(scope="session")
def hub(tmp_path_factory, image_layout):
    """The Docker Hub stand-in (Bearer token flow), holding library/alpine, library/busybox
    and a multi-arch library/multi."""
    layout, _ = image_layout
    # A quota no suite can use up: tests that watch the quota run their own stand-in.
    with FakeDockerHub(
        tmp_path_factory.mktemp("hub"), username=HUB_USER, token=HUB_TOKEN, ratelimit=(100000, 100000)
    ) as hub:
        hub.push_image(layout, "latest", "library/alpine")
        hub.push_image(layout, "other", "library/busybox", dest_tag="latest")
        hub.push_image(layout, "multi", "library/multi", dest_tag="latest")
        yield hub


@pytest.fixture
def clean_hub(hub):
    hub.unblock()
    hub.set_delay(0)
    hub.reset_counts()
    return hub


@pytest.fixture(scope="session")
def release_server(tmp_path_factory):
    """GitHub's release downloads, on loopback: the 2.8.2 asset for amd64 with its .sha256."""
    root = tmp_path_factory.mktemp("releases")
    asset = make_release_asset(root, RELEASE_VERSION, "amd64", binary=REGISTRY_BINARY)
    with FileServer(root) as server:
        server.asset = asset
        server.template = server.url + "/v{version}/registry_{version}_linux_{arch}.tar.gz"
        yield server


@pytest.fixture
def masterless(tmp_path_factory):
    """A masterless minion with its own config, pillar and lookup paths; mirrors stopped after."""
    root = world_traversable_dir(f"/tmp/hm-{unique_name('')}")
    minion = Masterless(root)
    minion.sync()
    yield minion
    minion.teardown()
    shutil.rmtree(root, ignore_errors=True)


def archive_pillar(release_server, mirrors, **extra):
    """A pillar that installs the release asset from the loopback release server."""
    return {
        "version": RELEASE_VERSION,
        "install": {
            "method": "archive",
            "source": release_server.template,
            "source_hash": release_server.template + ".sha256",
        },
        "mirrors": mirrors,
        **extra,
    }


@pytest.fixture
def mirror_name():
    return unique_name("m")
