"""Fixtures shared by every tier: the Docker Hub stand-in, release assets, masterless Salt."""

import os
import shutil
import sys

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.release import REGISTRY_BINARY, serve_releases
from tests.support.saltcall import Masterless, unique_name


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
    with serve_releases(tmp_path_factory.mktemp("releases")) as server:
        yield server


@pytest.fixture
def masterless():
    """A masterless minion with its own config, pillar and lookup paths; mirrors stopped after."""
    minion = Masterless.fresh()
    yield minion
    minion.discard()


@pytest.fixture
def mirror_name():
    return unique_name("m")
