"""What the reliability suite checks after every fault: each pull verified byte for byte,
and a mirror's storage holding only blobs that match their digests.

A registry's filesystem storage keeps every blob once, content-addressed, at
``docker/registry/v2/blobs/sha256/<2 hex>/<hex>/data``; uploads in progress (and the
leftovers of failed ones) live under ``repositories/<name>/_uploads/<id>/``, which the
registry never serves.
"""

import hashlib
import json
import os
from pathlib import Path

BLOB_ROOT = Path("docker/registry/v2/blobs/sha256")
REPO_ROOT = Path("docker/registry/v2/repositories")
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)
HASH_CHUNK = 1024 * 1024


class IntegrityError(AssertionError):
    """A pull returned bytes that do not match their digest or size."""


def sha256_file(path):
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()


class StorageAudit:
    """Every blob of a storage root hashed: ``blobs`` {digest: size} of the sound ones,
    ``corrupt`` [(path, expected, actual)], ``incomplete`` blob dirs without data,
    and the leftovers of unfinished uploads (``upload_count``, ``upload_bytes``)."""

    def __init__(self, root):
        self.root = Path(root)
        self.blobs = {}
        self.corrupt = []
        self.incomplete = []
        self.upload_count = 0
        self.upload_bytes = 0
        self._walk_blobs()
        self._walk_uploads()

    def _walk_blobs(self):
        base = self.root / BLOB_ROOT
        if not base.is_dir():
            return
        for prefix in sorted(base.iterdir()):
            for blob_dir in sorted(prefix.iterdir()):
                expected = f"sha256:{blob_dir.name}"
                data = blob_dir / "data"
                if not data.is_file():
                    self.incomplete.append(str(blob_dir))
                    continue
                actual = sha256_file(data)
                if actual != expected or prefix.name != blob_dir.name[:2]:
                    self.corrupt.append((str(data), expected, actual))
                else:
                    self.blobs[expected] = data.stat().st_size

    def _walk_uploads(self):
        base = self.root / REPO_ROOT
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            if os.path.basename(os.path.dirname(dirpath)) != "_uploads":
                continue
            self.upload_count += 1
            dirnames[:] = []
            for name in filenames:
                self.upload_bytes += os.path.getsize(os.path.join(dirpath, name))

    @property
    def sound(self):
        return not self.corrupt and not self.incomplete

    def __repr__(self):
        return (
            f"<StorageAudit {self.root}: {len(self.blobs)} sound blobs, corrupt={self.corrupt}, "
            f"incomplete={self.incomplete}, {self.upload_count} unfinished uploads "
            f"({self.upload_bytes} bytes)>"
        )


def fetch_blob(session, base_url, repo, descriptor, timeout=60):
    """GET one blob and check its size and digest; returns the size."""
    url = f"{base_url}/v2/{repo}/blobs/{descriptor['digest']}"
    with session.get(url, stream=True, timeout=timeout) as resp:
        resp.raise_for_status()
        sha, size = hashlib.sha256(), 0
        for chunk in resp.iter_content(HASH_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    actual = "sha256:" + sha.hexdigest()
    if actual != descriptor["digest"] or size != descriptor["size"]:
        raise IntegrityError(
            f"{repo} blob {descriptor['digest']} ({descriptor['size']} bytes): got {actual}, {size} bytes"
        )
    return size


def http_pull(session, base_url, repo, reference, timeout=60):
    """Pull a single-platform image over the registry API, verifying every byte.

    The manifest's digest is computed from the bytes served and must equal the
    ``Docker-Content-Digest`` header (and ``reference`` when that is a digest); the
    config and every layer must match their descriptors' digest and size. Returns
    (manifest digest, bytes pulled).
    """
    url = f"{base_url}/v2/{repo}/manifests/{reference}"
    resp = session.get(url, headers={"Accept": ACCEPT}, timeout=timeout)
    resp.raise_for_status()
    digest = "sha256:" + hashlib.sha256(resp.content).hexdigest()
    served = resp.headers.get("Docker-Content-Digest")
    if served != digest or (reference.startswith("sha256:") and reference != digest):
        raise IntegrityError(f"{repo}:{reference} manifest is {digest}, served as {served}")
    manifest = json.loads(resp.content)
    if manifest.get("mediaType") not in MANIFEST_TYPES:
        raise IntegrityError(f"{repo}:{reference} is a {manifest.get('mediaType')}, not an image manifest")
    total = len(resp.content)
    for descriptor in [manifest["config"], *manifest["layers"]]:
        total += fetch_blob(session, base_url, repo, descriptor, timeout)
    return digest, total
