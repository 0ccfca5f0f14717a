"""The host the unit tests stand for: its grains, what its pillar makes of a mirror, the
lookup paths of a mirror kept under a temporary directory, and its container clients'
files under a temporary root."""

import os
import stat

from _hub_mirror import settings, validate
from _hub_mirror.clients import files as client_files
from _hub_mirror.clients import runtimes
from _hub_mirror.clients import validate as client_validate
from tests.support.modules import HOST_GRAINS

# The tests' amd64 Linux host, with eth0 (192.0.2.10) beside loopback.
GRAINS = {**HOST_GRAINS, "ip4_interfaces": {"lo": ["127.0.0.1"], "eth0": ["192.0.2.10"]}}


def settings_of(raw, redact=False):
    """What the facade's ``settings`` (``redact=True``) or ``_settings(redact=False)``
    returns for the raw ``hub_mirror`` pillar ``raw`` on this host."""
    return validate.load(raw, GRAINS, redact)


def pillar_mirror(**changes):
    """A mirror's pillar entry: Docker Hub on 127.0.0.1:5000, with ``changes``."""
    return {"upstream": "https://registry-1.docker.io", "listen": "127.0.0.1:5000", **changes}


def mirror_spec(**overrides):
    """The completed settings of the mirror ``dockerhub`` with credentials ``u``/``t0k3n``."""
    spec = settings.merge(settings.MIRROR_DEFAULTS, {"username": "u", "token": "t0k3n"})
    spec.update(overrides)
    return validate.complete_mirror("dockerhub", spec, settings.DEFAULTS["lookup"], GRAINS)


def lookup_in(tmp_path):
    """``hub_mirror:lookup`` with every directory under ``tmp_path``, supervised by sysv."""
    return {
        "prefix": str(tmp_path / "opt"),
        "config_dir": str(tmp_path / "etc"),
        "state_dir": str(tmp_path / "state"),
        "log_dir": str(tmp_path / "log"),
        "run_dir": str(tmp_path / "run"),
        "unit_dir": str(tmp_path / "units"),
        "init_dir": str(tmp_path / "init.d"),
        "supervisor": "sysv",
    }


# --- the container clients ---------------------------------------------------------------

RUNTIMES = ["docker", "containerd", "podman", "buildkit", "k3s"]
# The mirror the clients are pointed at.
MIRROR = "http://192.168.128.1:5000"


def make_client(root, mirrors):
    """The completed ``client:`` settings for every runtime, its files under ``root``."""
    client = client_validate.client_conf({"client": {"mirrors": mirrors, "runtimes": RUNTIMES}, "lookup": {"state_dir": f"{root}/state"}})
    client["paths"].update(
        docker_daemon_json=f"{root}/docker/daemon.json",
        docker_pidfile=f"{root}/none.pid",
        docker_socket=f"{root}/none.sock",
        containerd_config=f"{root}/containerd.toml",
        containerd_certs_d=f"{root}/certs.d",
        registries_conf=f"{root}/containers/registries.conf",
        registries_conf_d=f"{root}/containers/registries.conf.d",
        buildkitd_toml=f"{root}/buildkit/buildkitd.toml",
        k3s_registries=f"{root}/k3s/registries.yaml",
        systemd_units=f"{root}/units",
        docker_default=f"{root}/default-docker",
    )
    return client


def snapshot(path):
    """(bytes or None, mode, uid, gid, link target) of what ``path`` names."""
    link = os.readlink(path) if os.path.islink(path) else None
    try:
        info = os.stat(path)
        with open(path, "rb") as handle:
            return handle.read(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, link
    except FileNotFoundError:
        return None, None, None, None, link


def configure(client, alive=None, test=False):
    """One client_configure run on ``client``'s files, with the mirrors ``alive``
    answering (all of ``client:mirrors`` when not given): (changes, comment lines)."""
    alive = client["mirrors"] if alive is None else alive
    record = client_files.ClientRecord(client["record_dir"])
    return runtimes._sync_all(client, record, alive, test=test)


def clean(client):
    """One client_remove run on ``client``'s files: (changes, comment lines)."""
    return runtimes._sync_all(client, client_files.ClientRecord(client["record_dir"]), {}, test=False, cleaning=True)
