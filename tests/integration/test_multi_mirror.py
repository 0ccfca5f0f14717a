"""Several upstreams on one host: one registry instance per mirror, each with its own
address, storage, credential and service; changing or removing one touches only it."""

import pytest

from tests.support import oci
from tests.support.hub import FakeDockerHub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import unique_name

pytestmark = pytest.mark.integration

GHCR_USER, GHCR_TOKEN = "ghcr-bot", "ghp_SECRETghcrTOKEN0123456789"


@pytest.fixture(scope="module")
def ghcr(tmp_path_factory, image_layout):
    """A second upstream, standing in for ghcr.io, with its own credential."""
    layout, _ = image_layout
    with FakeDockerHub(tmp_path_factory.mktemp("ghcr"), username=GHCR_USER, token=GHCR_TOKEN) as hub:
        hub.push_image(layout, "other", "acme/tool", dest_tag="v1")
        yield hub


def started_count(minion, name):
    return (minion.root / "log" / f"{name}.log").read_text().count("serving in proxy mode")


def test_each_upstream_its_own_mirror_and_changes_stay_local(masterless, release_server, clean_hub, ghcr, tmp_path):
    hub_name, ghcr_name = unique_name("hub"), unique_name("ghcr")
    hub_port, ghcr_port = free_port(), free_port()
    mirrors = {
        hub_name: clean_hub.mirror_pillar(hub_port),
        ghcr_name: ghcr.mirror_pillar(ghcr_port),
    }
    masterless.set_pillar(archive_pillar(release_server, mirrors))
    first = masterless.apply()
    assert first.returncode == 0, first

    assert oci.pull(f"127.0.0.1:{hub_port}", "library/alpine", "latest", str(tmp_path / "a"))
    assert oci.pull(f"127.0.0.1:{ghcr_port}", "acme/tool", "v1", str(tmp_path / "b"))
    assert masterless.run("hub_mirror.catalog", f"mirror={hub_name}").data == ["library/alpine"]
    assert masterless.run("hub_mirror.catalog", f"mirror={ghcr_name}").data == ["acme/tool"]
    assert all(r["username"] == GHCR_USER and r["password_ok"] for r in ghcr.token_requests if not r["anonymous"])
    hub_starts, ghcr_starts = started_count(masterless, hub_name), started_count(masterless, ghcr_name)

    # Change only the ghcr mirror: only it restarts.
    mirrors[ghcr_name]["log_level"] = "warn"
    masterless.set_pillar(archive_pillar(release_server, mirrors))
    changed = masterless.apply()
    assert changed.returncode == 0, changed
    assert set(changed.changes) == {
        f"hub_mirror-config-{ghcr_name}-configured",
        f"hub_mirror-service-{ghcr_name}-running",
    }
    assert started_count(masterless, hub_name) == hub_starts
    assert started_count(masterless, ghcr_name) == ghcr_starts + 1

    # Drop the ghcr mirror from pillar: it is stopped and removed, its cache kept; the
    # Docker Hub mirror is not touched and keeps serving.
    del mirrors[ghcr_name]
    masterless.set_pillar(archive_pillar(release_server, mirrors))
    predicted = masterless.apply(test=True)
    removed = masterless.apply()
    assert removed.returncode == 0, removed
    assert set(removed.changes) == {f"hub_mirror-service-{ghcr_name}-absent"} == set(predicted.changes)
    assert removed.changes[f"hub_mirror-service-{ghcr_name}-absent"]["stopped"] is True
    assert not oci_answers(ghcr_port)
    assert (masterless.root / "var-lib" / ghcr_name / "docker").is_dir()
    assert started_count(masterless, hub_name) == hub_starts
    assert oci.pull(f"127.0.0.1:{hub_port}", "library/alpine", "latest", str(tmp_path / "c"))
    assert masterless.apply().changes == {}


def oci_answers(port):
    import requests  # pylint: disable=import-outside-toplevel

    try:
        requests.get(f"http://127.0.0.1:{port}/v2/", timeout=2)
        return True
    except requests.RequestException:
        return False


def test_endpoint_publishes_each_mirror_for_the_mine(masterless, release_server, clean_hub):
    name, port = unique_name("hub"), free_port()
    masterless.set_pillar(archive_pillar(release_server, {name: {"upstream": clean_hub.url, "listen": f"127.0.0.1:{port}"}}))
    assert masterless.apply().returncode == 0
    assert masterless.run("hub_mirror.endpoint").data == [
        {
            "mirror": name,
            "registry": "127.0.0.1:" + clean_hub.url.rsplit(":", 1)[1],
            "url": f"http://127.0.0.1:{port}",
            "loopback_only": True,
            "serving": True,
        }
    ]
