"""
Installing the registry: the release for this CPU, its verified digest, download,
extract, swap in; or the distribution's package.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.parse

import requests
from salt.exceptions import CommandExecutionError

from . import front
from .fsutil import ensure_dir, read_file, sha256_file, write_atomic
from .net import redact_text, redact_url
from .settings import (
    RELEASE_ARCHES_2,
    RELEASE_ARCHES_3,
    RELEASE_URL,
    binary_path,
    dialect_of,
    record_path,
)
from .supervisor import supervisor_for
from .units import DIGEST_RE

# Published SHA-256 of the release tarballs (docs/facts.md).
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


def _read_record(conf):
    try:
        with open(record_path(conf), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def binary_version(binary):
    """The version ``registry --version`` prints, e.g. ``2.8.2+ds1``; None if it won't run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    return words[-1].lstrip("v") if words else None


def asset_url(version, arch, source=RELEASE_URL):
    """The release tarball URL for ``version`` and release ``arch``."""
    return source.format(version=version, arch=arch)


def _check_arch_supported(version, arch, grains):
    arches = RELEASE_ARCHES_2 if dialect_of(version) == "2" else RELEASE_ARCHES_3
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
    match = DIGEST_RE.fullmatch(source_hash)
    if match:
        return match.group(1).lower()
    url = source_hash.format(version=version, arch=arch)
    try:
        text = _fetch_text(url)
    except (requests.RequestException, OSError, UnicodeDecodeError) as exc:
        raise CommandExecutionError(
            f"hub_mirror:install:source_hash: cannot fetch {redact_url(url)}: {redact_text(exc, url)}"
        ) from exc
    match = re.search(r"\b([0-9a-fA-F]{64})\b", text)
    if not match:
        raise CommandExecutionError(f"hub_mirror:install:source_hash: {redact_url(url)} holds no sha256 digest")
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


# Debian's maintainer scripts start a package's service through invoke-rc.d or
# deb-systemd-invoke, which both run this program first: 101 means "do not".
POLICY_RC_D = "/usr/sbin/policy-rc.d"
_POLICY_MARK = "# hub_mirror is installing a package: its own service does not start now"
# Held (flock) by the hub_mirror run whose policy is in place; the kernel lets go of it
# when that run dies, however it dies.
INSTALL_LOCK = "/run/hub-mirror-install.lock"
INSTALL_LOCK_WAIT = 600


def _policy_text(services):
    """A policy that refuses ``services`` (as init scripts and as units) and allows the rest."""
    names = "|".join(shlex.quote(name) for service in services for name in (service, f"{service}.service"))
    return (
        f"#!/bin/sh\n{_POLICY_MARK}; other services may.\n"
        'while [ "${1#--}" != "$1" ]; do shift; done\n'  # invoke-rc.d passes --quiet first
        f'case "$1" in\n    {names}) exit 101 ;;\nesac\nexit 0\n'
    )


def _is_our_policy():
    try:
        text = read_file(POLICY_RC_D)
    except OSError:  # a directory or a link loop there: not ours
        return False
    return text is not None and text.startswith(f"#!/bin/sh\n{_POLICY_MARK}")


@contextlib.contextmanager
def _install_lock():
    """One hub_mirror package install at a time on this host (apt would refuse the second
    anyway): a run that finds the lock free knows no other run's policy is in place."""
    descriptor = os.open(INSTALL_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + INSTALL_LOCK_WAIT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise CommandExecutionError(
                        f"another hub_mirror run has been installing a package for {INSTALL_LOCK_WAIT} s "
                        f"(it holds {INSTALL_LOCK}); apply again once it is done"
                    ) from exc
                time.sleep(0.5)
        yield
    finally:
        os.close(descriptor)  # and with it the lock


def _without_service_starts(pkg_install, services):
    """``pkg_install`` during which Debian starts none of ``services``: docker-registry would
    serve its own config on :5000 and nginx its welcome page on :80 until hub_mirror
    disabled them. A policy the host has (a container image's) is left to decide; one of
    ours found while holding the install lock was left by a run that died mid-install,
    and is replaced and removed."""

    def install(*args, **kwargs):
        with _install_lock():
            if _is_our_policy():
                os.unlink(POLICY_RC_D)
            try:
                # Exclusive: a policy that appeared meanwhile is never overwritten.
                descriptor = os.open(POLICY_RC_D, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
            except FileExistsError:
                return pkg_install(*args, **kwargs)
            try:
                os.fchmod(descriptor, 0o755)
                os.write(descriptor, _policy_text(services).encode())
            except OSError:
                # An empty script would pass for the host's own and allow every start.
                os.unlink(POLICY_RC_D)
                raise
            finally:
                os.close(descriptor)
            try:
                return pkg_install(*args, **kwargs)
            finally:
                if _is_our_policy():
                    os.unlink(POLICY_RC_D)

    return install


def install(conf, grains, pkg_version, pkg_install, test=False):
    """Install the registry the ``hub_mirror`` pillar asks for, and nginx where a mirror has
    a front; idempotent."""
    lookup = conf["lookup"]
    pkg_install = _without_service_starts(pkg_install, [lookup["package_service"], lookup["front_service"]])
    if conf["install"]["method"] == "package":
        result = _install_package(conf, test, pkg_version, pkg_install)
    else:
        result = _install_archive(conf, grains, test)
    if any(front.enabled(spec) for spec in conf["mirrors"].values()):
        changes = front.install(conf, pkg_version, pkg_install, supervisor_for(conf), test)
        if changes:
            result["changes"].update(changes)
            result["comment"] += "; nginx installed for the front" if not test else "; nginx would be installed"
    return result


def _install_package(conf, test, pkg_version, pkg_install):
    package = conf["lookup"]["package"]
    current = pkg_version(package)
    changes = {}
    if not current:
        changes["package"] = {"old": "", "new": package}
        if not test:
            # refresh: a fresh host (or image) may have no package lists yet.
            result = pkg_install(package, refresh=True)
            current = pkg_version(package)
            if not current:
                raise CommandExecutionError(f"installing package {package} failed: {result}")
            changes["package"]["new"] = f"{package} {current}"
    # The package's own service serves its own config on :5000, on every interface.
    service = conf["lookup"]["package_service"]
    supervisor = supervisor_for(conf)
    if supervisor.package_active(service) or not current:
        changes["package_service"] = {"old": "running or enabled", "new": "stopped and disabled"}
        if not test:
            supervisor.package_disable(service)
    if not changes:
        return {"changes": {}, "comment": f"Package {package} {current} is installed, its service off"}
    verb = "would be" if test else "was"
    return {"changes": changes, "comment": f"Package {package} {verb} installed, its own service stopped"}


def _install_archive(conf, grains, test):
    version = conf["version"]
    arch = conf["arch"]
    _check_arch_supported(version, arch, grains)
    source = conf["install"]["source"]
    url = asset_url(version, arch, source)
    binary = binary_path(conf)
    record = _read_record(conf)
    # The record keeps a digest of the URL, not the URL: it may hold a token.
    wanted = {"version": version, "arch": arch, "source_sha256": hashlib.sha256(url.encode()).hexdigest()}
    installed = {k: record.get(k) for k in wanted}
    if installed == wanted and os.path.isfile(binary) and record.get("binary_sha256") == (sha256_file(binary)):
        return {"changes": {}, "comment": f"registry {version} ({arch}) is installed"}

    old = f"{record['version']} ({record['arch']})" if record.get("version") else ""
    if not old and os.path.isfile(binary):
        old = "unrecorded binary"
    changes = {"registry": {"old": old, "new": f"{version} ({arch})"}}
    expected = _expected_digest(version, arch, conf["install"]["source_hash"])
    if test:
        return {"changes": changes, "comment": f"registry {version} ({arch}) would be installed"}

    bin_dir = os.path.dirname(binary)
    ensure_dir(bin_dir, 0o755)
    with tempfile.TemporaryDirectory(dir=bin_dir, prefix=".download-") as work:
        tarball = os.path.join(work, os.path.basename(urllib.parse.urlparse(url).path))
        try:
            actual = _download(url, tarball)
        except (requests.RequestException, OSError) as exc:
            raise CommandExecutionError(
                f"hub_mirror:install:source: downloading {redact_url(url)} failed: "
                f"{redact_text(exc, url)}; the installed registry was left as it was"
            ) from exc
        if actual != expected:
            raise CommandExecutionError(
                f"hub_mirror:install:source_hash: sha256 mismatch for {redact_url(url)}: expected "
                f"{expected}, got {actual}; the installed registry was left as it was. "
                "Check install:source (a wrong or truncated download) or, if upstream really "
                "republished the release, set install:source_hash to its published digest"
            )
        staged = os.path.join(work, "registry")
        _extract_registry(tarball, staged)
        reported = binary_version(staged)
        if reported is None or reported.split("+")[0] != version:
            raise CommandExecutionError(
                f"hub_mirror:version: the downloaded registry reports version {reported!r}, "
                f"not {version} (or does not run on this host); the installed registry was "
                "left as it was"
            )
        os.replace(staged, binary)
    record = dict(wanted, source=redact_url(url), tarball_sha256=actual, binary_sha256=sha256_file(binary))
    write_atomic(record_path(conf), json.dumps(record, indent=2) + "\n", 0o600)
    return {"changes": changes, "comment": f"Installed registry {version} ({arch}) from {redact_url(url)}"}
