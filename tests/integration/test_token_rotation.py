"""Rotating the Docker Hub token in pillar: on 2.8 the config changes and the mirror restarts
exactly once; on 3.x only the credentials file changes and the registry keeps running (its
credential helper hands over the new token at the next login). Either way the upstream sees
the new credential, and no output shows either token."""

import hashlib
import time

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port
from tests.support.release import CREDENTIAL_LIFETIME_S, archive_pillar

pytestmark = pytest.mark.integration

NEW_TOKEN = "dckr_pat_ROTATED9876543210zyxwvu"


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def rotating_hub(clean_hub):
    yield clean_hub
    clean_hub.token = HUB_TOKEN


def test_rotation_uses_the_new_token_restarting_only_where_it_must(
    masterless, release_server, rotating_hub, mirror_name, tmp_path
):
    hub = rotating_hub
    port = free_port()
    mirror = hub.mirror_pillar(port)
    masterless.set_pillar(archive_pillar(release_server, {mirror_name: mirror}))
    assert masterless.apply().returncode == 0
    oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "a"))
    log_path = masterless.root / "log" / f"{mirror_name}.log"
    starts_before = log_path.read_text().count("serving in proxy mode")
    started_before = masterless.run("hub_mirror.status", f"mirror={mirror_name}").data[mirror_name]["started"]

    hub.token = NEW_TOKEN  # Docker Hub now accepts only the new token
    masterless.set_pillar(archive_pillar(release_server, {mirror_name: dict(mirror, token=NEW_TOKEN)}))
    predicted = masterless.apply(test=True)
    rotated = masterless.apply()
    assert rotated.returncode == 0, rotated

    configured = rotated.changes[f"hub_mirror-config-{mirror_name}-configured"]
    service = f"hub_mirror-service-{mirror_name}-running"
    registry_started = masterless.run("hub_mirror.status", f"mirror={mirror_name}").data[mirror_name]["started"]
    if release_server.version.startswith("2."):
        assert configured == {"config": {"proxy.password": {"old": "<redacted>", "new": "<redacted>"}}}
        assert rotated.changes[service] == {"restarted": True}
        assert log_path.read_text().count("serving in proxy mode") == starts_before + 1
    else:
        assert configured == {"credentials": {"old": "<redacted>", "new": "<redacted>"}}
        assert service not in rotated.changes
        assert log_path.read_text().count("serving in proxy mode") == starts_before
        assert registry_started == started_before  # the same registry process
        time.sleep(CREDENTIAL_LIFETIME_S + 1)  # the registry asks its helper again after this
    assert predicted.changes == rotated.changes

    hub.reset_counts()
    hub.token_requests.clear()
    oci.pull(f"127.0.0.1:{port}", "library/busybox", "latest", str(tmp_path / "b"))
    used = [req for req in hub.token_requests if not req["anonymous"]]
    assert used and all(req["password_sha256"] == sha256(NEW_TOKEN) and req["password_ok"] for req in used)

    minion_log = masterless.log_file.read_text()
    assert "[DEBUG" in minion_log  # the check below reads a debug-level log
    for output in (predicted.output, rotated.output, log_path.read_text(), minion_log):
        assert HUB_TOKEN not in output
        assert NEW_TOKEN not in output

    again = masterless.apply()
    assert again.changes == {}
