"""Storage full: the mirror's storage is a 20 MB filesystem and the pulls need more.

What fits is cached and keeps being served; what does not fit is either served without
being cached or refused with a 500, never stored in part as a blob; and once space is
freed (a repository's content removed with the registry stopped, then the registry's own
``garbage-collect`` through ``hub_mirror.gc``), new pulls are cached again. See
docs/reliability.md for why ``hub_mirror.prune`` is not the route here."""

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.reliability.conftest import FULL_IMAGES, FULL_LAYER
from tests.support import oci
from tests.support.integrity import REPO_ROOT, StorageAudit
from tests.support.processes import wait_for
from tests.support.saltcall import unique_name, world_traversable_dir

pytestmark = pytest.mark.integration

FS_SIZE = "20m"


@pytest.fixture
def small_fs():
    """A 20 MB tmpfs, unmounted at teardown (after the mirror on it has stopped)."""
    mountpoint = world_traversable_dir(f"/tmp/hm-{unique_name('fs')}")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE},mode=0755", "tmpfs", str(mountpoint)], check=True)
    yield mountpoint
    for _ in range(20):
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode == 0:
            break
        time.sleep(0.5)
    else:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    mountpoint.rmdir()


@pytest.fixture
def full_mirror(small_fs, salt_mirror_factory):
    return salt_mirror_factory(storage=small_fs / "cache")


def try_pull(mirror, repo, reference, dest):
    """(manifest digest, None) or (None, skopeo's last error line)."""
    try:
        return oci.pull(mirror.hostport, repo, reference, str(dest)), None
    except subprocess.CalledProcessError as exc:
        return None, (exc.stderr.strip().splitlines() or [""])[-1]


def layer(hub, name):
    return hub.images[f"full/{name}"]["layer_digests"][0]


def stored(mirror, digest, timeout):
    """True once ``digest`` is in the mirror's blob store (it stores after serving)."""
    try:
        wait_for(lambda: digest in StorageAudit(mirror.storage).blobs, timeout, digest)
        return True
    except AssertionError:
        return False


def free_bytes(path):
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def valid_json(path):
    try:
        json.loads(path.read_text())
        return True
    except ValueError:
        return False


# How a miss the full disk cannot store fails the pull: 2.8 answers 500; 3.x too for a
# manifest, but a blob's one fetch feeds the client and the store together, so 3.x cuts
# the body when the store fails. The front writes each blob it fills to disk as well and
# cuts the body (or closes before any answer: a bare EOF) when that write fails, on
# either version.
CUT = ("500 Internal Server Error", "unexpected EOF", '": EOF')
MISS_ON_A_FULL_DISK = {"2": CUT, "3": CUT}


def test_storage_full_fails_cleanly_serves_the_cache_and_recovers(hub, full_mirror, registry_version, tmp_path):
    mirror = full_mirror
    failed = MISS_ON_A_FULL_DISK[registry_version.split(".")[0]]
    outcomes, cached, full = {}, [], False
    for name in FULL_IMAGES:
        digest, error = try_pull(mirror, f"full/{name}", "latest", tmp_path / name)
        # A pull gets exactly the image or an error, never other bytes.
        assert digest == hub.images[f"full/{name}"]["manifest_digest"] or any(word in error for word in failed), error
        # 2.8 stores a miss from a fetch of its own: its copy may land while the front's
        # fails the pull. Whatever is stored must be sound (the audit below).
        if stored(mirror, layer(hub, name), 3 if full else 10):
            cached.append(name)
            outcomes[name] = "cached" if digest else f"cached, though the pull failed: {error}"
        else:
            full = True
            outcomes[name] = "served, not cached" if digest else error
    audit = StorageAudit(mirror.storage)
    print(f"\npulls of 5 x 6 MB on a {FS_SIZE} filesystem: {outcomes}\n{audit}")
    assert audit.sound, audit
    assert cached[0] == FULL_IMAGES[0] and len(cached) < len(FULL_IMAGES)
    assert not {layer(hub, name) for name in FULL_IMAGES if name not in cached} & set(audit.blobs)
    assert any(word in outcome for word in failed for outcome in outcomes.values())
    # What it has, it keeps serving: by digest, and by tag with the upstream refusing.
    whole = [name for name in cached if outcomes[name] == "cached"]  # pulled whole and stored
    hub.block()
    for name in whole:
        want = hub.images[f"full/{name}"]["manifest_digest"]
        assert try_pull(mirror, f"full/{name}", want, tmp_path / f"{name}-digest") == (want, None)
        assert try_pull(mirror, f"full/{name}", "latest", tmp_path / f"{name}-tag") == (want, None)
    hub.unblock()

    # Free space with the registry stopped: remove the oldest repository's content and let
    # the registry's garbage-collect delete the blobs nothing references any more.
    # (hub_mirror.prune cannot run on a full disk: it rewrites scheduler-state.json first.)
    assert mirror.call("hub_mirror.stop").data is True
    # The registry may have rewritten its expiry state while the disk was full and lost
    # it; 2.8 panics at every start on such a file, so the supervisor sets it aside.
    # (3.x may not have written one at all before the disk filled up.)
    state = mirror.storage / "scheduler-state.json"
    state_truncated = state.exists() and not valid_json(state)
    # Room for two copies of a miss (the registry's and the front's fill): two images go,
    # and the partial uploads the failed stores left (upload purging would take 168h).
    for name in cached[:2]:
        shutil.rmtree(mirror.storage / REPO_ROOT / "full" / name)
    for uploads in (mirror.storage / REPO_ROOT).glob("*/*/_uploads"):
        shutil.rmtree(uploads)
    collected = mirror.call("hub_mirror.gc", "dry_run=False")
    assert collected.returncode == 0, collected
    assert collected.data["freed"]["bytes"] >= FULL_LAYER, collected.data
    assert mirror.call("hub_mirror.start").data is True, mirror.log()[-2000:]
    if state_truncated:
        assert list(mirror.storage.glob("scheduler-state.json.broken-*"))
        assert "moved the unreadable expiry schedule aside" in mirror.log()
    assert free_bytes(mirror.storage) >= 2 * FULL_LAYER

    # Recovered: the first image that did not fit is now pulled and cached, and the rest
    # of the cache is still served.
    missing = next(name for name in FULL_IMAGES if name not in cached)
    want = hub.images[f"full/{missing}"]["manifest_digest"]
    assert try_pull(mirror, f"full/{missing}", "latest", tmp_path / f"{missing}-again") == (want, None)
    assert stored(mirror, layer(hub, missing), 15), StorageAudit(mirror.storage)
    hub.block()
    for name in [*(name for name in whole if name not in cached[:2]), missing]:
        want = hub.images[f"full/{name}"]["manifest_digest"]
        assert try_pull(mirror, f"full/{name}", want, tmp_path / f"{name}-after") == (want, None)
    hub.unblock()
    audit = StorageAudit(mirror.storage)
    assert audit.sound, audit
    print(
        f"scheduler-state.json truncated by the full disk: {state_truncated}; "
        f"garbage-collect freed {collected.data['freed']['human']}; after recovery: {audit}"
    )
