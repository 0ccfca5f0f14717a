"""
The settings' defaults and the names derived from them: paths of a mirror's files,
the release's URL and arch, Docker Hub's names.
"""

import copy
import os
import re

from .net import hostport, parse_hostport, resolve_host

DEFAULT_VERSION = "3.0.0"

RELEASE_URL = (
    "https://github.com/distribution/distribution/releases/download/v{version}/registry_{version}_linux_{arch}.tar.gz"
)

# Release asset arch for each name the osarch (dpkg/rpm) and cpuarch (uname -m) grains use.
RELEASE_ARCH = {
    "amd64": "amd64",
    "x86_64": "amd64",
    "arm64": "arm64",
    "aarch64": "arm64",
    "armhf": "armv7",
    "armv7l": "armv7",
    "armv7hl": "armv7",
    "armel": "armv6",
    "armv6l": "armv6",
    "armv6hl": "armv6",
    "ppc64el": "ppc64le",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}

# riscv64 builds start with 3.0.
RELEASE_ARCHES_2 = ("amd64", "arm64", "armv6", "armv7", "ppc64le", "s390x")

RELEASE_ARCHES_3 = RELEASE_ARCHES_2 + ("riscv64",)


# Docker Hub: the name clients pull it by, the endpoint they reach, and every name of it.
DOCKER_HUB = "docker.io"
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io", "registry.hub.docker.com")

DEFAULTS = {
    "version": DEFAULT_VERSION,
    "install": {"method": "archive", "source": RELEASE_URL, "source_hash": ""},
    "mirrors": {"dockerhub": {}},
    "probe_timeout": 30,
    # Used by clean.sls only: also delete each mirror's cache.
    "clean": {"purge_storage": False},
    "lookup": {
        "user": "hub-mirror",
        "group": "hub-mirror",
        "prefix": "/opt/hub-mirror",
        "config_dir": "/etc/hub-mirror",
        "state_dir": "/var/lib/hub-mirror",
        "log_dir": "/var/log/hub-mirror",
        "run_dir": "/run/hub-mirror",
        "unit_dir": "/etc/systemd/system",
        "init_dir": "/etc/init.d",
        "package": "docker-registry",
        "package_binary": "/usr/bin/docker-registry",
        "package_service": "docker-registry",
        # nginx, the front of each mirror (front: nginx), from the distribution.
        "front_binary": "/usr/sbin/nginx",
        "front_package": "nginx",
        "front_service": "nginx",
        # systemd or sysv; empty: systemd where it is PID 1, else sysv.
        "supervisor": "",
    },
}

MIRROR_DEFAULTS = {
    "upstream": DOCKER_HUB_URL,
    "listen": "127.0.0.1:5000",
    # The URL other hosts reach this mirror at, as hub_mirror.endpoint publishes it to the
    # mine (a DNS name, or the address in front of a NAT). Empty: the listen address.
    "advertise": "",
    # Empty: loopback, on the listen port + 10000.
    "debug_listen": "",
    "username": "",
    "token": "",
    # Empty: <state_dir>/<mirror name>.
    "storage": "",
    # 3.x only (2.8 fixes it at 168h); 0 keeps cached content forever.
    "ttl": "168h",
    "log_level": "info",
    # nginx in front of the registry (see _hub_mirror/front.py), or none.
    "front": "nginx",
    # How long the front may answer a tag from its cache before it asks again (a Go
    # duration). 0: every tag request asks the upstream, as the registry alone does, but
    # requests within a second of the same one share its answer.
    "manifest_check_interval": "0",
    # Images the state hub_mirror.warmed keeps in the cache, e.g. [library/alpine:3.20].
    "warm": [],
    # Cap on the storage directory (e.g. 50G); empty: none. The state hub_mirror.pruned enforces it.
    "max_size": "",
    # Shared storage: the registry's S3 driver instead of the storage directory, so that
    # several mirror hosts serve one cache. Empty: local filesystem.
    "s3": {},
    # Blob descriptor cache in redis, shared by the hosts of an S3 pool.
    "redis": {},
}

S3_DEFAULTS = {
    "bucket": "",
    "region": "us-east-1",
    # Empty: AWS. Otherwise the S3 API's URL, e.g. http://minio.internal:9000.
    "endpoint": "",
    # Both empty: the instance's IAM role.
    "accesskey": "",
    "secretkey": "",
    # Key prefix inside the bucket.
    "rootdirectory": "/",
    # Path-style URLs (bucket in the path), which most S3-compatible servers need.
    "path_style": True,
}

REDIS_DEFAULTS = {"addr": "", "password": "", "db": 0}


# Rendered-config keys that hold secrets: shown as <redacted> in every change report.
SECRET_CONFIG_KEYS = ("proxy.password", "storage.s3.secretkey", "redis.password")

SECRET_KEYS = ("token",)


# How long registry 3.x keeps a credential from the helper: a rotated token is in use
# within this time, without a restart. Not 0: 3.x fetches a bearer token for every
# request that reaches the upstream, and with 0 each would start the helper, one at a
# time behind the registry's lock.
CREDENTIAL_LIFETIME = "10s"


def merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def release_arch(grains):
    """The release asset arch for these grains: ``osarch`` (dpkg or rpm name) decides,
    ``cpuarch`` (``uname -m``) is the fallback; None when upstream builds nothing for it."""
    for grain in ("osarch", "cpuarch"):
        arch = RELEASE_ARCH.get(str(grains.get(grain, "")).lower())
        if arch:
            return arch
    return None


def dialect_of(version):
    """``"2"`` or ``"3"``: the registry's config keys differ by major version."""
    match = re.match(r"^v?(\d+)\.\d+", str(version))
    return match.group(1) if match else "3"


def default_debug_port(port):
    """The debug listener's port when pillar gives none: the listen port + 10000."""
    return port + 10000 if port + 10000 < 65536 else port - 10000


def mirror_sockets(mirror, grains):
    """(key, ip, port) of the listen and debug sockets a valid mirror entry will bind."""
    sockets = []
    try:
        host, port = parse_hostport(mirror.get("listen"))
        sockets.append(("listen", resolve_host(host, grains), port))
        if mirror.get("debug_listen"):
            host, debug_port = parse_hostport(mirror["debug_listen"])
            sockets.append(("debug_listen", resolve_host(host, grains), debug_port))
        else:
            sockets.append(("debug_listen", "127.0.0.1", default_debug_port(port)))
    except (ValueError, TypeError):
        pass  # reported by _validate_mirror
    return [socket_ for socket_ in sockets if socket_[1]]


def storage_path(mirror, lookup, name):
    """The resolved storage directory of a mirror (pillar's, else ``<state_dir>/<name>``)."""
    return os.path.realpath(mirror.get("storage") or os.path.join(lookup["state_dir"], name))


def binary_path(conf):
    if conf["install"]["method"] == "package":
        return conf["lookup"]["package_binary"]
    return os.path.join(conf["lookup"]["prefix"], "bin", "registry")


def record_path(conf):
    return os.path.join(conf["lookup"]["prefix"], "install.json")


def mirror_paths(conf, name):
    lookup = conf["lookup"]
    return {
        "config": os.path.join(lookup["config_dir"], f"{name}.yml"),
        "offline_config": os.path.join(lookup["config_dir"], f"{name}.offline.yml"),
        "credentials": os.path.join(lookup["config_dir"], f"{name}.credentials.json"),
        "credential_helper": os.path.join(lookup["prefix"], "bin", "hub-mirror-credential-helper"),
        "last_good": os.path.join(lookup["config_dir"], f"{name}.last-good.json"),
        "fingerprint": os.path.join(lookup["state_dir"], ".fingerprints", name),
        "unit": os.path.join(lookup["unit_dir"], f"hub-mirror-{name}.service"),
        "init": os.path.join(lookup["init_dir"], f"hub-mirror-{name}"),
        "supervise": os.path.join(lookup["prefix"], "bin", "hub-mirror-supervise"),
        "supervise_settings": os.path.join(lookup["config_dir"], f"{name}.supervise.json"),
        "front_conf": os.path.join(lookup["config_dir"], f"{name}.front.conf"),
        "pidfile": os.path.join(lookup["run_dir"], f"{name}.pid"),
        "log": os.path.join(lookup["log_dir"], f"{name}.log"),
        # Not a path: whose processes serve the mirror (see processes.mirror_processes).
        "user": lookup["user"],
    }


def probe_url(spec):
    host = spec["listen_host"]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{hostport(host, spec['listen_port'])}"
