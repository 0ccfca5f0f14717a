"""The service files: what the systemd unit allows the registry, and values quoted so that
no control character reaches a unit file."""

import pytest

from _hub_mirror import settings, supervisor
from tests.unit.host import mirror_spec


def test_unprivileged_ports_drop_every_capability():
    conf = settings.merge(settings.DEFAULTS, {})
    conf["lookup"]["supervisor"] = "systemd"
    files = supervisor.render_service_files(conf, mirror_spec())
    unit = files["/etc/systemd/system/hub-mirror-dockerhub.service"][0]
    assert "CapabilityBoundingSet=\n" in unit
    assert "User=hub-mirror" in unit
    assert 'ReadWritePaths="/var/lib/hub-mirror/dockerhub"' in unit
    assert "Restart=always" in unit
    assert "t0k3n" not in unit


def test_a_control_character_never_reaches_a_unit_file():
    with pytest.raises(ValueError):
        supervisor._systemd_quote("/srv/cache\nUser=root")
