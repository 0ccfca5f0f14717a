"""The upstream dies in the middle of a blob transfer: the pull fails (never with wrong
bytes), nothing partial is stored or served as the blob, and the client's retry succeeds
once the upstream is back."""

import subprocess
import threading
import time

import pytest

from tests.reliability.conftest import MIB
from tests.support import oci
from tests.support.integrity import StorageAudit
from tests.support.netutil import loopback_session
from tests.support.processes import wait_for

pytestmark = pytest.mark.functional

DOWN_SECONDS = 2
RETRY_WINDOW = 60


def test_upstream_killed_mid_blob_then_retry_succeeds(hub, mirror, tmp_path):
    image = hub.images["fault/big"]
    big = image["layer_digests"][0]
    # Paced, so both of the registry's upstream fetches of the blob (the one it stores
    # and the one it streams to the client) are in flight when the upstream dies.
    hub.set_blob_rate(2 * MIB)
    hub.cut_blob(big, after=MIB)

    with pytest.raises(subprocess.CalledProcessError) as failed:
        oci.pull(mirror.hostport, "fault/big", "latest", str(tmp_path / "cut"))
    assert hub.cuts == [big] and hub.blocked
    # The mirror had announced the whole length, so the client sees the short body (or,
    # had the cut come before the mirror answered, a 500).
    client_error = failed.value.stderr.strip().splitlines()[-1]
    assert "unexpected EOF" in client_error or "500 Internal Server Error" in client_error, client_error
    sent_before_cut = hub.progress.sent(big)

    # While the upstream is down: no partial copy is stored, and none is served.
    audit = StorageAudit(mirror.storage)
    assert audit.sound, audit
    assert big not in audit.blobs
    with loopback_session() as session:
        resp = session.get(f"{mirror.url}/v2/fault/big/blobs/{big}", timeout=60)
    assert resp.status_code >= 500, (resp.status_code, len(resp.content))
    assert len(resp.content) < 4096

    # The client retries (skopeo 1.9.3 does not retry this error itself: a CI step does);
    # the upstream comes back a little later.
    hub.set_blob_rate(None)
    threading.Timer(DOWN_SECONDS, hub.unblock).start()
    attempts, errors = 0, []
    deadline = time.monotonic() + RETRY_WINDOW
    while True:
        attempts += 1
        try:
            digest = oci.pull(mirror.hostport, "fault/big", "latest", str(tmp_path / f"retry{attempts}"))
            break
        except subprocess.CalledProcessError as exc:
            errors.append(exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else "")
            assert time.monotonic() < deadline, errors
            time.sleep(0.5)
    assert digest == image["manifest_digest"]

    blobs = {image["config_digest"], *image["layer_digests"]}

    def stored():
        audit = StorageAudit(mirror.storage)
        return audit if blobs <= set(audit.blobs) or not audit.sound else None

    audit = wait_for(stored, 30, "the blob stored after the retry")
    assert audit.sound, audit
    print(
        f"\nupstream cut after {sent_before_cut} of {image['layer_sizes'][0]} bytes (both fetches); "
        f"the client saw: {client_error}; "
        f"{attempts} attempt(s) until success, {len(errors)} failed while down "
        f"({errors[0][-110:] if errors else 'none'}); "
        f"left in _uploads: {audit.upload_count} unfinished upload(s), {audit.upload_bytes} bytes"
    )
