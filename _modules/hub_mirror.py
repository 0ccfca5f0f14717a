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
import http.client
import http.server
import ipaddress
import json
import logging
import os
import re
import shutil
import shlex
import signal
import socket
import stat
import string
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import unicodedata
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
    # Images hub_mirror.cached keeps in the cache, e.g. [library/alpine:3.20].
    "warm": [],
    # Cap on the storage directory (e.g. 50G); empty: none. hub_mirror.capped enforces it.
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
# within this time, without a restart.
CREDENTIAL_LIFETIME = "5m"
# Patterns are used with fullmatch: "$" would also match before a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_VERSION_RE = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})")
_DIGEST_RE = re.compile(r"(?:sha256[:=])?([0-9a-fA-F]{64})")
_DURATION_RE = re.compile(r"0|([0-9]{1,9}(\.[0-9]{1,9})?(ns|us|ms|s|m|h)){1,6}")
# Paths reach unit files, init scripts and rm: letters, digits and . _ - + @ / only.
_PATH_RE = re.compile(r"/[A-Za-z0-9._@+/-]{0,4095}")
_HOST_RE = re.compile(r"[A-Za-z0-9_.@-]{1,253}")
_ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9@+._-]{0,127}")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# HTTP Basic (requests encodes it as latin-1, raising on anything else) and every registry's
# tokens: printable ASCII; a space is a folded YAML scalar, ':' ends a Basic username.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")
_USERNAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")
# Storage is owned by the service user and emptied by a purge: never one of these trees...
_SYSTEM_TREES = (
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/lost+found", "/proc", "/root", "/run", "/sbin", "/snap", "/sys", "/usr",
)
# ...nor one of these directories itself (a directory of its own inside them is fine).
_SHARED_DIRS = (
    "/", "/data", "/media", "/mnt", "/opt", "/srv", "/tmp", "/var", "/var/cache",
    "/var/lib", "/var/log", "/var/spool", "/var/tmp",
)
# Groups whose members are as good as root, or read what they must not.
_PRIVILEGED_GROUPS = ("adm", "disk", "docker", "kvm", "libvirt", "lxd", "shadow", "staff", "sudo", "systemd-journal", "wheel")
# The GECOS of the account config.sls creates (user.present fullname).
SERVICE_GECOS = "hub_mirror registry"
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
    if "hub_mirror" not in __pillar__ and __opts__.get("master_type") == "disable":
        # A masterless salt-minion daemon never compiles its pillar (Salt 3008 does that
        # only on connecting to a master), and the client_recheck schedule runs there.
        import salt.pillar  # pylint: disable=import-outside-toplevel

        return (
            salt.pillar.get_pillar(
                __opts__, dict(__grains__), __opts__["id"], saltenv=__opts__.get("saltenv"),
                pillarenv=__opts__.get("pillarenv"),
            )
            .compile_pillar()
            .get("hub_mirror", {})
        )
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
        self.messages.append(f"hub_mirror{':' if key else ''}{key}: {problem}; {fix}")

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
                f"{prefix}:{_key_part(_plain(key))}" if prefix else _key_part(_plain(key)),
                "unknown key",
                f"remove it or use one of: {', '.join(sorted(known))}",
            )


def _shown(value, limit=80):
    """``value`` fit for an error message: quoted, a newline shown as \\n, and short."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return _plain(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _plain(value):
    """``str(value)``, or a stand-in where str() raises: YAML reads a 5000-digit literal as
    an int that Python refuses to print (ValueError)."""
    try:
        return str(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to show>"


def _key_part(name):
    """A pillar key as it may appear in a message: control characters escaped."""
    return repr(name)[1:-1] if _has_control(name) else name


def _has_control(text):
    """A control, format or line-separator character: in a unit file or script a newline is
    a new directive, and invisible characters make a value differ from what it looks like."""
    return any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs") for char in text)


def _check_text(errors, key, value, secret=False, pattern=None, fix="see pillar.example"):
    """``value`` if it is a string without control characters (and matches ``pattern``)."""
    shown = "a secret" if secret else _shown(value)
    if not isinstance(value, str):
        errors.add(key, f"must be a string, got {type(value).__name__} ({shown})", "quote the value in YAML")
        return None
    if _has_control(value):
        errors.add(key, "holds a newline or another control character", "write it on one line, without them")
        return None
    if pattern is not None and not pattern.fullmatch(value):
        errors.add(key, f"{shown} is not allowed here", fix)
        return None
    return value


def _check_path(errors, key, value, example="/var/lib/hub-mirror"):
    """An absolute, normalized path of safe characters (it reaches unit files and scripts)."""
    path = _check_text(errors, key, value)
    if path is None:
        return None
    if not _PATH_RE.fullmatch(path):
        errors.add(
            key,
            f"{_shown(path)} is not an absolute path of letters, digits and . _ - + @ /",
            f"write e.g. {example} (no spaces, quotes, $, % or other shell characters)",
        )
        return None
    if any(part in (".", "..") for part in path.split("/")):
        errors.add(key, f"{path!r} has . or .. parts", "write the path without them")
        return None
    # NAME_MAX: mkdir would fail with ENAMETOOLONG at configure, after validation said yes.
    if any(len(part) > 255 for part in path.split("/")):
        errors.add(key, f"{_shown(path)} has a part longer than 255 characters", "shorten it")
        return None
    return os.path.normpath(path)


def _parse_hostport(text):
    """Split ``host:port``, ``[v6]:port`` or ``iface:port``; raise ValueError.

    An IPv6 address must be bracketed: ``::1:5000`` is ambiguous, and the registry refuses it.
    """
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if sep:
            ipaddress.IPv6Address(host)  # ValueError unless an IPv6 address
            if not _is_ip(host):
                raise ValueError(text)
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(text)
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port):
        raise ValueError(text)
    if not text.startswith("[") and not _HOST_RE.fullmatch(host):
        raise ValueError(text)
    if not 0 < int(port) < 65536:
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


def _is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    # ipaddress takes any text after an IPv6 % as the zone: allow-list it like a host.
    return "%" not in host or bool(_HOST_RE.fullmatch(host.partition("%")[2]))


def _is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redact_url(value):
    """``value`` fit to show or store: userinfo and query (where tokens go) redacted.

    Works on text that does not parse as a URL too: everything before the last ``@`` goes.
    """
    if not isinstance(value, str):
        return value
    scheme, sep, rest = value.partition("://")
    if "@" in value:
        if not sep:
            return REDACTED
        rest = f"{REDACTED}@{rest.rpartition('@')[2]}"
    rest, query, _ = rest.partition("#")[0].partition("?")
    return f"{scheme}{sep}{rest}" + (f"?{REDACTED}" if query else "")


def _redact_text(text, *urls):
    """``text`` (an error message) with every secret part of ``urls`` redacted."""
    text = str(text)
    for url in urls:
        if not isinstance(url, str):
            continue
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            continue
        text = text.replace(url, _redact_url(url))
        secrets = [parts.query, parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""]
        secrets += [urllib.parse.quote(secret, safe="=&") for secret in secrets]
        for secret in secrets:
            if secret:
                text = text.replace(secret, REDACTED)
    return text


def _check_url(errors, key, value, schemes=("http", "https"), credentials=False, placeholders=False):
    """The parsed URL, or None after adding what is wrong with it."""
    if _check_text(errors, key, value) is None:
        return None
    if " " in value:
        errors.add(key, f"{_redact_url(value)!r} holds a space", "percent-encode it as %20")
        return None
    if placeholders:
        problem = _placeholder_problem(value)
        if problem:
            errors.add(key, problem, "use only {version} and {arch}, e.g. .../v{version}/registry_{version}_linux_{arch}.tar.gz")
            return None
        value = value.format(version="0.0.0", arch="amd64")
    try:
        parsed = urllib.parse.urlsplit(value)
        parsed.port  # pylint: disable=pointless-statement  # ValueError: port out of range
        host = parsed.hostname
    except ValueError:
        errors.add(key, f"{_redact_url(value)!r} is not a valid URL (bad host or port)", "write it like https://registry-1.docker.io")
        return None
    if parsed.scheme not in schemes or (parsed.scheme != "file" and not host):
        errors.add(
            key,
            f"{_redact_url(value)!r} is not an absolute {'/'.join(schemes)} URL",
            "write it like https://registry-1.docker.io",
        )
        return None
    if host and not (_HOST_RE.fullmatch(host) or _is_ip(host)):
        errors.add(key, f"{host!r} is not a host name or IP address", "write it like https://registry-1.docker.io")
        return None
    if (parsed.username or parsed.password) and not credentials:
        errors.add(key, "the URL holds credentials", "put them in username and token instead")
        return None
    return parsed


def _placeholder_problem(template):
    """Why a URL template is unusable: only bare ``{version}`` and ``{arch}`` may appear
    (``str.format`` would also follow ``{version.__class__}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid URL template ({exc})"
    for _, field, spec, conversion in parsed:
        if field is not None and (field not in ("version", "arch") or spec or conversion):
            return f"has the placeholder {{{_shown(field)}}}"
    return None


def _validate_upstream(errors, prefix, mirror, own):
    """The upstream must be a registry's root URL that is not this mirror itself."""
    key = f"{prefix}:upstream"
    upstream = _check_url(errors, key, mirror["upstream"], credentials=True)
    if not upstream:
        return
    if upstream.username or upstream.password:
        errors.add(key, "the URL holds credentials", "put them in username and token instead")
    if upstream.path not in ("", "/") or upstream.query or upstream.fragment:
        errors.add(
            key,
            f"{_redact_url(mirror['upstream'])!r} has a path or query",
            "give only scheme and host, e.g. https://ghcr.io",
        )
        return
    port = upstream.port or (443 if upstream.scheme == "https" else 80)
    host = _resolve_host(upstream.hostname, {})
    for own_host, own_port in own:
        if port == own_port and host and _hosts_overlap(host, own_host):
            errors.add(key, f"{_redact_url(mirror['upstream'])!r} is this mirror's own address", "point it at the registry to mirror")


def _validate_mirror(errors, name, mirror, version, grains):
    prefix = f"mirrors:{_key_part(name)}"
    if not _NAME_RE.fullmatch(name):
        errors.add(
            prefix,
            f"{_shown(name)} is not a valid mirror name",
            "use 1-32 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    _check_keys(errors, prefix, mirror, MIRROR_DEFAULTS)
    # Only this mirror's type errors stop its checks: other keys' errors are reported too.
    known_before = len(errors.messages)
    for key in MIRROR_DEFAULTS:
        if key in ("warm", "max_size", "s3", "redis"):
            continue  # checked by _validate_cache_keys and _validate_shared_storage
        value = mirror.get(key)
        if key in ("username", "token") and isinstance(value, str):
            value = value.strip()  # as _complete_mirror does: a block scalar's newline goes
        _check_text(errors, f"{prefix}:{key}", value, secret=key in SECRET_KEYS)
    if len(errors.messages) > known_before:
        return

    bound = {}
    for key in ("listen", "debug_listen"):
        if key == "debug_listen" and not mirror[key]:
            continue
        try:
            host, port = _parse_hostport(mirror[key])
        except ValueError:
            errors.add(
                f"{prefix}:{key}",
                f"{_shown(mirror[key])} is not HOST:PORT with a port from 1 to 65535",
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
        _hosts_overlap(bound["listen"][0], bound["debug_listen"][0])
    ):
        errors.add(
            f"{prefix}:debug_listen",
            f"{mirror['debug_listen']!r} is the listen address too",
            "give the debug listener its own port, or remove it for listen port + 10000",
        )
    _validate_upstream(errors, prefix, mirror, bound.values())

    username, token = mirror["username"].strip(), mirror["token"].strip()
    if token and not username:
        errors.add(
            f"{prefix}:token",
            "a token is set without a username",
            f"set hub_mirror:{prefix}:username to the account the token belongs to",
        )
    if username and not token:
        errors.add(
            f"{prefix}:username",
            "a username is set without a token",
            f"set hub_mirror:{prefix}:token (an access token) or remove the username",
        )
    # Not shown: what follows a ':' in a username is usually the token pasted with it.
    if username and not _USERNAME_RE.fullmatch(username):
        errors.add(
            f"{prefix}:username",
            "holds ':', a space or a character outside printable ASCII",
            "give the account name alone",
        )
    if token and not _TOKEN_RE.fullmatch(token):
        errors.add(
            f"{prefix}:token",
            "holds a space or a character outside printable ASCII",
            "paste the token on one line, exactly as the registry issued it",
        )

    if mirror["storage"]:
        _check_path(errors, f"{prefix}:storage", mirror["storage"], f"/var/lib/hub-mirror/{name}")

    if mirror["advertise"]:
        problem = _mirror_url_problem(mirror["advertise"])
        host = None if problem else urllib.parse.urlsplit(mirror["advertise"]).hostname
        if host and not (_HOST_RE.fullmatch(host) or _is_ip(host)):
            # Published to the mine and written into every client's config.
            problem = f"{host!r} is not a host name or IP address"
        if problem:
            errors.add(f"{prefix}:advertise", problem, "write it like http://mirror1.example.net:5000")

    if not _DURATION_RE.fullmatch(mirror["ttl"]):
        errors.add(
            f"{prefix}:ttl",
            f"{_shown(mirror['ttl'])} is not a duration",
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
            f"{_shown(mirror['log_level'])} is not a log level",
            f"use one of {', '.join(_LOG_LEVELS)}",
        )
    _validate_cache_keys(errors, prefix, mirror)
    _validate_shared_storage(errors, prefix, mirror, version)


def _validate_shared_storage(errors, prefix, mirror, version):
    for section, defaults in (("s3", S3_DEFAULTS), ("redis", REDIS_DEFAULTS)):
        value = mirror.get(section)
        if not isinstance(value, dict):
            errors.add(f"{prefix}:{section}", "must be a mapping", "see pillar.example")
            return
        _check_keys(errors, f"{prefix}:{section}", value, defaults)
        for key, default in defaults.items():
            if key not in value:
                continue
            if not isinstance(value[key], type(default)) or isinstance(value[key], bool) != isinstance(default, bool):
                errors.add(
                    f"{prefix}:{section}:{key}",
                    f"must be a {type(default).__name__}",
                    "see pillar.example",
                )
            elif isinstance(default, str):
                _check_text(errors, f"{prefix}:{section}:{key}", value[key], secret=key in ("secretkey", "password"))
    s3, redis = mirror["s3"], mirror["redis"]
    if s3:
        if not s3.get("bucket"):
            errors.add(f"{prefix}:s3:bucket", "is required with s3", "name the bucket")
        elif isinstance(s3["bucket"], str) and not _BUCKET_RE.fullmatch(s3["bucket"]):
            errors.add(f"{prefix}:s3:bucket", f"{_shown(s3['bucket'])} is not a bucket name", "use 3-63 lowercase letters, digits, '.' or '-'")
        if bool(s3.get("accesskey")) != bool(s3.get("secretkey")):
            errors.add(
                f"{prefix}:s3:secretkey",
                "accesskey and secretkey go together",
                "set both, or neither to use the instance's IAM role",
            )
        if s3.get("endpoint"):
            _check_url(errors, f"{prefix}:s3:endpoint", s3["endpoint"])
        if isinstance(s3.get("region", ""), str) and not re.fullmatch(r"[a-z0-9-]{0,64}", s3.get("region", "")):
            errors.add(f"{prefix}:s3:region", f"{_shown(s3['region'])} is not a region", "write e.g. us-east-1")
        if isinstance(s3.get("rootdirectory", "/"), str) and not _PATH_RE.fullmatch(s3.get("rootdirectory", "/")):
            errors.add(f"{prefix}:s3:rootdirectory", "is not a key prefix like /mirror", "start it with / and use letters, digits and . _ - /")
    if redis:
        try:
            _parse_hostport(redis.get("addr", ""))
        except ValueError:
            errors.add(f"{prefix}:redis:addr", "is not HOST:PORT", "write e.g. 127.0.0.1:6379")
        if not isinstance(redis.get("db", 0), int) or isinstance(redis.get("db", 0), bool) or not 0 <= redis.get("db", 0) < 1 << 16:
            errors.add(f"{prefix}:redis:db", "is not a database number", "use e.g. 0")
        if _dialect(version) == "2" or mirror["ttl"] != "0":
            errors.add(
                f"{prefix}:redis",
                "the blob descriptor cache serves stale descriptors once TTL expiry deletes "
                "content (clients then get empty bodies)",
                "use registry 3.x with ttl: '0' for a redis-backed pool, or remove redis",
            )


def _default_debug_port(port):
    """The debug listener's port when pillar gives none: the listen port + 10000."""
    return port + 10000 if port + 10000 < 65536 else port - 10000


def _mirror_sockets(mirror, grains):
    """(key, ip, port) of the listen and debug sockets a valid mirror entry will bind."""
    sockets = []
    try:
        host, port = _parse_hostport(mirror.get("listen"))
        sockets.append(("listen", _resolve_host(host, grains), port))
        if mirror.get("debug_listen"):
            host, debug_port = _parse_hostport(mirror["debug_listen"])
            sockets.append(("debug_listen", _resolve_host(host, grains), debug_port))
        else:
            sockets.append(("debug_listen", "127.0.0.1", _default_debug_port(port)))
    except (ValueError, TypeError):
        pass  # reported by _validate_mirror
    return [socket_ for socket_ in sockets if socket_[1]]


def _hosts_overlap(one, other):
    return one == other or {one, other} & {"0.0.0.0", "::"}


def _validate_storage(errors, key, path, lookup, example):
    """Storage is deleted by a purge and owned by the service user: never a system
    directory or anything inside one, judged after resolving ``..`` and symlinks."""
    real = os.path.realpath(path)
    shown = path if real == path else f"{path} (which resolves to {_shown(real)})"
    # A symlink leads anywhere: what reaches the unit file and rm is where it leads.
    if not _PATH_RE.fullmatch(real) or any(len(part) > 255 for part in real.split("/")):
        errors.add(key, f"{shown} is not a path of letters, digits and . _ - + @ /", example)
        return
    for system in _SYSTEM_TREES:
        if real == system or real.startswith(system.rstrip("/") + "/"):
            errors.add(
                key,
                f"{shown} is {'a system directory' if real == system else f'inside the system directory {system}'}",
                example,
            )
            return
    if real in _SHARED_DIRS:
        errors.add(key, f"{shown} is a shared system directory", example)
        return
    for name in ("prefix", "config_dir", "state_dir", "log_dir", "run_dir", "unit_dir", "init_dir", "package_binary"):
        other = os.path.realpath(lookup[name])
        # The default storage is <state_dir>/<mirror>: inside state_dir is fine, but not in
        # its dot directories (fingerprints, client records). Nothing of hub_mirror's may be
        # inside the storage either: the service user owns its root and could rename a
        # root-owned directory there and put its own unit file or binary in its place.
        if name == "state_dir":
            below = os.path.relpath(real, other) if _nested(real, other) else ""
            clash = _nested(other, real) or below.startswith(".")
        else:
            clash = _nested(real, other) or _nested(other, real)
        if clash:
            errors.add(key, f"{shown} overlaps lookup:{name} ({lookup[name]})", "give the cache a directory of its own")
            return


def _nested(inner, outer):
    """Whether ``inner`` is ``outer`` or inside it (absolute, resolved paths)."""
    return (inner.rstrip("/") + "/").startswith(outer.rstrip("/") + "/")


def _validate_lookup(errors, lookup):
    _check_keys(errors, "lookup", lookup, DEFAULTS["lookup"])
    for name in ("prefix", "config_dir", "state_dir", "log_dir", "run_dir", "unit_dir", "init_dir", "package_binary"):
        if name in lookup and _check_path(errors, f"lookup:{name}", lookup[name]) == "/":
            errors.add(f"lookup:{name}", "is /", "give a directory of its own")
    for name in ("package", "package_service"):
        if name in lookup:
            _check_text(errors, f"lookup:{name}", lookup[name], pattern=_PACKAGE_RE, fix="give a package or service name")
    if lookup.get("supervisor", "") not in ("", "systemd", "sysv"):
        errors.add("lookup:supervisor", "must be systemd, sysv or empty", "remove it to detect")
    user = _check_text(errors, "lookup:user", lookup.get("user", DEFAULTS["lookup"]["user"]), pattern=_ACCOUNT_RE, fix="use a name like hub-mirror")
    group = _check_text(errors, "lookup:group", lookup.get("group", DEFAULTS["lookup"]["group"]), pattern=_ACCOUNT_RE, fix="use a name like hub-mirror")
    if user and group:
        for key, problem in _account_problems(user, group):
            errors.add(key, problem, "use a dedicated account hub_mirror creates, e.g. hub-mirror (the default)")


def _account_problems(user, group):
    """The service user and group own the cache and run the registry: hub_mirror creates
    them, and takes over no account or group that already serves someone else."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    problems = []
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        account = None
    # 100-999: Debian's dynamically allocated system accounts (login.defs SYS_UID_MIN/MAX);
    # below are the static ones (daemon, bin, www-data, ...), above are people.
    if account:
        login = os.path.basename(account.pw_shell or "") not in ("nologin", "false")
        # The GECOS is the mark: messagebus, sshd and redis are nologin system accounts with
        # an empty one, and user.present would rewrite their home and shell.
        dedicated = 100 <= account.pw_uid < 1000 and account.pw_gecos == SERVICE_GECOS
        if login or not dedicated:
            kind = "login" if login or account.pw_uid >= 1000 else "system"
            problems.append(("lookup:user", f"{user!r} is an existing {kind} account (uid {account.pw_uid})"))
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        entry = None
    if entry:
        others = set(entry.gr_mem) - {user}
        others |= {p.pw_name for p in pwd.getpwall() if p.pw_gid == entry.gr_gid and p.pw_name != user}
        if entry.gr_gid < 100 or entry.gr_gid >= 1000 or group in _PRIVILEGED_GROUPS or others:
            problems.append(
                ("lookup:group", f"{group!r} is an existing group (gid {entry.gr_gid})"
                 + (f" of {', '.join(sorted(others)[:3])}" if others else ""))
            )
    return problems


def _storage_path(mirror, lookup, name):
    """The resolved storage directory of a mirror (pillar's, else ``<state_dir>/<name>``)."""
    return os.path.realpath(mirror.get("storage") or os.path.join(lookup["state_dir"], name))


# Deeper than any value pillar.example has (5): copy.deepcopy and repr recurse, and a few
# hundred levels (or a YAML alias that contains itself) are a RecursionError. Aliases also
# multiply: nine levels of ten make a billion values.
_MAX_DEPTH = 16
_MAX_VALUES = 100000


def _too_deep(value, limit=_MAX_DEPTH):
    """The key path to the first value nested more than ``limit`` levels deep (or past
    ``_MAX_VALUES`` values in all), or None."""
    stack, seen = [(value, [])], 0
    while stack:
        item, path = stack.pop()
        seen += 1
        if len(path) > limit or seen > _MAX_VALUES:
            return path
        if isinstance(item, dict):
            stack.extend((sub, path + [key]) for key, sub in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, path + [index]) for index, sub in enumerate(item))
    return None


def _validate(raw, grains):
    errors = _Errors()
    if not isinstance(raw, dict):
        errors.add("", f"must be a mapping, got {type(raw).__name__}", "see pillar.example")
        errors.raise_if_any()
    deep = _too_deep(raw)
    if deep:
        errors.add(
            ":".join(_key_part(_plain(key)) for key in deep[:3]),
            f"is nested more than {_MAX_DEPTH} levels deep, or holds more than {_MAX_VALUES} values",
            "see pillar.example for the shape of each key",
        )
        errors.raise_if_any()
    _check_keys(errors, "", raw, list(DEFAULTS) + ["client"])

    version = raw.get("version", DEFAULT_VERSION)
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        errors.add(
            "version",
            f"{_shown(version)} is not a release version like '3.0.0'",
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
        errors.add("install:method", f"{_shown(method)} is not supported", "use archive or package")
    source = install.get("source", RELEASE_URL)
    _check_url(errors, "install:source", source, ("http", "https", "file"), credentials=True, placeholders=True)
    source_hash = install.get("source_hash", "")
    if not isinstance(source_hash, str) or (source_hash and not _DIGEST_RE.fullmatch(source_hash) and not re.match(r"(https?|file)://", source_hash)):
        errors.add(
            "install:source_hash",
            f"{_shown(_redact_url(source_hash))} is neither a sha256 digest nor a URL",
            "give 64 hex digits (optionally 'sha256:' first) or the URL of a .sha256 file",
        )
    elif source_hash and not _DIGEST_RE.fullmatch(source_hash):
        _check_url(errors, "install:source_hash", source_hash, ("http", "https", "file"), credentials=True, placeholders=True)

    probe_timeout = raw.get("probe_timeout", DEFAULTS["probe_timeout"])
    if not isinstance(probe_timeout, (int, float)) or isinstance(probe_timeout, bool) or not (
        0 < probe_timeout <= 600
    ):
        errors.add(
            "probe_timeout", f"{_shown(probe_timeout)} is not a number of seconds", "use e.g. 30"
        )

    clean = raw.get("clean", {})
    if not isinstance(clean, dict) or not isinstance(clean.get("purge_storage", False), bool):
        errors.add("clean:purge_storage", "must be true or false", "see pillar.example")
    elif clean:
        _check_keys(errors, "clean", clean, DEFAULTS["clean"])

    lookup = raw.get("lookup", {})
    if not isinstance(lookup, dict):
        errors.add("lookup", "must be a mapping", "see pillar.example")
        lookup = {}
    known_before = len(errors.messages)
    _validate_lookup(errors, lookup)
    lookup = _merge(DEFAULTS["lookup"], lookup) if len(errors.messages) == known_before else None

    mirrors = raw.get("mirrors", DEFAULTS["mirrors"])
    if not isinstance(mirrors, dict) or not mirrors:
        errors.add("mirrors", "must be a non-empty mapping of mirror names", "see pillar.example")
        mirrors = {}
    sockets, storages = [], {}
    for name, mirror in mirrors.items():
        if not isinstance(name, str):
            errors.add(f"mirrors:{_shown(name)}", f"the mirror name is a {type(name).__name__}", "quote it in YAML")
            continue
        mirror = mirror if mirror is not None else {}
        if not isinstance(mirror, dict):
            errors.add(f"mirrors:{_key_part(name)}", "must be a mapping", "see pillar.example")
            continue
        mirror = _merge(MIRROR_DEFAULTS, mirror)
        known_before = len(errors.messages)
        _validate_mirror(errors, name, mirror, version, grains)
        for key, host, port in _mirror_sockets(mirror, grains):
            for other, other_key, other_host, other_port in sockets:
                if other != name and port == other_port and _hosts_overlap(host, other_host):
                    errors.add(
                        f"mirrors:{name}:{key}",
                        f"{_hostport(host, port)} is also mirror {other!r}'s {other_key}",
                        "give each mirror its own port (debug_listen defaults to listen + 10000)",
                    )
            sockets.append((name, key, host, port))
        if lookup is None or len(errors.messages) > known_before or mirror["s3"]:
            continue
        _validate_storage(
            errors,
            f"mirrors:{name}:storage",
            mirror["storage"] or os.path.join(lookup["state_dir"], name),
            lookup,
            f"write e.g. /var/lib/hub-mirror/{name}",
        )
        storage = _storage_path(mirror, lookup, name)
        for other, other_storage in storages.items():
            if _nested(storage, other_storage) or _nested(other_storage, storage):
                errors.add(
                    f"mirrors:{name}:storage",
                    f"{storage!r} overlaps mirror {other!r}'s storage {other_storage!r}",
                    "give each mirror its own storage, neither inside the other",
                )
        storages[name] = storage
    _validate_client(errors, raw.get("client"))
    errors.raise_if_any()


def settings():
    """
    Return the ``hub_mirror`` settings: defaults merged with pillar, validated.

    Each mirror is complete (listen address resolved, storage and debug listener
    filled in), and every secret (token, S3 secret key, redis password) is redacted.
    Raises an error that names each bad pillar key and its fix.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.settings
    """
    return _settings(redact=True)


def _settings(redact):
    """settings(); ``redact=False`` only for the code that writes the 0600 files."""
    raw = _raw_pillar()
    _validate(raw, __grains__)
    merged = _merge(DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    merged["mirrors"] = {}
    for name, mirror in (raw.get("mirrors") or DEFAULTS["mirrors"]).items():
        merged["mirrors"][name] = _complete_mirror(name, mirror or {}, merged["lookup"])
    merged["arch"] = release_arch()
    if redact:
        for key in ("source", "source_hash"):
            merged["install"][key] = _redact_url(merged["install"][key])
        for mirror in merged["mirrors"].values():
            mirror["token"] = REDACTED if mirror["token"] else ""
            for section, key in (("s3", "secretkey"), ("redis", "password")):
                if mirror[section].get(key):
                    mirror[section][key] = REDACTED
    return merged


def _complete_mirror(name, mirror, lookup):
    mirror = _merge(MIRROR_DEFAULTS, mirror)
    mirror["name"] = name
    # A token pasted as a YAML block scalar (``token: |``) ends in a newline that every
    # upstream login would then send.
    mirror["username"], mirror["token"] = mirror["username"].strip(), mirror["token"].strip()
    host, port = _parse_hostport(mirror["listen"])
    mirror["listen_host"] = _resolve_host(host, __grains__)
    mirror["listen_port"] = port
    if mirror["debug_listen"]:
        debug_host, debug_port = _parse_hostport(mirror["debug_listen"])
        mirror["debug_listen"] = _hostport(_resolve_host(debug_host, __grains__), debug_port)
    else:
        mirror["debug_listen"] = f"127.0.0.1:{_default_debug_port(port)}"
    mirror["storage"] = _storage_path(mirror, lookup, name)
    if mirror["s3"]:
        mirror["s3"] = _merge(S3_DEFAULTS, mirror["s3"])
    if mirror["redis"]:
        mirror["redis"] = _merge(REDIS_DEFAULTS, mirror["redis"])
    return mirror


def _mirror(name, redact=True):
    conf = _settings(redact=redact)
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
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


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
                f"its .sha256 file (e.g. {asset_url(version, arch)}.sha256, or the published "
                "digest from the release page)"
            )
        return digest
    match = _DIGEST_RE.fullmatch(source_hash)
    if match:
        return match.group(1).lower()
    url = source_hash.format(version=version, arch=arch)
    try:
        text = _fetch_text(url)
    except (requests.RequestException, OSError, UnicodeDecodeError) as exc:
        raise CommandExecutionError(
            f"hub_mirror:install:source_hash: cannot fetch {_redact_url(url)}: {_redact_text(exc, url)}"
        ) from exc
    match = re.search(r"\b([0-9a-fA-F]{64})\b", text)
    if not match:
        raise CommandExecutionError(
            f"hub_mirror:install:source_hash: {_redact_url(url)} holds no sha256 digest"
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
    changes = {}
    if not current:
        changes["package"] = {"old": "", "new": package}
        if not test:
            # refresh: a fresh host (or image) may have no package lists yet.
            result = __salt__["pkg.install"](package, refresh=True)
            current = __salt__["pkg.version"](package)
            if not current:
                raise CommandExecutionError(f"installing package {package} failed: {result}")
            changes["package"]["new"] = f"{package} {current}"
    # The package's own service serves its own config on :5000, on every interface.
    service = conf["lookup"]["package_service"]
    if _package_service_active(conf, service) or not current:
        changes["package_service"] = {"old": "running or enabled", "new": "stopped and disabled"}
        if not test:
            _disable_package_service(conf, service)
    if not changes:
        return {"changes": {}, "comment": f"Package {package} {current} is installed, its service off"}
    verb = "would be" if test else "was"
    return {"changes": changes, "comment": f"Package {package} {verb} installed, its own service stopped"}


def _package_service_active(conf, service):
    """Whether the distribution's own registry service runs or would start at boot."""
    if _supervisor(conf) == "systemd":
        return any(
            _systemctl(verb, "--quiet", f"{service}.service", check=False).returncode == 0
            for verb in ("is-active", "is-enabled")
        )
    script = os.path.join(conf["lookup"]["init_dir"], service)
    running = os.path.exists(script) and subprocess.run(
        [script, "status"], capture_output=True, timeout=60, check=False
    ).returncode == 0
    return running or bool(_rc_links(service))


def _disable_package_service(conf, service):
    # Salt's service.dead would answer "OFFLINE mode" where systemd is not PID 1.
    if _supervisor(conf) == "systemd":
        _systemctl("disable", "--now", "--quiet", f"{service}.service", check=False)
        return
    script = os.path.join(conf["lookup"]["init_dir"], service)
    if os.path.exists(script):
        subprocess.run([script, "stop"], capture_output=True, timeout=60, check=False)
    if shutil.which("update-rc.d"):
        subprocess.run(
            ["update-rc.d", service, "disable"], capture_output=True, timeout=60, check=False
        )


def _install_archive(conf, test):
    version = conf["version"]
    arch = conf["arch"]
    _check_arch_supported(version, arch, __grains__)
    source = conf["install"]["source"]
    url = asset_url(version, arch, source)
    binary = _binary_path(conf)
    record = _read_record(conf)
    # The record keeps a digest of the URL, not the URL: it may hold a token.
    wanted = {"version": version, "arch": arch, "source_sha256": hashlib.sha256(url.encode()).hexdigest()}
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
    _makedirs(bin_dir, 0o755)
    with tempfile.TemporaryDirectory(dir=bin_dir, prefix=".download-") as work:
        tarball = os.path.join(work, os.path.basename(urllib.parse.urlparse(url).path))
        try:
            actual = _download(url, tarball)
        except (requests.RequestException, OSError) as exc:
            raise CommandExecutionError(
                f"hub_mirror:install:source: downloading {_redact_url(url)} failed: "
                f"{_redact_text(exc, url)}; the installed registry was left as it was"
            ) from exc
        if actual != expected:
            raise CommandExecutionError(
                f"hub_mirror:install:source_hash: sha256 mismatch for {_redact_url(url)}: expected "
                f"{expected}, got {actual}; the installed registry was left as it was. "
                "Check install:source (a wrong or truncated download) or, if upstream really "
                "republished the release, set install:source_hash to its published digest"
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
    record = dict(wanted, source=_redact_url(url), tarball_sha256=actual, binary_sha256=_sha256_file(binary))
    _write_atomic(_record_path(conf), json.dumps(record, indent=2) + "\n", 0o600)
    return {"changes": changes, "comment": f"Installed registry {version} ({arch}) from {_redact_url(url)}"}


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
            **_storage_driver(mirror, dialect),
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
        **_redis(mirror),
    }


def _storage_driver(mirror, dialect):
    storage = _s3_driver(mirror["s3"], dialect) if mirror["s3"] else {
        "filesystem": {"rootdirectory": mirror["storage"]}
    }
    if mirror["redis"]:
        storage["cache"] = {"blobdescriptor": "redis"}
    return storage


def _s3_driver(s3, dialect):
    driver = {"bucket": s3["bucket"], "region": s3["region"], "rootdirectory": s3["rootdirectory"]}
    if s3["accesskey"]:
        driver.update(accesskey=s3["accesskey"], secretkey=s3["secretkey"])
    if s3["endpoint"]:
        driver["regionendpoint"] = s3["endpoint"]
        driver["secure"] = not s3["endpoint"].startswith("http://")
    # 2.8 uses path-style URLs whenever regionendpoint is set; 3.x asks.
    if dialect != "2":
        driver["forcepathstyle"] = s3["path_style"]
    return {"s3": driver}


def _redis(mirror):
    redis = mirror["redis"]
    if not redis:
        return {}
    return {"redis": {"addr": redis["addr"], "password": redis["password"], "db": redis["db"]}}


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


def _config_header(name):
    """The first line of every registry config hub_mirror writes: what marks it as ours."""
    return f"# Managed by Salt (hub_mirror mirror {name}). Local changes are overwritten.\n"


# What hub_mirror before 2026-12 wrote: still ours when it finds an orphan.
_LEGACY_CONFIG_HEADER = "# Managed by Salt (hub_mirror). Local changes are overwritten.\n"


def _config_text(name, config):
    return _config_header(name) + yaml.safe_dump(config, default_flow_style=False, sort_keys=False)


def _paths(conf, name):
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
        "pidfile": os.path.join(lookup["run_dir"], f"{name}.pid"),
        "log": os.path.join(lookup["log_dir"], f"{name}.log"),
        # Not a path: whose processes serve the mirror (see _mirror_processes).
        "user": lookup["user"],
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
    # Fixed modes whatever the umask: under 077 the service user could not reach its files.
    _makedirs(directory, 0o755)
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
    # surrogateescape: a file edited into something that is not UTF-8 just differs.
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _ids(conf, required=True):
    """uid and gid of the service user; a clear error (or None) when the user is missing."""
    import grp  # pylint: disable=import-outside-toplevel
    import pwd  # pylint: disable=import-outside-toplevel

    user, group = conf["lookup"]["user"], conf["lookup"]["group"]
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    except KeyError as exc:
        if not required:
            return None
        raise CommandExecutionError(
            f"hub_mirror:lookup:user: the service user {user!r} or group {group!r} does not "
            "exist; apply hub_mirror.config (it creates them) or create them first"
        ) from exc


def _config_changes(old_text, new_text):
    """Dotted keys that differ between two config texts, with secrets redacted."""
    try:
        old = yaml.safe_load(old_text) if old_text else {}
    except yaml.YAMLError:
        old = None
    old_flat = _flatten(old) if isinstance(old, dict) else None
    if old_flat is None:
        # A local edit that is not a mapping (a list, broken YAML, an alias that contains
        # itself, a billion laughs): all of it goes.
        return {"config": {"old": "not a registry config (edited by hand)", "new": "rendered from pillar"}}
    new_flat = _flatten(yaml.safe_load(new_text))
    changes = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) != new_flat.get(key):
            secret = key in SECRET_CONFIG_KEYS
            changes[key] = {
                "old": REDACTED if secret and key in old_flat else old_flat.get(key),
                "new": REDACTED if secret and key in new_flat else new_flat.get(key),
            }
    return changes


def _flatten(config, limit=10000):
    """{dotted key: value} of a config's leaves; None when it is no config of ours: nested
    too deep (a recursive alias) or too big (aliases multiply: a billion laughs)."""
    out, stack = {}, [(config, "")]
    while stack:
        value, prefix = stack.pop()
        if isinstance(value, dict):
            if prefix.count(".") >= _MAX_DEPTH or len(out) + len(stack) > limit:
                return None
            stack.extend((sub, f"{prefix}{key}.") for key, sub in value.items())
        elif _too_deep(value) is not None:
            return None
        else:
            out[prefix[:-1]] = value
    return out


def _config_files(conf, spec):
    """{paths key: text} of every file ``configure`` writes for a mirror (token included)."""
    paths = _paths(conf, spec["name"])
    rendered = render_config(spec, _config_dialect(conf), paths["credential_helper"])
    texts = {
        "config": _config_text(spec["name"], rendered),
        "offline_config": _config_text(spec["name"], render_offline_config(rendered)),
        "supervise_settings": json.dumps(_supervise_settings(conf, spec), indent=2, sort_keys=True) + "\n",
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
    _check_listen_free(conf, spec)

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
    ids = _ids(conf, required=False)
    storage = _storage_plan(spec, ids)
    if storage:
        changes["storage"] = storage
    warnings = []
    if {"config", "credentials"} & set(changes):
        # Before anything is written: a refused credential changes nothing.
        warnings = _check_upstream(spec)
    if not changes:
        return {"changes": {}, "comment": f"Mirror {mirror} config is up to date", "warnings": warnings}
    if test:
        return {"changes": changes, "comment": f"Mirror {mirror} config would be updated", "warnings": warnings}

    uid, gid = _ids(conf)
    if storage:
        _own_storage(spec["storage"], uid, gid, f"hub_mirror:mirrors:{mirror}:storage")
    for key, text in texts.items():
        if key == "credential_helper" and key in changes:
            _write_atomic(paths[key], text, 0o755)
        elif key in changes:
            _write_atomic(paths[key], text, 0o600, uid, gid)
    return {"changes": changes, "comment": f"Mirror {mirror} config updated", "warnings": warnings}


def _check_listen_free(conf, spec):
    """Refuse an address another process holds. The mirror's own processes may hold it
    (they are told apart by what they serve, not by the address in an old config, which
    a local edit may have changed), so a restart can move or widen the address."""
    ours = None
    for key, host, port in (
        ("listen", spec["listen_host"], spec["listen_port"]),
        ("debug_listen", *_parse_hostport(spec["debug_listen"])),
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                continue
            except OSError as exc:
                error = exc
        if error.errno == errno.EADDRINUSE:
            if ours is None:
                ours = set(_mirror_processes(_paths(conf, spec["name"])))
            holders = _listeners(port)
            if holders and holders <= ours:
                continue
        reason = (
            "is already in use by another process"
            if error.errno == errno.EADDRINUSE
            else f"cannot be bound here ({error.strerror})"
        )
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:{key}: {_hostport(host, port)} {reason}; "
            "choose a free address and port (nothing was changed)"
        )


def _processes():
    """(pid, argv) of every process, from /proc."""
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                args = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
        except OSError:
            continue
        yield int(pid), args


def _mirror_processes(paths):
    """PIDs of every process that serves a mirror: its registry (proxy or offline mode,
    supervised or orphaned) and its supervisor, recognised by the files they serve and
    by running as the service user. Anyone can put "serve <our config>" in an argv: such
    a process would pass as the mirror's own listener, and root would kill it."""
    uid = _service_uid(paths["user"])
    if uid is None:
        return []
    served = {paths["config"], paths["offline_config"]}
    pids = []
    for pid, args in _processes():
        if len(args) >= 3 and args[-2] == "serve" and args[-1] in served:
            pass
        elif len(args) >= 2 and args[-2] == paths["supervise"] and args[-1] == paths["supervise_settings"]:
            pass
        else:
            continue
        if _process_uid(pid) == uid:
            pids.append(pid)
    return pids


def _service_uid(user):
    import pwd  # pylint: disable=import-outside-toplevel

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _process_uid(pid):
    """The real uid of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _listeners(port):
    """PIDs holding a listening TCP socket on ``port`` (any address), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    # fields: sl local_address rem_address st ... inode; 0A is LISTEN.
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, ValueError):
            continue
    holders = set()
    if not inodes:
        return holders
    for pid, _ in _processes():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    holders.add(pid)
                    break
            except OSError:
                continue
    return holders


def _stop_leftovers(paths, timeout=15):
    """Stop whatever still serves a mirror after its service stopped: a registry that a
    killed supervisor left behind, or a supervisor its service manager lost track of."""
    pids = _mirror_processes(paths)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _mirror_processes(paths):
            time.sleep(0.1)
        pids = _mirror_processes(paths)
        if not pids:
            break
    return not pids


def _port_closed(spec):
    try:
        host, port = _parse_hostport(_probe_url(spec)[len("http://") :])
        with socket.create_connection((host.strip("[]"), port), timeout=2):
            return False
    except OSError:
        return True


# What marks a storage directory as a hub_mirror cache: a purge deletes nothing elsewhere.
STORAGE_MARKER = ".hub-mirror-cache"
# The directories the registry writes into, from the storage root down (what it creates
# itself; a chown of these, not of the whole cache, gives a mirror its storage back).
_REGISTRY_DIRS = ("docker", "docker/registry", "docker/registry/v2", "docker/registry/v2/blobs", "docker/registry/v2/repositories")


def _storage_plan(spec, ids):
    """What ``configure`` changes about a mirror's storage directory, or None.

    It creates the directory, or adopts one that is empty or already the service user's,
    and keeps it (and the registry's directories in it) owned by the service user. A
    directory of someone else's with content in it is refused, by name.
    """
    if spec["s3"]:
        return None
    path = spec["storage"]
    key = f"hub_mirror:mirrors:{spec['name']}:storage"
    if not os.path.lexists(path):
        return {"old": "", "new": path}
    if not os.path.isdir(path):
        raise CommandExecutionError(f"{key}: {path} exists and is not a directory; give a directory (nothing was changed)")
    info = os.stat(path)
    marked = os.path.exists(os.path.join(path, STORAGE_MARKER))
    if not marked and os.listdir(path) and (ids is None or info.st_uid != ids[0]):
        raise CommandExecutionError(
            f"{key}: {path} is not empty, belongs to uid {info.st_uid} and is not a hub_mirror "
            "cache: hub_mirror will not take over a directory it did not create. Give a new or "
            "empty directory, or, if it is a cache you mean to hand over, chown it to the "
            "service user (nothing was changed)"
        )
    stale = [
        relative
        for relative in ("", *_REGISTRY_DIRS)
        for full in [os.path.join(path, relative) if relative else path]
        if os.path.isdir(full) and (ids is None or (os.stat(full).st_uid, os.stat(full).st_gid) != ids)
    ]
    if not marked:
        return {"old": f"{path} (not marked as a hub_mirror cache)", "new": "marked, owned by the service user"}
    if stale or info.st_mode & 0o700 != 0o700:
        return {"old": f"not owned by the service user: {', '.join(stale) or 'mode ' + oct(info.st_mode & 0o777)}", "new": "owned by the service user"}
    return None


def _own_storage(path, uid, gid, key="hub_mirror:mirrors:storage"):
    """Create, mark and hand the storage to the service user (see ``_storage_plan``).

    Everything goes through directory fds opened without following symlinks: whoever can
    write a parent of the storage (or, inside it, the service user) could otherwise swap a
    directory for a link between validation and the chown, and be handed /etc.
    """
    _makedirs(path, 0o750)
    fd = _open_dir(path, key)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, os.fstat(fd).st_mode & 0o7777 | 0o750)
        for relative in _REGISTRY_DIRS:
            sub = _open_below(fd, relative)
            if sub is not None:
                os.fchown(sub, uid, gid)
                os.close(sub)
        try:
            marker = os.open(STORAGE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640, dir_fd=fd)
        except FileExistsError:
            return
        with os.fdopen(marker, "w", encoding="utf-8") as handle:
            os.fchmod(marker, 0o640)
            os.fchown(marker, uid, gid)
            handle.write("A hub_mirror registry cache: hub_mirror.remove purge_storage=True deletes it.\n")
    finally:
        os.close(fd)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(path, key):
    """An fd of the directory at the resolved ``path``, proven to be that very directory:
    a symlink swapped in anywhere on the way is refused, not followed."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        raise CommandExecutionError(f"{key}: {path} is no longer a directory ({exc.strerror}); nothing was changed in it") from exc
    if os.readlink(f"/proc/self/fd/{fd}") != path:
        os.close(fd)
        raise CommandExecutionError(
            f"{key}: {path} now leads somewhere else (a directory on the way was replaced by a "
            "symlink); nothing was changed in it. Check who can write its parent directories"
        )
    return fd


def _open_below(fd, relative):
    """An fd of ``relative`` under the directory ``fd``, following no symlink; None if it
    is not a directory."""
    current = fd
    try:
        for part in relative.split("/"):
            try:
                following = os.open(part, _DIR_FLAGS, dir_fd=current)
            except OSError:
                return None
            finally:
                if current != fd:
                    os.close(current)
            current = following
        return current
    except BaseException:
        if current != fd:
            os.close(current)
        raise


def _makedirs(path, mode):
    """``os.makedirs`` whose parents are traversable whatever the umask (a root umask of
    077 would otherwise lock the service user out of its own storage)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for index, directory in enumerate(reversed(missing)):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):
                raise
            continue  # made meanwhile by someone else: theirs, its mode too
        # Through an fd: a chmod by name would follow a symlink swapped in after mkdir.
        fd = os.open(directory, _DIR_FLAGS)
        try:
            os.fchmod(fd, mode if index == len(missing) - 1 else 0o755)
        finally:
            os.close(fd)


def _storage_writable(conf, spec):
    """Prove, as the service user, that the registry can write its storage."""
    if spec["s3"] or not os.path.isdir(spec["storage"]) or os.geteuid() != 0:
        return
    dirs = [spec["storage"]] + [
        os.path.join(spec["storage"], relative)
        for relative in _REGISTRY_DIRS
        if os.path.isdir(os.path.join(spec["storage"], relative))
    ]
    check = "import os, sys; bad = [d for d in sys.argv[1:] if not os.access(d, os.W_OK | os.X_OK)]; print(*bad); sys.exit(bool(bad))"
    proc = subprocess.run(
        [_python(), "-c", check, *dirs], capture_output=True, text=True, timeout=60, check=False, **_service_user_kwargs(conf)
    )
    if proc.returncode != 0:
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:storage: the service user {conf['lookup']['user']} cannot "
            f"write {proc.stdout.strip() or spec['storage']} (a read-only mount, a parent it cannot "
            "enter, or permissions changed by hand); every pull would fail. Fix the directory, "
            "or give another storage path"
        )


def _check_upstream(spec, timeout=10):
    """Warnings about the upstream; raises when it refuses the mirror's credential.

    Asks only what a login asks: ``/v2/`` and, with a credential, the token service the
    upstream names (or ``/v2/`` with Basic auth). No manifest is fetched, so nothing
    counts as a pull. The credential goes only to a realm on the upstream's own site.
    """
    upstream = spec["upstream"].rstrip("/")
    try:
        response = requests.get(f"{upstream}/v2/", timeout=timeout)
    except requests.RequestException as exc:
        return [
            f"mirror {spec['name']}: the upstream {upstream} does not answer ({type(exc).__name__}); "
            "the mirror serves its cache read-only until it does. Check hub_mirror:mirrors:"
            f"{spec['name']}:upstream if it should"
        ]
    if not spec["username"] or response.status_code != 401:
        return []
    scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate"))
    auth = (spec["username"], spec["token"])
    realm = params.get("realm", "")
    try:
        if scheme == "basic":
            check = requests.get(f"{upstream}/v2/", auth=auth, timeout=timeout)
        elif scheme == "bearer" and _same_site(realm, upstream):
            query = {"service": params["service"]} if params.get("service") else {}
            check = requests.get(realm, params=query, auth=auth, timeout=timeout)
        else:
            return [f"mirror {spec['name']}: the credential was not checked (the upstream asks for {scheme or 'no'} auth at {_redact_url(realm) or 'no realm'})"]
    except requests.RequestException as exc:
        return [f"mirror {spec['name']}: the upstream's token service does not answer ({type(exc).__name__}); the credential was not checked"]
    if check.status_code in (401, 403):
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:token: the upstream {upstream} refuses the credential "
            f"of {spec['username']!r} (HTTP {check.status_code}); check username and token "
            "(nothing was changed)"
        )
    return []


def _same_site(url, other):
    """Whether two URLs' hosts share a registrable domain (the last two labels), or are
    the same IP: 3.1 sends credentials to no other token realm, and neither do we."""
    try:
        one, two = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(other).hostname
    except ValueError:
        return False
    if not one or not two:
        return False
    if _is_ip(one) or _is_ip(two):
        return one == two
    return one.split(".")[-2:] == two.split(".")[-2:]


# ---------------------------------------------------------------------------------------
# Service: a hardened systemd unit, or an init script with a restart loop
# ---------------------------------------------------------------------------------------

UNIT_TEMPLATE = """\
# Managed by Salt (hub_mirror). Local changes are overwritten.
[Unit]
Description=hub_mirror pull-through cache {name}
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
ReadWritePaths={read_write}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
{private_ipc}ProtectHostname=yes
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

# Every value below is shell-quoted where it is filled in; none comes from pillar but the
# lookup paths and the account, which validation limits to safe characters first.
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
LOG={log}
start() {{
    # Only called when nothing runs: a pidfile left now names a dead or zombie process,
    # which start-stop-daemon would take for a running one.
    rm -f "$PIDFILE"
    mkdir -p {run_dir} {log_dir}
    touch "$LOG"
    chown {owner} {log_dir} "$LOG"
    chmod 0750 {log_dir}
    chmod 0640 "$LOG"
    # A clean environment, as systemd gives: nothing leaks in from whoever ran this. The
    # supervisor sends its output (and the registry's) to $LOG itself.
    env -i PATH={path} LANG=C.UTF-8 \\
    start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$PIDFILE" \\
        --chuid {owner} --umask 027 --startas {python} -- {supervise} {settings}
}}
stop() {{
    start-stop-daemon --stop --quiet --retry TERM/10/KILL/5 --pidfile "$PIDFILE" --remove-pidfile
}}
running() {{
    start-stop-daemon --status --pidfile "$PIDFILE" || return 1
    # A killed supervisor stays a zombie where PID 1 does not reap (a container's shell,
    # a CI agent): that is not running.
    ! grep -qs '^State:[[:space:]]*Z' "/proc/$(cat "$PIDFILE")/status"
}}
case "$1" in
    start) running || start ;;
    stop) stop || true ;;
    restart|force-reload) stop || true; start ;;
    status) if running; then echo running; else echo stopped; exit 3; fi ;;
    *) echo "usage: $0 {{start|stop|restart|force-reload|status}}" >&2; exit 2 ;;
esac
"""


def _systemd_quote(value, exec_line=False):
    """One word of a unit file setting, quoted so systemd reads back exactly ``value``:
    backslash and quote escaped, ``%`` specifiers doubled, and on Exec lines ``$`` too."""
    if _has_control(value):
        raise ValueError(f"a control character cannot go into a unit file: {value!r}")
    value = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_line:
        value = value.replace("$", "$$")
    return f'"{value}"'


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


def _supervise_settings(conf, spec):
    """What the supervisor needs, as the settings file it reads: pillar values reach it
    only as JSON, never through a unit file, a script or a command line."""
    paths = _paths(conf, spec["name"])
    return {
        "binary": _binary_path(conf),
        "config": paths["config"],
        "offline_config": paths["offline_config"],
        "listen": _probe_url(spec)[len("http://") :],
        "upstream": spec["upstream"],
        "credentials": paths["credentials"],
        "storage": "" if spec["s3"] else spec["storage"],
        "log": "" if _supervisor(conf) == "systemd" else paths["log"],
    }


def _service_files(conf, spec):
    """The files that define the service, as {path: (text, mode)}."""
    paths = _paths(conf, spec["name"])
    command = [_python(), paths["supervise"], paths["supervise_settings"]]
    lookup = conf["lookup"]
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
                name=spec["name"],
                command=" ".join(_systemd_quote(word, exec_line=True) for word in command),
                read_write=_systemd_quote(spec["storage"]),
                capabilities=capabilities,
                # qemu-user cannot set up an IPC namespace (226/NAMESPACE); nothing here
                # uses SysV IPC and RemoveIPC= stays, so only emulated hosts go without.
                private_ipc="" if _user_mode_emulated() else "PrivateIPC=yes\n",
                user=lookup["user"],
                group=lookup["group"],
            ),
            0o644,
        )
    else:
        quote = shlex.quote
        files[paths["init"]] = (
            INIT_TEMPLATE.format(
                name=spec["name"],
                pidfile=quote(paths["pidfile"]),
                log=quote(paths["log"]),
                run_dir=quote(lookup["run_dir"]),
                log_dir=quote(lookup["log_dir"]),
                owner=quote(f"{lookup['user']}:{lookup['group']}"),
                path=quote(_SYSTEM_PATH),
                python=quote(command[0]),
                supervise=quote(command[1]),
                settings=quote(command[2]),
            ),
            0o755,
        )
    return files


def _user_mode_emulated():
    """True when systemd here runs under qemu-user emulation (binfmt_misc), as in an arm64
    root on an x86-64 machine: PID 1's executable is then the emulator. (qemu shows each
    process the guest binary as its own /proc/self/exe, but not other processes'.)"""
    try:
        return os.path.basename(os.readlink("/proc/1/exe")).startswith("qemu-")
    except OSError:
        return False


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
    return bool(_rc_links(_service_name(name)))


def _rc_links(service):
    """The sysv start links of ``service`` (S<nn><service> in /etc/rc[2-5].d)."""
    return [
        os.path.join(path, entry)
        for level in "2345"
        for path in [f"/etc/rc{level}.d"]
        if os.path.isdir(path)
        for entry in os.listdir(path)
        if entry.startswith("S") and entry[3:] == service
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
    for key in ("config", "offline_config", "supervise_settings"):
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
    # Serving without its service: what a supervisor killed by older versions left behind.
    leftovers = [] if is_running else _mirror_processes(paths)
    _storage_writable(conf, spec)

    changes = {}
    for path in stale:
        changes[path] = "updated" if os.path.exists(path) else "created"
    if not _is_enabled(conf, mirror):
        changes["enabled"] = True
    if leftovers:
        changes["unsupervised"] = {"old": f"pids {', '.join(map(str, leftovers))} serve without a supervisor", "new": "stopped"}
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
    if leftovers and not _stop_leftovers(paths):
        raise CommandExecutionError(f"mirror {mirror}: processes {leftovers} serving it without a supervisor do not stop")
    if "started" in changes or "restarted" in changes:
        _start(conf, mirror, restart=is_running)
    if not _wait_serving(spec, conf["probe_timeout"]):
        raise CommandExecutionError(_rollback(conf, spec, paths))
    # 0600: a digest over the rendered config is still derived from the token.
    _write_atomic(paths["fingerprint"], fingerprint + "\n", 0o600)
    _save_last_good(paths, files)
    return {"changes": changes, "comment": f"Mirror {mirror} runs and answers /v2/"}


def _save_last_good(paths, service_files):
    """Keep every file the mirror just served with (configs and service files), with
    owner and mode, so that a later change that does not come up can be undone whole."""
    snapshot = {}
    for path in [paths["config"], paths["offline_config"], paths["supervise_settings"], *service_files]:
        info = os.stat(path)
        snapshot[path] = {
            "text": _read(path),
            "mode": info.st_mode & 0o7777,
            "uid": info.st_uid,
            "gid": info.st_gid,
        }
    # 0600: the config in it holds the token (2.8).
    _write_atomic(paths["last_good"], json.dumps(snapshot), 0o600)


def _rollback(conf, spec, paths):
    """Bring back every file of the last setup that served; return the failure message."""
    name = spec["name"]
    message = (
        f"mirror {name} did not answer {_probe_url(spec)}/v2/ within "
        f"{conf['probe_timeout']}s. Recent log:\n{_recent_log(conf, name)}"
    )
    try:
        with open(paths["last_good"], encoding="utf-8") as handle:
            snapshot = json.load(handle)
    except (OSError, ValueError):
        return message
    restore = {path: f for path, f in snapshot.items() if _read(path) != f["text"]}
    if not restore:
        return message
    if _read(paths["config"]) is not None:
        shutil.copy2(paths["config"], paths["config"] + ".failed")
    for path, saved in restore.items():
        _write_atomic(path, saved["text"], saved["mode"], saved["uid"], saved["gid"])
    if paths["unit"] in restore:
        _systemctl("daemon-reload")
    _start(conf, name, restart=True)
    # The restored config serves on its own address, which may not be the new one.
    host, port = _parse_hostport(yaml.safe_load(snapshot[paths["config"]]["text"])["http"]["addr"])
    restored = _wait_serving(dict(spec, listen_host=host, listen_port=port), conf["probe_timeout"])
    return message + (
        "\nRestored the last setup that served "
        f"({'it serves again' if restored else 'it does not answer either'}); "
        f"the new config is kept as {paths['config']}.failed"
    )


def orphans():
    """
    Return the mirrors this host still has a config for but pillar no longer names.
    ``hub_mirror.service`` removes them (their cache stays), so that dropping one mirror
    from pillar touches only that mirror.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.orphans
    """
    conf = settings()
    try:
        entries = os.listdir(conf["lookup"]["config_dir"])
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry[: -len(".yml")]
        if not entry.endswith(".yml") or name in conf["mirrors"] or not _NAME_RE.fullmatch(name):
            continue
        try:
            with open(os.path.join(conf["lookup"]["config_dir"], entry), encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, UnicodeDecodeError):
            continue
        # Only configs hub_mirror wrote: notes.yml, a backup or a package's config.yml stay.
        if first in (_config_header(name), _LEGACY_CONFIG_HEADER):
            found.append(name)
    return sorted(found)


def _mirror_or_orphan(name):
    """A pillar mirror, or one that only its config on disk still describes."""
    conf = settings()
    if name in conf["mirrors"]:
        return conf, conf["mirrors"][name]
    # The name becomes file names in config_dir, unit_dir, init_dir: "../x" would not.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise SaltInvocationError(f"{_shown(name)} is not a mirror name: give one of pillar's or of hub_mirror.orphans")
    text = _read(_paths(conf, name)["config"])
    if text is None and not os.path.exists(_paths(conf, name)["init"]) and not os.path.exists(
        _paths(conf, name)["unit"]
    ):
        return _mirror(name)  # raises: neither in pillar nor on this host
    try:
        storage = ((yaml.safe_load(text or "") or {}).get("storage") or {}).get("filesystem") or {}
        storage = storage.get("rootdirectory", "") if isinstance(storage, dict) else ""
    except (yaml.YAMLError, AttributeError):
        storage = ""  # an edited config: the cache stays where it is
    # The config is the service user's (0600, its own): what it names is checked like
    # pillar storage before a purge may go there.
    errors = _Errors()
    storage = _check_path(errors, "", storage) if storage else None
    if storage:
        _validate_storage(errors, "", storage, conf["lookup"], "")
    storage = os.path.realpath(storage) if storage and not errors.messages else ""
    return conf, {"name": name, "storage": storage, "s3": {}}


def _registry_host(upstream):
    """The name clients use for an upstream: docker.io for Docker Hub's endpoint."""
    host = urllib.parse.urlparse(upstream).netloc
    return "docker.io" if host in ("registry-1.docker.io", "index.docker.io") else host


def endpoint():
    """
    Return this host's mirrors as clients should reach them, for the Salt mine: one entry
    per mirror with the registry it mirrors (``docker.io``, ``ghcr.io``, ...), its URL
    (``advertise``, else the listen address) and whether it answers ``/v2/`` right now.
    Without ``advertise``, a mirror that listens on loopback or on every address
    (``0.0.0.0``) publishes a loopback URL and ``loopback_only: True``: it serves only
    this host.

    Publish it with the mine (minion config or pillar):

    .. code-block:: yaml

        mine_functions:
          hub_mirror.endpoint: []

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.endpoint
        salt-run mine.get 'role:mirror' hub_mirror.endpoint tgt_type=grain
    """
    conf = settings()
    endpoints = []
    for name, spec in sorted(conf["mirrors"].items()):
        local_url = _probe_url(spec)
        url = spec["advertise"].rstrip("/") or local_url
        endpoints.append(
            {
                "mirror": name,
                "registry": _registry_host(spec["upstream"]),
                "url": url,
                "loopback_only": not spec["advertise"]
                and _is_loopback(urllib.parse.urlparse(url).hostname),
                # The advertised address may be a NAT's, which this host need not reach.
                "serving": _answers(local_url, 2),
            }
        )
    return endpoints


def _stop(conf, spec):
    """Stop the service and anything else serving the mirror; True once its port is closed."""
    name = spec["name"]
    paths = _paths(conf, name)
    if _supervisor(conf) == "systemd":
        _systemctl("stop", _service_name(name), check=False)
    elif os.path.exists(paths["init"]):
        _init(conf, name, "stop", check=False)
    _stop_leftovers(paths)
    return not _is_running(conf, name) and not _mirror_processes(paths) and (
        "listen_port" not in spec or _port_closed(spec)
    )


def stop(mirror="dockerhub"):
    """
    Stop ``mirror``'s registry and its supervisor, and anything else still serving its
    config. True once nothing serves it and its port is closed.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.stop
    """
    conf, spec = _mirror(mirror)
    return _stop(conf, spec)


def start(mirror="dockerhub"):
    """
    Start ``mirror``'s registry and wait until it answers ``/v2/``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.start
    """
    conf, spec = _mirror(mirror)
    if not _is_running(conf, mirror):
        _stop_leftovers(_paths(conf, mirror))
        _start(conf, mirror, restart=False)
    return _wait_serving(spec, conf["probe_timeout"])


def _purge_targets(storage):
    """What a purge deletes: only what the registry wrote, in a directory marked as ours."""
    if not storage or not os.path.isfile(os.path.join(storage, STORAGE_MARKER)):
        return []
    names = ["docker"] + [entry for entry in os.listdir(storage) if entry.startswith("scheduler-state.json")]
    return [os.path.join(storage, entry) for entry in names + [STORAGE_MARKER] if os.path.lexists(os.path.join(storage, entry))]


def absent(mirror="dockerhub", purge_storage=False, test=False):
    """
    Stop ``mirror`` and remove its service files, config and fingerprint. The cache in
    its storage directory stays unless ``purge_storage=True``; a purge deletes only what
    the registry wrote, in a directory hub_mirror marked as its cache.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.absent
        salt '*' hub_mirror.absent purge_storage=True
    """
    conf, spec = _mirror_or_orphan(mirror)
    paths = _paths(conf, mirror)
    candidates = [
        paths[k]
        for k in (
            "unit",
            "init",
            "config",
            "offline_config",
            "supervise_settings",
            "credentials",
            "last_good",
            "fingerprint",
        )
    ]
    candidates += [paths["config"] + ".failed"]
    present = [path for path in candidates if os.path.exists(path)]
    purge = _purge_targets(spec["storage"]) if purge_storage else []
    is_running = _is_running(conf, mirror) or bool(_mirror_processes(paths))
    changes = {path: "removed" for path in present}
    comment = ""
    if purge:
        changes[spec["storage"]] = "purged"
    elif purge_storage and spec["storage"] and os.path.isdir(spec["storage"]):
        comment = f"; {spec['storage']} is not marked as a hub_mirror cache, so it was left as it is"
    if is_running:
        changes["stopped"] = True
    if not changes or test:
        comment = (f"Mirror {mirror} would be removed" if changes else f"Mirror {mirror} is absent") + comment
        return {"changes": changes, "comment": comment}
    stopped = _stop(conf, spec)
    if _supervisor(conf) == "systemd":
        _systemctl("disable", "--quiet", _service_name(mirror), check=False)
    elif shutil.which("update-rc.d") and os.path.exists(paths["init"]):
        subprocess.run(
            ["update-rc.d", "-f", _service_name(mirror), "remove"],
            capture_output=True,
            timeout=60,
            check=False,
        )
    if not stopped:
        raise CommandExecutionError(f"mirror {mirror} still serves after its service was stopped: nothing was removed")
    # Stopping takes seconds: the storage chosen before must still be that directory.
    storage_fd = _open_dir(spec["storage"], f"hub_mirror:mirrors:{mirror}:storage") if purge else None
    try:
        for path in present:
            os.unlink(path)
        for path in purge:
            # By the fd's own /proc link, which stays on the opened directory.
            pinned = os.path.join(f"/proc/self/fd/{storage_fd}", os.path.basename(path))
            if stat.S_ISDIR(os.lstat(pinned).st_mode):
                shutil.rmtree(pinned)
            else:
                os.unlink(pinned)
    finally:
        if storage_fd is not None:
            os.close(storage_fd)
    if purge:
        try:
            os.rmdir(spec["storage"])
        except OSError:
            pass  # something of the user's is in it: it stays
    if paths["unit"] in present:
        _systemctl("daemon-reload", check=False)
    return {"changes": changes, "comment": f"Mirror {mirror} removed" + comment}


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
    # A page size above the server's catalog.maxentries is refused (400): the first
    # page finds the largest size it accepts, by bisection.
    accepted, refused_above = None, page_size
    while True:
        response = requests.get(f"{base_url}/v2/_catalog?n={page_size}", timeout=timeout)
        if response.status_code == 400 and "PAGINATION_NUMBER_INVALID" in response.text:
            refused_above = page_size - 1
            if refused_above < 1:
                response.raise_for_status()
        else:
            response.raise_for_status()
            accepted = (page_size, response)
        low = accepted[0] if accepted else 0
        if low >= refused_above:
            break
        page_size = (low + refused_above + 1) // 2
    response = accepted[1]
    repositories = list(response.json().get("repositories") or [])
    seen = set()
    link = next_link(response.headers.get("Link"))
    url = urllib.parse.urljoin(base_url + "/", link) if link else None
    while url and url not in seen:
        seen.add(url)
        response = requests.get(url, timeout=timeout)
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


def catalog(mirror="dockerhub", tags=False, sizes=False, source="api"):
    """
    List every repository cached by ``mirror``.

    ``source="api"`` (the default) asks the registry (``/v2/_catalog``), following its
    pagination within the server's ``catalog.maxentries``; ``source="disk"`` reads the
    storage directory instead, and works with the registry stopped. Either way,
    repositories whose cached content has all expired are left out: the registry keeps
    listing them because their directories stay.

    With ``tags=True`` each repository maps to its cached tags and their digests, read
    from local storage: on a proxy, ``/v2/<name>/tags/list`` shows the upstream's tags,
    not what is cached. With ``sizes=True`` each maps to ``{"size": {"bytes", "human"}}``,
    the bytes its cached images take (a layer shared by repositories counts in each),
    and to ``{"tags": ..., "size": ...}`` with both.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.catalog
        salt '*' hub_mirror.catalog tags=True
        salt '*' hub_mirror.catalog sizes=True source=disk
    """
    _, spec = _mirror(mirror)
    if source not in ("api", "disk"):
        raise SaltInvocationError(
            f"source={source!r}: use api (the registry's /v2/_catalog) or disk (the storage "
            "directory; works with the registry stopped)"
        )
    if source == "api":
        base_url = _probe_url(spec)
        try:
            repositories = _repositories_api(base_url)
        except requests.RequestException as exc:
            reason = "no connection" if isinstance(exc, requests.ConnectionError) else str(exc)
            raise CommandExecutionError(
                f"mirror {mirror} does not answer at {base_url} ({reason}); is it running? "
                f"(salt-call hub_mirror.running mirror={mirror}), or read the storage "
                "directly with source=disk"
            ) from exc
        view = _CacheView(spec["storage"])
    else:
        view = _storage_view(spec)
        repositories = view.repositories()
    live = {repo: set(view.live_revisions(repo)) for repo in repositories}
    repositories = [repo for repo in repositories if live[repo]]
    if not tags and not sizes:
        return repositories
    result = {}
    for repo in repositories:
        cached = {tag: digest for tag, digest in view.tag_links(repo).items() if digest in live[repo]}
        if not sizes:
            result[repo] = cached
            continue
        entry = {"size": _size(view.repository_bytes(repo, live[repo]))}
        result[repo] = {"tags": cached, **entry} if tags else entry
    return result


# ---------------------------------------------------------------------------------------
# Inspect and operate the cache (status, tags, ratelimit, warm, gc, usage)
# ---------------------------------------------------------------------------------------

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_ACCEPT = ", ".join((MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST))
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io", "registry.hub.docker.com")
# Docker Hub's documented way to read the pull quota: a HEAD here is not a pull.
RATELIMIT_REPOSITORY = "ratelimitpreview/test"
# Go parses this as a time long past: the registry's scheduler expires such entries at once.
EXPIRED = "1970-01-01T00:00:00Z"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_GO_TIME_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")
_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_GC_ELIGIBLE_RE = re.compile(r"^(blob|manifest) eligible for deletion: (sha256:[0-9a-f]{64})", re.MULTILINE)
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
_PROMETHEUS_RE = re.compile(
    r'^registry_proxy_(requests|hits|misses|pulled_bytes)(?:_total)?\{[^}]*type="(blob|manifest)"[^}]*\}\s+(\S+)',
    re.MULTILINE,
)


def _human_size(num):
    """``1.5 MiB`` for 1572864: binary units, one decimal."""
    if num is None:
        return None
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return None


def _size(num):
    return {"bytes": num, "human": _human_size(num)} if num is not None else None


def _parse_size(value):
    """
    Bytes for a size: an integer, or a string such as ``500M``, ``20G`` or ``1.5TiB``
    (K, M, G, T, P are powers of 1024, with or without ``i``/``B``). Empty or 0: None.
    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if value in (None, "", 0):
        return None
    if isinstance(value, (int, float)):
        if value < 0 or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(value)
        return int(value) or None
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(value)
    unit = match.group(2).lower()
    factor = 1024 ** ("kmgtp".index(unit) + 1) if unit else 1
    return int(float(match.group(1)) * factor) or None


def _iso(timestamp):
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _parse_go_time(text):
    """Seconds since the epoch for an RFC 3339 time as Go writes it (nanoseconds, Z or offset)."""
    match = _GO_TIME_RE.match(str(text or ""))
    if not match:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    days = _days_from_civil(year, month, day)
    seconds = days * 86400 + hour * 3600 + minute * 60 + second + float(match.group(7) or 0)
    zone = match.group(8)
    if zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    return seconds


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _as_list(value):
    """A list of strings from a list or a comma-separated string (the CLI's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part).strip() for part in value if str(part).strip()]


def _is_docker_hub(upstream):
    return (urllib.parse.urlparse(upstream).hostname or "") in DOCKER_HUB_HOSTS


def _parse_image(image, upstream="https://registry-1.docker.io"):
    """
    ``(repository, reference)`` for an image as users write it: ``alpine``,
    ``alpine:3.20``, ``docker.io/library/alpine``, ``ghcr.io/org/app@sha256:...``.

    A leading registry host is dropped (a mirror serves one upstream) and, for Docker Hub,
    one-part names get ``library/``. Raises ValueError for a malformed reference.
    """
    text = str(image or "").strip()
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        text = rest
    if "@" in text:
        name, reference = text.split("@", 1)
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        if not _DIGEST_RE.fullmatch(reference) or not reference.startswith("sha256:"):
            raise ValueError(f"{image!r}: {reference!r} is not a sha256:<64 hex> digest")
    else:
        name, reference = text, "latest"
        if ":" in text.rsplit("/", 1)[-1]:
            name, reference = text.rsplit(":", 1)
        if not _TAG_RE.fullmatch(reference):
            raise ValueError(f"{image!r}: {reference!r} is not a valid tag")
    if "/" not in name and _is_docker_hub(upstream):
        name = f"library/{name}"
    if not _REPO_RE.fullmatch(name):
        raise ValueError(f"{image!r}: {name!r} is not a valid repository name")
    return name, reference


def _validate_cache_keys(errors, prefix, mirror):
    """The per-mirror keys for operating the cache: ``warm`` and ``max_size``."""
    warm = mirror.get("warm")
    if not isinstance(warm, list):
        errors.add(
            f"{prefix}:warm",
            f"must be a list of images, got {type(warm).__name__}",
            "write e.g. warm: [library/alpine:3.20, library/python:3.12-slim]",
        )
    else:
        for index, image in enumerate(warm):
            try:
                _parse_image(image, mirror.get("upstream") or MIRROR_DEFAULTS["upstream"])
            except ValueError as exc:
                errors.add(f"{prefix}:warm:{index}", str(exc), "write NAME[:TAG] or NAME@sha256:DIGEST")
    try:
        # A 64-bit count at most: Salt's msgpack cannot carry a larger int in a job return.
        if (_parse_size(mirror.get("max_size")) or 0) >= 1 << 63:
            raise ValueError(mirror.get("max_size"))
    except ValueError:
        errors.add(
            f"{prefix}:max_size",
            f"{_shown(mirror.get('max_size'))} is not a size",
            "write e.g. 50G, 500M or a number of bytes; empty for no cap",
        )


def _platform_name(platform):
    """``linux/arm/v7`` for an OCI platform object (or an image config)."""
    if not isinstance(platform, dict):
        return "unknown"
    parts = [platform.get("os") or "unknown", platform.get("architecture") or "unknown"]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def _platform_wanted(name, platforms):
    if platforms is None:
        # Build attestations are index entries too; no runtime pulls them.
        return not name.startswith("unknown/")
    return any(name == wanted or name.startswith(wanted.rstrip("/") + "/") for wanted in platforms)


def _read_schedule(storage):
    """{"repo@digest": (expiry seconds, "blob"|"manifest")} from the proxy's scheduler state."""
    try:
        with open(os.path.join(storage, "scheduler-state.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError):
        return {}
    schedule = {}
    for key, entry in (raw or {}).items():
        if isinstance(entry, dict):
            kind = "manifest" if entry.get("EntryType") == 1 else "blob"
            schedule[key] = (_parse_go_time(entry.get("ExpiryData")), kind)
    return schedule


class _CacheView:
    """
    A read-only view of a mirror's storage, laid out as the registry lays it out
    (REGISTRY_FACTS.md). Content counts as cached while its revision link and data exist
    and its expiry in ``scheduler-state.json`` has not passed: the registry removes the
    links of expired content but leaves the directories, and expires overdue entries at
    its next start.
    """

    def __init__(self, storage, now=None):
        self.storage = storage
        self.v2 = _v2_root(storage)
        self.repos_root = os.path.join(self.v2, "repositories")
        self.now = time.time() if now is None else now
        self.schedule = _read_schedule(storage)
        self._documents = {}
        self._sizes = {}

    def repositories(self):
        """Every repository directory, as the registry's catalog walk finds them."""
        found = []
        pending = [""]
        while pending:
            relative = pending.pop()
            try:
                entries = list(os.scandir(os.path.join(self.repos_root, relative)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name == "_manifests" and relative:
                    found.append(relative)
                elif not entry.name.startswith("_") and entry.is_dir(follow_symlinks=False):
                    pending.append(f"{relative}/{entry.name}" if relative else entry.name)
        return sorted(found)

    def blob_path(self, digest):
        algorithm, _, hexdigest = digest.partition(":")
        return os.path.join(self.v2, "blobs", algorithm, hexdigest[:2], hexdigest, "data")

    def blob_size(self, digest):
        if digest not in self._sizes:
            try:
                self._sizes[digest] = os.stat(self.blob_path(digest)).st_size
            except OSError:
                self._sizes[digest] = None
        return self._sizes[digest]

    def _link(self, repo, kind, digest):
        algorithm, _, hexdigest = digest.partition(":")
        parts = ("_manifests", "revisions") if kind == "manifest" else ("_layers",)
        return os.path.join(self.repos_root, repo, *parts, algorithm, hexdigest, "link")

    def revisions(self, repo):
        """Digests of the manifests linked in ``repo``, expired or not."""
        base = os.path.join(self.repos_root, repo, "_manifests", "revisions", "sha256")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return []
        return [f"sha256:{name}" for name in names if os.path.exists(os.path.join(base, name, "link"))]

    def expires(self, repo, digest):
        entry = self.schedule.get(f"{repo}@{digest}")
        return entry[0] if entry else None

    def live(self, repo, digest):
        if not os.path.exists(self._link(repo, "manifest", digest)) or self.blob_size(digest) is None:
            return False
        expires = self.expires(repo, digest)
        return expires is None or expires > self.now

    def live_revisions(self, repo):
        return [digest for digest in self.revisions(repo) if self.live(repo, digest)]

    def layer_cached(self, repo, digest):
        if not os.path.exists(self._link(repo, "blob", digest)) or self.blob_size(digest) is None:
            return False
        expires = self.expires(repo, digest)
        return expires is None or expires > self.now

    def document(self, digest):
        """A manifest or image config (JSON) from blob storage; None if absent or not JSON."""
        if digest not in self._documents:
            try:
                with open(self.blob_path(digest), "rb") as handle:
                    self._documents[digest] = json.loads(handle.read(4 << 20))
            except (OSError, ValueError):
                self._documents[digest] = None
        return self._documents[digest]

    def references(self, digest):
        """(child manifest descriptors, blob digests) of a manifest."""
        doc = self.document(digest)
        if not isinstance(doc, dict):
            return [], []
        if isinstance(doc.get("manifests"), list):
            return [m for m in doc["manifests"] if isinstance(m, dict) and m.get("digest")], []
        blobs = []
        config = doc.get("config")
        if isinstance(config, dict) and config.get("digest"):
            blobs.append(config["digest"])
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict) and layer.get("digest"):
                blobs.append(layer["digest"])
        for layer in doc.get("fsLayers") or []:  # schema 1
            if isinstance(layer, dict) and layer.get("blobSum"):
                blobs.append(layer["blobSum"])
        return [], blobs

    def closure(self, repo, digest, linked=None):
        """Blob digests a manifest is made of (itself included), through an index's
        children that ``linked(repo, child)`` accepts (default: the cached ones)."""
        linked = linked or self.live
        found, pending = set(), [digest]
        while pending:
            current = pending.pop()
            if current in found:
                continue
            found.add(current)
            children, blobs = self.references(current)
            found.update(blobs)
            pending.extend(c["digest"] for c in children if linked(repo, c["digest"]))
        return found

    def complete(self, repo, digest):
        """A cached manifest whose config and layers are all cached for ``repo``."""
        _, blobs = self.references(digest)
        return self.live(repo, digest) and all(self.layer_cached(repo, blob) for blob in blobs)

    def bytes_of(self, digests):
        return sum(self.blob_size(d) or 0 for d in digests)

    def repository_bytes(self, repo, digests):
        members = set()
        for digest in digests:
            members |= self.closure(repo, digest)
        return self.bytes_of(members)

    def tag_links(self, repo):
        return cached_tags(self.storage, repo)

    def link_time(self, repo, digest):
        try:
            return os.stat(self._link(repo, "manifest", digest)).st_mtime
        except OSError:
            return None

    def describe(self, repo, digest):
        """What a cached manifest is: media type, platforms cached, size, when cached and until when."""
        doc = self.document(digest) or {}
        children, blobs = self.references(digest)
        info = {
            "digest": digest,
            "media_type": doc.get("mediaType")
            or ("application/vnd.docker.distribution.manifest.v1+json" if "fsLayers" in doc else None),
            "cached": _iso(self.link_time(repo, digest)),
            "expires": _iso(self.expires(repo, digest)),
        }
        if children or isinstance(doc.get("manifests"), list):
            info["platforms"] = [
                _platform_name(child.get("platform"))
                for child in children
                if self.complete(repo, child["digest"])
            ]
            info["platforms_available"] = [_platform_name(child.get("platform")) for child in children]
        else:
            config = self.document(blobs[0]) if blobs and "config" in doc else None
            info["platforms"] = [_platform_name(config)] if config and self.complete(repo, digest) else []
        info["size"] = _size(self.bytes_of(self.closure(repo, digest)))
        return info

    def blob_files(self):
        """{digest: size} of every blob in storage."""
        root = os.path.join(self.v2, "blobs", "sha256")
        found = {}
        try:
            prefixes = list(os.scandir(root))
        except OSError:
            return found
        for prefix in prefixes:
            try:
                entries = list(os.scandir(prefix.path))
            except OSError:
                continue
            for entry in entries:
                try:
                    found[f"sha256:{entry.name}"] = os.stat(os.path.join(entry.path, "data")).st_size
                except OSError:
                    continue
        return found

    def marked(self):
        """The blobs ``registry garbage-collect`` keeps: every linked manifest and what it
        references (an index's children by digest, an image's config and layers)."""
        keep = set()
        for repo in self.repositories():
            for digest in self.revisions(repo):
                keep.add(digest)
                children, blobs = self.references(digest)
                keep.update(blobs)
                keep.update(child["digest"] for child in children)
        return keep


def _tree_bytes(path):
    """Apparent size of every file under ``path`` (as ``du -sb``)."""
    total, pending = 0, [path]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _storage_view(spec):
    """The cache view of an existing storage directory; a clear error if there is none."""
    storage = spec["storage"]
    if not os.path.isdir(storage):
        raise CommandExecutionError(
            f"mirror {spec['name']} has no storage directory {storage}: nothing was cached "
            f"there (hub_mirror:mirrors:{spec['name']}:storage; apply hub_mirror.config to create it)"
        )
    return _CacheView(storage)


def tags(repo, mirror="dockerhub"):
    """
    Return the tags of ``repo`` that ``mirror`` has cached, read from its storage (so it
    works with the registry stopped): for each tag its digest, media type, size, when it
    was cached and when the cache expires it, and the platforms actually cached; for a
    multi-arch index also ``platforms_available``, every platform the index lists.

    ``repo`` is written as for ``docker pull``: ``alpine`` means ``library/alpine`` on
    Docker Hub.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.tags library/alpine
        salt '*' hub_mirror.tags myorg/app mirror=ghcr
    """
    _, spec = _mirror(mirror)
    try:
        name, _ = _parse_image(repo, spec["upstream"])
    except ValueError as exc:
        raise SaltInvocationError(f"repo: {exc}") from exc
    view = _storage_view(spec)
    live = set(view.live_revisions(name))
    if not live:
        expired = os.path.isdir(os.path.join(view.repos_root, name, "_manifests"))
        raise CommandExecutionError(
            f"mirror {mirror} holds no cached content for {name}"
            + (" (what it cached has expired)" if expired else "")
            + f"; 'hub_mirror.catalog mirror={mirror} source=disk' lists what is cached"
        )
    return {
        tag: view.describe(name, digest)
        for tag, digest in view.tag_links(name).items()
        if digest in live
    }


def _registry_process(paths):
    """{"pid", "mode", "started"} of the registry serving a mirror's config, from /proc."""
    wanted = {paths["config"]: "proxy", paths["offline_config"]: "offline"}
    for pid, args in _processes():
        if len(args) >= 3 and args[-2] == "serve" and args[-1] in wanted:
            return {"pid": pid, "mode": wanted[args[-1]], "started": _iso(_process_start(pid))}
    return None


def _process_start(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="utf-8") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _proxy_counters(expvar=None, metrics=None, dialect="3"):
    """
    Hit and miss counters of the proxy for blobs and manifests.

    3.x exports them as Prometheus ``registry_proxy_*_total{type=...}``; 2.8 only in
    ``/debug/vars``, where every served manifest counts as a hit (hits = requests -
    misses) and blob misses are not counted at all.
    """
    counters = {}
    found = {(kind, name): float(value) for name, kind, value in _PROMETHEUS_RE.findall(metrics or "")}
    proxy = ((expvar or {}).get("registry") or {}).get("proxy") or {}
    for kind, plural in (("blob", "blobs"), ("manifest", "manifests")):
        if found:
            requests_, hits, misses, pulled = (
                int(found.get((kind, key), 0)) for key in ("requests", "hits", "misses", "pulled_bytes")
            )
            note = None
        elif proxy.get(plural):
            raw = proxy[plural]
            requests_, misses, pulled = raw.get("Requests", 0), raw.get("Misses", 0), raw.get("BytesPulled", 0)
            hits, note = raw.get("Hits", 0), None
            if dialect == "2" and kind == "manifest":
                hits = max(requests_ - misses, 0)
            elif dialect == "2":
                requests_ = hits = misses = pulled = None
                note = "registry 2.8 does not count blob cache misses (3.x does)"
        else:
            counters[plural] = None
            continue
        counters[plural] = {
            "requests": requests_,
            "hits": hits,
            "misses": misses,
            "hit_ratio": round(hits / requests_, 3) if requests_ else None,
            "pulled": _size(pulled),
        }
        if note:
            counters[plural]["note"] = note
    return counters


def _http_get(url, timeout, **kwargs):
    try:
        return requests.get(url, timeout=timeout, **kwargs)
    except requests.RequestException:
        return None


def _health(debug_url):
    response = _http_get(f"{debug_url}/debug/health", 3)
    if response is None:
        return None
    if response.status_code == 200:
        return "ok"
    return f"unhealthy: {response.text.strip()[:500]}"


def _upstream_reachable(upstream, timeout=5):
    """Any HTTP answer from ``/v2/`` (401 included) means the upstream is reachable."""
    return _http_get(upstream.rstrip("/") + "/v2/", timeout) is not None


def _usage(view, spec):
    blobs = view.blob_files()
    cap = _parse_size(spec["max_size"])
    used = _tree_bytes(view.storage) if os.path.isdir(view.storage) else 0
    try:
        disk = shutil.disk_usage(view.storage)
        filesystem = {"free": _size(disk.free), "total": _size(disk.total)}
    except OSError:
        filesystem = None
    return {
        "storage": view.storage,
        "used": _size(used),
        "blobs": {"count": len(blobs), "size": _size(sum(blobs.values()))},
        "filesystem": filesystem,
        "max_size": _size(cap),
        "over_cap": bool(cap and used > cap),
    }, blobs


def usage(mirror="dockerhub"):
    """
    Return the storage use of ``mirror``: bytes used (apparent size of every file, as
    ``du -sb``), blob count and bytes, cached repositories, what ``hub_mirror.gc`` would
    reclaim now, the filesystem's free space, and the pillar cap ``max_size`` with
    whether it is exceeded. Reads the storage only: works with the registry stopped.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.usage
        salt '*' hub_mirror.usage mirror=ghcr
    """
    _, spec = _mirror(mirror)
    view = _CacheView(spec["storage"])
    report, blobs = _usage(view, spec)
    keep = view.marked()
    report["repositories"] = sum(1 for repo in view.repositories() if view.live_revisions(repo))
    report["reclaimable"] = _size(sum(size for digest, size in blobs.items() if digest not in keep))
    cap = _parse_size(spec["max_size"])
    report["over_by"] = _size(report["used"]["bytes"] - cap) if report["over_cap"] else None
    return {"mirror": mirror, **report}


def status(mirror=None, images=False):
    """
    Return the state of each mirror (or only ``mirror``), keyed by mirror name:

    - ``running`` (the service), ``serving`` (``/v2/`` answers), ``mode`` (``proxy``, or
      ``offline`` while the supervisor serves the cache read-only), ``started``,
      ``version``, ``listen``;
    - ``health`` from the debug listener's storage check, ``upstream_reachable``;
    - ``credential``: whether a username and token are configured (never their value);
    - ``repositories`` cached, ``disk`` (used, free) and ``max_size`` / ``over_cap``;
    - ``proxy``: hit and miss counters with hit ratios for blobs and manifests, since
      the registry started.

    ``images=True`` adds ``images``: every cached repository with its cached tags (what
    the ``hub_mirror.fleet`` runner aggregates).

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.status
        salt '*' hub_mirror.status mirror=dockerhub images=True
    """
    if mirror is not None:
        _mirror(mirror)
    conf = settings()
    binary = _binary_path(conf)
    installed = _binary_version(binary) if os.path.exists(binary) else None
    names = [mirror] if mirror is not None else sorted(conf["mirrors"])
    return {name: _mirror_status(conf, conf["mirrors"][name], installed, images) for name in names}


def _mirror_status(conf, spec, installed, images):
    name = spec["name"]
    paths = _paths(conf, name)
    process = _registry_process(paths)
    running = _is_running(conf, name)
    serving = _answers(_probe_url(spec), 3)
    debug_url = f"http://{spec['debug_listen']}"
    counters = None
    if serving or process:
        expvar_response = _http_get(f"{debug_url}/debug/vars", 5)
        metrics_response = _http_get(f"{debug_url}/metrics", 5)
        try:
            expvar = expvar_response.json() if expvar_response is not None else None
        except ValueError:
            expvar = None
        metrics = metrics_response.text if metrics_response is not None else None
        if expvar or metrics:
            counters = _proxy_counters(expvar, metrics, _dialect(installed or conf["version"]))
    view = _CacheView(spec["storage"])
    disk, _ = _usage(view, spec)
    repositories = [repo for repo in view.repositories() if view.live_revisions(repo)]
    report = {
        "running": running,
        "serving": serving,
        "mode": process["mode"] if process else None,
        "started": process["started"] if process else None,
        "version": installed,
        "listen": _probe_url(spec)[len("http://") :],
        "upstream": spec["upstream"],
        "upstream_reachable": _upstream_reachable(spec["upstream"]),
        "health": _health(debug_url) if (serving or process) else None,
        "credential": bool(spec["username"] and spec["token"]),
        "repositories": len(repositories),
        "disk": {"used": disk["used"], "free": (disk["filesystem"] or {}).get("free")},
        "max_size": disk["max_size"],
        "over_cap": disk["over_cap"],
        "proxy": counters,
    }
    if images:
        report["images"] = {
            repo: {
                tag: digest
                for tag, digest in view.tag_links(repo).items()
                if view.live(repo, digest)
            }
            for repo in repositories
        }
    if not running and process:
        comment = (
            f"a registry (pid {process['pid']}) serves without its supervisor: apply hub_mirror "
            f"or run hub_mirror.stop mirror={name} to heal it"
        )
    elif not running and not serving:
        comment = f"not running (start it: hub_mirror.start mirror={name})"
    elif not serving:
        comment = f"the service runs but {report['listen']} does not answer /v2/"
    else:
        comment = f"serving in {report['mode'] or 'unknown'} mode"
    if report["health"] not in (None, "ok"):
        comment += "; storage health check fails"
    if disk["over_cap"]:
        comment += (
            f"; storage use {disk['used']['human']} exceeds max_size {disk['max_size']['human']}"
            f" (apply hub_mirror.capped or run hub_mirror.prune mirror={name})"
        )
    report["comment"] = comment
    return report


def _parse_ratelimit(headers):
    """(limit, remaining, window seconds, source) from Docker Hub's rate-limit headers."""

    def split(value):
        if not value:
            return None, None
        count, _, rest = value.partition(";")
        window = re.search(r"w=(\d+)", rest)
        try:
            return int(count.strip()), int(window.group(1)) if window else None
        except ValueError:
            return None, None

    limit, window = split(headers.get("ratelimit-limit"))
    remaining, remaining_window = split(headers.get("ratelimit-remaining"))
    return limit, remaining, window or remaining_window, headers.get("docker-ratelimit-source")


def _parse_challenge(header):
    scheme, _, params = (header or "").partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM_RE.findall(params))


def ratelimit(mirror="dockerhub", timeout=15):
    """
    Return the Docker Hub pull quota left for ``mirror``'s credential (anonymous without
    one): ``limit``, ``remaining`` and the ``window`` they apply to, from a HEAD on
    ``ratelimitpreview/test`` with a token from the realm the upstream advertises. A HEAD
    is not a pull: checking uses up nothing. The token is sent only to that realm.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.ratelimit
    """
    _, spec = _mirror(mirror, redact=False)
    upstream = spec["upstream"].rstrip("/")
    target = f"{upstream}/v2/{RATELIMIT_REPOSITORY}/manifests/latest"
    headers = {"Accept": MANIFEST_ACCEPT}
    authenticated = bool(spec["username"] and spec["token"])
    try:
        response = requests.head(target, headers=headers, timeout=timeout)
        if response.status_code == 401:
            scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate"))
            if scheme != "bearer" or not params.get("realm"):
                raise CommandExecutionError(
                    f"the upstream {upstream} of mirror {mirror} asks for {scheme or 'no'} "
                    "authentication, not a Docker Hub style bearer token"
                )
            query = {"scope": f"repository:{RATELIMIT_REPOSITORY}:pull"}
            if params.get("service"):
                query["service"] = params["service"]
            auth = (spec["username"], spec["token"]) if authenticated else None
            token_response = requests.get(params["realm"], params=query, auth=auth, timeout=timeout)
            if token_response.status_code in (401, 403):
                raise CommandExecutionError(
                    f"the token service of {upstream} refused the credential of mirror {mirror}: "
                    f"check hub_mirror:mirrors:{mirror}:username and :token"
                )
            token_response.raise_for_status()
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            response = requests.head(
                target, headers={**headers, "Authorization": f"Bearer {token}"}, timeout=timeout
            )
    except requests.RequestException as exc:
        raise CommandExecutionError(
            f"cannot ask the upstream {upstream} of mirror {mirror} for its rate limit: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    except ValueError as exc:
        raise CommandExecutionError(f"the token service of {upstream} answered no JSON token") from exc
    limit, remaining, window, source = _parse_ratelimit(response.headers)
    report = {
        "mirror": mirror,
        "upstream": upstream,
        "authenticated": authenticated,
        "limit": limit,
        "remaining": remaining,
        "window": {"seconds": window, "human": f"{window / 3600:g}h"} if window else None,
        "source": source,
        "checked": _iso(time.time()),
    }
    if limit is None:
        report["comment"] = (
            f"the upstream sent no rate-limit headers (HTTP {response.status_code}): no pull "
            "limit applies to this credential, or the upstream is not Docker Hub"
        )
    else:
        report["comment"] = (
            f"{remaining} of {limit} pulls left in the current {report['window']['human']} window"
            + ("" if authenticated else " (anonymous: per IP address)")
        )
    return report


def _get_manifest(session, base, repo, reference, timeout):
    response = session.get(
        f"{base}/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}, timeout=timeout
    )
    if response.status_code != 200:
        raise CommandExecutionError(
            f"{repo}:{reference}: the mirror answered HTTP {response.status_code}: {response.text.strip()[:300]}"
        )
    body = response.content
    digest = response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise CommandExecutionError(f"{repo}:{reference}: the manifest is not JSON") from exc
    return digest, doc, len(body)


def _fetch_blob(session, base, repo, digest, timeout):
    fetched = 0
    with session.get(f"{base}/v2/{repo}/blobs/{digest}", stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            raise CommandExecutionError(f"{repo}@{digest}: the mirror answered HTTP {response.status_code}")
        for chunk in response.iter_content(1 << 20):
            fetched += len(chunk)
    return fetched


def _warm_one(spec, base, image, repo, reference, platforms, timeout):
    """Pull one image through the mirror into its cache; a report, never an exception."""
    before = _CacheView(spec["storage"])
    report = {"image": image, "repository": repo, "reference": reference}
    fetched = 0
    # Read before the GET: the GET itself stores the manifest.
    prior = reference if reference.startswith("sha256:") else before.tag_links(repo).get(reference)
    prior = prior if prior and before.live(repo, prior) else None
    try:
        with requests.Session() as session:
            digest, doc, size = _get_manifest(session, base, repo, reference, timeout)
            report["digest"] = digest
            was_cached = digest == prior
            fetched += 0 if was_cached else size
            manifests = [(digest, doc)]
            if isinstance(doc.get("manifests"), list):
                chosen = [
                    entry
                    for entry in doc["manifests"]
                    if isinstance(entry, dict) and _platform_wanted(_platform_name(entry.get("platform")), platforms)
                ]
                if not chosen:
                    available = [_platform_name(e.get("platform")) for e in doc["manifests"] if isinstance(e, dict)]
                    raise CommandExecutionError(
                        f"{image}: the index has none of the platforms {platforms}; it has {available}"
                    )
                report["platforms"] = [_platform_name(entry.get("platform")) for entry in chosen]
                manifests = []
                for entry in chosen:
                    child_cached = before.live(repo, entry["digest"])
                    child_digest, child_doc, child_size = _get_manifest(
                        session, base, repo, entry["digest"], timeout
                    )
                    was_cached = was_cached and child_cached
                    fetched += 0 if child_cached else child_size
                    manifests.append((child_digest, child_doc))
            blobs = []
            for _, manifest in manifests:
                config = manifest.get("config") or {}
                blobs += [config["digest"]] if config.get("digest") else []
                blobs += [layer["digest"] for layer in manifest.get("layers") or [] if layer.get("digest")]
            missing = [blob for blob in dict.fromkeys(blobs) if not before.layer_cached(repo, blob)]
            for blob in missing:
                fetched += _fetch_blob(session, base, repo, blob, timeout)
        # The registry stores a blob it fetched upstream in the background after serving
        # it: wait for it, or the next pull would miss again.
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            after = _CacheView(spec["storage"])
            missing = [blob for blob in missing if not after.layer_cached(repo, blob)]
            if missing:
                time.sleep(0.2)
        if missing:
            raise CommandExecutionError(f"{image}: the mirror did not store {len(missing)} blob(s) within {timeout}s")
        report.update(
            already_cached=was_cached and fetched == 0,
            fetched=_size(fetched),
            blobs=len(set(blobs)),
            error=None,
        )
    except (requests.RequestException, CommandExecutionError) as exc:
        report.update(already_cached=False, fetched=_size(fetched), error=str(exc))
    return report


def _cached_for(view, repo, reference, platforms):
    """Whether ``repo:reference`` is cached with all wanted platforms (disk only)."""
    digest = reference if reference.startswith("sha256:") else view.tag_links(repo).get(reference)
    if not digest or not view.live(repo, digest):
        return False
    children, _ = view.references(digest)
    if not children:
        return view.complete(repo, digest)
    wanted = [c for c in children if _platform_wanted(_platform_name(c.get("platform")), platforms)]
    return bool(wanted) and all(view.complete(repo, child["digest"]) for child in wanted)


def warm(images=None, mirror="dockerhub", platforms=None, parallel=4, timeout=300, test=False):
    """
    Pull ``images`` through ``mirror`` so that they are cached before the first build
    needs them: manifest (or index), then config and layers, ``parallel`` images at a
    time. For a multi-arch index every platform is fetched, or only ``platforms`` (e.g.
    ``linux/amd64,linux/arm64``). Without ``images``, the pillar list
    ``hub_mirror:mirrors:<mirror>:warm`` is used.

    Reports per image the digest, the bytes fetched and whether it was already cached.
    ``test=True`` reads the cache only and says which images would be fetched. Images
    that cannot be fetched make it fail after the others are done.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.warm library/alpine:3.20,library/python:3.12-slim
        salt '*' hub_mirror.warm '["alpine:3.20"]' platforms=linux/amd64 parallel=2
        salt '*' hub_mirror.warm test=True
    """
    _, spec = _mirror(mirror)
    images = _as_list(spec["warm"] if images is None else images)
    platforms = _as_list(platforms) or None
    try:
        parallel = int(parallel)
        timeout = float(timeout)
    except (TypeError, ValueError) as exc:
        raise SaltInvocationError("parallel and timeout must be numbers") from exc
    if parallel < 1:
        raise SaltInvocationError("parallel must be 1 or more")
    parsed, bad = [], []
    for image in images:
        try:
            parsed.append((image, *_parse_image(image, spec["upstream"])))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise SaltInvocationError("cannot warm: " + "; ".join(bad))
    if not parsed:
        return {"changes": {}, "comment": f"No images to warm for mirror {mirror}", "images": {}}

    if test:
        view = _CacheView(spec["storage"])
        missing = [img for img, repo, ref in parsed if not _cached_for(view, repo, ref, platforms)]
        return {
            "changes": {image: "would be fetched" for image in missing},
            "comment": (
                f"{len(missing)} of {len(parsed)} images would be fetched into mirror {mirror}"
                if missing
                else f"All {len(parsed)} images are cached by mirror {mirror}"
            ),
            "images": {img: {"already_cached": img not in missing} for img, _, _ in parsed},
        }

    base = _probe_url(spec)
    if not _answers(base, 5):
        raise CommandExecutionError(
            f"mirror {mirror} does not answer at {base}: nothing was warmed "
            f"(start it: hub_mirror.start mirror={mirror})"
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(parallel, len(parsed))) as pool:
        reports = list(
            pool.map(lambda item: _warm_one(spec, base, *item, platforms, timeout), parsed)
        )
    results = {report.pop("image"): report for report in reports}
    changes = {
        image: {"digest": r["digest"], "fetched": r["fetched"]}
        for image, r in results.items()
        if not r["error"] and not r["already_cached"]
    }
    failed = {image: r["error"] for image, r in results.items() if r["error"]}
    total = sum(r["fetched"]["bytes"] for r in results.values())
    comment = (
        f"Mirror {mirror}: {len(changes)} image(s) fetched ({_human_size(total)}), "
        f"{sum(1 for r in results.values() if r['already_cached'])} already cached"
    )
    if failed:
        raise CommandExecutionError(
            f"{comment}; {len(failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return {"changes": changes, "comment": comment, "images": results}


def _service_user_kwargs(conf):
    """subprocess arguments that run a command as the mirror's service user."""
    if os.geteuid() != 0:
        return {}
    uid, gid = _ids(conf)
    return {"user": uid, "group": gid, "extra_groups": []}


def _registry_env(**overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["OTEL_TRACES_EXPORTER"] = "none"
    env.update(overrides)
    return env


def _wait_stopped(paths, timeout=30):
    deadline = time.monotonic() + timeout
    while _registry_process(paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _registry_process(paths) is None


def _while_stopped(conf, spec, action):
    """Run ``action()`` with the mirror's service stopped, then bring it back.

    Returns (action's result, {"stopped": seconds, "serving": bool or None}). The
    registry must be gone before ``action`` runs: the caller deletes files under it.
    """
    name = spec["name"]
    paths = _paths(conf, name)
    was_running = _is_running(conf, name)
    began = time.monotonic()
    if was_running or _mirror_processes(paths):
        _stop(conf, spec)
    serving = None
    try:
        if not _wait_stopped(paths):
            raise CommandExecutionError(
                f"the registry of mirror {name} still runs (pid {_registry_process(paths)['pid']}): "
                "nothing was deleted"
            )
        result = action()
    finally:
        if was_running:
            _start(conf, name, restart=False)
            serving = _wait_serving(spec, conf["probe_timeout"])
        stopped = time.monotonic() - began
    if was_running and not serving:
        raise CommandExecutionError(
            f"mirror {name} did not answer again within {conf['probe_timeout']}s after the "
            f"maintenance. Recent log:\n{_recent_log(conf, name)}"
        )
    return result, {"stopped": round(stopped, 1) if was_running else None, "serving": serving}


def _run_gc(conf, paths, dry_run, delete_untagged):
    command = [_binary_path(conf), "garbage-collect"]
    command += ["--dry-run"] if dry_run else []
    command += ["--delete-untagged"] if delete_untagged else []
    command.append(paths["config"])
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
            env=_registry_env(),
            **_service_user_kwargs(conf),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CommandExecutionError(f"cannot run {' '.join(command)}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise CommandExecutionError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def gc(mirror="dockerhub", dry_run=True, delete_untagged=False):
    """
    Garbage-collect ``mirror``'s storage with ``registry garbage-collect`` and report the
    bytes freed. Blobs that no cached manifest references (left by expiry, or by pulls
    that fetched layers of manifests that were never stored) are deleted.

    With ``dry_run=True`` (the default) nothing is deleted and the registry keeps
    serving: the report says what would be freed. Otherwise the mirror is stopped for
    the collection (the registry must not run while files are deleted under it) and
    started again; ``stopped`` says for how many seconds. ``delete_untagged=True`` also
    deletes manifests that no tag points at, which on a pull-through cache includes the
    per-platform manifests of every cached multi-arch image: use it only knowingly.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.gc
        salt '*' hub_mirror.gc dry_run=False
    """
    conf, spec = _mirror(mirror)
    paths = _paths(conf, mirror)
    if not os.path.exists(paths["config"]):
        raise CommandExecutionError(
            f"mirror {mirror} has no registry config {paths['config']}; apply hub_mirror.config first"
        )
    view = _storage_view(spec)
    report = {"mirror": mirror, "dry_run": bool(dry_run), "delete_untagged": bool(delete_untagged)}
    if not os.path.isdir(view.repos_root):
        return dict(report, blobs=0, manifests=0, freed=_size(0), comment="Nothing is cached: nothing to collect")
    before = view.blob_files()
    if dry_run:
        output = _run_gc(conf, paths, True, delete_untagged)
        window = None
    else:
        output, window = _while_stopped(
            conf, spec, lambda: _run_gc(conf, paths, False, delete_untagged)
        )
    eligible = _GC_ELIGIBLE_RE.findall(output)
    if dry_run:
        freed = sum(before.get(digest, 0) for kind, digest in eligible if kind == "blob")
    else:
        after = _CacheView(spec["storage"]).blob_files()
        freed = sum(size for digest, size in before.items() if digest not in after)
    report.update(
        blobs=sum(1 for kind, _ in eligible if kind == "blob"),
        manifests=sum(1 for kind, _ in eligible if kind == "manifest"),
        freed=_size(freed),
    )
    if window:
        report.update(window)
    verb = "would free" if dry_run else "freed"
    report["comment"] = (
        f"garbage-collect {verb} {_human_size(freed)} in {report['blobs']} blob(s)"
        + (f"; the mirror was stopped for {window['stopped']}s" if window and window["serving"] else "")
    )
    return report


def _plan_prune(units, used, unreferenced, cap):
    """
    Which cached images to expire, oldest first, to bring ``used`` bytes to ``cap``.

    ``units`` are {"id", "order", "blobs": {digest: size}}; a blob shared by images is
    freed only when the last image using it goes, and ``unreferenced`` bytes go with the
    garbage collection anyway. Returns (chosen ids, bytes freed, bytes used after).
    """
    refcount = {}
    for unit in units:
        for digest in unit["blobs"]:
            refcount[digest] = refcount.get(digest, 0) + 1
    projected = used - unreferenced
    chosen, freed = [], unreferenced
    for unit in sorted(units, key=lambda u: (u["order"], u["id"])):
        if projected <= cap:
            break
        chosen.append(unit["id"])
        for digest, size in unit["blobs"].items():
            refcount[digest] -= 1
            if refcount[digest] == 0:
                projected -= size
                freed += size
    return chosen, freed, projected


def _prune_units(view):
    """One unit per top-level cached manifest (an index with its platforms)."""
    units = []
    for repo in view.repositories():
        revisions = view.revisions(repo)
        children = set()
        for digest in revisions:
            children.update(c["digest"] for c in view.references(digest)[0])
        for digest in revisions:
            if digest in children or f"{repo}@{digest}" not in view.schedule:
                continue
            members = view.closure(repo, digest, linked=lambda r, d: d in revisions)
            units.append(
                {
                    "id": f"{repo}@{digest}",
                    "repo": repo,
                    "order": view.expires(repo, digest) or 0,
                    "manifests": [d for d in members if d in revisions],
                    "blobs": {d: view.blob_size(d) or 0 for d in members},
                }
            )
    return units


class _StubUpstream(http.server.BaseHTTPRequestHandler):
    """Answers ``/v2/`` with no auth challenge: all a maintenance registry needs to start."""

    def do_GET(self):  # pylint: disable=invalid-name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass


def _free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _expire_now(conf, spec, keys, timeout=120):
    """
    Make the registry itself expire scheduler entries ``keys`` now: mark them overdue
    in ``scheduler-state.json`` and run the registry, on the mirror's own config, until
    its scheduler has processed them. It runs on private loopback ports with a stub
    upstream (the proxy refuses to start without one), so it serves and fetches nothing.
    The mirror's service must be stopped.
    """
    state_path = os.path.join(spec["storage"], "scheduler-state.json")
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CommandExecutionError(
            f"cannot read the expiry schedule {state_path} of mirror {spec['name']}: {exc}; "
            "nothing was expired"
        ) from exc
    keys = [key for key in keys if key in state]
    for key in keys:
        state[key]["ExpiryData"] = EXPIRED
    info = os.stat(state_path)
    try:
        _write_atomic(state_path, json.dumps(state), info.st_mode & 0o777, info.st_uid, info.st_gid)
    except OSError as exc:
        raise CommandExecutionError(
            f"cannot write the expiry schedule {state_path} of mirror {spec['name']}: {exc}; "
            "nothing was expired"
        ) from exc

    paths = _paths(conf, spec["name"])
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubUpstream)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    env = _registry_env(
        REGISTRY_HTTP_ADDR=f"127.0.0.1:{_free_loopback_port()}",
        REGISTRY_HTTP_DEBUG_ADDR=f"127.0.0.1:{_free_loopback_port()}",
        REGISTRY_PROXY_REMOTEURL=f"http://127.0.0.1:{stub.server_address[1]}",
    )
    with tempfile.TemporaryFile() as log_file:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [_binary_path(conf), "serve", paths["config"]],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            **_service_user_kwargs(conf),
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                pending = set(keys) & set(_read_schedule(spec["storage"]))
                if not pending:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_file.seek(0)
                    tail = "\n".join(log_file.read().decode(errors="replace").splitlines()[-10:])
                    raise CommandExecutionError(
                        f"the registry did not expire {len(pending)} cached item(s) of mirror "
                        f"{spec['name']} within {timeout}s. Its log:\n{tail}"
                    )
                time.sleep(0.5)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stub.shutdown()
            stub.server_close()


def prune(mirror="dockerhub", max_size=None, test=False):
    """
    Bring ``mirror``'s storage under its cap (``max_size``, default the pillar's
    ``hub_mirror:mirrors:<mirror>:max_size``), freeing space oldest first, by the
    registry's own means: the oldest cached images are marked expired in its scheduler,
    the registry expires them (with the mirror stopped, on private ports), and
    ``registry garbage-collect`` deletes their blobs; then the mirror serves again.
    Nothing is deleted while the mirror's registry runs.

    An image is the unit: a multi-arch index goes with its platforms, and a layer shared
    with an image that stays is kept. Returns ``{"changes": {...}, "comment": ...}``;
    ``test=True`` says what would be expired and freed.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.prune
        salt '*' hub_mirror.prune max_size=20G test=True
    """
    conf, spec = _mirror(mirror)
    try:
        cap = _parse_size(spec["max_size"] if max_size is None else max_size)
    except ValueError as exc:
        raise SaltInvocationError(f"max_size: {max_size!r} is not a size; write e.g. 50G") from exc
    if not cap:
        return {"changes": {}, "comment": f"Mirror {mirror} has no max_size: nothing to enforce"}
    view = _CacheView(spec["storage"])
    used = _tree_bytes(spec["storage"]) if os.path.isdir(spec["storage"]) else 0
    if used <= cap:
        return {
            "changes": {},
            "comment": f"Mirror {mirror} uses {_human_size(used)}, within max_size {_human_size(cap)}",
        }
    if _config_dialect(conf) != "2" and str(spec["ttl"]) == "0":
        raise CommandExecutionError(
            f"mirror {mirror} keeps cached content forever (hub_mirror:mirrors:{mirror}:ttl: 0), so "
            "the registry cannot expire any of it: set a ttl or raise max_size"
        )
    blobs = view.blob_files()
    keep = view.marked()
    unreferenced = sum(size for digest, size in blobs.items() if digest not in keep)
    units = _prune_units(view)
    chosen, freed, projected = _plan_prune(units, used, unreferenced, cap)
    by_id = {unit["id"]: unit for unit in units}
    expire = [f"{by_id[i]['repo']}@{d}" for i in chosen for d in by_id[i]["manifests"]]
    surviving = set()
    for unit in units:
        if unit["id"] not in chosen:
            surviving.update(unit["blobs"])
    for unit_id in chosen:
        repo = by_id[unit_id]["repo"]
        expire += [
            f"{repo}@{d}"
            for d in by_id[unit_id]["blobs"]
            if d not in surviving and f"{repo}@{d}" in view.schedule and view.schedule[f"{repo}@{d}"][1] == "blob"
        ]
    expire = sorted(set(expire))
    changes = {"expired": sorted(chosen), "freed": _size(freed), "used": {"old": _size(used), "new": _size(projected)}}
    if projected > cap:
        changes["warning"] = f"everything expirable is expired and {_human_size(projected)} remain"
    if test:
        return {
            "changes": changes,
            "comment": f"Mirror {mirror} would expire {len(chosen)} image(s) to free {_human_size(freed)}",
        }
    paths = _paths(conf, mirror)
    if not os.path.exists(paths["config"]):
        raise CommandExecutionError(
            f"mirror {mirror} has no registry config {paths['config']}; apply hub_mirror.config first"
        )

    def maintenance():
        if expire:
            _expire_now(conf, spec, expire)
        _run_gc(conf, paths, False, False)

    _, window = _while_stopped(conf, spec, maintenance)
    after = _tree_bytes(spec["storage"])
    changes["freed"] = _size(max(used - after, 0))
    changes["used"]["new"] = _size(after)
    changes.pop("warning", None)
    if after > cap:
        changes["warning"] = f"{_human_size(after)} remain above max_size {_human_size(cap)}"
    return {
        "changes": changes,
        "comment": (
            f"Mirror {mirror}: expired {len(chosen)} image(s), freed {_human_size(used - after)}"
            + (f"; it was stopped for {window['stopped']}s" if window["serving"] else "")
        ),
    }



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
    # Take the mirrors from the Salt mine (DISCOVER_DEFAULTS); empty: only "mirrors".
    "discover": {},
    "runtimes": list(CLIENT_RUNTIMES),
    # A mirror on the LAN answers in milliseconds; this bounds what a dead one costs.
    "probe_timeout": 2,
    # A CA bundle for https mirrors signed by a private CA: the probe verifies with it,
    # and containerd and buildkit get it for those mirrors.
    "ca_file": "",
    # Seconds: re-probe the mirrors at most this far apart from a Salt schedule entry
    # (client_recheck) and take a dead one out of every client without a state run.
    # 0: no schedule.
    "recheck": 0,
    "paths": {
        "docker_daemon_json": "/etc/docker/daemon.json",
        "docker_pidfile": "/var/run/docker.pid",
        "docker_socket": "/var/run/docker.sock",
        "containerd_config": "/etc/containerd/config.toml",
        "containerd_certs_d": "/etc/containerd/certs.d",
        "registries_conf": "/etc/containers/registries.conf",
        "registries_conf_d": "/etc/containers/registries.conf.d",
        "buildkitd_toml": "/etc/buildkit/buildkitd.toml",
        "k3s_registries": "/etc/rancher/k3s/registries.yaml",
        "rke2_registries": "/etc/rancher/rke2/registries.yaml",
        # Where docker.service and its drop-ins may be (first match wins, as in systemd).
        "systemd_units": "/etc/systemd/system:/run/systemd/system:/usr/local/lib/systemd/system:/usr/lib/systemd/system:/lib/systemd/system",
        "docker_default": "/etc/default/docker",
    },
}

DISCOVER_DEFAULTS = {
    # The mirror hosts whose mine to read, e.g. 'G@role:mirror and G@zone:a'.
    "tgt": "",
    "tgt_type": "glob",
    # The mine function (or alias) the mirror hosts publish hub_mirror.endpoint under.
    "function": "hub_mirror.endpoint",
    # A grain such as zone: mirror hosts with this host's value come first.
    "same_grain": "",
    # Minion ids that come first, in this order (before the same_grain matches).
    "prefer": [],
}
# The target types the master's mine lookup understands.
DISCOVER_TGT_TYPES = (
    "glob", "pcre", "list", "grain", "grain_pcre", "pillar", "pillar_pcre", "pillar_exact",
    "ipcidr", "compound", "nodegroup",
)

DOCKER_HUB = "docker.io"
# The Salt schedule entry client_recheck manages, and its shortest interval: each run
# probes every mirror, and one that hangs costs probe_timeout.
RECHECK_JOB = "hub_mirror-client-recheck"
# containerd >= 2.1 gives up connecting to a black-holed mirror host after this, instead
# of the kernel's SYN retries (about 2 min); older containerd ignores the key.
HOSTS_TOML_DIAL_TIMEOUT = "2s"
RECHECK_MIN = 5
# Loaded in name order after registries.conf; a user file sorting later can override it.
REGISTRIES_DROPIN = "50-hub-mirror.conf"
BLOCK_BEGIN = "# BEGIN hub_mirror: managed by Salt; `state.apply hub_mirror.client.clean` removes it"
BLOCK_END = "# END hub_mirror"

_REGISTRY_HOST_RE = re.compile(
    r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?$"
)
# A DNS name (any case, as the reference grammars allow) or an IPv4 address.
_MIRROR_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
# Characters that end or escape a string in JSON, TOML or YAML, or no URL host has.
_URL_FORBIDDEN = set('\\"\'<>`{}|^')
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
        if not isinstance(upstream, str) or not _REGISTRY_HOST_RE.fullmatch(upstream):
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

    discover = client.get("discover") or {}
    if not isinstance(discover, dict):
        errors.add(
            "client:discover",
            f"must be a mapping, got {type(discover).__name__}",
            "write e.g. {tgt: 'G@role:mirror', tgt_type: compound}",
        )
    elif discover:
        _validate_discover(errors, discover)

    timeout = client.get("probe_timeout", CLIENT_DEFAULTS["probe_timeout"])
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        errors.add(
            "client:probe_timeout",
            f"{timeout!r} is not a number of seconds from 0 to 60",
            "use e.g. 2: a mirror that answers at all answers in milliseconds",
        )

    ca_file = client.get("ca_file") or ""
    problem = _ca_file_problem(ca_file) if ca_file else None
    if problem:
        errors.add(
            "client:ca_file",
            problem,
            "give the absolute path of the PEM bundle that signed the https mirrors, or leave it out",
        )

    recheck = client.get("recheck", CLIENT_DEFAULTS["recheck"])
    if (
        not isinstance(recheck, int)
        or isinstance(recheck, bool)
        or not (recheck == 0 or RECHECK_MIN <= recheck <= 86400)
    ):
        errors.add(
            "client:recheck",
            f"{recheck!r} is not 0 or a whole number of seconds from {RECHECK_MIN} to 86400",
            "use e.g. 60 (a dead mirror is out of every client within a minute), or 0 for no schedule",
        )

    paths = client.get("paths") or {}
    if not isinstance(paths, dict):
        errors.add("client:paths", "must be a mapping", "see pillar.example")
        return
    _check_keys(errors, "client:paths", paths, CLIENT_DEFAULTS["paths"])
    for name, value in paths.items():
        if name in CLIENT_DEFAULTS["paths"] and (
            not isinstance(value, str)
            or not all(os.path.isabs(part) for part in value.split(":"))
            or any(unicodedata.category(c)[0] == "C" for c in value)
            or (":" in value and name != "systemd_units")
        ):
            errors.add(
                f"client:paths:{name}",
                f"{value!r} is not an absolute path",
                f"write e.g. {CLIENT_DEFAULTS['paths'][name]}",
            )


def _validate_discover(errors, discover):
    _check_keys(errors, "client:discover", discover, DISCOVER_DEFAULTS)
    tgt = discover.get("tgt")
    if not isinstance(tgt, str) or not tgt.strip():
        errors.add(
            "client:discover:tgt",
            "is required: the mirror hosts whose mine to read",
            "write e.g. 'G@role:mirror' with tgt_type: compound",
        )
    tgt_type = discover.get("tgt_type", DISCOVER_DEFAULTS["tgt_type"])
    if tgt_type not in DISCOVER_TGT_TYPES:
        errors.add(
            "client:discover:tgt_type",
            f"{tgt_type!r} is not a target type the mine understands",
            f"use one of: {', '.join(DISCOVER_TGT_TYPES)}",
        )
    function = discover.get("function", DISCOVER_DEFAULTS["function"])
    if not isinstance(function, str) or not function.strip() or "," in function:
        errors.add(
            "client:discover:function",
            f"{function!r} is not the name of one mine function",
            "use hub_mirror.endpoint, or the alias mine_functions publishes it under",
        )
    same_grain = discover.get("same_grain", "")
    if not isinstance(same_grain, str):
        errors.add(
            "client:discover:same_grain",
            f"{same_grain!r} is not a grain name",
            "write e.g. zone (or a nested one like location:rack)",
        )
    prefer = discover.get("prefer", [])
    if not isinstance(prefer, list) or not all(isinstance(minion, str) for minion in prefer):
        errors.add(
            "client:discover:prefer",
            f"{prefer!r} is not a list of minion ids",
            "write e.g. [mirror1.example.net, mirror2.example.net]",
        )


def _host_problem(host):
    """Why ``host`` (a URL's host, IPv6 in brackets) is no registry host every runtime's
    reference grammar accepts, or None."""
    if host.startswith("["):
        try:
            # No zone (fe80::1%eth0): no runtime's config takes one.
            ipaddress.IPv6Address(host[1:-1] if host.endswith("]") and "%" not in host else "x")
        except ValueError:
            return "is not a bracketed IPv6 address"
        return None
    if not host.isascii():
        try:
            ascii_form = host.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a host name"
        # Docker's and containers/image's reference grammars take ASCII host names only.
        return f"is not ASCII: write its IDNA form {ascii_form}"
    if not _MIRROR_HOST_RE.fullmatch(host):
        return "is not a host name or IP address"
    return None


def _mirror_url_problem(url):
    """Why ``url`` cannot be a mirror for every runtime, or None. Applied to every source
    of a mirror URL (pillar, the mine, a mirror's ``advertise``): what passes here is
    written into JSON, TOML and YAML and parsed by each runtime's reference grammar."""
    if not isinstance(url, str):
        return f"{url!r} is not a URL"
    if "@" in url:
        # Not echoed: the part before the @ may be a password.
        return "a mirror URL holds credentials (not shown here)"
    # urllib silently drops tab/CR/LF, so check the raw text: a newline in a mirror
    # makes dockerd refuse daemon.json and TOML files invalid.
    bad = [c for c in url if unicodedata.category(c)[0] in "CZ" or c in _URL_FORBIDDEN]
    if bad:
        return f"{url!r} holds {bad[0]!r}, which no runtime's config takes in a mirror URL"
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError:
        # e.g. brackets that hold no IPv6 address
        return f"{url!r} is not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{url!r} is not an absolute http or https URL"
    try:
        parsed.port  # pylint: disable=pointless-statement
    except ValueError:
        return f"{url!r} has an invalid port"
    # Docker's registry-mirrors and buildkit's mirrors take a host, nothing more.
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.params:
        return f"{url!r} has a path"
    host = parsed.netloc.rsplit(":", 1)[0] if parsed.port is not None else parsed.netloc
    problem = _host_problem(host)
    if problem:
        return f"{url!r}: its host {problem}"
    return None


def _ca_file_problem(path):
    if not isinstance(path, str) or not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if any(unicodedata.category(c)[0] == "C" for c in path):
        return f"{path!r} holds a control character"
    if not os.path.isfile(path):
        return f"{path} does not exist on this host"
    return None


def _client_conf(conf):
    """The completed ``client`` settings: defaults, URL lists, the record directory."""
    raw = conf.get("client") or {}
    client = _merge(CLIENT_DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    client["mirrors"] = {
        upstream: [url.rstrip("/") for url in ([urls] if isinstance(urls, str) else urls)]
        for upstream, urls in (raw.get("mirrors") or {}).items()
    }
    if raw.get("discover"):
        client["discover"] = _merge(DISCOVER_DEFAULTS, raw["discover"])
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
    if not isinstance(theirs, (list, type(None))):
        raise ValueError("its registry-mirrors is not a list: fix it")
    merged = ours + [url for url in (theirs or []) if url.rstrip("/") not in ours]
    return json_set_member(base, "registry-mirrors", json.dumps(merged))


def _strip_daemon_json(current, record):
    """daemon.json without hub_mirror's mirrors; the user's original value where it is intact."""
    ours = {url for urls in record.get("mirrors", {}).values() for url in urls}
    _, listed = _json_member_value(current, "registry-mirrors")
    listed = listed if isinstance(listed, list) else []
    theirs = [url for url in listed if str(url).rstrip("/") not in ours]
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


def strip_block(text, separated=True):
    """``text`` without hub_mirror's marked block, and without the newline add_block put
    before it when it was ``separated`` from the user's text (the record says; a user who
    later wrote lines above a block that began the file wrote that newline themselves)."""
    if text is None:
        return None
    begin = text.find(BLOCK_BEGIN + "\n")
    if begin < 0 or (begin > 0 and text[begin - 1] != "\n"):
        return text
    end = text.find(BLOCK_END + "\n", begin)
    if end < 0:
        return text
    end += len(BLOCK_END) + 1
    return text[: max(begin - 1, 0) if separated else begin] + text[end:]


def add_block(base, body):
    """``base`` with a marked block holding ``body`` appended; ``base`` None: the block alone."""
    block = f"{BLOCK_BEGIN}\n{body}{BLOCK_END}\n"
    base = strip_block(base)
    return block if not base else f"{base}\n{block}"


def _strip_block_file(current, record):
    text = strip_block(current, record.get("separated", True))
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
    """``host:port`` of a mirror URL, IPv6 in brackets, as buildkit and registries.conf
    take it."""
    return urllib.parse.urlparse(url).netloc


def _is_ipv6_url(url):
    return _mirror_host(url).startswith("[")


def _toml_str(text):
    """A TOML basic string: JSON's escaping is TOML's, except that TOML also escapes DEL
    and takes non-ASCII as it is (JSON's surrogate-pair escapes are not TOML)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _toml_array(value):
    """A TOML array of strings (or of arrays of strings), each element TOML-escaped."""
    return "[" + ", ".join(_toml_array(item) if isinstance(item, list) else _toml_str(item) for item in value) + "]"


def upstream_server(upstream):
    """The URL a client pulls ``upstream`` from when no mirror is configured."""
    return "https://registry-1.docker.io" if upstream == DOCKER_HUB else f"https://{upstream}"


def render_hosts_toml(base, mirrors, ca_file="", server_certs=None):
    """containerd ``certs.d/<upstream>/hosts.toml``: each mirror as a pull/resolve host, in
    order, then ``server`` (the upstream). In a user's own file the hosts are appended in a
    marked block after the user's own. ``server_certs`` ({"ca": [...], "client": [[cert,
    key]]}) are the docker-style files found in that directory: containerd stops reading
    them once a hosts.toml exists, so the file names them."""
    ((upstream, urls),) = mirrors.items()
    lines = []
    if not strip_block(base):
        lines += [f"server = {_toml_str(upstream_server(upstream))}"]
        for key, value in (server_certs or {}).items():
            if value:
                lines.append(f"{key} = {_toml_array(value)}")
        lines.append("")
    for url in urls:
        lines += [
            f"[host.{_toml_str(url)}]",
            '  capabilities = ["pull", "resolve"]',
            f"  dial_timeout = {_toml_str(HOSTS_TOML_DIAL_TIMEOUT)}",
        ]
        if ca_file and url.startswith("https://"):
            lines.append(f"  ca = {_toml_str(ca_file)}")
        lines.append("")
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def _hosts_toml_conflict(base, mirrors):
    tables = _toml_tables(base)
    taken = [url for urls in mirrors.values() for url in urls if f'host."{url}"' in tables]
    if taken:
        return f"it already has a [host.\"{taken[0]}\"] table of its own"
    return None


def render_registries_conf(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    """A containers-registries.conf(5) v2 drop-in: per upstream a ``[[registry]]`` with its
    mirrors in order; http mirrors are marked insecure. (containers/image takes a CA from
    /etc/containers/certs.d/<host>/, not from this file.)"""
    lines = []
    for upstream, urls in mirrors.items():
        lines += ["[[registry]]", f"prefix = {_toml_str(upstream)}", f"location = {_toml_str(upstream)}", ""]
        for url in urls:
            lines += ["[[registry.mirror]]", f"location = {_toml_str(_mirror_host(url))}"]
            if url.startswith("http://"):
                lines.append("insecure = true")
            lines.append("")
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def render_buildkitd_toml(base, mirrors, ca_file=""):
    """buildkitd.toml: ``[registry."<upstream>"] mirrors`` in order, and ``http = true``
    for each plain-http mirror host (``ca`` for https ones with ``client:ca_file``), in a
    marked block after the user's settings."""
    # One table per name: a mirror host that is also an upstream gets both its mirrors
    # and its http/ca setting there (a TOML table defined twice stops buildkitd).
    tables = {}
    for upstream, urls in mirrors.items():
        hosts = [_mirror_host(url) for url in urls]
        tables.setdefault(upstream, []).append(f"  mirrors = {_toml_array(hosts)}")
    for url in (url for urls in mirrors.values() for url in urls):
        setting = "  http = true" if url.startswith("http://") else f"  ca = [{_toml_str(ca_file)}]" if ca_file else None
        table = tables.setdefault(_mirror_host(url), [])
        if setting and not any(line.split("=")[0] == setting.split("=")[0] for line in table):
            table.append(setting)
    lines = []
    for name, settings in tables.items():
        if settings:
            lines += [f"[registry.{_toml_str(name)}]", *settings, ""]
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def _buildkitd_conflict(base, mirrors):
    tables = _toml_tables(strip_block(base))
    if "registry" in tables:
        return "it has a [registry] table of its own; add the mirrors there yourself"
    ours = list(mirrors) + [_mirror_host(url) for urls in mirrors.values() for url in urls]
    for name in ours:
        if f'registry."{name}"' in tables:
            return f'it already configures [registry."{name}"]; add the mirrors there yourself'
    if re.search(r"^\s*registry\s*\.", strip_block(base) or "", re.M):
        return "it sets registry keys with dotted names; add the mirrors there yourself"
    return None


# -- pure rendering: k3s / rke2 registries.yaml -------------------------------------------


def _registries_yaml_data(text):
    """The mapping of a registries.yaml, or ValueError saying what is wrong with it."""
    data = yaml.safe_load(text) if text else None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("mirrors") or {}, dict):
        raise ValueError("it does not hold a mapping with a mirrors mapping: fix it")
    for upstream, entry in (data.get("mirrors") or {}).items():
        if entry is not None and (
            not isinstance(entry, dict) or not isinstance(entry.get("endpoint") or [], list)
        ):
            raise ValueError(f"its mirrors.{upstream} is not a mapping with an endpoint list: fix it")
    return data


def render_registries_yaml(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    """k3s/rke2 ``registries.yaml`` with our endpoints first under ``mirrors.<upstream>``."""
    data = _registries_yaml_data(base)
    header = ""
    if not base or yaml.safe_load(base) is None:
        header = "# Managed by Salt (hub_mirror): `state.apply hub_mirror.client.clean` removes it.\n"
    if data.get("mirrors") is None:
        data["mirrors"] = {}
    section = data["mirrors"]
    for upstream, urls in mirrors.items():
        entry = section.get(upstream) or {}
        section[upstream] = entry
        theirs = [url for url in entry.get("endpoint") or [] if url not in urls]
        entry["endpoint"] = list(urls) + theirs
    return header + yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def _strip_registries_yaml(current, record):
    data = _registries_yaml_data(current)
    ours = record.get("mirrors", {})
    section = data.get("mirrors")
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


def _render_daemon_json(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    return render_daemon_json(base, mirrors)


_CLIENT_KINDS = {
    "daemon_json": (_render_daemon_json, _strip_daemon_json),
    "hosts_toml": (render_hosts_toml, _strip_block_file),
    "registries_conf": (render_registries_conf, _strip_block_file),
    "buildkitd_toml": (render_buildkitd_toml, _strip_block_file),
    "registries_yaml": (render_registries_yaml, _strip_registries_yaml),
}
# Kinds where hub_mirror's part is a marked block: found and taken out by its markers
# even when the record of it is lost.
_BLOCK_KINDS = ("hosts_toml", "registries_conf", "buildkitd_toml")


# -- host side: probe, detect, record, write ------------------------------------------------


def _probe_mirror(url, deadline, timeout, ca_file=""):
    """None when ``url`` answers ``/v2/`` like a registry before ``deadline``, else why not.

    A raw HTTP/1.1 exchange with every socket wait bounded by the time left, so a mirror
    that trickles bytes cannot stretch the probe (an HTTP library's timeout is per read).
    Salt's proxy environment is ignored: the probe goes where the clients go.
    """
    import ssl  # pylint: disable=import-outside-toplevel  # only the probe needs it

    parsed = urllib.parse.urlparse(url)
    https = parsed.scheme == "https"
    port = parsed.port or (443 if https else 80)

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline")
        return remaining

    try:
        sock = socket.create_connection((parsed.hostname, port), timeout=left())
        try:
            if https:
                context = ssl.create_default_context(cafile=ca_file or None)
                sock.settimeout(left())
                sock = context.wrap_socket(sock, server_hostname=parsed.hostname)
            request = (
                f"GET /v2/ HTTP/1.1\r\nHost: {parsed.netloc}\r\nUser-Agent: hub_mirror-probe\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            sock.settimeout(left())
            sock.sendall(request.encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                sock.settimeout(left())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        finally:
            sock.close()
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout}s"
    except ssl.SSLCertVerificationError as exc:
        return f"its TLS certificate is not trusted ({exc.verify_message}): set hub_mirror:client:ca_file"
    except ssl.SSLError as exc:
        return f"TLS failed ({exc.reason})"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError:
        return "unreachable"
    status_line, _, headers = head.decode("latin-1").partition("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
    if not match:
        return "answered, but not as a registry"
    if match.group(1) not in ("200", "401"):
        return f"answered HTTP {match.group(1)}"
    api = re.search(r"^docker-distribution-api-version:[ \t]*registry/2", headers, re.I | re.M)
    return None if api else "answered, but not as a registry"


def _probe_mirrors(urls, timeout, ca_file=""):
    """{url: None or why it does not answer}, probed in parallel and bounded by
    ``timeout`` in total: a probe still running then (e.g. stuck in a name lookup) is
    abandoned in a daemon thread and counts as no answer."""
    deadline = time.monotonic() + timeout
    results = {}

    def probe(url):
        results[url] = _probe_mirror(url, deadline, timeout, ca_file)

    threads = [threading.Thread(target=probe, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
    return {url: results.get(url, f"no answer within {timeout}s") for url in urls}


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
    """Create ``directory`` and missing parents, 0755 whatever the umask (a 0700
    directory breaks every non-root podman/skopeo); return the ones created, top first."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        os.mkdir(path)
        os.chmod(path, 0o755)
    return list(reversed(missing))


def _write_exact(path, text, new_mode=0o644):
    """Write ``text`` atomically through a symlink to its target (the link stays), keeping
    an existing file's mode and owner; a new file gets ``new_mode`` whatever the umask."""
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


def _remove_exact(path):
    """Remove the file ``path`` names; a symlink's target goes, the link stays as the
    user made it (dangling, as it was before hub_mirror wrote through it)."""
    os.unlink(os.path.realpath(path))


class _ClientRecord:
    """What hub_mirror did to client config files, kept under ``<state_dir>/.client`` (0700).

    Per file (the three ways of owning its bytes): ``existed`` and the user's own version
    in ``originals/`` (0600), a digest of what hub_mirror ``written`` last, and the
    ``mirrors`` in it; what is there now is read at each run. An entry is added only after
    its file was written. A record that is unreadable or incomplete is repaired when
    loaded (what is lost is said in ``repaired``), never fatal.
    """

    def __init__(self, directory):
        self.directory = directory
        self.index_path = os.path.join(directory, "index.json")
        self.repaired = []
        self.dirty = False
        self.corrupt = False
        try:
            with open(self.index_path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except FileNotFoundError:
            raw = {}
        except (OSError, ValueError) as exc:
            self.corrupt = True
            self.repaired.append(
                f"{self.index_path} was unreadable ({exc}): started afresh, the old one is kept "
                "as index.json.corrupt; hub_mirror's marked blocks are still found by their markers"
            )
            self.dirty = True
            raw = {}
        files = raw.get("files") if isinstance(raw, dict) else None
        self.files = {}
        for path, entry in (files if isinstance(files, dict) else {}).items():
            fixed = self._repair(path, entry)
            if fixed is None:
                self.repaired.append(f"dropped the unusable record of {path}")
                self.dirty = True
            else:
                self.files[path] = fixed

    def _repair(self, path, entry):
        if not isinstance(path, str) or not os.path.isabs(path) or not isinstance(entry, dict):
            return None
        if entry.get("runtime") not in CLIENT_RUNTIMES:
            return None
        fixed = dict(entry)
        if not isinstance(fixed.get("existed"), bool):
            fixed["existed"] = os.path.exists(self._original_path(path))
        if not isinstance(fixed.get("written"), str):
            # E.g. an entry left by a write that failed: what is there now is not ours.
            fixed["written"] = None
        mirrors = fixed.get("mirrors")
        if not isinstance(mirrors, dict) or not all(
            isinstance(urls, list) and all(isinstance(url, str) for url in urls) for urls in mirrors.values()
        ):
            fixed["mirrors"] = {}
        if not isinstance(fixed.get("dirs"), list) or not all(isinstance(d, str) for d in fixed["dirs"]):
            fixed["dirs"] = []
        if fixed != entry:
            self.repaired.append(f"repaired the record of {path}")
            self.dirty = True
        return fixed

    def _original_path(self, path):
        return os.path.join(self.directory, "originals", hashlib.sha256(path.encode()).hexdigest())

    def original(self, path):
        try:
            return _read_exact(self._original_path(path))
        except (OSError, ValueError):
            return None

    def keep_original(self, path, text):
        """Keep ``text`` as the user's own version of ``path`` (None: they have none)."""
        saved = self._original_path(path)
        if text is None:
            try:
                os.unlink(saved)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(saved), mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        _write_exact(saved, text, new_mode=0o600)

    def forget(self, path):
        self.files.pop(path, None)
        self.keep_original(path, None)
        self.dirty = True

    def save(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        if self.corrupt and os.path.isfile(self.index_path):
            os.replace(self.index_path, self.index_path + ".corrupt")
        self.corrupt = False
        _write_atomic(self.index_path, json.dumps({"files": self.files}, indent=2) + "\n", 0o600)
        self.dirty = False


_CONFLICTS = {"hosts_toml": _hosts_toml_conflict, "buildkitd_toml": _buildkitd_conflict}


def _plan_file(kind, entry, current, original, mirrors, **render_args):
    """
    The user's own version of one client config file and the text it should hold:
    ``(base, desired, note)``; None for a file that should not exist. Pure.

    ``entry`` is the record of the file (None: hub_mirror never wrote it), ``current``
    its text now, ``original`` the user's version kept in the record. Three-way: a file
    still exactly as hub_mirror wrote it has the kept version as its base; one the user
    changed since has what is there now minus hub_mirror's part, so the user's edits
    stay, now and on clean.
    """
    render, strip = _CLIENT_KINDS[kind]
    if entry is None:
        # A marked block is ours by its markers, even when its record was lost; a file
        # that holds nothing else was created by hub_mirror.
        base = strip_block(current) if kind in _BLOCK_KINDS and current else current
        if kind in _BLOCK_KINDS and current and not base:
            base = None
    elif current is None:
        base = None
    elif entry.get("written") == _sha256_text(current) and (original is not None or not entry["existed"]):
        base = original if entry["existed"] else None
    else:
        base = strip(current, entry)
    note = None
    if mirrors and kind in _CONFLICTS and strip_block(base):
        conflict = _CONFLICTS[kind](strip_block(base), mirrors)
        if conflict:
            mirrors, note = {}, conflict
    desired = render(base, mirrors, **render_args) if mirrors else base
    separated = bool(base)
    if kind in _BLOCK_KINDS and entry is not None and current and desired and _block_span(current):
        # Where the user wrote around hub_mirror's block, the block stays where it is.
        desired = _splice_block(current, desired)
        separated = entry.get("separated", True)
    return base, desired, mirrors, note, separated


def _read_marked(path):
    """A client file's text if it may hold a block of ours, else ""."""
    try:
        return _read_exact(path) or ""
    except (OSError, ValueError):
        return ""


def _block_span(text):
    """(start, end) of hub_mirror's marked block in ``text``, or None."""
    begin = (text or "").find(BLOCK_BEGIN + "\n")
    if begin < 0 or (begin > 0 and text[begin - 1] != "\n"):
        return None
    end = text.find(BLOCK_END + "\n", begin)
    return None if end < 0 else (begin, end + len(BLOCK_END) + 1)


def _splice_block(current, rendered):
    """``current`` with its marked block replaced by the one in ``rendered``."""
    old, new = _block_span(current), _block_span(rendered)
    if not old or not new:
        return rendered
    return current[: old[0]] + rendered[new[0] : new[1]] + current[old[1] :]


def _apply_file(record, runtime, path, kind, plan, current, test):
    """Write one planned file; record it only once the write succeeded. Returns the
    change, or None when the file is already right."""
    base, desired, mirrors, separated = plan
    entry = record.files.get(path)
    if entry is None and not mirrors:
        if kind not in _BLOCK_KINDS or desired == current:
            return None, []
        # A block of ours whose record was lost: found by its markers, it comes out (a
        # dead mirror must not stay); what is left is the user's and stays unrecorded.
        if not test:
            if desired is None:
                _remove_exact(path)
            else:
                _write_exact(path, desired)
        return {"old": "a hub_mirror block with no record", "new": {}}, []
    change = (
        None
        if desired == current
        else {"old": (entry or {}).get("mirrors", {}) if current is not None else {}, "new": mirrors}
    )
    if test:
        return change, []
    kept = record.original(path) if entry is not None and entry["existed"] else None
    if entry is None or base != kept or (base is None) == entry["existed"]:
        # The user's version changed (first touch, or they edited the file): keep it
        # before the file changes, so that no failure later can lose it.
        try:
            record.keep_original(path, base)
        except OSError as exc:
            raise OSError(exc.errno, f"its original could not be kept in {record.directory}: {exc.strerror}") from exc
    dirs = list((entry or {}).get("dirs", []))
    emptied = []
    if desired != current:
        if desired is None:
            _remove_exact(path)
            emptied = dirs
        else:
            dirs += _makedirs_recorded(os.path.dirname(os.path.realpath(path)))
            _write_exact(path, desired)
    if mirrors and desired is not None:
        new_entry = {
            "runtime": runtime,
            "existed": base is not None,
            "dirs": dirs,
            "mirrors": mirrors,
            "written": _sha256_text(desired),
        }
        if kind == "daemon_json":
            new_entry.update(_remember_daemon_json(base))
        elif kind in _BLOCK_KINDS:
            # Whether add_block put a newline between the user's text and the block.
            new_entry["separated"] = separated
        if new_entry != entry:
            record.files[path] = new_entry
            record.dirty = True
    elif entry is not None:
        record.forget(path)
        if desired is not None:
            emptied = []
    return change, emptied


def _dockerd_pid(client):
    """The pid of the running dockerd named by the pidfile, or None."""
    pid_text = (_read_exact(client["paths"]["docker_pidfile"]) or "").strip()
    if not pid_text.isdigit():
        return None
    try:
        comm = _read_exact(f"/proc/{pid_text}/comm")
    except OSError:
        return None
    return int(pid_text) if (comm or "").strip() == "dockerd" else None


def _docker_unit_args(client):
    """[(file, dockerd arguments)] from the docker.service unit in force and its drop-ins
    (systemd's precedence, ``ExecStart=`` resetting the list) and ``DOCKER_OPTS`` in
    /etc/default/docker: how dockerd starts next time, whether it runs now or not."""
    paths = client["paths"]
    unit_dirs = paths["systemd_units"].split(":")
    found = []
    unit = next(
        (os.path.join(d, "docker.service") for d in unit_dirs if os.path.isfile(os.path.join(d, "docker.service"))),
        None,
    )
    dropins = {}
    for directory in reversed(unit_dirs):
        dropin_dir = os.path.join(directory, "docker.service.d")
        if os.path.isdir(dropin_dir):
            for name in os.listdir(dropin_dir):
                if name.endswith(".conf"):
                    dropins[name] = os.path.join(dropin_dir, name)
    exec_starts = []
    for path in ([unit] if unit else []) + [dropins[name] for name in sorted(dropins)]:
        try:
            text = _read_exact(path) or ""
        except (OSError, ValueError):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "ExecStart":
                exec_starts = exec_starts + [(path, value.split())] if value.strip() else []
    found += exec_starts
    try:
        default = _read_exact(paths["docker_default"]) or ""
    except (OSError, ValueError):
        default = ""
    for line in default.splitlines():
        if re.match(r"^\s*(export\s+)?DOCKER_OPTS\s*=", line):
            found.append((paths["docker_default"], line.split("=", 1)[1].strip("\"' ").split()))
    return found


def _docker_args_blocked(client, where, args):
    if any(arg.startswith("--registry-mirror") for arg in args):
        # dockerd refuses a key set both as a flag and in daemon.json, at reload and start.
        return (
            f"dockerd {where} with --registry-mirror: kept it, daemon.json was left alone "
            "(dockerd refuses registry-mirrors set in both); move its mirrors into daemon.json"
        )
    config_files = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config-file=")]
    if config_files and os.path.realpath(config_files[-1]) != os.path.realpath(
        client["paths"]["docker_daemon_json"]
    ):
        return (
            f"dockerd {where} reads {config_files[-1]}, not {client['paths']['docker_daemon_json']}: "
            "set hub_mirror:client:paths:docker_daemon_json to it"
        )
    return None


def _docker_blocked(client):
    """Why merging registry-mirrors into daemon.json would break dockerd, now or at its
    next start, or None."""
    pid = _dockerd_pid(client)
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                args = handle.read().decode("utf-8", "replace").split("\0")
        except OSError:
            args = []
        blocked = _docker_args_blocked(client, "runs", args)
        if blocked:
            return blocked
    for path, args in _docker_unit_args(client):
        blocked = _docker_args_blocked(client, f"is started ({path})", args)
        if blocked:
            return blocked
    return None


def _docker_reload(client, test):
    """Make dockerd re-read daemon.json without a restart; say how, or None if not running."""
    pid = _dockerd_pid(client)
    if pid is None:
        return None
    systemctl = _which("systemctl") if os.path.isdir("/run/systemd/system") else None
    if systemctl:
        # Only when docker.service is the dockerd of our pidfile: another one (a second
        # daemon, or client:paths pointing elsewhere) gets its own SIGHUP.
        main = subprocess.run(
            [systemctl, "show", "--property=MainPID", "--value", "docker"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.strip()
        if main == str(pid):
            if not test:
                _systemctl("reload", "docker")
            return "systemctl reload docker"
    if not test:
        os.kill(pid, signal.SIGHUP)
    return f"SIGHUP to dockerd (pid {pid})"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: how the Docker API is reached."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _dockerd_mirrors(socket_path):
    """The registry mirrors the running dockerd uses (Docker API ``/info``), or None."""
    connection = _UnixHTTPConnection(socket_path, 5)
    try:
        connection.request("GET", "/info")
        response = connection.getresponse()
        if response.status != 200:
            return None
        info = json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return [url.rstrip("/") for url in (info.get("RegistryConfig") or {}).get("Mirrors") or []]


def _wait_dockerd_mirrors(socket_path, expected, timeout=10):
    """Poll until dockerd reports ``expected``; return what it reports last (None: no API)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = _dockerd_mirrors(socket_path)
        if seen is None or seen == expected or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


def _docker_apply(client, old_ours, test):
    """
    Make the running dockerd use the daemon.json just written; return (how, notes).

    A reload applies only the keys present in the file: dockerd keeps mirrors whose key
    was removed. So when hub_mirror's mirrors go and the user's file has no
    registry-mirrors key, dockerd first reloads a copy holding an empty list, and then
    the user's own file goes back in place.
    """
    path = client["paths"]["docker_daemon_json"]
    socket_path = client["paths"]["docker_socket"]
    how = _docker_reload(client, test=True)
    if how is None:
        return None, ["dockerd is not running: it reads daemon.json when it starts"]
    if test:
        return how, []
    final = _read_exact(path)
    _, expected = _json_member_value(final, "registry-mirrors") if final else (None, None)
    if expected is None:
        running = _dockerd_mirrors(socket_path)
        if running is None:
            _docker_reload(client, test=False)
            return how, [
                f"could not ask dockerd at {socket_path} for its mirrors: a reload keeps "
                "mirrors whose key left daemon.json, so restart dockerd if `docker info` "
                f"still lists {', '.join(old_ours)}"
            ]
        if not set(running) & set(old_ours):
            _docker_reload(client, test=False)
            return how, []
        created = _makedirs_recorded(os.path.dirname(path))
        _write_exact(path, json_set_member(final or "{}\n", "registry-mirrors", "[]"))
        try:
            _docker_reload(client, test=False)
            _wait_dockerd_mirrors(socket_path, [])
        finally:
            if final is None:
                _remove_exact(path)
                for directory in reversed(created):
                    os.rmdir(directory)
            else:
                _write_exact(path, final)
        expected = []
    else:
        _docker_reload(client, test=False)
    expected = [url.rstrip("/") for url in expected]
    seen = _wait_dockerd_mirrors(socket_path, expected)
    if seen is None:
        return how, [f"could not ask dockerd at {socket_path} whether it applied daemon.json"]
    if seen != expected:
        return how, [
            f"dockerd still uses mirrors {seen} after the reload: see its log, it refused "
            "daemon.json"
        ]
    return how, []


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


def _user_registries_confs(client):
    """The registries.conf files other than hub_mirror's drop-in, in load order."""
    paths = client["paths"]
    candidates = [paths["registries_conf"]]
    if os.path.isdir(paths["registries_conf_d"]):
        candidates += [
            os.path.join(paths["registries_conf_d"], name)
            for name in sorted(os.listdir(paths["registries_conf_d"]))
            if name.endswith(".conf") and name != REGISTRIES_DROPIN
        ]
    texts = []
    for path in candidates:
        try:
            text = _read_exact(path)
        except (OSError, ValueError):
            continue
        if text:
            texts.append((path, text))
    return texts


def _podman_blocked(client):
    """Why a v2 drop-in would break containers/image here, or None."""
    for path, text in _user_registries_confs(client):
        if _V1_REGISTRIES_RE.search(text):
            return (
                f"{path} uses the old v1 format ([registries.search]); containers/image "
                "refuses to mix it with a v2 drop-in: convert it to v2 first"
            )
    return None


def _registries_conf_registries(text):
    """The ``[[registry]]`` tables of a registries.conf, read line by line (no TOML
    library needed on Salt's Python): ``[{"keys": {key: raw value}, "mirrors": n}]``.
    Anything it cannot read as a plain key counts as a key, so a registry it does not
    understand is taken as the user's own policy."""
    registries, current, in_mirror = [], None, False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _TOML_HEADER_RE.match(line)
        if header:
            name = re.sub(r"\s*\.\s*", ".", header.group(1))
            in_mirror = False
            if name == "registry" and stripped.startswith("[["):
                current = {"keys": {}, "mirrors": 0}
                registries.append(current)
            elif name == "registry.mirror" and current is not None:
                current["mirrors"] += 1
                in_mirror = True
            else:
                current = None
            continue
        if current is None or in_mirror:
            continue
        match = re.match(r"""^\s*([A-Za-z0-9_-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|(\S+))""", line)
        key = match.group(1) if match else stripped
        value = next((g for g in match.groups()[1:] if g is not None), "") if match else ""
        current["keys"][key] = value
    return registries


def _podman_user_policy(client, upstreams):
    """{upstream: why hub_mirror leaves it to the user} for each upstream that the user's
    own registries.conf files configure: a later drop-in's [[registry]] of the same
    prefix replaces theirs, lifting a ``blocked = true`` or dropping their mirrors."""
    kept = {}
    for path, text in _user_registries_confs(client):
        for registry in _registries_conf_registries(text):
            keys = registry["keys"]
            prefix = keys.get("prefix") or keys.get("location")
            if prefix not in upstreams or prefix in kept:
                continue
            if keys.get("blocked") == "true":
                kept[prefix] = f"{prefix} is blocked in {path} (blocked = true): kept it blocked, no mirror added"
            elif registry["mirrors"] or set(keys) - {"prefix", "location"} or keys.get("location", prefix) != prefix:
                kept[prefix] = (
                    f"{path} has a [[registry]] of its own for {prefix}: kept it (a drop-in would "
                    "replace it); add the mirror to it yourself"
                )
    return kept


def _docker_style_certs(directory):
    """containerd's docker-style files in a certs.d host directory: ``*.crt`` CAs and
    ``*.cert``/``*.key`` client pairs, which it reads only while there is no hosts.toml."""
    try:
        # A name that is not UTF-8 could not be written into hosts.toml: left to the user.
        names = sorted(name for name in os.listdir(directory) if name.isprintable() and _utf8(name))
    except OSError:
        return {}
    ca = [os.path.join(directory, name) for name in names if name.endswith(".crt")]
    client = [
        [os.path.join(directory, name), os.path.join(directory, name[: -len(".cert")] + ".key")]
        for name in names
        if name.endswith(".cert") and name[: -len(".cert")] + ".key" in names
    ]
    return {key: value for key, value in (("ca", ca), ("client", client)) if value}


def _runtime_files(runtime, client, alive):
    """([(path, kind, mirrors, render args)] that ``runtime`` should have given the
    answering mirrors, [notes])."""
    paths = client["paths"]
    ca_file = client.get("ca_file") or ""
    if runtime == "docker":
        ours = {DOCKER_HUB: alive[DOCKER_HUB]} if DOCKER_HUB in alive else {}
        return [(paths["docker_daemon_json"], "daemon_json", ours, {})], []
    if runtime == "containerd":
        files, notes = [], []
        # containerd 1.6 does not use a [host."http://[::1]:port"] (measured: it pulls
        # from the next host): an IPv6 mirror only costs it a detour.
        v6 = [url for urls in alive.values() for url in urls if _is_ipv6_url(url)]
        if v6:
            notes.append(f"left out {', '.join(dict.fromkeys(v6))}: containerd does not use an IPv6 address as a mirror host, give it a host name")
        alive = {up: [url for url in urls if url not in v6] for up, urls in alive.items()}
        alive = {up: urls for up, urls in alive.items() if urls}
        for upstream in client["mirrors"]:
            directory = os.path.join(paths["containerd_certs_d"], upstream)
            certs = _docker_style_certs(directory)
            if certs and upstream in alive:
                names = ", ".join(os.path.basename(p) for p in certs.get("ca", []) + [c[0] for c in certs.get("client", [])])
                notes.append(f"kept containerd using {names} in {directory}: hosts.toml names it for {upstream}")
            mirrors = {upstream: alive[upstream]} if upstream in alive else {}
            files.append(
                (os.path.join(directory, "hosts.toml"), "hosts_toml", mirrors, {"ca_file": ca_file, "server_certs": certs})
            )
        return files, notes
    if runtime == "podman":
        notes = []
        kept = _podman_user_policy(client, set(alive))
        mirrors = {}
        for upstream, urls in alive.items():
            if upstream in kept:
                notes.append(kept[upstream])
                continue
            # containers/image's reference grammar has no IPv6 literal: such a location
            # fails every pull of the upstream ("invalid reference format").
            v6 = [url for url in urls if _is_ipv6_url(url)]
            if v6:
                notes.append(f"left out {', '.join(v6)}: podman/skopeo cannot use an IPv6 address as a mirror, give it a host name")
            if len(v6) < len(urls):
                mirrors[upstream] = [url for url in urls if url not in v6]
        path = os.path.join(paths["registries_conf_d"], REGISTRIES_DROPIN)
        return [(path, "registries_conf", mirrors, {})], notes
    if runtime == "buildkit":
        return [(paths["buildkitd_toml"], "buildkitd_toml", alive, {"ca_file": ca_file})], []
    return [(paths[f"{runtime}_registries"], "registries_yaml", alive, {})], []


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
        path = client["paths"]["docker_daemon_json"]
        if path in changes:
            old_ours = changes[path]["old"].get(DOCKER_HUB, [])
            try:
                how, reload_notes = _docker_apply(client, old_ours, test)
            except (OSError, ValueError, CommandExecutionError) as exc:
                how, reload_notes = None, [f"reloading dockerd failed: {exc}"]
            if how:
                changes["reload"] = how
            notes += reload_notes
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


def _plan_runtime(record, client, runtime, alive, wanted, cleaning=False):
    """Everything one runtime's files should become, decided from their bytes now,
    before anything is written: ``{"files": [(path, kind, current, plan | None)],
    "notes": [...], "absent": why not installed, "blocked": why left alone}``. A file
    that cannot be read or rendered gets plan None and a note; nothing is raised."""
    absent = _runtime_present(runtime, client["paths"]) if wanted else None
    recorded = [path for path, entry in record.files.items() if entry["runtime"] == runtime]
    plan = {"files": [], "notes": [], "absent": absent, "blocked": None}
    if absent and not recorded:
        return plan
    files, notes = _runtime_files(runtime, client, alive) if wanted and not absent else ([], [])
    if cleaning and runtime in client["runtimes"]:
        # Blocks of ours that a lost record no longer names: clean finds them by marker.
        candidates, _ = _runtime_files(runtime, client, {})
        files += [
            (path, kind, {}, {})
            for path, kind, _, _ in candidates
            if kind in _BLOCK_KINDS and path not in record.files and _block_span(_read_marked(path))
        ]
    plan["notes"] += notes
    files += [(path, _kind_of(runtime), {}, {}) for path in recorded if path not in {f[0] for f in files}]
    if wanted and runtime == "podman":
        plan["blocked"] = _podman_blocked(client)
    elif wanted and runtime == "docker":
        plan["blocked"] = _docker_blocked(client)
    for path, kind, mirrors, render_args in files:
        if plan["blocked"]:
            mirrors = {}
        entry = record.files.get(path)
        try:
            if os.path.isdir(path):
                raise ValueError("it is a directory")
            current = _read_exact(path)
            base, desired, written, note, separated = _plan_file(
                kind, entry, current, record.original(path) if entry else None, mirrors, **render_args
            )
        except json.JSONDecodeError as exc:
            plan["notes"].append(f"{path} is not valid JSON ({exc}): fix it; it was left as it was")
            plan["files"].append((path, kind, None, None))
            continue
        except Exception as exc:  # pylint: disable=broad-except
            # Whatever a user's file holds, it costs this file only, never the run.
            plan["notes"].append(f"{path} was left as it was: {exc}")
            plan["files"].append((path, kind, None, None))
            continue
        if note:
            plan["notes"].append(f"{path}: {note}")
        plan["files"].append((path, kind, current, (base, desired, written, separated)))
    return plan


def _sync_runtime(record, client, runtime, plan, alive, wanted, test, cleaning=False):
    """Write one runtime's planned files, each recorded once written; return (changes,
    one comment line). A file that cannot be written is reported on the line and left
    unrecorded (or recorded as it was); the other files go on."""
    changes, notes, configured, emptied_dirs = {}, list(plan["notes"]), {}, []
    failed = False
    for path, kind, current, file_plan in plan["files"]:
        if file_plan is None:
            failed = True
            continue
        try:
            change, emptied = _apply_file(record, runtime, path, kind, file_plan, current, test)
        except OSError as exc:
            notes.append(f"{path} could not be written ({exc.strerror or exc}); it is as it was")
            failed = True
            continue
        finally:
            notes += _save_record(record, test)
        if change:
            changes[path] = change
        emptied_dirs += emptied
        for upstream, urls in file_plan[2].items():
            configured.setdefault(upstream, urls)
    # Deepest first; a directory that holds something else stays.
    for directory in sorted(set(emptied_dirs), key=len, reverse=True):
        try:
            os.rmdir(directory)
        except OSError:
            pass
    try:
        notes = _runtime_notes(runtime, client, alive if wanted else {}, changes, configured, test) + notes
    except Exception as exc:  # pylint: disable=broad-except
        notes.insert(0, f"could not check how {runtime} picks this up: {exc}")
    if plan["blocked"]:
        notes.insert(0, plan["blocked"])

    has_mirror = DOCKER_HUB in client["mirrors"] if runtime == "docker" else bool(client["mirrors"])
    restored = "would restore its own config" if test else "restored its own config"
    if configured:
        verb = "would configure" if test and changes else "configured"
        line = f"{runtime}: {verb} {_describe(configured)}"
    elif cleaning:
        line = f"{runtime}: {restored if changes else 'nothing to restore'}"
    else:
        if not wanted:
            line = f"{runtime}: not in hub_mirror:client:runtimes"
        elif plan["absent"]:
            line = f"{runtime}: skipped: {plan['absent']}"
        elif failed or plan["blocked"] or plan["notes"]:
            line = f"{runtime}: left alone"
        elif not has_mirror:
            line = f"{runtime}: no mirror for it in hub_mirror:client:mirrors"
        else:
            line = f"{runtime}: no mirror answers for it, pulls go direct"
        if changes:
            line += f"; {restored}"
    if notes:
        line += " (" + "; ".join(notes) + ")"
    return changes, line


def _sync_all(client, record, alive, test, cleaning=False):
    """Plan every runtime, then write them one by one; (changes, comment lines)."""
    plans = {}
    lines = [f"Record: {note}" for note in record.repaired]
    for runtime in CLIENT_RUNTIMES:
        wanted = runtime in client["runtimes"] and not cleaning
        recorded = any(e["runtime"] == runtime for e in record.files.values())
        if not wanted and not recorded and not (cleaning and runtime in client["runtimes"]):
            continue
        try:
            plans[runtime] = (_plan_runtime(record, client, runtime, alive, wanted, cleaning), wanted)
        except Exception as exc:  # pylint: disable=broad-except
            lines.append(f"{runtime}: left alone: {type(exc).__name__}: {exc}")
    changes = {}
    for runtime, (plan, wanted) in plans.items():
        try:
            runtime_changes, line = _sync_runtime(record, client, runtime, plan, alive, wanted, test, cleaning)
        except Exception as exc:  # pylint: disable=broad-except
            runtime_changes, line = {}, f"{runtime}: failed: {type(exc).__name__}: {exc}"
        if runtime_changes:
            changes[runtime] = runtime_changes
        lines.append(line)
    lines += [f"Record: {note}" for note in _save_record(record, test)]
    return changes, lines


def _save_record(record, test):
    """Save the record if it changed; [why it could not be saved]."""
    if test or not record.dirty:
        return []
    try:
        record.save()
    except OSError as exc:
        return [f"{record.index_path} could not be saved ({exc.strerror or exc}): fix that, then re-run"]
    return []


def _grain(path):
    """This host's value of grain ``path`` (``a:b`` for nested), or None."""
    first, *nested = path.split(":")
    # __grains__ is the loader's context object, not a dict.
    value = __grains__.get(first)
    for part in nested:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _endpoint_problem(entry, own):
    """Why a mine entry of ``hub_mirror.endpoint`` is no mirror for this host, or None."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("registry"), str)
        or not _REGISTRY_HOST_RE.fullmatch(entry["registry"])
        or _mirror_url_problem(entry.get("url"))
    ):
        return "not a hub_mirror.endpoint entry"
    if entry.get("loopback_only") and not own:
        return "listens on loopback only: set advertise on that mirror"
    if entry.get("serving") is not True:
        return "not serving at the last mine update"
    return None


def _discover(client):
    """(mirrors, comment line): ``client:mirrors`` where each registry the mine has a
    mirror for gets the mine's mirrors instead, in preference order: ``prefer`` first,
    then the ``same_grain`` matches, then by minion id."""
    discover, static = client["discover"], client["mirrors"]
    source = f"Mine ({discover['function']} of {discover['tgt']!r})"
    try:
        found = __salt__["mine.get"](discover["tgt"], discover["function"], tgt_type=discover["tgt_type"])
        same = set()
        value = _grain(discover["same_grain"]) if discover["same_grain"] else None
        if value not in (None, "") and not isinstance(value, (dict, list)):
            same = set(
                __salt__["mine.get"](
                    f"{discover['same_grain']}:{value}", discover["function"], tgt_type="grain"
                )
            )
    except Exception as exc:  # pylint: disable=broad-except
        # A masterless minion has no mine to ask, and a master that does not answer must
        # not fail a build host's run.
        return static, f"{source}: not read ({type(exc).__name__}: {exc}); using hub_mirror:client:mirrors"
    own = __opts__.get("id")
    prefer = discover["prefer"]
    ranked, skipped = [], []
    for minion, endpoints in (found if isinstance(found, dict) else {}).items():
        for entry in endpoints if isinstance(endpoints, list) else [endpoints]:
            problem = _endpoint_problem(entry, minion == own)
            name = f"{minion}/{entry['mirror']}" if isinstance(entry, dict) and "mirror" in entry else minion
            if problem:
                skipped.append(f"{name} ({problem})")
                continue
            rank = (
                prefer.index(minion) if minion in prefer else len(prefer),
                minion not in same,
                minion,
                str(entry.get("mirror")),
            )
            ranked.append((rank, entry["registry"], entry["url"].rstrip("/")))
    discovered = {}
    for _, registry, url in sorted(ranked):
        urls = discovered.setdefault(registry, [])
        if url not in urls:
            urls.append(url)
    mirrors = {**static, **{registry: discovered[registry] for registry in sorted(discovered)}}
    line = f"{source}: {_describe(discovered) if discovered else 'no mirror'}"
    if skipped:
        line += f"; skipped {', '.join(sorted(skipped))}"
    kept = [upstream for upstream in static if upstream not in discovered]
    if kept:
        line += f"; from hub_mirror:client:mirrors: {', '.join(kept)}"
    return mirrors, line


def client_configure(test=False):
    """
    Point this host's container clients at the mirrors in ``hub_mirror:client:mirrors``,
    but only at those that answer ``GET /v2/`` within ``client:probe_timeout`` right now.

    With ``client:discover``, the mirrors come from the Salt mine: the
    ``hub_mirror.endpoint`` data of the minions ``discover:tgt`` matches, in preference
    order (``prefer``, then the hosts whose ``same_grain`` value is this host's, then by
    minion id), without mirrors that were not serving at the last mine update or that
    listen on another host's loopback. Each registry the mine has no mirror for keeps its
    ``client:mirrors`` list, e.g. on a masterless minion, which has no mine to read.

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

    The user's policy is kept and the comment says so: an upstream their own
    registries.conf configures (``blocked = true``, their mirrors), dockerd started with
    ``--registry-mirror`` (its unit, drop-ins or /etc/default/docker, running or not),
    docker-style certs in ``certs.d/<upstream>/`` (named from the new hosts.toml). An
    IPv6 mirror goes to docker, buildkit and k3s only: containerd 1.6 does not use one
    and containers/image cannot parse one. Edits the user made since the last run stay.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_configure
        salt '*' hub_mirror.client_configure test=True
    """
    client = _client_conf(settings())
    lines = []
    if client["discover"]:
        client["mirrors"], line = _discover(client)
        lines.append(line)
    urls = list(dict.fromkeys(url for urls in client["mirrors"].values() for url in urls))
    probed = _probe_mirrors(urls, client["probe_timeout"], client.get("ca_file") or "")
    alive = {
        upstream: [url for url in urls if probed[url] is None]
        for upstream, urls in client["mirrors"].items()
    }
    alive = {upstream: urls for upstream, urls in alive.items() if urls}

    if urls:
        lines.append("Mirrors: " + "; ".join(f"{url} {probed[url] or 'answers'}" for url in urls))
    elif client["discover"]:
        lines.append("Neither the mine nor hub_mirror:client:mirrors names a mirror to point clients at")
    else:
        lines.append("hub_mirror:client:mirrors is empty: there is no mirror to point clients at")
    record = _ClientRecord(client["record_dir"])
    changes, runtime_lines = _sync_all(client, record, alive, test)
    return {"changes": changes, "comment": "\n".join(lines + runtime_lines)}


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
    changes, lines = _sync_all(client, record, {}, test, cleaning=True)
    return {
        "changes": changes,
        "comment": "\n".join(lines) or "No client config of hub_mirror's is left to restore",
    }


def _recheck_job(seconds, masterless=False):
    """The schedule entry for ``client:recheck: seconds``: Salt adds a random 1..splay to
    each interval, so ``seconds - splay`` keeps two runs at most ``seconds`` apart while a
    fleet's probes spread over the last fifth of it. Without a master there is nobody to
    return the job to (trying logs an error every run)."""
    splay = max(1, seconds // 5)
    return {
        "function": "hub_mirror.client_configure",
        "seconds": seconds - splay,
        "splay": splay,
        "maxrunning": 1,
        "return_job": not masterless,
    }


def _minion_daemon_running():
    """True inside the salt-minion daemon, or beside a running one (salt-call): then the
    schedule is changed through the daemon's event bus, else in its file only."""
    if __opts__.get("__cli") == "salt-minion":
        return True
    try:
        with open(__opts__.get("pidfile") or "", encoding="utf-8") as handle:
            os.kill(int(handle.read().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def client_recheck(test=False, remove=False):
    """
    Keep the Salt schedule entry ``hub_mirror-client-recheck`` as ``client:recheck``
    asks: with ``recheck: N`` the minion runs ``hub_mirror.client_configure`` (the very
    function ``hub_mirror.client`` runs) at most N seconds apart, with splay, so a mirror
    that stops answering is out of every client within one interval and back in when it
    answers again. A run that finds the same answering mirrors writes nothing and
    reloads nothing; no run ever restarts a daemon. ``recheck: 0`` (or ``remove=True``,
    as ``hub_mirror.client.clean`` does) removes the entry.

    The schedule runs in the salt-minion daemon, under a master or masterless
    (``file_client: local`` with ``master_type: disable``). From ``salt-call --local``
    without a running daemon the entry is written to ``minion.d/_schedule.conf``, which
    the daemon reads when it starts. Returns ``{"changes": {...}, "comment": "..."}``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_recheck
        salt '*' hub_mirror.client_recheck remove=True
    """
    seconds = 0 if remove else _client_conf(settings())["recheck"]
    live = _minion_daemon_running()
    where = {} if live else {"offline": True}
    jobs = __salt__["schedule.list"](show_all=True, return_yaml=False, **where)
    current = jobs.get(RECHECK_JOB) if isinstance(jobs, dict) else None
    wanted = _recheck_job(seconds, __opts__.get("master_type") == "disable") if seconds else None
    have = {key: current.get(key) for key in _recheck_job(60)} if current else None
    how = "" if live else " (no salt-minion runs now: it takes the entry when it starts)"
    if have == wanted:
        if not wanted:
            return {"changes": {}, "comment": ""}
        return {"changes": {}, "comment": f"Recheck: every {seconds} s at most, scheduled{how}"}
    changes = {"recheck": {"old": have, "new": wanted}}
    if test:
        return {"changes": changes, "comment": f"Recheck: the schedule entry {RECHECK_JOB} would change{how}"}
    if wanted is None:
        outcome = __salt__["schedule.delete"](RECHECK_JOB, **where)
    elif current:
        outcome = __salt__["schedule.modify"](RECHECK_JOB, **wanted, **where)
    else:
        outcome = __salt__["schedule.add"](RECHECK_JOB, **wanted, **where)
    if not outcome.get("result"):
        raise CommandExecutionError(f"changing the schedule entry {RECHECK_JOB} failed: {outcome.get('comment')}")
    if wanted is None:
        return {"changes": changes, "comment": f"Recheck: schedule entry {RECHECK_JOB} removed{how}"}
    return {"changes": changes, "comment": f"Recheck: every {seconds} s at most, scheduled{how}"}
