"""Unit tests import the execution module directly, with the loader's dunders stubbed."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(f"hm_unit_{name}", REPO / "_modules" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
