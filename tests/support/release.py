"""A loopback stand-in for GitHub release downloads of the ``registry`` binary.

The installer fetches ``registry_<ver>_linux_<arch>.tar.gz`` and its ``.sha256``
from a URL template. Tests point that template at a FileServer serving real
assets, so installs are exercised end to end without the internet: 2.8.2 is
Debian's build packed here; 3.x is upstream's code from the Go module proxy,
built and packed like the release by ``.ci/build-registry``.
"""

import contextlib
import io
import os
import pathlib
import shutil
import subprocess
import tarfile
import threading
import urllib.parse
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from .integrity import sha256_file
from .modules import lib
from .netutil import free_port

# Debian's docker-registry stands in for the 2.8.2 release binary: it reports 2.8.2+ds1.
REGISTRY_BINARY = "/usr/bin/docker-registry"
RELEASE_VERSION = "2.8.2"
# The releases every tier runs on (HM_REGISTRY_VERSIONS narrows it): Debian's 2.8.2 and
# the default install, 3.0.0. 3.1.2 (the newest 3.1.x) is built too, for the tests of
# what 3.1 changed.
REGISTRY_VERSIONS = tuple(os.environ.get("HM_REGISTRY_VERSIONS", "2.8.2,3.0.0").split(","))
NEWEST_3 = "3.1.2"
# What hub_mirror installs when pillar names no version.
DEFAULT_VERSION = lib("settings").DEFAULT_VERSION
# How long 3.x may use a rotated-out token (settings.CREDENTIAL_LIFETIME), in seconds.
CREDENTIAL_LIFETIME_S = int(lib("settings").CREDENTIAL_LIFETIME.rstrip("s"))
REPO = pathlib.Path(__file__).resolve().parents[2]
BUILT_RELEASES = pathlib.Path(os.environ.get("HM_REGISTRY_RELEASES", "/var/cache/hub-mirror-ci/registry-releases"))
BUILD_TIMEOUT = 3600
# Where upstream's release downloads are, below the server's URL: install:source's form.
TEMPLATE_PATH = "/v{version}/registry_{version}_linux_{arch}.tar.gz"
DEB_CACHE = pathlib.Path("/var/cache/hub-mirror-ci/debs")
APT_TIMEOUT = 600
# A fixed mtime keeps assets reproducible: same inputs, same sha256.
ASSET_MTIME = 1_700_000_000

README = "# registry\n\nTest stand-in for a CNCF distribution release asset (hub_mirror tests).\n"
LICENSE = "Apache License, Version 2.0 (stand-in text for tests)\n"


def asset_name(version, arch):
    return f"registry_{version}_linux_{arch}.tar.gz"


def _add_member(tar, name, data, mode):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = ASSET_MTIME
    tar.addfile(info, io.BytesIO(data))


def make_release_asset(out_dir, version, arch, binary=REGISTRY_BINARY):
    """Write ``<out_dir>/v<version>/registry_<version>_linux_<arch>.tar.gz`` and its ``.sha256``.

    The tarball holds ``registry`` (0755), ``README.md`` and ``LICENSE`` at the
    top level, like upstream's. The ``.sha256`` file holds only the hex digest
    and a newline, also like upstream's. Returns {"path", "sha256", "url_path"}.
    """
    release_dir = pathlib.Path(out_dir) / f"v{version}"
    release_dir.mkdir(parents=True, exist_ok=True)
    name = asset_name(version, arch)
    path = release_dir / name
    with tarfile.open(path, "w:gz") as tar:
        _add_member(tar, "registry", pathlib.Path(binary).read_bytes(), 0o755)
        _add_member(tar, "README.md", README.encode(), 0o644)
        _add_member(tar, "LICENSE", LICENSE.encode(), 0o644)
    # Upstream's .sha256 files hold the bare hex digest.
    digest = sha256_file(path).split(":", 1)[1]
    (release_dir / f"{name}.sha256").write_text(digest + "\n")
    return {"path": str(path), "sha256": digest, "url_path": f"/v{version}/{name}"}


def one_registry_version():
    """The version tests marked ``one_registry`` run on: the default install, if the
    matrix has it."""
    return DEFAULT_VERSION if DEFAULT_VERSION in REGISTRY_VERSIONS else REGISTRY_VERSIONS[0]


def built_release(version, arch="amd64"):
    """The path of upstream's ``version`` packed as its release asset by .ci/build-registry,
    which builds it if it is missing (waiting on its lock while .ci/run's build makes it)."""
    path = BUILT_RELEASES / f"v{version}" / asset_name(version, arch)
    if not (path.is_file() and pathlib.Path(f"{path}.sha256").is_file()):
        build = [str(REPO / ".ci" / "build-registry"), version, arch]
        built = subprocess.run(build, timeout=BUILD_TIMEOUT, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            raise RuntimeError(f"{' '.join(build)} failed:\n{built.stderr[-3000:]}")
    return path


def reported_version(version):
    """What ``hub_mirror.version`` says of an installed ``version``: Debian's adds +ds1."""
    return f"{version}+ds1" if version == RELEASE_VERSION else version


def registry_binary(version, dest_dir, arch="amd64"):
    """The path of a ``registry`` binary of ``version``: Debian's for 2.8.2, else the
    built release's, extracted under ``dest_dir``."""
    if version == RELEASE_VERSION:
        return REGISTRY_BINARY if arch == "amd64" else fetch_debian_registry_binary(arch, dest_dir)
    dest = pathlib.Path(dest_dir) / f"registry-{version}-{arch}"
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(built_release(version, arch)) as tar:
        tar.extract("registry", dest, filter="data")
    return str(dest / "registry")


def add_release(out_dir, version, arch):
    """Put the asset of ``version`` for ``arch`` and its .sha256 under ``out_dir`` as a
    release server serves them: Debian's 2.8.2 packed here, 3.x as built."""
    if version == RELEASE_VERSION:
        binary = registry_binary(version, pathlib.Path(out_dir) / ".debs", arch)
        return make_release_asset(out_dir, version, arch, binary=binary)
    source = built_release(version, arch)
    release_dir = pathlib.Path(out_dir) / f"v{version}"
    release_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, release_dir / source.name)
    shutil.copy(f"{source}.sha256", release_dir / f"{source.name}.sha256")
    digest = pathlib.Path(f"{source}.sha256").read_text().strip()
    return {"path": str(release_dir / source.name), "sha256": digest, "url_path": f"/v{version}/{source.name}"}


# -- Debian builds for other architectures --------------------------------------


def _run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=APT_TIMEOUT, **kwargs)


def _ensure_dpkg_arch(arch):
    """Enable ``arch`` in dpkg and refresh apt lists, only if not already enabled."""
    native = _run(["dpkg", "--print-architecture"]).stdout.strip()
    foreign = _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    if arch == native or arch in foreign:
        return False
    _run(["dpkg", "--add-architecture", arch])
    _run(["apt-get", "update", "-q"])
    return True


def _cached_deb(arch):
    matches = sorted(DEB_CACHE.glob(f"docker-registry_*_{arch}.deb"))
    return matches[-1] if matches else None


def _download_deb(arch):
    """``apt-get download docker-registry:<arch>`` into the cache; path of the .deb."""
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        _run(["apt-get", "download", f"docker-registry:{arch}"], cwd=DEB_CACHE)
    except subprocess.CalledProcessError:
        # Unknown arch or stale lists: enable it and refresh (once), then retry once.
        if not _ensure_dpkg_arch(arch):
            _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", f"docker-registry:{arch}"], cwd=DEB_CACHE)
    deb = _cached_deb(arch)
    if deb is None:
        raise FileNotFoundError(f"apt-get download left no docker-registry .deb for {arch} in {DEB_CACHE}")
    return deb


def fetch_debian_registry_binary(arch, dest_dir):
    """Debian's ``docker-registry`` binary for ``arch`` (e.g. arm64); returns its path.

    The .deb is cached under /var/cache/hub-mirror-ci/debs so only the first
    call touches apt. Foreign binaries run here through qemu-user-static.
    """
    deb = _cached_deb(arch) or _download_deb(arch)
    dest_dir = pathlib.Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest_dir)])
    binary = dest_dir / "usr" / "bin" / "docker-registry"
    if not binary.exists():
        raise FileNotFoundError(f"{deb} has no usr/bin/docker-registry")
    return str(binary)


# -- static file server -----------------------------------------------------------


class _FileHandler(SimpleHTTPRequestHandler):
    """Static files only: records each path, honours overrides, no listings."""

    def __init__(self, *args, fileserver=None, **kwargs):
        self.fileserver = fileserver
        super().__init__(*args, **kwargs)

    def log_message(self, fmt, *args):
        """Silent: FileServer.requests is the log."""

    def _common(self):
        path = urllib.parse.urlsplit(self.path).path
        self.fileserver._record(path)
        override = self.fileserver.overrides.get(path)
        if override is not None:
            status, body = override
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return True
        local = pathlib.Path(self.translate_path(self.path))
        if not local.is_file():
            # A directory listing is not what a release server returns.
            self.send_error(404, "Not Found")
            return True
        return False

    def do_GET(self):
        if not self._common():
            super().do_GET()

    def do_HEAD(self):
        if not self._common():
            super().do_HEAD()


class FileServer:
    """Threaded static HTTP server for ``root_dir`` on 127.0.0.1:<free port>.

    ``requests`` lists the paths asked for (GET and HEAD), in order.
    ``override(path, status, body)`` makes one path answer with a canned
    response (e.g. a 500 or a truncated asset) for failure tests.
    """

    def __init__(self, root_dir, port=None):
        self.root_dir = str(root_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The template of install:source for the release assets it serves.
        self.template = self.url + TEMPLATE_PATH
        self.requests = []
        self.overrides = {}
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    def _record(self, path):
        with self._lock:
            self.requests.append(path)

    def override(self, path, status=500, body=b""):
        self.overrides[path] = (status, body)

    def clear_overrides(self):
        self.overrides.clear()

    def start(self):
        handler = partial(_FileHandler, directory=self.root_dir, fileserver=self)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True, name=f"fileserver-{self.port}")
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()


# -- the release server and the pillar that installs from it ----------------------


@contextlib.contextmanager
def serve_releases(root, versions=(RELEASE_VERSION,), arch="amd64", fake=()):
    """GitHub's release downloads on loopback: under ``root``, the asset of each of
    ``versions`` for ``arch`` (:func:`add_release`), with its .sha256, and for each of
    ``fake`` Debian's 2.8.2 named as that version. ``.template`` is the pillar's
    install:source; ``.version`` and ``.asset`` are the first version and its asset."""
    assets = [add_release(root, version, arch) for version in versions]
    assets += [make_release_asset(root, version, arch) for version in fake]
    with FileServer(root) as server:
        server.version = (list(versions) + list(fake))[0]
        server.asset = assets[0]
        yield server


def archive_pillar(server, mirrors, **extra):
    """A hub_mirror pillar with ``mirrors`` that installs ``server.version`` from
    ``server`` (a :class:`FileServer` of release assets); ``extra`` adds top-level keys."""
    return {
        "version": server.version,
        "install": {
            "method": "archive",
            "source": server.template,
            "source_hash": server.template + ".sha256",
        },
        "mirrors": mirrors,
        **extra,
    }
