"""A fleet through one salt-master: two mirror hosts publish their endpoints with the Salt
mine, three build hosts take their mirrors from it, and a build host keeps pulling when
its first mirror is killed.

Five salt-minion daemons (pytest-salt-factories) run on this one machine:

- ``mirror1-*`` (zone a) and ``mirror2-*`` (zone b), grain ``role: mirror``: one mirror
  each, listening on 127.0.0.11 and 127.0.0.12 (Linux routes 127/8 to ``lo``) and
  publishing that URL through ``advertise``, since a loopback listen address alone is
  published as loopback only. ``mine_functions`` comes from their pillar.
- ``build1-*`` (zone a), ``build2-*`` (zone b): ``client:discover`` on
  ``G@role:mirror``, same zone first. ``build3-*`` (zone c) discovers only zone c, where
  there is no mirror, so it falls back to its static ``client:mirrors``.

The mirrors' upstream is the Docker Hub stand-in on 127.0.0.1, and the clients pull it by
that name (``127.0.0.1:<port>/library/alpine``), not as docker.io: skopeo's own fallback
after the mirrors is then the stand-in on loopback, and over https, which the plain-http
stand-in refuses, so a pull that succeeds was served by a mirror. Each build host's client
config (registries.conf.d drop-in, containerd certs.d) lives under its own directory.

Needs the saltfactories plugin: run without ``-p no:saltfactories``.
"""

import json
import subprocess
import types
from pathlib import Path

import pytest
import tomllib

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import clean_env, free_port
from tests.support.release import archive_pillar
from tests.support.results import states_of
from tests.support.saltcall import unique_name, world_traversable_dir
from tests.support.saltmaster import SALT_TIMEOUT, SaltCluster

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]

IMAGE = "library/alpine"
CLIENT_STATE = "hub_mirror-client-clients-configured"


def add_mirror_host(cluster, hub, release_server, index, address, zone):
    port = free_port(address)
    mirror = hub.mirror_pillar(f"{address}:{port}", advertise=f"http://{address}:{port}")
    return cluster.add_minion(
        archive_pillar(release_server, {unique_name("m"): mirror}),
        id_prefix=f"mirror{index}-",
        grains={"role": "mirror", "zone": zone},
        extra_pillar={"mine_functions": {"hub_mirror.endpoint": []}},
    )


def add_build_host(cluster, root, index, zone, discover, static=None):
    home = root / f"build{index}-client"
    paths = {
        "registries_conf": home / "containers" / "registries.conf",
        "registries_conf_d": home / "containers" / "registries.conf.d",
        "containerd_config": home / "containerd" / "config.toml",
        "containerd_certs_d": home / "containerd" / "certs.d",
    }
    client = {
        "discover": discover,
        "runtimes": ["podman", "containerd"],
        "paths": {key: str(value) for key, value in paths.items()},
    }
    if static:
        client["mirrors"] = static
    minion = cluster.add_minion({"client": client}, id_prefix=f"build{index}-", grains={"role": "build", "zone": zone})
    minion.client_paths = paths
    return minion


@pytest.fixture(scope="module")
def fleet(salt_factories, hub, release_server):
    """Master and five minions started; ``saltutil.sync_all`` on all, ``state.apply
    hub_mirror`` on the mirror hosts, ``mine.update``, ``state.apply hub_mirror.client`` on
    the build hosts. The runs' results are kept for the tests."""
    hub.unblock()
    hub.set_delay(0)
    root = world_traversable_dir(f"/tmp/hm-{unique_name('')}")
    cluster = SaltCluster(salt_factories, root)
    upstream = hub.url.split("://", 1)[1]
    mirror1 = add_mirror_host(cluster, hub, release_server, 1, "127.0.0.11", "a")
    mirror2 = add_mirror_host(cluster, hub, release_server, 2, "127.0.0.12", "b")
    same_zone_first = {"tgt": "G@role:mirror", "tgt_type": "compound", "same_grain": "zone"}
    build1 = add_build_host(cluster, root, 1, "a", same_zone_first)
    build2 = add_build_host(cluster, root, 2, "b", same_zone_first)
    build3 = add_build_host(
        cluster, root, 3, "c", {"tgt": "G@role:mirror and G@zone:c", "tgt_type": "compound"},
        static={upstream: [url_of(mirror2)]},
    )
    with cluster.running():
        runs = types.SimpleNamespace()
        runs.synced = cluster.salt("*", "saltutil.sync_all")
        runs.mirrors = cluster.salt("mirror*", "state.apply", "hub_mirror")
        runs.mine = cluster.salt("*", "mine.update")
        runs.clients = cluster.salt("build*", "state.apply", "hub_mirror.client")
        yield types.SimpleNamespace(
            cluster=cluster, runs=runs, upstream=upstream,
            mirror1=mirror1, mirror2=mirror2, build1=build1, build2=build2, build3=build3,
        )


def url_of(minion):
    return minion.pillar["mirrors"][minion.mirror_name]["advertise"]


def host_of(minion):
    return url_of(minion).split("://", 1)[1]


def dropin_mirrors(fleet, build):
    """The mirror hosts the build host's registries.conf.d drop-in lists for the stand-in."""
    dropin = build.client_paths["registries_conf_d"] / "50-hub-mirror.conf"
    registries = tomllib.loads(dropin.read_text())["registry"]
    (entry,) = [r for r in registries if r["prefix"] == fleet.upstream]
    return [mirror["location"] for mirror in entry["mirror"]]


def hosts_toml_mirrors(fleet, build):
    hosts_toml = build.client_paths["containerd_certs_d"] / fleet.upstream / "hosts.toml"
    return [url.split("://", 1)[1] for url in tomllib.loads(hosts_toml.read_text())["host"]]


def each(result):
    """{minion id: {state id: return}} of a state run on several minions."""
    return {minion: states_of(data) for minion, data in result.data.items()}


def client_state(result, minion):
    """The client state's return for ``minion``, from a run on it alone or on a glob."""
    return states_of(result.data.get(minion.id, result.data))[CLIENT_STATE]


def skopeo_through(build, image, dest):
    """skopeo as the build host runs it, the host's registries.conf.d drop-in as its
    registries.conf. skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF: --registries-conf."""
    work = Path(dest).parent / f"{Path(dest).name}-skopeo"
    work.mkdir(parents=True)
    (work / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (work / "auth.json").write_text("{}\n")
    env = clean_env(
        {
            "REGISTRY_AUTH_FILE": str(work / "auth.json"),
            "HOME": str(work),
            "XDG_RUNTIME_DIR": str(work),
            "XDG_CONFIG_HOME": str(work),
            "DOCKER_CONFIG": str(work),
        }
    )
    result = subprocess.run(
        [
            "skopeo", "--policy", str(work / "policy.json"),
            "--registries-conf", str(build.client_paths["registries_conf_d"] / "50-hub-mirror.conf"),
            "--override-arch=amd64", "--override-os=linux",
            "copy", "--retry-times=0", "--quiet", f"docker://{image}", f"oci:{dest}:pulled",
        ],
        env=env, capture_output=True, text=True, timeout=180, check=False, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    return oci.read_tag(dest, "pulled")["digest"]


def catalog(fleet, minion):
    result = fleet.cluster.salt(minion, "hub_mirror.catalog", f"mirror={minion.mirror_name}")
    assert result.returncode == 0, result
    return result.data


def test_every_minion_converges_in_one_run(fleet):
    runs, cluster = fleet.runs, fleet.cluster
    assert set(runs.synced.data) == set(cluster.minions), runs.synced
    assert all("modules.hub_mirror" in synced["modules"] for synced in runs.synced.data.values())

    mirror_runs = each(runs.mirrors)
    assert set(mirror_runs) == {fleet.mirror1.id, fleet.mirror2.id}, runs.mirrors.stdout
    for minion in (fleet.mirror1, fleet.mirror2):
        states = mirror_runs[minion.id]
        assert f"hub_mirror-service-{minion.mirror_name}-running" in states, states
        assert all(ret["result"] is True for ret in states.values()), states

    # Only the mirror hosts have mine_functions: the build hosts' mine.update returns None.
    assert set(runs.mine.data) == set(cluster.minions), runs.mine
    assert runs.mine.data[fleet.mirror1.id] is True and runs.mine.data[fleet.mirror2.id] is True, runs.mine

    client_runs = each(runs.clients)
    assert set(client_runs) == {fleet.build1.id, fleet.build2.id, fleet.build3.id}, runs.clients.stdout
    for states in client_runs.values():
        assert states[CLIENT_STATE]["result"] is True, states
        assert states[CLIENT_STATE]["changes"], states

    # Converged: a second run of each changes nothing.
    again = {**each(cluster.salt("mirror*", "state.apply", "hub_mirror")),
             **each(cluster.salt("build*", "state.apply", "hub_mirror.client"))}
    assert set(again) == set(cluster.minions)
    for minion, states in again.items():
        assert states and all(ret["result"] is True and not ret["changes"] for ret in states.values()), (minion, states)


def test_mirror_hosts_publish_their_advertised_url_in_the_mine(fleet):
    result = fleet.cluster.salt(fleet.build1, "mine.get", "G@role:mirror", "hub_mirror.endpoint", "compound")
    assert result.returncode == 0, result
    assert result.data == {
        minion.id: [
            {
                "mirror": minion.mirror_name,
                "registry": fleet.upstream,
                "url": url_of(minion),
                "loopback_only": False,
                "serving": True,
            }
        ]
        for minion in (fleet.mirror1, fleet.mirror2)
    }
    assert all(HUB_TOKEN not in output for output in fleet.cluster.outputs)


def test_build_hosts_list_the_discovered_mirrors_same_zone_first(fleet):
    one, two = host_of(fleet.mirror1), host_of(fleet.mirror2)
    # Zone a: mirror1 first; zone b: mirror2 first.
    assert dropin_mirrors(fleet, fleet.build1) == [one, two]
    assert hosts_toml_mirrors(fleet, fleet.build1) == [one, two]
    assert dropin_mirrors(fleet, fleet.build2) == [two, one]
    assert hosts_toml_mirrors(fleet, fleet.build2) == [two, one]
    assert (
        f"Mine (hub_mirror.endpoint of 'G@role:mirror'): {fleet.upstream} -> {url_of(fleet.mirror2)}, "
        f"{url_of(fleet.mirror1)}" in client_state(fleet.runs.clients, fleet.build2)["comment"]
    )


def test_a_build_host_the_mine_has_no_mirror_for_keeps_its_static_mirrors(fleet):
    assert dropin_mirrors(fleet, fleet.build3) == [host_of(fleet.mirror2)]
    comment = client_state(fleet.runs.clients, fleet.build3)["comment"]
    assert (
        f"Mine (hub_mirror.endpoint of 'G@role:mirror and G@zone:c'): no mirror; "
        f"from hub_mirror:client:mirrors: {fleet.upstream}"
    ) in comment


def test_pulls_fail_over_to_the_second_mirror_and_a_reapply_takes_the_dead_one_out(fleet, image_layout, tmp_path):
    cluster, build1, mirror1, mirror2 = fleet.cluster, fleet.build1, fleet.mirror1, fleet.mirror2
    image = f"{fleet.upstream}/{IMAGE}:latest"
    expected = image_layout[1]["single"]["manifest_digest"]

    assert skopeo_through(build1, image, tmp_path / "first") == expected
    # build1's first mirror served it; the second has not seen it.
    assert catalog(fleet, mirror1) == [IMAGE]
    assert catalog(fleet, mirror2) == []

    stopped = cluster.salt(mirror1, "hub_mirror.stop", f"mirror={mirror1.mirror_name}")
    assert stopped.returncode == 0 and stopped.data is True, stopped
    assert skopeo_through(build1, image, tmp_path / "second") == expected
    assert catalog(fleet, mirror2) == [IMAGE]

    # The mine still says mirror1 serves (it was updated before the kill): the probe
    # takes it out.
    reapplied = cluster.salt(build1, "state.apply", "hub_mirror.client")
    assert reapplied.returncode == 0, reapplied
    comment = client_state(reapplied, build1)["comment"]
    assert f"{url_of(mirror1)} connection refused" in comment, comment
    assert dropin_mirrors(fleet, build1) == [host_of(mirror2)]
    assert hosts_toml_mirrors(fleet, build1) == [host_of(mirror2)]
    assert skopeo_through(build1, image, tmp_path / "third") == expected

    # Once the mine is updated, discovery itself leaves mirror1 out.
    updated = cluster.salt("*", "mine.update")
    assert updated.returncode == 0, updated
    again = cluster.salt(build1, "state.apply", "hub_mirror.client")
    comment = client_state(again, build1)["comment"]
    assert f"skipped {mirror1.id}/{mirror1.mirror_name} (not serving at the last mine update)" in comment, comment
    assert url_of(mirror1) not in comment.split("\n", 2)[1]  # the probe line
    assert client_state(again, build1)["changes"] == {}


def test_fleet_runner_covers_every_mirror_host(fleet):
    """Runs after the failover test: mirror1 is stopped, both cached the image."""
    salt_run = fleet.cluster.master.salt_run_cli(timeout=SALT_TIMEOUT)
    synced = salt_run.run("saltutil.sync_runners")
    assert synced.returncode == 0 and "runners.hub_mirror" in synced.data, synced
    result = salt_run.run("hub_mirror.fleet", "tgt=G@role:mirror", "tgt_type=compound", "timeout=120")
    assert result.returncode == 0, result
    assert HUB_TOKEN not in result.stdout + result.stderr
    one = f"{fleet.mirror1.id}/{fleet.mirror1.mirror_name}"
    two = f"{fleet.mirror2.id}/{fleet.mirror2.mirror_name}"
    assert set(result.data["mirrors"]) == {one, two}
    assert result.data["images"] == {f"{IMAGE}:latest": [one, two]}
    assert set(result.data["down"]) == {one}
    assert result.data["no_answer"] == {}
