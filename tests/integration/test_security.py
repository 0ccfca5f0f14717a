"""What a mirror refuses and where it answers, with the real registry applied through
masterless `salt-call --local`: no push, PUT or DELETE reaches the cache or the upstream,
the mirror listens only on its configured address, the debug listener only on loopback,
and the registry runs as the unprivileged service user."""

import json
import pwd
import socket
import subprocess

import pytest
import requests

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port, loopback_session
from tests.support.processes import cmdline, parent_pid, pids, registry_pids, stat_fields, status
from tests.support.release import archive_pillar
from tests.support.saltcall import Masterless, unique_name

pytestmark = pytest.mark.integration

# Linux routes all of 127/8 to lo: a second loopback address needs no setup.
LISTEN_HOST = "127.0.0.2"
SERVICE_USER = "hub-mirror"


def port_free_on_both():
    """A port free on 127.0.0.1 and 127.0.0.2, so a refusal on one proves the bind, whose
    default debug port (+ 10000 on 127.0.0.1) is free too."""
    for _ in range(50):
        port = free_port(LISTEN_HOST)
        if port + 10000 >= 65536:
            continue
        with socket.socket() as probe, socket.socket() as debug:
            try:
                probe.bind(("127.0.0.1", port))
                debug.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free on both loopback addresses")


def pids_with_parent(parent):
    return [pid for pid in pids() if (fields := stat_fields(pid)) and int(fields[1]) == parent]


def listening_sockets(pid):
    """``addr:port`` of every TCP socket ``pid`` listens on (``ss``, iproute2)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if f"pid={pid}," in line}


@pytest.fixture(scope="module")
def mirror(hub, release_server, tmp_path_factory):
    """One mirror on 127.0.0.2, its debug listener on the default (127.0.0.1, port + 10000),
    with one image pulled through it."""
    minion = Masterless.fresh()
    name, port = unique_name("m"), port_free_on_both()
    pillar = archive_pillar(release_server, {name: hub.mirror_pillar(f"{LISTEN_HOST}:{port}", debug_listen="")})
    try:
        minion.set_pillar(pillar)
        applied = minion.apply()
        assert applied.returncode == 0, applied
        digest = oci.pull(f"{LISTEN_HOST}:{port}", "library/alpine", "latest", str(tmp_path_factory.mktemp("pulled")))
        config_path = f"{minion.lookup['config_dir']}/{name}.yml"
        yield {
            "minion": minion,
            "name": name,
            "port": port,
            "pillar": pillar,
            "digest": digest,
            "config_path": config_path,
            "base": f"http://{LISTEN_HOST}:{port}",
        }
    finally:
        minion.set_pillar(pillar)
        minion.discard()


@pytest.fixture
def session():
    with loopback_session() as http:
        yield http


def assert_unsupported(response):
    assert response.status_code == 405, (response.status_code, response.text)
    assert [error["code"] for error in response.json()["errors"]] == ["UNSUPPORTED"]


def test_blob_upload_is_refused(mirror, session, clean_hub):
    response = session.post(f"{mirror['base']}/v2/library/alpine/blobs/uploads/", timeout=10)
    assert_unsupported(response)
    assert not [r for r in clean_hub.requests if r["method"] not in ("GET", "HEAD")]


def test_manifest_put_is_refused(mirror, session, clean_hub, image_layout):
    layout, images = image_layout
    manifest = oci.read_blob(layout, images["other"]["manifest_digest"])
    response = session.put(
        f"{mirror['base']}/v2/library/alpine/manifests/pushed",
        data=manifest,
        headers={"Content-Type": oci.MT_MANIFEST},
        timeout=10,
    )
    assert_unsupported(response)
    assert not [r for r in clean_hub.requests if r["method"] not in ("GET", "HEAD")]


def test_manifest_and_blob_delete_are_refused(mirror, session, clean_hub, image_layout):
    layout, images = image_layout
    manifest = oci.read_blob(layout, mirror["digest"])
    layer = json.loads(manifest)["layers"][0]["digest"]
    for path in (f"manifests/{mirror['digest']}", f"blobs/{layer}"):
        response = session.delete(f"{mirror['base']}/v2/library/alpine/{path}", timeout=10)
        assert_unsupported(response)
    # Both are still served: nothing was deleted from the cache.
    assert session.get(f"{mirror['base']}/v2/library/alpine/blobs/{layer}", timeout=10).status_code == 200
    assert oci.inspect_raw(f"{LISTEN_HOST}:{mirror['port']}", "library/alpine", mirror["digest"]).encode() == manifest
    assert not [r for r in clean_hub.requests if r["method"] not in ("GET", "HEAD")]


def test_skopeo_copy_into_the_mirror_fails(mirror, session, clean_hub, image_layout):
    layout, _ = image_layout
    with pytest.raises(subprocess.CalledProcessError) as failed:
        oci.push(layout, "other", f"{LISTEN_HOST}:{mirror['port']}", "library/pushed")
    assert "405" in failed.value.stderr or "unsupported" in failed.value.stderr.lower(), failed.value.stderr
    catalog = session.get(f"{mirror['base']}/v2/_catalog", timeout=10).json()["repositories"]
    assert "library/pushed" not in catalog
    assert not [r for r in clean_hub.requests if r["method"] not in ("GET", "HEAD")]


def test_mirror_answers_only_on_its_configured_address(mirror, session):
    answer = session.get(f"{mirror['base']}/v2/", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Docker-Distribution-Api-Version"].startswith("registry/2")
    with pytest.raises(requests.ConnectionError):
        session.get(f"http://127.0.0.1:{mirror['port']}/v2/", timeout=10)


def test_the_mirror_listens_on_exactly_its_address_and_the_loopback_debug_address(mirror):
    pids = registry_pids(mirror["config_path"])
    assert len(pids) == 1, pids
    # The registry: TCP only for its debug listener (the front reaches it on a unix socket).
    assert listening_sockets(pids[0]) == {f"127.0.0.1:{mirror['port'] + 10000}"}
    # The front: nginx's master (the registry's sibling under the supervisor) and its workers.
    supervisor = parent_pid(pids[0])
    master = [pid for pid in pids_with_parent(supervisor) if pid != pids[0]]
    front = master + [pid for pid in pids_with_parent(master[0])]
    assert len(master) == 1 and cmdline(master[0])[0].startswith("nginx: master process"), master
    assert set().union(*(listening_sockets(pid) for pid in front)) == {f"{LISTEN_HOST}:{mirror['port']}"}


def test_debug_listener_serves_metrics_and_vars_on_loopback_only(mirror, session):
    debug = f"127.0.0.1:{mirror['port'] + 10000}"
    variables = session.get(f"http://{debug}/debug/vars", timeout=10)
    assert variables.status_code == 200
    assert "registry" in variables.json()
    metrics = session.get(f"http://{debug}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "# TYPE" in metrics.text
    with pytest.raises(requests.ConnectionError):
        session.get(f"http://{LISTEN_HOST}:{mirror['port'] + 10000}/debug/vars", timeout=10)


@pytest.mark.parametrize("address", ["0.0.0.0", "[::]", "192.0.2.1"])
def test_non_loopback_debug_listen_is_refused(mirror, address):
    minion, name = mirror["minion"], mirror["name"]
    before = registry_pids(mirror["config_path"])
    bad = {**mirror["pillar"], "mirrors": {name: {**mirror["pillar"]["mirrors"][name]}}}
    bad["mirrors"][name]["debug_listen"] = f"{address}:{free_port()}"
    try:
        minion.set_pillar(bad)
        result = minion.apply()
    finally:
        minion.set_pillar(mirror["pillar"])
    assert result.returncode != 0, result
    assert f"hub_mirror:mirrors:{name}:debug_listen" in result.output
    assert "is not a loopback address" in result.output and "bind it to 127.0.0.1" in result.output
    assert HUB_TOKEN not in result.output
    assert registry_pids(mirror["config_path"]) == before


def test_registry_and_supervisor_run_as_the_service_user(mirror):
    service = pwd.getpwnam(SERVICE_USER)
    assert service.pw_uid != 0
    pids = registry_pids(mirror["config_path"])
    assert len(pids) == 1, pids
    supervisor = parent_pid(pids[0])
    for pid in (pids[0], supervisor):
        fields = status(pid)
        assert [int(uid) for uid in fields["Uid"].split()] == [service.pw_uid] * 4, (pid, fields["Uid"])
        assert [int(gid) for gid in fields["Gid"].split()] == [service.pw_gid] * 4, (pid, fields["Gid"])
        assert int(fields["CapEff"], 16) == 0, (pid, fields["CapEff"])
    supervisor_args = cmdline(supervisor)
    assert any(arg.endswith("hub-mirror-supervise") for arg in supervisor_args), supervisor_args
