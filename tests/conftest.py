"""Fixtures shared by every tier: the Docker Hub stand-in, release assets, masterless Salt."""

import os
import shutil
import sys

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.release import (
    REGISTRY_BINARY,
    REGISTRY_VERSIONS,
    one_registry_version,
    registry_binary,
    serve_releases,
)
from tests.support.saltcall import Masterless, unique_name


def pytest_sessionstart(session):
    missing = [tool for tool in ("skopeo", REGISTRY_BINARY, "start-stop-daemon") if not shutil.which(tool)]
    if missing or os.geteuid() != 0:
        # Loud, not skipped: .ci/run provides all of this.
        sys.exit(
            f"hub_mirror tests need root and {', '.join(missing) or 'nothing else'}: "
            "run them through .ci/run, which installs what they need"
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``one_registry`` check Salt's side (validation, clients, the loader):
    the registry version does not reach them, so they run on the default install only.
    Tests marked ``registry_dialect(major)`` check what only that major version has."""
    keep = one_registry_version()
    selected, deselected = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        version = params and params.get("registry_version")
        dialect = item.get_closest_marker("registry_dialect")
        if version and dialect and not version.startswith(f"{dialect.args[0]}."):
            deselected.append(item)
        elif version and version != keep and item.get_closest_marker("one_registry"):
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


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


@pytest.fixture(scope="session", params=REGISTRY_VERSIONS, ids=lambda version: f"registry-{version}")
def registry_version(request):
    """The registry release under test: every test that runs a mirror runs on each version
    of the matrix (tests/support/release.py)."""
    return request.param


@pytest.fixture(scope="session")
def release_server(registry_version, tmp_path_factory):
    """GitHub's release downloads, on loopback: the amd64 asset of ``registry_version``
    with its .sha256."""
    with serve_releases(tmp_path_factory.mktemp("releases"), versions=(registry_version,)) as server:
        yield server


@pytest.fixture(scope="session")
def registry_binary_path(registry_version, tmp_path_factory):
    """The amd64 ``registry`` binary of ``registry_version``, for registries tests run themselves."""
    return registry_binary(registry_version, tmp_path_factory.mktemp("registry-binary"))


@pytest.fixture
def masterless():
    """A masterless minion with its own config, pillar and lookup paths; mirrors stopped after."""
    minion = Masterless.fresh()
    yield minion
    minion.discard()


@pytest.fixture
def mirror_name():
    return unique_name("m")
