"""
The cache on disk: owning and marking the storage directory, and reading what the
registry stored (repositories, tags, blobs, the expiry schedule, usage) without it running.
"""

import json
import os
import shutil
import subprocess
import time

from salt.exceptions import CommandExecutionError

from .accounts import service_python, service_user_kwargs
from .front import FRONT_DIR
from .fsutil import ensure_dir, open_below, open_dir
from .registry_api import cached_tags, v2_root
from .units import iso, parse_go_time, parse_size, platform_name, size_report

# What marks a storage directory as a hub_mirror cache: a purge deletes nothing elsewhere.
STORAGE_MARKER = ".hub-mirror-cache"

# The directories the registry writes into, from the storage root down (what it creates
# itself; a chown of these, not of the whole cache, gives a mirror its storage back).
_REGISTRY_DIRS = (
    "docker",
    "docker/registry",
    "docker/registry/v2",
    "docker/registry/v2/blobs",
    "docker/registry/v2/repositories",
)


def storage_plan(spec, ids):
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
        raise CommandExecutionError(
            f"{key}: {path} exists and is not a directory; give a directory (nothing was changed)"
        )
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
        return {
            "old": f"not owned by the service user: {', '.join(stale) or 'mode ' + oct(info.st_mode & 0o777)}",
            "new": "owned by the service user",
        }
    return None


def own_storage(path, uid, gid, key="hub_mirror:mirrors:storage"):
    """Create, mark and hand the storage to the service user (see ``storage_plan``).

    Everything goes through directory fds opened without following symlinks: whoever can
    write a parent of the storage (or, inside it, the service user) could otherwise swap a
    directory for a link between validation and the chown, and be handed /etc.
    """
    ensure_dir(path, 0o750)
    fd = open_dir(path, key)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, os.fstat(fd).st_mode & 0o7777 | 0o750)
        for relative in _REGISTRY_DIRS:
            sub = open_below(fd, relative)
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


def add_missing_layer_dirs(storage, key="hub_mirror:mirrors:storage"):
    """
    Give every repository that has manifests but no ``_layers`` an empty one, owned like
    its ``_manifests``; the repositories changed. Registry 3.x's garbage-collect stops at
    the first such repository ("failed to mark: Path not found: .../_layers"), and a
    mirror makes them: a client that fetched a manifest and no layer (an inspect, a tag
    check), or a pull the full disk cut short. An empty directory means to the registry
    what a missing one should: no layer linked.

    Walked through directory fds, following no symlink: the service user owns the tree.
    """
    fd = open_dir(os.path.realpath(storage), key)
    added = []
    try:
        repos = open_below(fd, "docker/registry/v2/repositories")
        if repos is None:
            return added
        try:
            for repo in CacheView(storage).repositories():
                sub = open_below(repos, repo)
                if sub is not None:
                    try:
                        if _add_layer_dir(sub):
                            added.append(repo)
                    except OSError as exc:
                        raise CommandExecutionError(
                            f"{key}: cannot add an empty _layers directory to repository {repo} "
                            f"({exc.strerror}), which registry 3.x's garbage-collect needs; "
                            "free some space or fix the storage's permissions, then retry"
                        ) from exc
                    finally:
                        os.close(sub)
        finally:
            os.close(repos)
    finally:
        os.close(fd)
    return added


def _add_layer_dir(repo_fd):
    """An empty ``_layers`` owned like ``_manifests`` in the repository ``repo_fd``, if it
    has none; whether it added one. Chowned through an fd of the new directory: a name
    swapped for a link in between is refused, not followed."""
    try:
        manifests = os.stat("_manifests", dir_fd=repo_fd, follow_symlinks=False)
        os.mkdir("_layers", 0o755, dir_fd=repo_fd)
    except (FileExistsError, FileNotFoundError):
        return False
    layers = open_below(repo_fd, "_layers")
    if layers is None:
        return False
    try:
        os.fchown(layers, manifests.st_uid, manifests.st_gid)
    finally:
        os.close(layers)
    return True


def storage_writable(conf, spec):
    """Prove, as the service user, that the registry can write its storage."""
    if spec["s3"] or not os.path.isdir(spec["storage"]) or os.geteuid() != 0:
        return
    dirs = [spec["storage"]] + [
        os.path.join(spec["storage"], relative)
        for relative in _REGISTRY_DIRS
        if os.path.isdir(os.path.join(spec["storage"], relative))
    ]
    check = (
        "import os, sys; bad = [d for d in sys.argv[1:] if not os.access(d, os.W_OK | os.X_OK)]; "
        "print(*bad); sys.exit(bool(bad))"
    )
    proc = subprocess.run(
        [service_python(), "-c", check, *dirs],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **service_user_kwargs(conf),
    )
    if proc.returncode != 0:
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:storage: the service user {conf['lookup']['user']} cannot "
            f"write {proc.stdout.strip() or spec['storage']} (a read-only mount, a parent it cannot "
            "enter, or permissions changed by hand); every pull would fail. Fix the directory, "
            "or give another storage path"
        )


def read_schedule(storage):
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
            schedule[key] = (parse_go_time(entry.get("ExpiryData")), kind)
    return schedule


class CacheView:
    """
    A read-only view of a mirror's storage, laid out as the registry lays it out
    (docs/facts.md). Content counts as cached while its revision link and data exist
    and its expiry in ``scheduler-state.json`` has not passed: the registry removes the
    links of expired content but leaves the directories, and expires overdue entries at
    its next start.
    """

    def __init__(self, storage, now=None):
        self.storage = storage
        self.v2 = v2_root(storage)
        self.repos_root = os.path.join(self.v2, "repositories")
        self.now = time.time() if now is None else now
        self.schedule = read_schedule(storage)
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
        """Whether the manifest ``digest`` of ``repo`` is cached and not expired."""
        return self._cached(repo, "manifest", digest)

    def live_revisions(self, repo):
        return [digest for digest in self.revisions(repo) if self.live(repo, digest)]

    def layer_cached(self, repo, digest):
        """Whether the blob ``digest`` of ``repo`` is cached and not expired."""
        return self._cached(repo, "blob", digest)

    def _cached(self, repo, kind, digest):
        # The link and the data both, as the registry needs them to serve it from disk.
        if not os.path.exists(self._link(repo, kind, digest)) or self.blob_size(digest) is None:
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
            "cached": iso(self.link_time(repo, digest)),
            "expires": iso(self.expires(repo, digest)),
        }
        if children or isinstance(doc.get("manifests"), list):
            info["platforms"] = [
                platform_name(child.get("platform")) for child in children if self.complete(repo, child["digest"])
            ]
            info["platforms_available"] = [platform_name(child.get("platform")) for child in children]
        else:
            config = self.document(blobs[0]) if blobs and "config" in doc else None
            info["platforms"] = [platform_name(config)] if config and self.complete(repo, digest) else []
        info["size"] = size_report(self.bytes_of(self.closure(repo, digest)))
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


def tree_bytes(path):
    """Apparent size of every file under ``path`` (as ``du -sb``), the front's directory
    left out: its fills are transient copies of what the cache holds, not the cache."""
    total, pending = 0, [path]
    front = os.path.join(path, FRONT_DIR)
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.path == front:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                else:
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def storage_view(spec):
    """The cache view of an existing storage directory; a clear error if there is none."""
    storage = spec["storage"]
    if not os.path.isdir(storage):
        raise CommandExecutionError(
            f"mirror {spec['name']} has no storage directory {storage}: nothing was cached "
            f"there (hub_mirror:mirrors:{spec['name']}:storage; apply hub_mirror.config to create it)"
        )
    return CacheView(storage)


def storage_usage(view, spec):
    blobs = view.blob_files()
    cap = parse_size(spec["max_size"])
    used = tree_bytes(view.storage) if os.path.isdir(view.storage) else 0
    try:
        disk = shutil.disk_usage(view.storage)
        filesystem = {"free": size_report(disk.free), "total": size_report(disk.total)}
    except OSError:
        filesystem = None
    return {
        "storage": view.storage,
        "used": size_report(used),
        "blobs": {"count": len(blobs), "size": size_report(sum(blobs.values()))},
        "filesystem": filesystem,
        "max_size": size_report(cap),
        "over_cap": bool(cap and used > cap),
    }, blobs
