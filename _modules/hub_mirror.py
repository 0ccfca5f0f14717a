"""
Docker Hub pull-through caches with the CNCF distribution ``registry``.

This module holds all of hub_mirror's logic: it reads and validates the ``hub_mirror``
pillar, installs the registry release for the minion's CPU architecture, renders each
mirror's configuration for the installed version's dialect, runs each mirror under a
supervisor (a hardened systemd unit, or an init script with a restart loop where systemd
is not PID 1) and answers questions about what is cached.

The states in ``_states/hub_mirror.py`` are thin wrappers around the ``*_plan``-style
functions here: every function that changes the host takes ``test=True`` to report what
it would change without changing it, so ``test=True`` predicts a live run exactly.

Secrets: each mirror's upstream token is read from pillar here (never passed through
SLS), written only to the mirror's 0600 config file, and never returned, logged or put
on a command line. Functions that show configuration redact it.

:depends: requests, PyYAML (both ship with Salt)
:configuration: the ``hub_mirror`` pillar; see ``pillar.example``.
"""

import concurrent.futures
import copy
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse

import requests
import yaml

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "hub_mirror"

REDACTED = "<redacted>"

DEFAULT_VERSION = "3.0.0"
RELEASE_URL = (
    "https://github.com/distribution/distribution/releases/download/"
    "v{version}/registry_{version}_linux_{arch}.tar.gz"
)

# Published SHA-256 of the release tarballs (REGISTRY_FACTS.md).
KNOWN_DIGESTS = {
    "2.8.3": {
        "amd64": "b1f750ecbe09f38e2143e22c61a25e3da2afe1510d9522859230b480e642ceff",
        "arm64": "7d2252eeeac97dd60fb9b36bebd15b95d7f947c4c82b8e0824cb55233ece9cd0",
        "armv6": "b00606466f976b6757268f1e7691918cbeca4af6fd4093a114b9186744ee8ef0",
        "armv7": "d3d7d958a7cc04159d43871261b1ed470ba72531d345fada311068962b967517",
        "ppc64le": "9003659e5571bee89ee6d686057d02e9c0896d327276f268189922036e1ca84b",
        "s390x": "2c1347c73f881c320ff707055aecf649a888df39252e8bdc4fdfac7f59a383f1",
    },
    "3.0.0": {
        "amd64": "61c9a2c0d5981a78482025b6b69728521fbc78506d68b223d4a2eb825de5ca3d",
        "arm64": "6c2ee1d135626fa42e0d6fb66a0e0f42e22439e5050087d04f4c5ff53655892e",
        "armv6": "e038bba14c573628407d9f5dfa6b6f9d782acda62abf52dbf24ab257bbeedfe7",
        "armv7": "147d617e604e2e7d11b055484493c6a20731f6ce252d2bc47c716d8c48258719",
        "ppc64le": "5386e9811790616d5b3c4d5de2f449e6da99f03dd45f33ee3e3464e81a264e6e",
        "s390x": "c8645e6fcebde5a441e1050c673b3ffa38572f61c1d1b1605d2bf333d3760328",
        "riscv64": "99bfeef7c553bf7b9861435e6b55fa584ecca73704f4a71418e482cc2d9e013d",
    },
}

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
        # systemd or sysv; empty: systemd where it is PID 1, else sysv.
        "supervisor": "",
    },
}

MIRROR_DEFAULTS = {
    "upstream": "https://registry-1.docker.io",
    "listen": "127.0.0.1:5000",
    # Empty: loopback, on the listen port + 10000.
    "debug_listen": "",
    "username": "",
    "token": "",
    # Empty: <state_dir>/<mirror name>.
    "storage": "",
    # 3.x only (2.8 fixes it at 168h); 0 keeps cached content forever.
    "ttl": "168h",
    "log_level": "info",
}

SECRET_KEYS = ("token",)
# How long registry 3.x keeps a credential from the helper: a rotated token is in use
# within this time, without a restart.
CREDENTIAL_LIFETIME = "5m"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_DIGEST_RE = re.compile(r"^(?:sha256[:=])?([0-9a-fA-F]{64})$")
_DURATION_RE = re.compile(r"^(0|(\d+(\.\d+)?(ns|us|ms|s|m|h))+)$")
_LOG_LEVELS = ("error", "warn", "info", "debug")


def __virtual__():
    if __grains__.get("kernel") != "Linux":
        return (False, "hub_mirror runs the registry on Linux only")
    return __virtualname__


# ---------------------------------------------------------------------------------------
# Settings: one pillar read, one validation
# ---------------------------------------------------------------------------------------


def _merge(base, override):
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _raw_pillar():
    # __pillar__ gives the real values; pillar.get masks them in Salt 3008.
    return __pillar__.get("hub_mirror", {})


def release_arch(grains=None):
    """
    Return the release asset arch (``amd64``, ``arm64``, ``armv7``, ...) for this minion.

    The ``osarch`` grain (dpkg or rpm name) decides; ``cpuarch`` (``uname -m``) is the
    fallback. ``None`` when upstream builds nothing for the CPU.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.release_arch
    """
    grains = grains if grains is not None else __grains__
    for grain in ("osarch", "cpuarch"):
        arch = RELEASE_ARCH.get(str(grains.get(grain, "")).lower())
        if arch:
            return arch
    return None


def _dialect(version):
    """``"2"`` or ``"3"``: the registry's config keys differ by major version."""
    match = re.match(r"^v?(\d+)\.\d+", str(version))
    return match.group(1) if match else "3"


class _Errors:
    """Collects validation errors, each naming its pillar key and the fix."""

    def __init__(self):
        self.messages = []

    def add(self, key, problem, fix):
        self.messages.append(f"hub_mirror:{key}: {problem}; {fix}")

    def raise_if_any(self):
        if self.messages:
            raise SaltInvocationError(
                "Invalid hub_mirror pillar (nothing was changed):\n  - "
                + "\n  - ".join(self.messages)
            )


def _check_keys(errors, prefix, value, known):
    for key in value:
        if key not in known:
            errors.add(
                f"{prefix}:{key}" if prefix else str(key),
                "unknown key",
                f"remove it or use one of: {', '.join(sorted(known))}",
            )


def _parse_hostport(text):
    """Split ``host:port``, ``[v6]:port`` or ``iface:port``; raise ValueError."""
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def _resolve_host(host, grains):
    """An IP for a listen host that is an IP, ``localhost`` or an interface name."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    for grain in ("ip4_interfaces", "ip6_interfaces"):
        addresses = (grains.get(grain) or {}).get(host) or []
        if addresses:
            return addresses[0]
    return None


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _shown_url(value):
    """``value`` fit for an error message: what precedes an ``@`` may be a token."""
    if not isinstance(value, str) or "@" not in value:
        return value
    scheme, sep, rest = value.partition("://")
    return f"{scheme}{sep}{REDACTED}@{rest.rpartition('@')[2]}" if sep else REDACTED


def _check_url(errors, key, value, schemes=("http", "https")):
    parsed = urllib.parse.urlparse(value) if isinstance(value, str) else None
    if not parsed or parsed.scheme not in schemes or not parsed.netloc:
        errors.add(
            key,
            f"{_shown_url(value)!r} is not an absolute {'/'.join(schemes)} URL",
            "write it like https://registry-1.docker.io",
        )
        return None
    if parsed.username or parsed.password:
        errors.add(key, "the URL holds credentials", "put them in username and token instead")
    return parsed


def _validate_mirror(errors, name, mirror, version, grains):
    prefix = f"mirrors:{name}"
    if not _NAME_RE.match(name):
        errors.add(
            prefix,
            f"{name!r} is not a valid mirror name",
            "use 1-32 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    _check_keys(errors, prefix, mirror, MIRROR_DEFAULTS)
    for key in MIRROR_DEFAULTS:
        if not isinstance(mirror.get(key), str):
            shown = "a secret" if key in SECRET_KEYS else repr(mirror.get(key))
            errors.add(
                f"{prefix}:{key}",
                f"must be a string, got {type(mirror.get(key)).__name__} ({shown})",
                "quote the value in YAML",
            )
    if errors.messages:
        return

    upstream = _check_url(errors, f"{prefix}:upstream", mirror["upstream"])
    if upstream and upstream.path not in ("", "/"):
        errors.add(
            f"{prefix}:upstream",
            f"{_shown_url(mirror['upstream'])!r} has a path",
            "give only scheme and host, e.g. https://ghcr.io",
        )

    bound = {}
    for key in ("listen", "debug_listen"):
        if key == "debug_listen" and not mirror[key]:
            continue
        try:
            host, port = _parse_hostport(mirror[key])
        except ValueError:
            errors.add(
                f"{prefix}:{key}",
                f"{mirror[key]!r} is not HOST:PORT with a port from 1 to 65535",
                "write e.g. 127.0.0.1:5000, [::1]:5000 or eth0:5000",
            )
            continue
        resolved = _resolve_host(host, grains)
        if resolved is None:
            known = ", ".join(sorted((grains.get("ip4_interfaces") or {}).keys())) or "none"
            errors.add(
                f"{prefix}:{key}",
                f"{host!r} is neither an IP address nor an interface of this host",
                f"use an IP address or one of the interfaces: {known}",
            )
        elif key == "debug_listen" and not _is_loopback(resolved):
            errors.add(
                f"{prefix}:{key}",
                f"{mirror[key]!r} is not a loopback address",
                "the debug listener exposes pprof and metrics: bind it to 127.0.0.1",
            )
        else:
            bound[key] = (resolved, port)
    # Two listeners on one socket: the registry exits at start, so nothing would serve.
    if len(bound) == 2 and bound["listen"][1] == bound["debug_listen"][1] and (
        bound["listen"][0] == bound["debug_listen"][0]
        or {bound["listen"][0], bound["debug_listen"][0]} & {"0.0.0.0", "::"}
    ):
        errors.add(
            f"{prefix}:debug_listen",
            f"{mirror['debug_listen']!r} is the listen address too",
            "give the debug listener its own port, or remove it for listen port + 10000",
        )

    if mirror["token"] and not mirror["username"]:
        errors.add(
            f"{prefix}:token",
            "a token is set without a username",
            f"set hub_mirror:{prefix}:username to the account the token belongs to",
        )
    if mirror["username"] and not mirror["token"]:
        errors.add(
            f"{prefix}:username",
            "a username is set without a token",
            f"set hub_mirror:{prefix}:token (an access token) or remove the username",
        )

    storage = mirror["storage"]
    if storage and (not os.path.isabs(storage) or os.path.normpath(storage) in ("/", "//")):
        errors.add(
            f"{prefix}:storage",
            f"{storage!r} is not an absolute directory path below /",
            "write e.g. /var/lib/hub-mirror/" + name,
        )

    if not _DURATION_RE.match(mirror["ttl"]):
        errors.add(
            f"{prefix}:ttl",
            f"{mirror['ttl']!r} is not a duration",
            "write e.g. 168h, 30m or 0 (never expire)",
        )
    elif _dialect(version) == "2" and mirror["ttl"] != MIRROR_DEFAULTS["ttl"]:
        errors.add(
            f"{prefix}:ttl",
            f"registry {version} fixes the cache TTL at 168h",
            "remove ttl or use a 3.x version",
        )

    if mirror["log_level"] not in _LOG_LEVELS:
        errors.add(
            f"{prefix}:log_level",
            f"{mirror['log_level']!r} is not a log level",
            f"use one of {', '.join(_LOG_LEVELS)}",
        )


def _validate(raw, grains):
    errors = _Errors()
    if not isinstance(raw, dict):
        errors.add("", f"must be a mapping, got {type(raw).__name__}", "see pillar.example")
        errors.raise_if_any()
    _check_keys(errors, "", raw, list(DEFAULTS) + ["client"])

    version = raw.get("version", DEFAULT_VERSION)
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        errors.add(
            "version",
            f"{version!r} is not a release version like '3.0.0'",
            "quote it in YAML (3.0 unquoted is a number) and give all three parts",
        )
        version = DEFAULT_VERSION

    install = raw.get("install", {})
    if not isinstance(install, dict):
        errors.add("install", "must be a mapping", "see pillar.example")
        install = {}
    _check_keys(errors, "install", install, DEFAULTS["install"])
    method = install.get("method", "archive")
    if method not in ("archive", "package"):
        errors.add("install:method", f"{method!r} is not supported", "use archive or package")
    source = install.get("source", RELEASE_URL)
    parsed = _check_url(errors, "install:source", source, ("http", "https", "file"))
    if parsed and "{version}" not in source and "{arch}" not in source:
        log.debug("hub_mirror: install:source has no {version}/{arch} placeholders")
    source_hash = install.get("source_hash", "")
    if not isinstance(source_hash, str) or (
        source_hash
        and not _DIGEST_RE.match(source_hash)
        and not re.match(r"^(https?|file)://", source_hash)
    ):
        errors.add(
            "install:source_hash",
            f"{source_hash!r} is neither a sha256 digest nor a URL",
            "give 64 hex digits (optionally 'sha256:' first) or the URL of a .sha256 file",
        )

    probe_timeout = raw.get("probe_timeout", DEFAULTS["probe_timeout"])
    if not isinstance(probe_timeout, (int, float)) or isinstance(probe_timeout, bool) or not (
        0 < probe_timeout <= 600
    ):
        errors.add(
            "probe_timeout", f"{probe_timeout!r} is not a number of seconds", "use e.g. 30"
        )

    clean = raw.get("clean", {})
    if not isinstance(clean, dict) or not isinstance(clean.get("purge_storage", False), bool):
        errors.add("clean:purge_storage", "must be true or false", "see pillar.example")

    lookup = raw.get("lookup", {})
    if not isinstance(lookup, dict):
        errors.add("lookup", "must be a mapping", "see pillar.example")
        lookup = {}
    _check_keys(errors, "lookup", lookup, DEFAULTS["lookup"])
    if lookup.get("supervisor", "") not in ("", "systemd", "sysv"):
        errors.add("lookup:supervisor", "must be systemd, sysv or empty", "remove it to detect")

    mirrors = raw.get("mirrors", DEFAULTS["mirrors"])
    if not isinstance(mirrors, dict) or not mirrors:
        errors.add("mirrors", "must be a non-empty mapping of mirror names", "see pillar.example")
        mirrors = {}
    seen = {}
    for name, mirror in mirrors.items():
        mirror = mirror if mirror is not None else {}
        if not isinstance(mirror, dict):
            errors.add(f"mirrors:{name}", "must be a mapping", "see pillar.example")
            continue
        mirror = _merge(MIRROR_DEFAULTS, mirror)
        _validate_mirror(errors, str(name), mirror, version, grains)
        for key in ("listen", "storage"):
            value = mirror.get(key)
            if value and (key, value) in seen:
                errors.add(
                    f"mirrors:{name}:{key}",
                    f"{value!r} is also used by mirror {seen[(key, value)]!r}",
                    "give each mirror its own " + key,
                )
            seen[(key, value)] = name
    _validate_client(errors, raw.get("client"))
    errors.raise_if_any()


def settings(redact=True):
    """
    Return the ``hub_mirror`` settings: defaults merged with pillar, validated.

    Each mirror is complete (listen address resolved, storage and debug listener
    filled in) and tokens are redacted unless ``redact=False`` (for Python callers only).
    Raises an error that names each bad pillar key and its fix.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.settings
    """
    raw = _raw_pillar()
    _validate(raw, __grains__)
    merged = _merge(DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    merged["mirrors"] = {}
    for name, mirror in (raw.get("mirrors") or DEFAULTS["mirrors"]).items():
        merged["mirrors"][name] = _complete_mirror(name, mirror or {}, merged["lookup"])
    merged["arch"] = release_arch()
    if redact:
        for mirror in merged["mirrors"].values():
            mirror["token"] = REDACTED if mirror["token"] else ""
    return merged


def _complete_mirror(name, mirror, lookup):
    mirror = _merge(MIRROR_DEFAULTS, mirror)
    mirror["name"] = name
    host, port = _parse_hostport(mirror["listen"])
    mirror["listen_host"] = _resolve_host(host, __grains__)
    mirror["listen_port"] = port
    if not mirror["debug_listen"]:
        debug_port = port + 10000 if port + 10000 < 65536 else port - 10000
        mirror["debug_listen"] = f"127.0.0.1:{debug_port}"
    mirror["storage"] = os.path.normpath(
        mirror["storage"] or os.path.join(lookup["state_dir"], name)
    )
    return mirror


def _mirror(name, redact=True):
    conf = settings(redact=redact)
    if name not in conf["mirrors"]:
        raise SaltInvocationError(
            f"hub_mirror:mirrors has no mirror named {name!r}; "
            f"known: {', '.join(sorted(conf['mirrors']))}"
        )
    return conf, conf["mirrors"][name]


# ---------------------------------------------------------------------------------------
# Install
# ---------------------------------------------------------------------------------------


def _binary_path(conf):
    if conf["install"]["method"] == "package":
        return conf["lookup"]["package_binary"]
    return os.path.join(conf["lookup"]["prefix"], "bin", "registry")


def _record_path(conf):
    return os.path.join(conf["lookup"]["prefix"], "install.json")


def _read_record(conf):
    try:
        with open(_record_path(conf), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _binary_version(binary):
    """The version ``registry --version`` prints, e.g. ``2.8.2+ds1``; None if it won't run."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    return words[-1].lstrip("v") if words else None


def asset_url(version, arch, source=RELEASE_URL):
    """
    Return the release tarball URL for ``version`` and release ``arch``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.asset_url 3.0.0 arm64
    """
    return source.format(version=version, arch=arch)


def _check_arch_supported(version, arch, grains):
    arches = RELEASE_ARCHES_2 if _dialect(version) == "2" else RELEASE_ARCHES_3
    if arch is None or arch not in arches:
        shown = arch or f"{grains.get('osarch')}/{grains.get('cpuarch')}"
        raise CommandExecutionError(
            f"hub_mirror:version: registry {version} has no release for CPU arch {shown!r} "
            f"(upstream builds {', '.join(arches)}); use install:method: package "
            "if your distribution packages docker-registry for it"
        )


def _expected_digest(version, arch, source_hash):
    """The sha256 the tarball must have, from pillar or the built-in table."""
    if not source_hash:
        digest = KNOWN_DIGESTS.get(version, {}).get(arch)
        if not digest:
            raise CommandExecutionError(
                f"hub_mirror:install:source_hash: no digest is known for registry {version} "
                f"({arch}); set install:source_hash to the release's sha256 or to the URL of "
                f"its .sha256 file (e.g. {asset_url(version, arch)}.sha256)"
            )
        return digest
    match = _DIGEST_RE.match(source_hash)
    if match:
        return match.group(1).lower()
    try:
        text = _fetch_text(source_hash.format(version=version, arch=arch))
    except (requests.RequestException, OSError) as exc:
        raise CommandExecutionError(
            f"hub_mirror:install:source_hash: cannot fetch {source_hash}: {exc}"
        ) from exc
    match = re.search(r"\b([0-9a-fA-F]{64})\b", text)
    if not match:
        raise CommandExecutionError(
            f"hub_mirror:install:source_hash: {source_hash} holds no sha256 digest"
        )
    return match.group(1).lower()


def _fetch_text(url):
    if url.startswith("file://"):
        with open(urllib.parse.urlparse(url).path, encoding="utf-8") as handle:
            return handle.read()
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    return response.text


def _download(url, dest):
    """Stream ``url`` into ``dest``; return its sha256."""
    digest = hashlib.sha256()
    if url.startswith("file://"):
        source = open(urllib.parse.urlparse(url).path, "rb")  # pylint: disable=consider-using-with
        chunks = iter(lambda: source.read(1 << 20), b"")
    else:
        response = requests.get(url, stream=True, timeout=(10, 60))
        response.raise_for_status()
        source = response
        chunks = response.iter_content(1 << 20)
    with source, open(dest, "wb") as out:
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _extract_registry(tarball, dest):
    """Extract only the top-level ``registry`` regular file: nothing else, no paths."""
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if member.name.lstrip("./") == "registry" and member.isreg():
                source = archive.extractfile(member)
                with source, open(dest, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(dest, 0o755)
                return
    raise CommandExecutionError(f"the release tarball has no top-level 'registry' file: {tarball}")


def install(test=False):
    """
    Install the registry the ``hub_mirror`` pillar asks for; idempotent.

    ``method: archive`` downloads the release tarball for this minion's arch, verifies its
    sha256 (built-in digests for 2.8.3 and 3.0.0, else ``install:source_hash``), extracts
    only ``registry``, checks that it runs and reports the right version, and swaps it in
    atomically: any failure leaves the installed binary as it was. A matching install
    downloads nothing. ``method: package`` installs the distribution's ``docker-registry``.

    Returns ``{"changes": {...}, "comment": "..."}``; with ``test=True`` nothing changes
    and ``changes`` says what would.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.install
        salt '*' hub_mirror.install test=True
    """
    conf = settings()
    if conf["install"]["method"] == "package":
        return _install_package(conf, test)
    return _install_archive(conf, test)


def _install_package(conf, test):
    package = conf["lookup"]["package"]
    current = __salt__["pkg.version"](package)
    if current:
        return {"changes": {}, "comment": f"Package {package} {current} is installed"}
    if test:
        return {
            "changes": {"package": {"old": "", "new": package}},
            "comment": f"Package {package} would be installed",
        }
    result = __salt__["pkg.install"](package)
    new = __salt__["pkg.version"](package)
    if not new:
        raise CommandExecutionError(f"installing package {package} failed: {result}")
    return {
        "changes": {"package": {"old": "", "new": f"{package} {new}"}},
        "comment": f"Installed package {package} {new}",
    }


def _install_archive(conf, test):
    version = conf["version"]
    arch = conf["arch"]
    _check_arch_supported(version, arch, __grains__)
    source = conf["install"]["source"]
    url = asset_url(version, arch, source)
    binary = _binary_path(conf)
    record = _read_record(conf)
    wanted = {"version": version, "arch": arch, "source": url}
    installed = {k: record.get(k) for k in wanted}
    if installed == wanted and os.path.isfile(binary) and record.get("binary_sha256") == (
        _sha256_file(binary)
    ):
        return {"changes": {}, "comment": f"registry {version} ({arch}) is installed"}

    old = f"{record['version']} ({record['arch']})" if record.get("version") else ""
    if not old and os.path.isfile(binary):
        old = "unrecorded binary"
    changes = {"registry": {"old": old, "new": f"{version} ({arch})"}}
    expected = _expected_digest(version, arch, conf["install"]["source_hash"])
    if test:
        return {"changes": changes, "comment": f"registry {version} ({arch}) would be installed"}

    bin_dir = os.path.dirname(binary)
    os.makedirs(bin_dir, mode=0o755, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=bin_dir, prefix=".download-") as work:
        tarball = os.path.join(work, os.path.basename(urllib.parse.urlparse(url).path))
        try:
            actual = _download(url, tarball)
        except (requests.RequestException, OSError) as exc:
            raise CommandExecutionError(
                f"hub_mirror:install:source: downloading {url} failed: {exc}; "
                "the installed registry was left as it was"
            ) from exc
        if actual != expected:
            raise CommandExecutionError(
                f"hub_mirror:install:source_hash: sha256 mismatch for {url}: expected "
                f"{expected}, got {actual}; the installed registry was left as it was"
            )
        staged = os.path.join(work, "registry")
        _extract_registry(tarball, staged)
        reported = _binary_version(staged)
        if reported is None or reported.split("+")[0] != version:
            raise CommandExecutionError(
                f"hub_mirror:version: the downloaded registry reports version {reported!r}, "
                f"not {version} (or does not run on this host); the installed registry was "
                "left as it was"
            )
        os.replace(staged, binary)
    record = dict(wanted, tarball_sha256=actual, binary_sha256=_sha256_file(binary))
    _write_atomic(_record_path(conf), json.dumps(record, indent=2) + "\n", 0o644)
    return {"changes": changes, "comment": f"Installed registry {version} ({arch}) from {url}"}


def version():
    """
    Return the version of the installed registry binary, or ``None``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.version
    """
    conf = settings()
    binary = _binary_path(conf)
    return _binary_version(binary) if os.path.exists(binary) else None


def _config_dialect(conf):
    """The dialect to render: the package's installed version, else the pillar version."""
    if conf["install"]["method"] == "package":
        installed = _binary_version(_binary_path(conf)) if os.path.exists(_binary_path(conf)) else None
        return _dialect(installed or "2.8.0")
    return _dialect(conf["version"])


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def render_config(mirror, dialect, credential_helper=None):
    """
    Return the registry config (a dict) for a completed ``mirror`` in a ``dialect``
    (``"2"`` or ``"3"``). Pure: the caller decides what to do with the token in it.

    2.8 takes the credential as ``proxy.username``/``password``. 3.x asks
    ``credential_helper`` for it (``proxy.exec``), so the config holds no secret and a new
    token needs no restart.
    """
    proxy = {"remoteurl": mirror["upstream"]}
    if mirror["username"] and dialect == "2":
        proxy["username"] = mirror["username"]
        proxy["password"] = mirror["token"]
    elif mirror["username"]:
        proxy["exec"] = {"command": credential_helper, "lifetime": CREDENTIAL_LIFETIME}
    if dialect != "2":
        proxy["ttl"] = mirror["ttl"]
    return {
        "version": 0.1,
        "log": {
            "level": mirror["log_level"],
            "formatter": "text",
            "fields": {"service": "hub-mirror", "mirror": mirror["name"]},
        },
        "storage": {
            "filesystem": {"rootdirectory": mirror["storage"]},
            # Without delete, TTL expiry fails and cached content stays on disk forever.
            "delete": {"enabled": True},
            "maintenance": {
                "uploadpurging": {"enabled": True, "age": "168h", "interval": "24h", "dryrun": False}
            },
        },
        "http": {
            "addr": _hostport(mirror["listen_host"], mirror["listen_port"]),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
            "debug": {
                "addr": mirror["debug_listen"],
                "prometheus": {"enabled": True, "path": "/metrics"},
            },
        },
        # Storage only: an upstream check makes the registry answer 503 to every request
        # while the upstream is down, which is exactly when the cache matters.
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
        "proxy": proxy,
    }


def render_offline_config(config):
    """
    The config the supervisor serves while the upstream is down: the same storage as a
    plain registry, read-only, so every cached tag and blob is served and nothing is
    pulled or pushed.
    """
    offline = copy.deepcopy(config)
    del offline["proxy"]
    offline["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    offline["log"]["fields"]["mode"] = "offline"
    return offline


def _hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact_config(config):
    config = copy.deepcopy(config)
    if config.get("proxy", {}).get("password"):
        config["proxy"]["password"] = REDACTED
    return config


def _config_text(config):
    return "# Managed by Salt (hub_mirror). Local changes are overwritten.\n" + yaml.safe_dump(
        config, default_flow_style=False, sort_keys=False
    )


def _paths(conf, name):
    lookup = conf["lookup"]
    return {
        "config": os.path.join(lookup["config_dir"], f"{name}.yml"),
        "offline_config": os.path.join(lookup["config_dir"], f"{name}.offline.yml"),
        "credentials": os.path.join(lookup["config_dir"], f"{name}.credentials.json"),
        "credential_helper": os.path.join(lookup["prefix"], "bin", "hub-mirror-credential-helper"),
        "last_good": os.path.join(lookup["config_dir"], f"{name}.yml.last-good"),
        "fingerprint": os.path.join(lookup["state_dir"], ".fingerprints", name),
        "unit": os.path.join(lookup["unit_dir"], f"hub-mirror-{name}.service"),
        "init": os.path.join(lookup["init_dir"], f"hub-mirror-{name}"),
        "supervise": os.path.join(lookup["prefix"], "bin", "hub-mirror-supervise"),
        "pidfile": os.path.join(lookup["run_dir"], f"{name}.pid"),
        "log": os.path.join(lookup["log_dir"], f"{name}.log"),
    }


def config(mirror="dockerhub"):
    """
    Return the registry config rendered for ``mirror``, with the token redacted.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.config
        salt '*' hub_mirror.config mirror=ghcr
    """
    conf, spec = _mirror(mirror)
    return render_config(spec, _config_dialect(conf), _paths(conf, mirror)["credential_helper"])


def _write_atomic(path, text, mode, uid=-1, gid=-1):
    """Write ``text`` to ``path`` through a same-directory temp file and rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, mode)
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _ids(conf):
    """uid and gid of the service user; a clear error when the user is missing."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    user, group = conf["lookup"]["user"], conf["lookup"]["group"]
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise CommandExecutionError(
            f"hub_mirror:lookup:user: the service user {user!r} or group {group!r} does not "
            "exist; apply hub_mirror.config (it creates them) or create them first"
        ) from exc


def _config_changes(old_text, new_text):
    """Dotted keys that differ between two config texts, with secrets redacted."""
    old = yaml.safe_load(old_text) if old_text else {}
    new = yaml.safe_load(new_text)

    def flatten(value, prefix=""):
        if isinstance(value, dict):
            out = {}
            for key, sub in value.items():
                out.update(flatten(sub, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: value}

    old_flat, new_flat = flatten(old or {}), flatten(new)
    changes = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) != new_flat.get(key):
            secret = key == "proxy.password"
            changes[key] = {
                "old": REDACTED if secret and key in old_flat else old_flat.get(key),
                "new": REDACTED if secret and key in new_flat else new_flat.get(key),
            }
    return changes


def _config_files(conf, spec):
    """{paths key: text} of every file ``configure`` writes for a mirror (token included)."""
    paths = _paths(conf, spec["name"])
    rendered = render_config(spec, _config_dialect(conf), paths["credential_helper"])
    texts = {
        "config": _config_text(rendered),
        "offline_config": _config_text(render_offline_config(rendered)),
    }
    if "exec" in rendered["proxy"]:
        texts["credential_helper"] = _program_text("hub_mirror_credential_helper.py")
        texts["credentials"] = json.dumps(
            {"Username": spec["username"], "Secret": spec["token"]}, sort_keys=True
        )
    return texts


def configure(mirror="dockerhub", test=False):
    """
    Render ``mirror``'s registry config from pillar and write it, 0600, owned by the
    service user, atomically; only when it differs. The storage directory is created.

    A listen address held by another process is refused before anything is written.
    Returns ``{"changes": {...}, "comment": "..."}``: changed config keys with the token
    redacted; ``test=True`` changes nothing.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.configure
        salt '*' hub_mirror.configure mirror=dockerhub test=True
    """
    conf, spec = _mirror(mirror, redact=False)
    paths = _paths(conf, mirror)
    texts = _config_files(conf, spec)
    old_text = _read(paths["config"])
    _check_listen_free(conf, spec, old_text)

    changes = {}
    for key, text in texts.items():
        old = _read(paths[key])
        if old is None:
            changes[key] = {"old": "", "new": paths[key]}
        elif old != text and key == "config":
            changes[key] = _config_changes(old, text)
        elif old != text and key == "credentials":
            changes[key] = {"old": REDACTED, "new": REDACTED}
        elif old != text:
            changes[key] = "updated"
    if not os.path.isdir(spec["storage"]):
        changes["storage"] = {"old": "", "new": spec["storage"]}
    if not changes:
        return {"changes": {}, "comment": f"Mirror {mirror} config is up to date"}
    if test:
        return {"changes": changes, "comment": f"Mirror {mirror} config would be updated"}

    uid, gid = _ids(conf)
    if "storage" in changes:
        os.makedirs(spec["storage"], mode=0o750, exist_ok=True)
        os.chown(spec["storage"], uid, gid)
    for key, text in texts.items():
        if key == "credential_helper" and key in changes:
            _write_atomic(paths[key], text, 0o755)
        elif key in changes:
            _write_atomic(paths[key], text, 0o600, uid, gid)
    return {"changes": changes, "comment": f"Mirror {mirror} config updated"}


def _listen_addresses(config_text):
    if not config_text:
        return set()
    http = (yaml.safe_load(config_text) or {}).get("http", {})
    return {http.get("addr"), (http.get("debug") or {}).get("addr")} - {None}


def _check_listen_free(conf, spec, old_text):
    """Refuse an address another process holds; our own running mirror may keep its own."""
    ours = _listen_addresses(old_text) if _is_running(conf, spec["name"]) else set()
    for key, host, port in (
        ("listen", spec["listen_host"], spec["listen_port"]),
        ("debug_listen", *_parse_hostport(spec["debug_listen"])),
    ):
        if _hostport(host, port) in ours:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                reason = (
                    "is already in use by another process"
                    if exc.errno == errno.EADDRINUSE
                    else f"cannot be bound here ({exc.strerror})"
                )
                raise CommandExecutionError(
                    f"hub_mirror:mirrors:{spec['name']}:{key}: {_hostport(host, port)} {reason}; "
                    "choose a free address and port (nothing was changed)"
                ) from exc


# ---------------------------------------------------------------------------------------
# Service: a hardened systemd unit, or an init script with a restart loop
# ---------------------------------------------------------------------------------------

UNIT_TEMPLATE = """\
# Managed by Salt (hub_mirror). Local changes are overwritten.
[Unit]
Description=hub_mirror pull-through cache {name} for {upstream}
Documentation=https://distribution.github.io/distribution/about/configuration/
After=network-online.target
Wants=network-online.target
# The registry panics at start while an authenticated upstream is unreachable: keep
# retrying for as long as that lasts instead of giving up after five starts.
StartLimitIntervalSec=0

[Service]
Type=simple
User={user}
Group={group}
ExecStart={command}
Restart=always
RestartSec=2
UMask=0027
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={storage}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateIPC=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
{capabilities}SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
DevicePolicy=closed

[Install]
WantedBy=multi-user.target
"""

INIT_TEMPLATE = """\
#!/bin/sh
# Managed by Salt (hub_mirror). Local changes are overwritten.
### BEGIN INIT INFO
# Provides:          hub-mirror-{name}
# Required-Start:    $network $remote_fs
# Required-Stop:     $network $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: hub_mirror pull-through cache {name}
### END INIT INFO
PIDFILE={pidfile}
start() {{
    mkdir -p {run_dir} {log_dir}
    touch {log}
    chown {user}:{group} {log_dir} {log}
    chmod 0750 {log_dir}
    chmod 0640 {log}
    start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$PIDFILE" \\
        --chuid {user}:{group} --startas /bin/sh -- \\
        -c 'umask 027; exec "$0" "$@" >>{log} 2>&1' {command}
}}
stop() {{
    start-stop-daemon --stop --quiet --retry TERM/10/KILL/5 --pidfile "$PIDFILE" --remove-pidfile
}}
running() {{
    start-stop-daemon --status --pidfile "$PIDFILE"
}}
case "$1" in
    start) running || start ;;
    stop) stop || true ;;
    restart|force-reload) stop || true; start ;;
    status) if running; then echo running; else echo stopped; exit 3; fi ;;
    *) echo "usage: $0 {{start|stop|restart|force-reload|status}}" >&2; exit 2 ;;
esac
"""


def _supervisor(conf):
    chosen = conf["lookup"]["supervisor"]
    if chosen:
        return chosen
    # Salt's own test (salt.utils.systemd.booted); systemctl alone proves nothing.
    return "systemd" if os.path.isdir("/run/systemd/system") else "sysv"


def _service_name(name):
    return f"hub-mirror-{name}"


def _program_text(filename):
    """A program shipped beside this module, with a shebang for this host's Python."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, filename), encoding="utf-8") as handle:
        return f"#!{_python()}\n" + handle.read()


def _python():
    # The service user must be able to run it: a Salt venv under /root is not an option.
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _service_files(conf, spec):
    """The files that define the service, as {path: (text, mode)}."""
    paths = _paths(conf, spec["name"])
    command = " ".join(
        [
            _python(),
            paths["supervise"],
            f"--binary={_binary_path(conf)}",
            f"--config={paths['config']}",
            f"--offline-config={paths['offline_config']}",
            f"--listen={_probe_url(spec)[len('http://'):]}",
            f"--upstream={spec['upstream']}",
            f"--credentials={paths['credentials']}",
        ]
    )
    files = {paths["supervise"]: (_program_text("hub_mirror_supervise.py"), 0o755)}
    if _supervisor(conf) == "systemd":
        if spec["listen_port"] < 1024:
            capabilities = (
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n"
                "AmbientCapabilities=CAP_NET_BIND_SERVICE\n"
            )
        else:
            capabilities = "CapabilityBoundingSet=\nAmbientCapabilities=\n"
        files[paths["unit"]] = (
            UNIT_TEMPLATE.format(
                command=command,
                capabilities=capabilities,
                **{k: spec[k] for k in ("name", "upstream", "storage")},
                **{k: conf["lookup"][k] for k in ("user", "group")},
            ),
            0o644,
        )
    else:
        files[paths["init"]] = (
            INIT_TEMPLATE.format(
                name=spec["name"],
                pidfile=paths["pidfile"],
                log=paths["log"],
                command=command,
                **{k: conf["lookup"][k] for k in ("user", "group", "run_dir", "log_dir")},
            ),
            0o755,
        )
    return files


def _systemctl(*args, check=True):
    proc = subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise CommandExecutionError(
            f"systemctl {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def _init(conf, name, action, check=True):
    script = _paths(conf, name)["init"]
    proc = subprocess.run(
        [script, action], capture_output=True, text=True, timeout=120, check=False
    )
    if check and proc.returncode != 0:
        raise CommandExecutionError(
            f"{script} {action} failed: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


def _is_running(conf, name):
    if _supervisor(conf) == "systemd":
        return _systemctl("is-active", "--quiet", _service_name(name), check=False).returncode == 0
    if not os.path.exists(_paths(conf, name)["init"]):
        return False
    return _init(conf, name, "status", check=False).returncode == 0


def _is_enabled(conf, name):
    if _supervisor(conf) == "systemd":
        return _systemctl("is-enabled", "--quiet", _service_name(name), check=False).returncode == 0
    return bool(_rc_links(name))


def _rc_links(name):
    return [
        path
        for level in "2345"
        for path in [f"/etc/rc{level}.d"]
        if os.path.isdir(path)
        for entry in os.listdir(path)
        if entry.startswith("S") and entry[3:] == _service_name(name)
    ]


def _fingerprint(conf, spec, files):
    """
    What the mirror must serve with: the binary the pillar asks for, the configs rendered
    from pillar and the service files. Computed from pillar, not from disk, so that a test
    run sees the restart a pending install or config change will cause. The credentials
    file is left out: registry 3.x rereads it without a restart.
    """
    digest = hashlib.sha256()
    binary = _binary_path(conf)
    if conf["install"]["method"] == "archive":
        digest.update(asset_url(conf["version"], conf["arch"], conf["install"]["source"]).encode())
    elif os.path.exists(binary):
        digest.update(_sha256_file(binary).encode())
    texts = _config_files(conf, spec)
    for key in ("config", "offline_config"):
        digest.update(texts[key].encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path][0].encode())
    return digest.hexdigest()


def _probe_url(spec):
    host = spec["listen_host"]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{_hostport(host, spec['listen_port'])}"


def probe(mirror="dockerhub", timeout=5):
    """
    Return True when ``mirror`` answers ``GET /v2/`` on its listen address.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.probe
    """
    _, spec = _mirror(mirror)
    return _answers(_probe_url(spec), timeout)


def _answers(base_url, timeout):
    try:
        response = requests.get(f"{base_url}/v2/", timeout=timeout)
    except requests.RequestException:
        return False
    return response.status_code in (200, 401) and response.headers.get(
        "Docker-Distribution-Api-Version", ""
    ).startswith("registry/2")


def _wait_serving(spec, timeout):
    deadline = time.monotonic() + timeout
    url = _probe_url(spec)
    while time.monotonic() < deadline:
        if _answers(url, 2):
            return True
        time.sleep(0.5)
    return False


def _start(conf, name, restart):
    if _supervisor(conf) == "systemd":
        _systemctl("restart" if restart else "start", _service_name(name))
    else:
        _init(conf, name, "restart" if restart else "start")


def _enable(conf, name):
    if _supervisor(conf) == "systemd":
        _systemctl("enable", "--quiet", _service_name(name))
    elif shutil.which("update-rc.d"):
        subprocess.run(
            ["update-rc.d", _service_name(name), "defaults"],
            capture_output=True,
            timeout=60,
            check=False,
        )


def _recent_log(conf, name, lines=15):
    if _supervisor(conf) == "systemd":
        proc = subprocess.run(
            ["journalctl", "-u", _service_name(name), "-n", str(lines), "--no-pager", "-q"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.stdout.strip()
    text = _read(_paths(conf, name)["log"]) or ""
    # A Go panic's goroutine dump says little: keep the lines before it.
    text = text.split("\ngoroutine ")[0]
    return "\n".join(text.strip().splitlines()[-lines:])


def running(mirror="dockerhub", test=False):
    """
    Make ``mirror`` run under its supervisor and serve on its listen address.

    Writes the systemd unit (or, where systemd is not PID 1, an init script and a restart
    loop), enables it and (re)starts the registry only when the binary, the config or the
    service files differ from what it last started with. Success means ``/v2/`` answers
    within ``probe_timeout``: a restart that does not come up restores the last config
    that served, restarts on it and fails.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.running
        salt '*' hub_mirror.running mirror=dockerhub test=True
    """
    # Unredacted only to fingerprint the rendered config; the token goes nowhere else.
    conf, spec = _mirror(mirror, redact=False)
    paths = _paths(conf, mirror)
    if not os.path.exists(_binary_path(conf)) and not test:
        raise CommandExecutionError(
            f"the registry binary {_binary_path(conf)} is missing; apply hub_mirror.install first"
        )
    files = _service_files(conf, spec)
    stale = {path: entry for path, entry in files.items() if _read(path) != entry[0]}
    is_running = _is_running(conf, mirror)
    fingerprint = _fingerprint(conf, spec, files)
    changed = fingerprint != (_read(paths["fingerprint"]) or "").strip()

    changes = {}
    for path in stale:
        changes[path] = "updated" if os.path.exists(path) else "created"
    if not _is_enabled(conf, mirror):
        changes["enabled"] = True
    if not is_running:
        changes["started"] = True
    elif changed:
        changes["restarted"] = True
    if not changes:
        if _wait_serving(spec, min(conf["probe_timeout"], 5)):
            return {"changes": {}, "comment": f"Mirror {mirror} is running and answers /v2/"}
        changes["restarted"] = True
    if test:
        return {"changes": changes, "comment": f"Mirror {mirror} would be brought up"}

    for path, (text, mode) in stale.items():
        _write_atomic(path, text, mode)
    if stale and _supervisor(conf) == "systemd":
        _systemctl("daemon-reload")
    if "enabled" in changes:
        _enable(conf, mirror)
    if "started" in changes or "restarted" in changes:
        _start(conf, mirror, restart=is_running)
    if not _wait_serving(spec, conf["probe_timeout"]):
        raise CommandExecutionError(_rollback(conf, spec, paths))
    # 0600: a digest over the rendered config is still derived from the token.
    _write_atomic(paths["fingerprint"], fingerprint + "\n", 0o600)
    shutil.copy2(paths["config"], paths["last_good"])
    return {"changes": changes, "comment": f"Mirror {mirror} runs and answers /v2/"}


def _rollback(conf, spec, paths):
    """Bring back the last config that served; return the failure message."""
    name = spec["name"]
    message = (
        f"mirror {name} did not answer {_probe_url(spec)}/v2/ within "
        f"{conf['probe_timeout']}s. Recent log:\n{_recent_log(conf, name)}"
    )
    current, last_good = _read(paths["config"]), _read(paths["last_good"])
    if last_good is None or last_good == current:
        return message
    os.replace(paths["config"], paths["config"] + ".failed")
    # The service user must be able to read it, and it serves on its own address.
    _write_atomic(paths["config"], last_good, 0o600, *_ids(conf))
    _start(conf, name, restart=True)
    host, port = _parse_hostport(yaml.safe_load(last_good)["http"]["addr"])
    restored = _wait_serving(dict(spec, listen_host=host, listen_port=port), conf["probe_timeout"])
    return message + (
        f"\nRestored the last config that served ({'it serves again' if restored else 'it does not answer either'});"
        f" the new one is kept as {paths['config']}.failed"
    )


def stop(mirror="dockerhub"):
    """
    Stop ``mirror``'s registry (its supervisor too).

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.stop
    """
    conf, _ = _mirror(mirror)
    if _supervisor(conf) == "systemd":
        _systemctl("stop", _service_name(mirror), check=False)
    elif os.path.exists(_paths(conf, mirror)["init"]):
        _init(conf, mirror, "stop", check=False)
    return not _is_running(conf, mirror)


def start(mirror="dockerhub"):
    """
    Start ``mirror``'s registry and wait until it answers ``/v2/``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.start
    """
    conf, spec = _mirror(mirror)
    if not _is_running(conf, mirror):
        _start(conf, mirror, restart=False)
    return _wait_serving(spec, conf["probe_timeout"])


def absent(mirror="dockerhub", purge_storage=False, test=False):
    """
    Stop ``mirror`` and remove its service files, config and fingerprint. The cache in
    its storage directory stays unless ``purge_storage=True``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.absent
        salt '*' hub_mirror.absent purge_storage=True
    """
    conf, spec = _mirror(mirror)
    paths = _paths(conf, mirror)
    candidates = [
        paths[k]
        for k in (
            "unit",
            "init",
            "config",
            "offline_config",
            "credentials",
            "last_good",
            "fingerprint",
        )
    ]
    candidates += [paths["config"] + ".failed"]
    if purge_storage:
        candidates.append(spec["storage"])
    present = [path for path in candidates if os.path.exists(path)]
    is_running = _is_running(conf, mirror)
    changes = {path: "removed" for path in present}
    if is_running:
        changes["stopped"] = True
    if not changes or test:
        comment = f"Mirror {mirror} would be removed" if changes else f"Mirror {mirror} is absent"
        return {"changes": changes, "comment": comment}
    if _supervisor(conf) == "systemd":
        _systemctl("disable", "--now", "--quiet", _service_name(mirror), check=False)
    elif os.path.exists(paths["init"]):
        _init(conf, mirror, "stop", check=False)
        if shutil.which("update-rc.d"):
            subprocess.run(
                ["update-rc.d", "-f", _service_name(mirror), "remove"],
                capture_output=True,
                timeout=60,
                check=False,
            )
    for path in present:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if paths["unit"] in present:
        _systemctl("daemon-reload", check=False)
    return {"changes": changes, "comment": f"Mirror {mirror} removed"}


def uninstall(test=False):
    """
    Remove the registry installed by ``method: archive`` (a package is left to the
    package manager).

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.uninstall
    """
    conf = settings()
    present = [
        path
        for path in (
            _binary_path(conf),
            _record_path(conf),
            _paths(conf, "x")["supervise"],
            _paths(conf, "x")["credential_helper"],
        )
        if conf["install"]["method"] == "archive" and os.path.exists(path)
    ]
    changes = {path: "removed" for path in present}
    if test or not changes:
        return {"changes": changes, "comment": "registry would be removed" if changes else "registry is absent"}
    for path in present:
        os.unlink(path)
    return {"changes": changes, "comment": "registry removed"}


# ---------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------

_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def next_link(header):
    """The target of a ``Link: <...>; rel="next"`` header, or None."""
    match = _LINK_RE.search(header or "")
    return match.group(1) if match else None


def _repositories_api(base_url, page_size=1000, timeout=30):
    """Every repository the registry lists, following ``Link`` pagination."""
    repositories = []
    url = f"{base_url}/v2/_catalog?n={page_size}"
    seen = set()
    while url and url not in seen:
        seen.add(url)
        response = requests.get(url, timeout=timeout)
        if response.status_code == 400 and "PAGINATION_NUMBER_INVALID" in response.text:
            # The server's catalog.maxentries is below our page size: ask for less.
            page_size = max(1, page_size // 10)
            url = f"{base_url}/v2/_catalog?n={page_size}"
            seen.clear()
            repositories.clear()
            continue
        response.raise_for_status()
        repositories.extend(response.json().get("repositories") or [])
        link = next_link(response.headers.get("Link"))
        url = urllib.parse.urljoin(base_url + "/", link) if link else None
    return repositories


def _v2_root(storage):
    return os.path.join(storage, "docker", "registry", "v2")


def cached_tags(storage, repository):
    """{tag: "sha256:..."} for the tags of ``repository`` cached under ``storage``."""
    tags_dir = os.path.join(_v2_root(storage), "repositories", repository, "_manifests", "tags")
    tags = {}
    try:
        entries = sorted(os.listdir(tags_dir))
    except FileNotFoundError:
        return tags
    for tag in entries:
        link = _read(os.path.join(tags_dir, tag, "current", "link"))
        if link:
            tags[tag] = link.strip()
    return tags


def catalog(mirror="dockerhub", tags=False):
    """
    List every repository cached by ``mirror``, following the registry's pagination.

    With ``tags=True`` each repository maps to its cached tags and their digests, read
    from local storage: on a proxy, ``/v2/<name>/tags/list`` shows the upstream's tags,
    not what is cached.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.catalog
        salt '*' hub_mirror.catalog tags=True
    """
    _, spec = _mirror(mirror)
    base_url = _probe_url(spec)
    try:
        repositories = _repositories_api(base_url)
    except requests.RequestException as exc:
        raise CommandExecutionError(
            f"mirror {mirror} does not answer at {base_url}: {exc}; is it running? "
            f"(salt-call hub_mirror.running mirror={mirror})"
        ) from exc
    if not tags:
        return repositories
    return {repo: cached_tags(spec["storage"], repo) for repo in repositories}


# ---------------------------------------------------------------------------------------
# Inspect and operate the cache (status, tags, ratelimit, warm, gc, usage)
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# Clients: point docker, containerd, podman and buildkit at the mirror
# ---------------------------------------------------------------------------------------


# The client side runs on build hosts and VMs that may not run a mirror themselves. It
# never fails a run because a mirror is down: it configures only mirrors that answer now,
# takes out the ones that stopped answering, and reports per runtime what it did.
#
# Every file it touches is recorded under <state_dir>/.client (0700): whether the file
# existed, its original bytes and a digest of what hub_mirror last wrote. A file still
# holding exactly what hub_mirror wrote gets its original bytes back; one the user has
# edited since loses only hub_mirror's part (a daemon.json key, a marked block, or
# hub_mirror's endpoints in a registries.yaml).

CLIENT_RUNTIMES = ("docker", "containerd", "podman", "buildkit", "k3s", "rke2")

CLIENT_DEFAULTS = {
    # Upstream registry host -> mirror URLs, in preference order.
    "mirrors": {},
    "runtimes": list(CLIENT_RUNTIMES),
    # A mirror on the LAN answers in milliseconds; this bounds what a dead one costs.
    "probe_timeout": 2,
    "paths": {
        "docker_daemon_json": "/etc/docker/daemon.json",
        "docker_pidfile": "/var/run/docker.pid",
        "containerd_config": "/etc/containerd/config.toml",
        "containerd_certs_d": "/etc/containerd/certs.d",
        "registries_conf": "/etc/containers/registries.conf",
        "registries_conf_d": "/etc/containers/registries.conf.d",
        "buildkitd_toml": "/etc/buildkit/buildkitd.toml",
        "k3s_registries": "/etc/rancher/k3s/registries.yaml",
        "rke2_registries": "/etc/rancher/rke2/registries.yaml",
    },
}

DOCKER_HUB = "docker.io"
# Loaded in name order after registries.conf; a user file sorting later can override it.
REGISTRIES_DROPIN = "50-hub-mirror.conf"
BLOCK_BEGIN = "# BEGIN hub_mirror: managed by Salt; `state.apply hub_mirror.client.clean` removes it"
BLOCK_END = "# END hub_mirror"

_REGISTRY_HOST_RE = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?$"
)
_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")
_TOML_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(?:#.*)?$")
_V1_REGISTRIES_RE = re.compile(r"^\s*\[\s*registries\s*\.\s*(search|insecure|block)\s*\]", re.M)
# Where a root daemon finds its tools even when Salt runs with a short PATH.
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _validate_client(errors, client):
    """Validate ``hub_mirror:client``; called from ``_validate``."""
    if client is None:
        return
    if not isinstance(client, dict):
        errors.add("client", f"must be a mapping, got {type(client).__name__}", "see pillar.example")
        return
    _check_keys(errors, "client", client, CLIENT_DEFAULTS)

    mirrors = client.get("mirrors") or {}
    if not isinstance(mirrors, dict):
        errors.add(
            "client:mirrors",
            "must map an upstream registry host to mirror URLs",
            "write e.g. {docker.io: ['http://192.168.128.1:5000']}",
        )
        mirrors = {}
    for upstream, urls in mirrors.items():
        key = f"client:mirrors:{upstream}"
        if not isinstance(upstream, str) or not _REGISTRY_HOST_RE.match(upstream):
            errors.add(
                key,
                f"{upstream!r} is not a registry host",
                "use the host images are pulled from, e.g. docker.io, ghcr.io or quay.io",
            )
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls:
            errors.add(
                key,
                "must be a mirror URL or a non-empty list of them",
                "write e.g. ['http://192.168.128.1:5000']",
            )
            continue
        for url in urls:
            problem = _mirror_url_problem(url)
            if problem:
                errors.add(key, problem, "write it like http://192.168.128.1:5000 (scheme, host, port only)")
        if len({str(url).rstrip("/") for url in urls}) != len(urls):
            errors.add(key, "lists a mirror twice", "list each mirror once, in preference order")

    runtimes = client.get("runtimes", CLIENT_DEFAULTS["runtimes"])
    if not isinstance(runtimes, list) or any(r not in CLIENT_RUNTIMES for r in runtimes):
        errors.add(
            "client:runtimes",
            f"{runtimes!r} is not a list of known runtimes",
            f"use a list of: {', '.join(CLIENT_RUNTIMES)}",
        )

    timeout = client.get("probe_timeout", CLIENT_DEFAULTS["probe_timeout"])
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        errors.add(
            "client:probe_timeout",
            f"{timeout!r} is not a number of seconds from 0 to 60",
            "use e.g. 2: a mirror that answers at all answers in milliseconds",
        )

    paths = client.get("paths") or {}
    if not isinstance(paths, dict):
        errors.add("client:paths", "must be a mapping", "see pillar.example")
        return
    _check_keys(errors, "client:paths", paths, CLIENT_DEFAULTS["paths"])
    for name, value in paths.items():
        if name in CLIENT_DEFAULTS["paths"] and (
            not isinstance(value, str) or not os.path.isabs(value)
        ):
            errors.add(
                f"client:paths:{name}",
                f"{value!r} is not an absolute path",
                f"write e.g. {CLIENT_DEFAULTS['paths'][name]}",
            )


def _mirror_url_problem(url):
    """Why ``url`` cannot be a mirror for every runtime, or None."""
    if not isinstance(url, str):
        return f"{url!r} is not a URL"
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{url!r} is not an absolute http or https URL"
    try:
        parsed.port  # pylint: disable=pointless-statement
    except ValueError:
        return f"{url!r} has an invalid port"
    if parsed.username or parsed.password:
        return f"{url!r} holds credentials"
    # Docker's registry-mirrors and buildkit's mirrors take a host, nothing more.
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.params:
        return f"{url!r} has a path"
    return None


def _client_conf(conf):
    """The completed ``client`` settings: defaults, URL lists, the record directory."""
    raw = conf.get("client") or {}
    client = _merge(CLIENT_DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    client["mirrors"] = {
        upstream: [url.rstrip("/") for url in ([urls] if isinstance(urls, str) else urls)]
        for upstream, urls in (raw.get("mirrors") or {}).items()
    }
    client["record_dir"] = os.path.join(conf["lookup"]["state_dir"], ".client")
    return client


# -- pure rendering: daemon.json ---------------------------------------------------------


def json_members(text):
    """
    The members of the top-level JSON object in ``text``, as
    ``[(key, key_start, value_start, value_end)]``, plus the offsets of its braces.

    Lets daemon.json be edited one key at a time, leaving every other byte as the user
    wrote it. Raises ValueError when ``text`` is not a JSON object.
    """
    json.loads(text)
    decoder = json.JSONDecoder()
    index = _JSON_SPACE_RE.match(text, 0).end()
    if text[index : index + 1] != "{":
        raise ValueError("daemon.json does not hold a JSON object")
    opening = index
    index = _JSON_SPACE_RE.match(text, index + 1).end()
    members = []
    while text[index : index + 1] != "}":
        key, after = json.decoder.scanstring(text, index + 1)
        colon = _JSON_SPACE_RE.match(text, after).end()
        value_start = _JSON_SPACE_RE.match(text, colon + 1).end()
        _, value_end = decoder.raw_decode(text, value_start)
        members.append((key, index, value_start, value_end))
        index = _JSON_SPACE_RE.match(text, value_end).end()
        if text[index : index + 1] == ",":
            index = _JSON_SPACE_RE.match(text, index + 1).end()
    return members, opening, index


def json_set_member(text, key, value_text):
    """``text`` with top-level ``key`` set to the JSON ``value_text``; other bytes kept."""
    members, opening, closing = json_members(text)
    for name, _, value_start, value_end in members:
        if name == key:
            return text[:value_start] + value_text + text[value_end:]
    member = f"{json.dumps(key)}: {value_text}"
    if not members:
        return text[: opening + 1] + f"\n  {member}\n" + text[closing:]
    # Insert first, indented like the member that follows it.
    spacing = text[opening + 1 : members[0][1]]
    return text[: opening + 1] + spacing + member + "," + text[opening + 1 :]


def json_drop_member(text, key):
    """``text`` without top-level ``key``; the inverse of inserting it with json_set_member."""
    members, opening, closing = json_members(text)
    for position, (name, key_start, _, value_end) in enumerate(members):
        if name != key:
            continue
        if position + 1 < len(members):
            return text[:key_start] + text[members[position + 1][1] :]
        if position > 0:
            return text[: members[position - 1][3]] + text[value_end:]
        return text[: opening + 1] + text[closing:]
    return text


def _json_member_value(text, key):
    """(raw text, parsed value) of a top-level member, or (None, None)."""
    members, _, _ = json_members(text)
    for name, _, value_start, value_end in members:
        if name == key:
            raw = text[value_start:value_end]
            return raw, json.loads(raw)
    return None, None


def render_daemon_json(base, mirrors):
    """daemon.json text with ``registry-mirrors`` = our docker.io mirrors first, then the
    user's own; ``base`` None means there is no daemon.json yet."""
    ours = list(mirrors.get(DOCKER_HUB, []))
    if base is None:
        return json.dumps({"registry-mirrors": ours}, indent=2) + "\n"
    _, theirs = _json_member_value(base, "registry-mirrors")
    merged = ours + [url for url in (theirs or []) if url not in ours]
    return json_set_member(base, "registry-mirrors", json.dumps(merged))


def _strip_daemon_json(current, record):
    """daemon.json without hub_mirror's mirrors; the user's original value where it is intact."""
    ours = {url for urls in record.get("mirrors", {}).values() for url in urls}
    _, listed = _json_member_value(current, "registry-mirrors")
    theirs = [url for url in (listed or []) if url not in ours]
    original_raw = record.get("user_mirrors_raw")
    if original_raw is not None and theirs == json.loads(original_raw):
        text = json_set_member(current, "registry-mirrors", original_raw)
    elif original_raw is None and not theirs:
        text = json_drop_member(current, "registry-mirrors")
    else:
        text = json_set_member(current, "registry-mirrors", json.dumps(theirs))
    if not record.get("existed") and not json.loads(text):
        return None
    return text


def _remember_daemon_json(base):
    raw, _ = _json_member_value(base, "registry-mirrors") if base is not None else (None, None)
    return {"user_mirrors_raw": raw}


# -- pure rendering: marked blocks (TOML and registries.conf) ------------------------------


def strip_block(text):
    """``text`` without hub_mirror's marked block (and the newline that set it apart)."""
    if text is None:
        return None
    begin = text.find(BLOCK_BEGIN + "\n")
    if begin < 0 or (begin > 0 and text[begin - 1] != "\n"):
        return text
    end = text.find(BLOCK_END + "\n", begin)
    if end < 0:
        return text
    end += len(BLOCK_END) + 1
    return text[: max(begin - 1, 0)] + text[end:]


def add_block(base, body):
    """``base`` with a marked block holding ``body`` appended; ``base`` None: the block alone."""
    block = f"{BLOCK_BEGIN}\n{body}{BLOCK_END}\n"
    base = strip_block(base)
    return block if not base else f"{base}\n{block}"


def _strip_block_file(current, record):
    text = strip_block(current)
    if not text and not record.get("existed"):
        return None
    return text


def _toml_tables(text):
    """Normalised headers of the TOML tables in ``text`` (quotes and spacing unified)."""
    tables = set()
    for line in (text or "").splitlines():
        match = _TOML_HEADER_RE.match(line)
        if match:
            tables.add(re.sub(r"\s*\.\s*", ".", match.group(1).replace("'", '"')))
    return tables


def _mirror_host(url):
    return urllib.parse.urlparse(url).netloc


def upstream_server(upstream):
    """The URL a client pulls ``upstream`` from when no mirror is configured."""
    return "https://registry-1.docker.io" if upstream == DOCKER_HUB else f"https://{upstream}"


def render_hosts_toml(base, mirrors):
    """containerd ``certs.d/<upstream>/hosts.toml``: each mirror as a pull/resolve host, in
    order, then ``server`` (the upstream). In a user's own file the hosts are appended in a
    marked block after the user's own."""
    ((upstream, urls),) = mirrors.items()
    lines = []
    if not strip_block(base):
        lines += [f'server = "{upstream_server(upstream)}"', ""]
    for url in urls:
        lines += [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]', ""]
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def _hosts_toml_conflict(base, mirrors):
    tables = _toml_tables(base)
    taken = [url for urls in mirrors.values() for url in urls if f'host."{url}"' in tables]
    if taken:
        return f"it already has a [host.\"{taken[0]}\"] table of its own"
    return None


def render_registries_conf(base, mirrors):
    """A containers-registries.conf(5) drop-in: per upstream a ``[[registry]]`` with its
    mirrors in order; http mirrors are marked insecure."""
    lines = []
    for upstream, urls in mirrors.items():
        lines += ["[[registry]]", f'prefix = "{upstream}"', f'location = "{upstream}"', ""]
        for url in urls:
            lines += ["[[registry.mirror]]", f'location = "{_mirror_host(url)}"']
            if url.startswith("http://"):
                lines.append("insecure = true")
            lines.append("")
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def render_buildkitd_toml(base, mirrors):
    """buildkitd.toml: ``[registry."<upstream>"] mirrors`` in order, and ``http = true``
    for each plain-http mirror host, in a marked block after the user's settings."""
    lines = []
    plain_http = []
    for upstream, urls in mirrors.items():
        hosts = [_mirror_host(url) for url in urls]
        lines += [f'[registry."{upstream}"]', f"  mirrors = {json.dumps(hosts)}", ""]
        plain_http += [
            _mirror_host(url)
            for url in urls
            if url.startswith("http://") and _mirror_host(url) not in plain_http
        ]
    for host in plain_http:
        lines += [f'[registry."{host}"]', "  http = true", ""]
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def _buildkitd_conflict(base, mirrors):
    tables = _toml_tables(strip_block(base))
    if "registry" in tables:
        return "it has a [registry] table of its own; add the mirrors there yourself"
    ours = list(mirrors) + [
        _mirror_host(url) for urls in mirrors.values() for url in urls if url.startswith("http://")
    ]
    for name in ours:
        if f'registry."{name}"' in tables:
            return f'it already configures [registry."{name}"]; add the mirrors there yourself'
    if re.search(r"^\s*registry\s*\.", strip_block(base) or "", re.M):
        return "it sets registry keys with dotted names; add the mirrors there yourself"
    return None


# -- pure rendering: k3s / rke2 registries.yaml -------------------------------------------


def render_registries_yaml(base, mirrors):
    """k3s/rke2 ``registries.yaml`` with our endpoints first under ``mirrors.<upstream>``."""
    data = yaml.safe_load(base) if base else None
    header = ""
    if data is None:
        data = {}
        header = "# Managed by Salt (hub_mirror): `state.apply hub_mirror.client.clean` removes it.\n"
    if not isinstance(data, dict) or not isinstance(data.get("mirrors", {}), dict):
        raise ValueError("registries.yaml does not hold a mapping with a mirrors mapping")
    section = data.setdefault("mirrors", {})
    for upstream, urls in mirrors.items():
        entry = section.setdefault(upstream, {}) or {}
        section[upstream] = entry
        theirs = [url for url in entry.get("endpoint") or [] if url not in urls]
        entry["endpoint"] = list(urls) + theirs
    return header + yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def _strip_registries_yaml(current, record):
    data = yaml.safe_load(current) or {}
    ours = record.get("mirrors", {})
    section = data.get("mirrors") if isinstance(data, dict) else None
    if isinstance(section, dict):
        for upstream, urls in ours.items():
            entry = section.get(upstream)
            if not isinstance(entry, dict):
                continue
            entry["endpoint"] = [url for url in entry.get("endpoint") or [] if url not in urls]
            if not entry["endpoint"]:
                del entry["endpoint"]
            if not entry:
                del section[upstream]
        if not section:
            del data["mirrors"]
    if not data and not record.get("existed"):
        return None
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


_CLIENT_KINDS = {
    "daemon_json": (render_daemon_json, _strip_daemon_json),
    "hosts_toml": (render_hosts_toml, _strip_block_file),
    "registries_conf": (render_registries_conf, _strip_block_file),
    "buildkitd_toml": (render_buildkitd_toml, _strip_block_file),
    "registries_yaml": (render_registries_yaml, _strip_registries_yaml),
}


# -- host side: probe, detect, record, write ------------------------------------------------


def _probe_mirror(url, timeout):
    """None when ``url`` answers ``/v2/`` like a registry within ``timeout``, else why not."""
    session = requests.Session()
    # An HTTP proxy in Salt's environment says nothing about what the clients reach.
    session.trust_env = False
    try:
        response = session.get(f"{url}/v2/", timeout=(timeout, timeout), allow_redirects=False)
    except requests.Timeout:
        return f"no answer within {timeout}s"
    except requests.ConnectionError as exc:
        return "connection refused" if "refused" in str(exc).lower() else "unreachable"
    except requests.RequestException as exc:
        return f"failed: {type(exc).__name__}"
    finally:
        session.close()
    if response.status_code not in (200, 401):
        return f"answered HTTP {response.status_code}"
    if not response.headers.get("Docker-Distribution-Api-Version", "").startswith("registry/2"):
        return "answered, but not as a registry"
    return None


def _probe_mirrors(urls, timeout):
    """{url: None or why it does not answer}, probed in parallel so dead mirrors cost one
    timeout in all."""
    if not urls:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        return dict(zip(urls, pool.map(lambda url: _probe_mirror(url, timeout), urls)))


def _which(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + _SYSTEM_PATH)


def _runtime_present(runtime, paths):
    """None when ``runtime`` is on this host (its program or its config), else why not."""
    programs, marker = {
        "docker": (("dockerd",), paths["docker_daemon_json"]),
        "containerd": (("containerd",), paths["containerd_config"]),
        "podman": (("podman", "buildah", "skopeo", "crio"), paths["registries_conf"]),
        "buildkit": (("buildkitd",), paths["buildkitd_toml"]),
        "k3s": (("k3s",), os.path.dirname(paths["k3s_registries"])),
        "rke2": (("rke2",), os.path.dirname(paths["rke2_registries"])),
    }[runtime]
    if any(_which(program) for program in programs) or os.path.exists(marker):
        return None
    return f"not installed (no {' or '.join(programs)} on PATH, no {marker})"


def _read_exact(path):
    """The text of ``path`` exactly as stored (no newline translation), or None."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc


def _sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _makedirs_recorded(directory):
    """Create ``directory`` and missing parents (0755); return the ones created, top first."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path, 0o755)
    return list(reversed(missing))


def _write_exact(path, text, new_mode=0o644):
    """Write ``text`` atomically, keeping an existing file's mode and owner."""
    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    try:
        stat = os.stat(path)
        mode, uid, gid = stat.st_mode & 0o7777, stat.st_uid, stat.st_gid
    except FileNotFoundError:
        mode, uid, gid = new_mode, -1, -1
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.hub-mirror-")
    try:
        os.fchmod(fd, mode)
        if uid != -1:
            os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _ClientRecord:
    """What hub_mirror did to client config files, kept under ``<state_dir>/.client`` (0700):
    per file whether it existed, its original bytes (0600) and what hub_mirror last wrote."""

    def __init__(self, directory):
        self.directory = directory
        self.index_path = os.path.join(directory, "index.json")
        try:
            with open(self.index_path, encoding="utf-8") as handle:
                self.files = json.load(handle).get("files", {})
        except FileNotFoundError:
            self.files = {}

    def _original_path(self, path):
        return os.path.join(self.directory, "originals", hashlib.sha256(path.encode()).hexdigest())

    def original(self, path):
        return _read_exact(self._original_path(path))

    def remember(self, path, entry, original):
        """Record the first touch of ``path``, with its original bytes if it existed."""
        if original is not None:
            saved = self._original_path(path)
            os.makedirs(os.path.dirname(saved), mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            _write_exact(saved, original, new_mode=0o600)
        self.files[path] = entry

    def forget(self, path):
        self.files.pop(path, None)
        try:
            os.unlink(self._original_path(path))
        except FileNotFoundError:
            pass

    def save(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        _write_atomic(self.index_path, json.dumps({"files": self.files}, indent=2) + "\n", 0o600)


_CONFLICTS = {"hosts_toml": _hosts_toml_conflict, "buildkitd_toml": _buildkitd_conflict}


def _sync_file(record, runtime, path, kind, mirrors, blocked, test):
    """
    Bring one client config file to ``mirrors`` (empty: none of hub_mirror's in it).

    Returns ``(change, mirrors written, note)``; ``change`` is None when the file is
    already right.
    """
    render, strip = _CLIENT_KINDS[kind]
    entry = record.files.get(path)
    current = _read_exact(path)
    if entry is not None and current is not None and _sha256_text(current) == entry["written"]:
        base = record.original(path) if entry["existed"] else None
    elif entry is not None and current is not None:
        base = strip(current, entry)
    else:
        base = current
    note = None
    if mirrors and blocked:
        mirrors, note = {}, blocked
    if mirrors and kind in _CONFLICTS and strip_block(base):
        conflict = _CONFLICTS[kind](strip_block(base), mirrors)
        if conflict:
            mirrors, note = {}, f"{path}: {conflict}"
    desired = render(base, mirrors) if mirrors else base
    if desired == current:
        if not test and entry is not None and not mirrors:
            record.forget(path)
        return None, mirrors, note

    change = {"old": (entry or {}).get("mirrors", {}) if current is not None else {}, "new": mirrors}
    if test:
        return change, mirrors, note
    if entry is None:
        entry = {"runtime": runtime, "existed": current is not None, "dirs": []}
        if kind == "daemon_json":
            entry.update(_remember_daemon_json(current))
        record.remember(path, entry, current)
    if desired is None:
        os.unlink(path)
        for directory in reversed(entry["dirs"]):
            try:
                os.rmdir(directory)
            except OSError:
                break
    else:
        entry["dirs"] = entry["dirs"] + _makedirs_recorded(os.path.dirname(path))
        _write_exact(path, desired)
    if mirrors:
        entry.update(written=_sha256_text(desired), mirrors=mirrors)
        record.files[path] = entry
    else:
        record.forget(path)
    return change, mirrors, note


def _docker_reload(client, test):
    """Make dockerd re-read daemon.json without a restart; say how, or None if not running."""
    if os.path.isdir("/run/systemd/system") and _which("systemctl"):
        active = subprocess.run(
            ["systemctl", "is-active", "--quiet", "docker"], timeout=30, check=False
        ).returncode == 0
        if active:
            if not test:
                _systemctl("reload", "docker")
            return "systemctl reload docker"
    pid_text = _read_exact(client["paths"]["docker_pidfile"]) or ""
    pid = int(pid_text.strip()) if pid_text.strip().isdigit() else None
    if pid is None or (_read_exact(f"/proc/{pid}/comm") or "").strip() != "dockerd":
        return None
    if not test:
        os.kill(pid, signal.SIGHUP)
    return f"SIGHUP to dockerd (pid {pid})"


def _cri_config_paths(text):
    """The CRI plugin's registry ``config_path`` set in a containerd config.toml, or None."""
    table = ""
    for line in (text or "").splitlines():
        header = _TOML_HEADER_RE.match(line)
        if header:
            table = re.sub(r"\s*\.\s*", ".", header.group(1).replace("'", '"'))
            continue
        match = re.match(r"""^\s*((?:registry\s*\.\s*)?)config_path\s*=\s*["']([^"']*)["']""", line)
        if not match:
            continue
        where = table + ("." if table and match.group(1) else "") + ("registry" if match.group(1) else "")
        if where.endswith(".registry") and "cri" in where:
            return match.group(2)
    return None


def _containerd_major():
    program = _which("containerd")
    if not program:
        return None
    try:
        out = subprocess.run(
            [program, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\s v?(\d+)\.\d+", out)
    return int(match.group(1)) if match else None


def _containerd_note(client):
    """Whether the CRI plugin (kubelet, crictl) reads the certs.d hub_mirror writes."""
    config = client["paths"]["containerd_config"]
    certs_d = client["paths"]["containerd_certs_d"]
    configured = _cri_config_paths(_read_exact(config))
    if configured is None and (_containerd_major() or 1) >= 2:
        configured = "/etc/containerd/certs.d:/etc/docker/certs.d"
    if certs_d in (configured or "").split(":"):
        return f"the CRI plugin reads {certs_d}: nothing to restart"
    return (
        f"the CRI plugin does not read {certs_d}: set config_path = \"{certs_d}\" under "
        f'[plugins."io.containerd.grpc.v1.cri".registry] in {config} (and drop any '
        "registry.mirrors there), then restart containerd; ctr --hosts-dir and nerdctl "
        "use the hosts already"
    )


def _podman_blocked(client):
    """Why a v2 drop-in would break containers/image here, or None."""
    paths = client["paths"]
    candidates = [paths["registries_conf"]]
    if os.path.isdir(paths["registries_conf_d"]):
        candidates += [
            os.path.join(paths["registries_conf_d"], name)
            for name in sorted(os.listdir(paths["registries_conf_d"]))
            if name.endswith(".conf") and name != REGISTRIES_DROPIN
        ]
    for path in candidates:
        try:
            text = _read_exact(path)
        except (OSError, ValueError):
            continue
        if text and _V1_REGISTRIES_RE.search(text):
            return (
                f"{path} uses the old v1 format ([registries.search]); containers/image "
                "refuses to mix it with a v2 drop-in: convert it to v2 first"
            )
    return None


def _runtime_files(runtime, client, alive):
    """[(path, kind, mirrors)] that ``runtime`` should have, given the answering mirrors."""
    paths = client["paths"]
    if runtime == "docker":
        ours = {DOCKER_HUB: alive[DOCKER_HUB]} if DOCKER_HUB in alive else {}
        return [(paths["docker_daemon_json"], "daemon_json", ours)]
    if runtime == "containerd":
        return [
            (
                os.path.join(paths["containerd_certs_d"], upstream, "hosts.toml"),
                "hosts_toml",
                {upstream: alive[upstream]} if upstream in alive else {},
            )
            for upstream in client["mirrors"]
        ]
    if runtime == "podman":
        return [(os.path.join(paths["registries_conf_d"], REGISTRIES_DROPIN), "registries_conf", alive)]
    if runtime == "buildkit":
        return [(paths["buildkitd_toml"], "buildkitd_toml", alive)]
    return [(paths[f"{runtime}_registries"], "registries_yaml", alive)]




def _kind_of(runtime):
    return {
        "docker": "daemon_json",
        "containerd": "hosts_toml",
        "podman": "registries_conf",
        "buildkit": "buildkitd_toml",
    }.get(runtime, "registries_yaml")


def _describe(mirrors):
    return "; ".join(f"{upstream} -> {', '.join(urls)}" for upstream, urls in mirrors.items())


def _runtime_notes(runtime, client, alive, changes, configured, test):
    """What the user should know about ``runtime`` after this run: reloads, restarts."""
    notes = []
    if runtime == "docker":
        others = sorted(set(alive) - {DOCKER_HUB})
        if others:
            notes.append(f"docker mirrors only docker.io; {', '.join(others)} is left to the other runtimes")
        if changes:
            try:
                how = _docker_reload(client, test)
            except (OSError, CommandExecutionError) as exc:
                how = None
                notes.append(f"reloading dockerd failed: {exc}")
            if how:
                changes["reload"] = how
            else:
                notes.append("dockerd is not running: it reads daemon.json when it starts")
    elif runtime == "containerd" and configured:
        notes.append(_containerd_note(client))
    elif runtime == "buildkit" and changes:
        notes.append(
            "buildkitd reads buildkitd.toml at start: restart it, or recreate buildx builders "
            f"with --config {client['paths']['buildkitd_toml']}"
        )
    elif runtime in ("k3s", "rke2") and changes:
        notes.append(f"{runtime} reads registries.yaml at start: restart {runtime} to apply it")
    elif runtime == "podman" and changes and _which("crio"):
        notes.append("cri-o re-reads registries.conf on reload: systemctl reload crio")
    return notes


def _sync_runtime(record, client, runtime, alive, wanted, test):
    """Sync every config file of one runtime; return (changes, one comment line)."""
    absent = _runtime_present(runtime, client["paths"]) if wanted else None
    recorded = [path for path, entry in record.files.items() if entry["runtime"] == runtime]
    if absent and not recorded:
        return {}, f"{runtime}: skipped: {absent}"
    files = _runtime_files(runtime, client, alive) if wanted and not absent else []
    files += [
        (path, _kind_of(runtime), {}) for path in recorded if path not in {f[0] for f in files}
    ]
    blocked = _podman_blocked(client) if runtime == "podman" and wanted else None

    changes, notes, configured = {}, [], {}
    for path, kind, mirrors in files:
        try:
            change, written, note = _sync_file(record, runtime, path, kind, mirrors, blocked, test)
        except json.JSONDecodeError as exc:
            notes.append(f"{path} is not valid JSON ({exc}): fix it; it was left as it was")
            continue
        except (OSError, ValueError, yaml.YAMLError) as exc:
            notes.append(f"{path} was left as it was: {exc}")
            continue
        if change:
            changes[path] = change
        if note and note not in notes:
            notes.append(note)
        configured.update(written)
    notes = _runtime_notes(runtime, client, alive if wanted else {}, changes, configured, test) + notes

    if configured:
        verb = ("would configure" if test else "configured") if changes else "configured"
        line = f"{runtime}: {verb} {_describe(configured)}"
    else:
        if not wanted:
            line = f"{runtime}: not wanted"
        elif absent:
            line = f"{runtime}: skipped: {absent}"
        elif any(note.startswith(path) for path, _, _ in files for note in notes) or blocked:
            line = f"{runtime}: left alone"
        else:
            line = f"{runtime}: no mirror answers for it, pulls go direct"
        if changes:
            line += "; would restore its own config" if test else "; restored its own config"
    if notes:
        line += " (" + "; ".join(notes) + ")"
    return changes, line


def client_configure(test=False):
    """
    Point this host's container clients at the mirrors in ``hub_mirror:client:mirrors``,
    but only at those that answer ``GET /v2/`` within ``client:probe_timeout`` right now.

    Per runtime in ``client:runtimes`` (one that is not installed is skipped):

    - docker: ``registry-mirrors`` merged into daemon.json, every other byte kept as
      written (only docker.io can be mirrored), then dockerd reloaded (``systemctl
      reload docker`` or SIGHUP), never restarted.
    - containerd: ``certs.d/<upstream>/hosts.toml`` with the mirrors in order and the
      upstream as ``server`` fallback; the comment says whether the CRI plugin reads it.
    - podman, cri-o, buildah, skopeo: a ``registries.conf.d`` drop-in.
    - buildkit: ``[registry."<upstream>"] mirrors`` in buildkitd.toml (a marked block).
    - k3s, rke2: ``registries.yaml`` endpoints.

    A mirror configured by an earlier run that no longer answers is taken out; with none
    answering, each client gets its own config back. A problem with one client is
    reported in the comment, never raised: a dead mirror must not fail a build host's
    run. Returns ``{"changes": {...}, "comment": "..."}``; ``test=True`` changes nothing.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_configure
        salt '*' hub_mirror.client_configure test=True
    """
    client = _client_conf(settings())
    urls = list(dict.fromkeys(url for urls in client["mirrors"].values() for url in urls))
    probed = _probe_mirrors(urls, client["probe_timeout"])
    alive = {
        upstream: [url for url in urls if probed[url] is None]
        for upstream, urls in client["mirrors"].items()
    }
    alive = {upstream: urls for upstream, urls in alive.items() if urls}

    if urls:
        lines = [
            "Mirrors: "
            + "; ".join(f"{url} {probed[url] or 'answers'}" for url in urls)
        ]
    else:
        lines = ["hub_mirror:client:mirrors is empty: there is no mirror to point clients at"]
    record = _ClientRecord(client["record_dir"])
    changes = {}
    for runtime in CLIENT_RUNTIMES:
        wanted = runtime in client["runtimes"]
        if not wanted and not any(e["runtime"] == runtime for e in record.files.values()):
            continue
        runtime_changes, line = _sync_runtime(record, client, runtime, alive, wanted, test)
        if runtime_changes:
            changes[runtime] = runtime_changes
        lines.append(line)
    if not test and (changes or os.path.exists(record.index_path)):
        record.save()
    return {"changes": changes, "comment": "\n".join(lines)}


def client_clean(test=False):
    """
    Give every client config file ``hub_mirror.client_configure`` touched back to its
    owner: a file still exactly as hub_mirror left it gets its original bytes back (or is
    removed, when hub_mirror created it); a file edited since loses only hub_mirror's
    part. dockerd is reloaded when daemon.json changes.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_clean
        salt '*' hub_mirror.client_clean test=True
    """
    client = _client_conf(settings())
    record = _ClientRecord(client["record_dir"])
    changes, lines = {}, []
    for runtime in CLIENT_RUNTIMES:
        if not any(entry["runtime"] == runtime for entry in record.files.values()):
            continue
        runtime_changes, line = _sync_runtime(record, client, runtime, {}, False, test)
        if runtime_changes:
            changes[runtime] = runtime_changes
        lines.append(line.replace(": not wanted; ", ": "))
    if not test and os.path.exists(record.index_path):
        record.save()
    return {
        "changes": changes,
        "comment": "\n".join(lines) or "No client config of hub_mirror's is left to restore",
    }
