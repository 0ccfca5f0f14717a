"""docker on a real systemd host: ``hub_mirror.client`` reloads it with ``systemctl reload
docker`` (the path it takes when systemd is PID 1 and docker.service is active), never
restarts it, and dockerd pulls through the mirror.

The Debian 12 test host (systemd under systemd-nspawn, tests/support/nspawn.py) has no
docker in its cached root: Debian's dockerd, containerd, runc and docker CLI from this
machine are bind-mounted read-only (the root is Debian 12 too, so their libraries are
there), under a docker.service whose reload is Debian's (``kill -s HUP $MAINPID``). Salt
runs masterless inside the host, from this repository (bind-mounted). The host shares a
private network namespace (only ``lo``) with the mirror and the Docker Hub stand-in.
"""

import json

import pytest
import yaml

from tests.support.clients import Dockerd, NetNS
from tests.support.hub import HUB_TOKEN, HUB_USER, FakeDockerHub
from tests.support.nspawn import TestHost, ensure_root, wait_until
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.saltcall import REPO

pytestmark = pytest.mark.system

DEBIAN_DOCKER = ("/usr/sbin/dockerd", "/usr/bin/containerd", "/usr/bin/containerd-shim-runc-v2", "/usr/sbin/runc", "/usr/bin/docker")
UNIT = """[Unit]
Description=Docker (Debian's binaries, for hub_mirror's test)
[Service]
Type=notify
ExecStart=/usr/sbin/dockerd --config-file=/etc/docker/daemon.json
ExecReload=/bin/kill -s HUP $MAINPID
[Install]
WantedBy=multi-user.target
"""
MINION = {
    "id": "docker-host",
    "file_client": "local",
    "root_dir": "/var/lib/hm-salt",
    "file_roots": {"base": ["/srv/hub_mirror/salt", "/srv/hub_mirror"]},
    "pillar_roots": {"base": ["/etc/hm-salt/pillar"]},
}


def salt_call(host, *args):
    result = host.run(["/opt/saltvenv/bin/salt-call", "-c", "/etc/hm-salt", "--local", "--out=json", *args], timeout=300)
    return json.loads(result.stdout)["local"]


def applied(host, sls):
    (ret,) = salt_call(host, "state.apply", sls).values()
    assert ret["result"] is True, ret
    return ret


def docker_mirrors(host):
    info = json.loads(host.run(["/usr/bin/docker", "info", "--format", "{{json .RegistryConfig.Mirrors}}"]).stdout)
    return [m.rstrip("/") for m in info or []]


def unit_show(host, *props):
    out = host.run(["systemctl", "show", "docker", *(f"--property={p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_docker_under_systemd_is_reloaded_not_restarted_and_pulls_through_the_mirror(tmp_path, image_layout):
    layout, _ = image_layout
    root = ensure_root("amd64")
    netns = NetNS(prefix="hmd").create()
    started, host = [], None
    try:
        with netns.entered():
            hub = FakeDockerHub(tmp_path / "hub", username=HUB_USER, token=HUB_TOKEN).start()
            started.append(hub)
            hub.push_image(layout, "latest", "library/alpine")
            mirror = RegistryProcess(tmp_path / "mirror", config=proxy_config(tmp_path / "cache", hub.url, HUB_USER, HUB_TOKEN)).start()
            started.append(mirror)
        host = TestHost(root, network=netns.path, bind_ro={str(REPO): "/srv/hub_mirror", **{p: p for p in DEBIAN_DOCKER}})
        host.start()
        daemon_json = host.path("/etc/docker/daemon.json")
        daemon_json.parent.mkdir(parents=True)
        original = json.dumps(Dockerd.base_config("/var/lib/docker"), indent=4) + "\n"
        daemon_json.write_text(original)
        host.path("/etc/systemd/system/docker.service").write_text(UNIT)
        host.run("systemctl daemon-reload && systemctl start docker", timeout=120)
        before = unit_show(host, "MainPID", "NRestarts")
        assert docker_mirrors(host) == []

        pillar = host.path("/etc/hm-salt/pillar")
        pillar.mkdir(parents=True)
        (pillar / "top.sls").write_text("base:\n  '*':\n    - hub_mirror\n")
        (pillar / "hub_mirror.sls").write_text(yaml.safe_dump({"hub_mirror": {
            "client": {"mirrors": {"docker.io": mirror.url}, "runtimes": ["docker"], "probe_timeout": 2},
            "lookup": {"state_dir": "/var/lib/hm-state"},
        }}))
        host.path("/etc/hm-salt/minion").write_text(yaml.safe_dump(MINION))
        salt_call(host, "saltutil.sync_all")

        configured = applied(host, "hub_mirror.client")
        assert configured["changes"]["docker"]["reload"] == "systemctl reload docker", configured
        wait_until(lambda: docker_mirrors(host) == [mirror.url], 30, "dockerd to report the mirror")
        served = mirror.log_text().count('"GET /v2/library/alpine/blobs/')
        host.run(["/usr/bin/docker", "pull", "--quiet", "docker.io/library/alpine:latest"], timeout=180)
        assert mirror.log_text().count('"GET /v2/library/alpine/blobs/') > served

        mirror.stop()
        dropped = applied(host, "hub_mirror.client")
        assert dropped["changes"]["docker"]["reload"] == "systemctl reload docker", dropped
        wait_until(lambda: docker_mirrors(host) == [], 30, "dockerd to drop the mirror")
        assert daemon_json.read_text() == original
        assert applied(host, "hub_mirror.client.clean")["changes"] == {}
        # The same dockerd all along: reloaded by systemd, never restarted.
        assert unit_show(host, "MainPID", "NRestarts") == before
        journal = host.run(["journalctl", "--no-pager", "-o", "cat", "-u", "docker"]).stdout
        # systemd ran ExecReload twice, and dockerd re-read daemon.json each time.
        assert journal.count("Reloaded docker.service") == 2, journal[-3000:]
        assert journal.count("Got signal to reload configuration") == 2, journal[-3000:]
    finally:
        if host is not None:
            host.stop()
        with netns.entered():
            for server in reversed(started):
                server.stop()
        netns.delete()
