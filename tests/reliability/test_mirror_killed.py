"""The mirror's registry is SIGKILLed in the middle of a pull: the supervisor restarts it,
the cache is consistent (no partial blob stored as complete), and the pull then succeeds.

The mirror is applied with masterless Salt, so it runs under the real service and the
real supervisor (``hub-mirror-supervise``), as on a host."""

import os
import signal
import subprocess
import threading

import pytest

from tests.reliability.conftest import MIB
from tests.support import oci
from tests.support.integrity import StorageAudit
from tests.support.netutil import loopback_session
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def serving(mirror, old_pid):
    pid = mirror.registry_pid()
    if not pid or pid == old_pid:
        return None
    try:
        with loopback_session() as session:
            return pid if session.get(f"{mirror.url}/v2/", timeout=2).status_code == 200 else None
    except OSError:
        return None


def test_registry_killed_mid_pull_restarts_consistent(hub, salt_mirror_factory, tmp_path):
    mirror = salt_mirror_factory()
    image = hub.images["fault/big"]
    big = image["layer_digests"][0]
    hub.set_blob_rate(MIB)  # a 4 MB layer takes seconds: time to kill the registry mid-transfer

    outcome = {}

    def pull():
        try:
            outcome["digest"] = oci.pull(mirror.hostport, "fault/big", "latest", str(tmp_path / "killed"))
        except subprocess.CalledProcessError as exc:
            outcome["error"] = exc.stderr

    puller = threading.Thread(target=pull)
    puller.start()
    assert hub.progress.wait(big, MIB, timeout=60), "the layer transfer never started"
    pid = mirror.registry_pid()
    assert pid, mirror.log()
    os.kill(pid, signal.SIGKILL)
    puller.join(timeout=120)
    assert not puller.is_alive()
    assert "error" in outcome, outcome  # the client saw the mirror die
    sent_at_kill = hub.progress.sent(big)

    new_pid = wait_for(lambda: serving(mirror, pid), 60, "the supervisor to restart the registry", interval=0.5)
    assert "restarting" in mirror.log()

    audit = StorageAudit(mirror.storage)
    assert audit.sound, audit
    killed_uploads = (audit.upload_count, audit.upload_bytes)

    hub.set_blob_rate(None)
    hub.reset_counts()
    assert oci.pull(mirror.hostport, "fault/big", "latest", str(tmp_path / "after")) == image["manifest_digest"]

    blobs = {image["config_digest"], *image["layer_digests"]}

    def stored():
        audit = StorageAudit(mirror.storage)
        return audit if blobs <= set(audit.blobs) or not audit.sound else None

    try:
        audit = wait_for(stored, 30, "the image stored after the restart")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {StorageAudit(mirror.storage)}\n{mirror.log()[-5000:]}") from None
    assert audit.sound, audit
    # Cached now: by digest it is served with the upstream down.
    hub.block()
    assert oci.pull(mirror.hostport, "fault/big", image["manifest_digest"], str(tmp_path / "cached")) == image["manifest_digest"]
    print(
        f"\nregistry {pid} killed after {sent_at_kill} upstream bytes of the layer; restarted as {new_pid}; "
        f"unfinished uploads left by the kill: {killed_uploads[0]} ({killed_uploads[1]} bytes); "
        f"client error: {outcome['error'].strip().splitlines()[-1]}"
    )
