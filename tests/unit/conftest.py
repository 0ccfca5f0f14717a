"""Unit tests import the execution module directly, with the loader's dunders stubbed."""

import pytest

from tests.support.modules import load


@pytest.fixture
def hub_mirror():
    module = load("hub_mirror")
    module.__grains__ = {
        "kernel": "Linux",
        "osarch": "amd64",
        "cpuarch": "x86_64",
        "ip4_interfaces": {"lo": ["127.0.0.1"], "eth0": ["192.0.2.10"]},
        "ip6_interfaces": {"lo": ["::1"]},
    }
    module.__pillar__ = {}
    module.__salt__ = {}
    module.__opts__ = {}
    return module
