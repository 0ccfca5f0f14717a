"""A build host's container clients as files under a temporary root."""

import os

import pytest

from _hub_mirror.clients import docker, runtimes
from tests.unit.host import MIRROR, make_client


@pytest.fixture
def offline_runtimes(monkeypatch):
    """The pure file logic only: dockerd is reloaded in the integration tests, not here,
    and `containerd --version` (a subprocess per run, most of the time here) says 1."""
    monkeypatch.setattr(docker, "_docker_reload", lambda client, test: None)
    monkeypatch.setattr(runtimes, "_containerd_major", lambda: 1)


@pytest.fixture
def host(tmp_path, offline_runtimes):
    """Every runtime's files, for the mirror ``MIRROR``: daemon.json and registries.conf
    of the user's own, the rest absent."""
    client = make_client(str(tmp_path), {"docker.io": [MIRROR]})
    os.makedirs(f"{tmp_path}/k3s")
    os.makedirs(f"{tmp_path}/containers/registries.conf.d")
    with open(client["paths"]["registries_conf"], "w") as handle:
        handle.write("# v2\n")
    os.makedirs(f"{tmp_path}/docker")
    with open(client["paths"]["docker_daemon_json"], "w") as handle:
        handle.write('{\n  "debug": true\n}\n')
    return client

