"""Integration tier ordering."""


def pytest_collection_modifyitems(items):
    """Tests that run the Go-built runtimes (the ``tools`` fixture) go last: on a fresh
    machine .ci/run builds those in the background, and every other test can run first."""
    items[:] = [item for item in items if "tools" not in item.fixturenames] + [
        item for item in items if "tools" in item.fixturenames
    ]
