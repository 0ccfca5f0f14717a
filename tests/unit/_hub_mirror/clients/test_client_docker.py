"""dockerd's own flags, in its unit, its drop-ins or /etc/default/docker: a
--registry-mirror (dockerd refuses registry-mirrors set both as a flag and in daemon.json)
or a --config-file elsewhere keeps daemon.json as it is."""

import os

import pytest

from tests.unit.host import configure, snapshot


@pytest.mark.parametrize(
    "unit,dropin,blocked",
    [
        ("ExecStart=/usr/bin/dockerd -H fd:// --registry-mirror=http://m:1\n", None, True),
        ("ExecStart=/usr/bin/dockerd -H fd://\n", "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd \\\n  --registry-mirror http://m:1\n", True),
        ("ExecStart=/usr/bin/dockerd --registry-mirror=http://m:1\n", "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd\n", False),
        ("ExecStart=/usr/bin/dockerd --config-file=/srv/other.json\n", None, True),
    ],
)
def test_dockerd_flags_in_its_unit_keep_daemon_json_alone_while_it_is_stopped(host, unit, dropin, blocked):
    units = host["paths"]["systemd_units"]
    os.makedirs(f"{units}/docker.service.d")
    open(f"{units}/docker.service", "w").write("[Service]\n" + unit)
    if dropin:
        open(f"{units}/docker.service.d/override.conf", "w").write(dropin)
    host["runtimes"] = ["docker"]
    before = snapshot(host["paths"]["docker_daemon_json"])
    changes, lines = configure(host)
    if blocked:
        assert changes == {} and snapshot(host["paths"]["docker_daemon_json"]) == before
        assert lines[-1].startswith("docker: left alone (dockerd is started (")
    else:
        assert "docker" in changes, lines


def test_docker_opts_in_etc_default_docker_count_too(host):
    open(host["paths"]["docker_default"], "w").write('DOCKER_OPTS="--registry-mirror=http://m:1"\n')
    host["runtimes"] = ["docker"]
    changes, lines = configure(host)
    assert changes == {} and "--registry-mirror" in lines[-1]

