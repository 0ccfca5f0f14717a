"""``client:recheck`` under a salt-master: the state, run through the master, adds the
schedule entry live in the minion daemon, which then follows a mirror that stops and
starts with no further state run. The mirror and the Docker Hub stand-in listen on
loopback; no client program runs here (tests/integration/test_recheck.py and
test_runtimes.py run real clients in a private namespace), only their config files.

Needs the saltfactories plugin: run without ``-p no:saltfactories``.
"""


import pytest

from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.processes import wait_for
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.results import states_of
from tests.support.runtimes import RECHECK_JOB
from tests.support.saltcall import unique_name
from tests.support.saltmaster import SaltCluster

pytestmark = pytest.mark.integration

RECHECK = 6
FOLLOW_TIMEOUT = 10 * RECHECK + 60


def test_recheck_through_a_master(salt_factories, clean_hub, tmp_path):
    mirror = RegistryProcess(tmp_path / "mirror", config=proxy_config(tmp_path / "cache", clean_hub.url, HUB_USER, HUB_TOKEN)).start()
    files = tmp_path / "client"
    certs_d, dropin_dir = files / "certs.d", files / "containers" / "registries.conf.d"
    hosts_toml, dropin = certs_d / "docker.io" / "hosts.toml", dropin_dir / "50-hub-mirror.conf"
    (files / "containers").mkdir(parents=True)
    (files / "containers" / "registries.conf").write_text("# v2, nothing of its own\n")
    cluster = SaltCluster(salt_factories, f"/tmp/hm-{unique_name('')}")
    minion = cluster.add_minion(
        {
            "client": {
                "mirrors": {"docker.io": mirror.url},
                "runtimes": ["containerd", "podman"],
                "probe_timeout": 1,
                "recheck": RECHECK,
                "paths": {
                    "containerd_config": str(files / "config.toml"),
                    "containerd_certs_d": str(certs_d),
                    "registries_conf": str(files / "containers" / "registries.conf"),
                    "registries_conf_d": str(dropin_dir),
                },
            }
        }
    )
    try:
        with cluster.running():
            assert cluster.salt(minion, "saltutil.sync_all").returncode == 0
            applied = cluster.salt(minion, "state.apply", "hub_mirror.client")
            (ret,) = states_of(applied.data).values()
            assert ret["result"] is True, ret
            assert set(ret["changes"]) == {"containerd", "podman", "recheck"}
            # Run inside the minion daemon: the entry went in live, not only to its file.
            assert "no salt-minion runs now" not in ret["comment"]
            job = cluster.salt(minion, "schedule.list", "return_yaml=False").data[RECHECK_JOB]
            assert job["function"] == "hub_mirror.client_configure" and job["return_job"] is True
            assert mirror.hostport in dropin.read_text()

            mirror.stop()
            wait_for(lambda: not hosts_toml.exists() and not dropin.exists(), FOLLOW_TIMEOUT,
                     "the minion's schedule drops the dead mirror", interval=0.5)
            mirror.start()
            wait_for(lambda: hosts_toml.exists() and dropin.exists(), FOLLOW_TIMEOUT,
                     "the minion's schedule takes it back", interval=0.5)
            assert mirror.url in hosts_toml.read_text()

            cleaned = cluster.salt(minion, "state.apply", "hub_mirror.client.clean")
            (ret,) = states_of(cleaned.data).values()
            assert ret["result"] is True and "recheck" in ret["changes"], ret
            assert RECHECK_JOB not in cluster.salt(minion, "schedule.list", "return_yaml=False").data
            assert not hosts_toml.exists() and not dropin.exists()
    finally:
        mirror.stop()
