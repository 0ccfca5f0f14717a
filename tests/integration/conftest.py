"""The integration tier's salt-factories root and test order."""

import shutil

import pytest

from tests.support.saltcall import unique_name, world_traversable_dir


@pytest.fixture(scope="session")
def salt_factories_config():
    """The salt-factories daemons' root, its own scripts dir included (not a shared
    /tmp/scripts), under /tmp where the service user can reach the minions' mirrors."""
    root = world_traversable_dir(f"/tmp/hm-sf-{unique_name('')}")
    yield {"root_dir": root}
    shutil.rmtree(root, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Tests that run the Go-built runtimes (the ``tools`` fixture) go last: on a fresh
    machine .ci/run builds those in the background, and every other test can run first."""
    items[:] = [item for item in items if "tools" not in item.fixturenames] + [
        item for item in items if "tools" in item.fixturenames
    ]
