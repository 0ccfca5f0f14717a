"""`install: method: package`, the quick start's pillar: Debian's docker-registry serves as
the mirror, the package's own service stays stopped and disabled, and a re-apply changes
nothing."""

import json
import os
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.netutil import free_port

pytestmark = pytest.mark.integration


def test_package_method_serves_from_the_distribution_binary(masterless, clean_hub, mirror_name, tmp_path):
    port = free_port()
    masterless.set_pillar(
        {"install": {"method": "package"}, "mirrors": {mirror_name: {"upstream": clean_hub.url, "listen": f"127.0.0.1:{port}"}}}
    )
    first = masterless.apply()
    assert first.returncode == 0, first
    assert all(ret["result"] for ret in first.states.values()), first
    settings = json.loads((Path(masterless.lookup["config_dir"]) / f"{mirror_name}.supervise.json").read_text())
    assert settings["binary"] == "/usr/bin/docker-registry"
    assert masterless.run("hub_mirror.config", f"mirror={mirror_name}").data["proxy"] == {"remoteurl": clean_hub.url}

    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "a"))
    assert masterless.run("hub_mirror.catalog", f"mirror={mirror_name}").data == ["library/alpine"]
    # The package's own service (its config serves :5000 on every interface) stays off.
    assert not any(
        entry.startswith("S") and entry.endswith("docker-registry")
        for level in "2345"
        for entry in os.listdir(f"/etc/rc{level}.d")
    )
    again = masterless.apply()
    assert again.returncode == 0, again
    assert again.changes == {}
