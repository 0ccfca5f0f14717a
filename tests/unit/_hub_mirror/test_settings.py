"""Defaults and what follows from the host and the version: the release arch of each grain
spelling, and the config dialect of each registry version."""

import pytest

from _hub_mirror import settings

# Every arch upstream builds, and the grain spellings that must reach it.
GRAIN_TO_ASSET = [
    ({"osarch": "amd64"}, "amd64"),
    ({"osarch": "x86_64"}, "amd64"),
    ({"osarch": "arm64"}, "arm64"),
    ({"osarch": "aarch64"}, "arm64"),
    ({"osarch": "armhf"}, "armv7"),
    ({"osarch": "armv7hl"}, "armv7"),
    ({"osarch": "armel"}, "armv6"),
    ({"osarch": "ppc64el"}, "ppc64le"),
    ({"osarch": "ppc64le"}, "ppc64le"),
    ({"osarch": "s390x"}, "s390x"),
    ({"osarch": "riscv64"}, "riscv64"),
    ({"osarch": "", "cpuarch": "armv7l"}, "armv7"),
    ({"osarch": "", "cpuarch": "armv6l"}, "armv6"),
    ({"osarch": "", "cpuarch": "aarch64"}, "arm64"),
]


@pytest.mark.parametrize("grains,asset_arch", GRAIN_TO_ASSET)
def test_grains_map_to_release_asset_arch(grains, asset_arch):
    assert settings.release_arch(grains) == asset_arch


def test_unknown_cpu_has_no_release_arch():
    assert settings.release_arch({"osarch": "mips", "cpuarch": "mips"}) is None


@pytest.mark.parametrize(
    "version,dialect", [("2.8.3", "2"), ("2.8.2+ds1", "2"), ("v2.8.1", "2"), ("3.0.0", "3"), ("3.1.1", "3")]
)
def test_dialect_follows_the_major_version(version, dialect):
    assert settings.dialect_of(version) == dialect

