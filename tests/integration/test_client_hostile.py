"""Issue 15 with the real clients: what trying to break `hub_mirror.client` found, each
class closed and proven with Debian's dockerd, containerd 1.6 + ctr and skopeo in the
private network namespace of tests/integration/test_client.py (nothing leaves it)."""

import json
import os
import signal
import stat
import subprocess
import time

import pytest

from tests.integration.test_client import IMAGE, REF, gets, host, minion, user_daemon_json, world  # noqa: F401
from tests.support.clients import skopeo_copy
from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.netutil import TricklingMirror, free_port
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.saltcall import unique_name, world_traversable_dir

pytestmark = pytest.mark.integration


def salt_call(host, *args, prefix=()):
    """``state.apply hub_mirror.client`` (or ``args``) run through ``prefix``, e.g. in a
    mount namespace; the test thread is in the network namespace, so salt-call is too."""
    result = host.minion.run(*(args or ("state.apply", "hub_mirror.client")), prefix=prefix)
    assert result.returncode == 0, result
    if args:
        return result.data
    (ret,) = result.states.values()
    return ret


def line_of(ret, runtime):
    return next(line for line in ret["comment"].splitlines() if line.startswith(f"{runtime}:"))


def test_a_read_only_daemon_json_costs_docker_only_and_the_next_run_recovers(host, world):
    """Class 1: the write fails (read-only mount); nothing is recorded for it, the other
    runtime is configured and recorded, and once writable the next runs work."""
    mirror = world.mirrors[0]
    original = user_daemon_json(host.root)
    dockerd = host.dockerd(original)
    host.set_pillar({"docker.io": mirror.url}, ["docker", "podman"])
    docker_dir = host.paths["docker_daemon_json"].parent
    read_only = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f'mount --bind -o ro "{docker_dir}" "{docker_dir}" && exec "$@"', "ro"]
    ret = salt_call(host, prefix=read_only)
    assert ret["result"] is True, ret
    assert "could not be written (Read-only file system)" in line_of(ret, "docker"), ret
    assert line_of(ret, "podman").startswith(f"podman: configured docker.io -> {mirror.url}")
    index = json.loads((host.root / "state" / ".client" / "index.json").read_text())
    assert [entry["runtime"] for entry in index["files"].values()] == ["podman"]
    served = gets(mirror)
    host.skopeo_pull()
    assert gets(mirror) > served

    # Writable again: the next run configures docker (dockerd reloads it); clean undoes all.
    ret = host.apply()
    assert set(ret["changes"]) == {"docker"}, ret
    assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]
    cleaned = host.apply("hub_mirror.client.clean")
    assert set(cleaned["changes"]) == {"docker", "podman"}, cleaned
    assert host.paths["docker_daemon_json"].read_text() == original
    assert not host.dropin.exists()
    assert dockerd.wait_mirrors([]) == []


def test_user_edits_between_runs_survive_the_clean_and_a_symlink_stays(host, world):
    """Class 2: configure, the user edits daemon.json (a symlink) and the drop-in,
    configure again, clean: the edits stay, the symlink stays, dockerd takes each step."""
    mirror = world.mirrors[0]
    real = host.root / "real-docker"
    real.mkdir()
    original = user_daemon_json(host.root)
    (real / "daemon.json").write_text(original)
    link = host.paths["docker_daemon_json"]
    link.parent.mkdir(parents=True)
    link.symlink_to(real / "daemon.json")
    from tests.support.clients import Dockerd  # pylint: disable=import-outside-toplevel

    dockerd = Dockerd(host.world.netns, host.paths["docker_pidfile"].parent, link, host.env, {"/etc/hosts": host.etc_hosts})
    host.daemons.append(dockerd)
    dockerd.start()
    host.set_pillar({"docker.io": mirror.url}, ["docker", "podman"])
    assert set(host.apply()["changes"]) == {"docker", "podman"}
    assert link.is_symlink() and mirror.url in (real / "daemon.json").read_text()
    assert dockerd.wait_mirrors([mirror.url]) == [mirror.url]

    (real / "daemon.json").write_text((real / "daemon.json").read_text().replace('"10m"', '"20m"'))
    own = '\n[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'
    host.dropin.write_text(host.dropin.read_text() + own)
    again = host.apply()
    assert again["changes"] == {}, again
    host.skopeo_pull()  # the edited drop-in still parses for containers/image

    cleaned = host.apply("hub_mirror.client.clean")
    assert set(cleaned["changes"]) == {"docker", "podman"}, cleaned
    assert link.is_symlink() and os.readlink(link) == str(real / "daemon.json")
    assert (real / "daemon.json").read_text() == original.replace('"10m"', '"20m"')
    # The user's text, to the byte: they began it with a blank line after the block.
    assert host.dropin.read_text() == own
    assert dockerd.wait_mirrors([]) == []
    assert dockerd.info()["LoggingDriver"] == "json-file"
    host.skopeo_pull()


@pytest.fixture
def ipv6_mirror(world, tmp_path):
    """A mirror listening on every address of the namespace, so http://[::1]:port works."""
    port = free_port()
    config = proxy_config(tmp_path / "cache6", world.hub.url, HUB_USER, HUB_TOKEN)
    config["http"] = {"addr": f":{port}"}
    mirror = RegistryProcess(tmp_path / "mirror6", config=config).start()
    mirror.v6_url = f"http://[::1]:{port}"
    yield mirror
    mirror.stop()


def test_an_ipv6_mirror_is_used_where_the_runtime_takes_it_and_left_out_where_not(host, world, ipv6_mirror, capsys):
    """Class 3: a bracketed IPv6 mirror. dockerd pulls through it; containerd 1.6 does
    not use such a host and containers/image cannot parse one ("invalid reference
    format"), so hosts.toml and the drop-in leave it out and ctr and skopeo keep pulling
    from the upstream instead of failing."""
    url = ipv6_mirror.v6_url
    dockerd = host.dockerd(user_daemon_json(host.root))
    containerd = host.containerd()
    host.set_pillar({"docker.io": [url]}, ["docker", "containerd", "podman"])
    ret = host.apply()
    assert ret["result"] is True, ret
    assert f"{url} answers" in ret["comment"]
    assert line_of(ret, "docker").startswith(f"docker: configured docker.io -> {url}")
    assert "left out http://[::1]" in line_of(ret, "containerd"), ret
    assert "left out http://[::1]" in line_of(ret, "podman"), ret
    assert not host.dropin.exists() and not host.hosts_toml.exists()
    assert dockerd.wait_mirrors([url]) == [url]

    figures = {}
    served = gets(ipv6_mirror, "manifests")
    dockerd.pull(IMAGE)
    figures["docker_via_mirror"] = gets(ipv6_mirror, "manifests") - served
    for name, pull in (("ctr", lambda: host.ctr_pull(containerd)), ("skopeo", host.skopeo_pull)):
        world.hub.reset_counts()
        pull()
        figures[f"{name}_from_upstream"] = world.hub.counts()["manifest_get"]
    with capsys.disabled():
        print("\nmanifest GETs with an IPv6 mirror:", json.dumps(figures))
    assert all(count >= 1 for count in figures.values()), figures

    cleaned = host.apply("hub_mirror.client.clean")
    assert set(cleaned["changes"]) == {"docker"}, cleaned
    assert dockerd.wait_mirrors([]) == []


@pytest.mark.parametrize(
    "value,words",
    [
        ("|\n        http://127.0.0.1:5000\n", "'\\n'"),
        ("'http://bücher.example:5000'", "xn--bcher-kva.example"),
        ("'http://a\"b:5000'", "'\"'"),
    ],
)
def test_a_mirror_url_that_would_break_a_runtime_fails_the_render_by_key(host, world, value, words):
    """Class 3: refused before anything is written, with the key and the fix."""
    original = user_daemon_json(host.root)
    host.paths["docker_daemon_json"].parent.mkdir(parents=True)
    host.paths["docker_daemon_json"].write_text(original)
    host.minion.write_raw_pillar(
        "hub_mirror:\n"
        f"  lookup: {{state_dir: {host.root / 'state'}}}\n"
        "  client:\n"
        f"    mirrors:\n      docker.io: {value}\n"
        f"    paths: {{docker_daemon_json: {host.paths['docker_daemon_json']}, "
        f"registries_conf_d: {host.paths['registries_conf_d']}}}\n"
    )
    result = host.minion.apply("hub_mirror.client")
    assert result.returncode != 0
    assert "hub_mirror:client:mirrors:docker.io" in result.output and words in result.output, result
    assert host.paths["docker_daemon_json"].read_text() == original
    assert not host.dropin.exists()


def test_a_blocked_docker_io_stays_blocked(host, world):
    """Class 4: the user's `blocked = true` is kept, and the comment says so."""
    registries = host.containers / "registries.conf"
    registries.write_text('[[registry]]\nlocation = "docker.io"\nblocked = true\n')
    host.set_pillar({"docker.io": world.mirrors[0].url}, ["podman"])
    ret = host.apply()
    assert ret["changes"] == {}, ret
    assert "kept it blocked" in line_of(ret, "podman")
    result = skopeo_copy(
        host.world.netns, REF, host.root / "oci", host.env,
        {"/etc/hosts": host.etc_hosts, "/etc/containers": host.containers}, check=False,
    )
    assert result.returncode != 0 and "blocked" in result.stderr, result.stderr


def test_a_stopped_dockerd_whose_unit_sets_a_mirror_still_starts(host, world):
    """Class 4: the unit says --registry-mirror; with dockerd stopped the state leaves
    daemon.json alone, so dockerd (started the way the unit says) still starts."""
    units = host.paths["systemd_units"]
    units.mkdir()
    (units / "docker.service").write_text(
        "[Service]\nExecStart=/usr/sbin/dockerd -H fd:// --registry-mirror=http://127.0.0.1:1\n"
    )
    original = user_daemon_json(host.root)
    host.paths["docker_daemon_json"].parent.mkdir(parents=True)
    host.paths["docker_daemon_json"].write_text(original)
    host.set_pillar({"docker.io": world.mirrors[0].url}, ["docker"])
    ret = host.apply()
    assert ret["changes"] == {}, ret
    assert f"dockerd is started ({units}/docker.service) with --registry-mirror" in line_of(ret, "docker")
    assert host.paths["docker_daemon_json"].read_text() == original
    dockerd = host.dockerd(original, "--registry-mirror=http://127.0.0.1:1")
    assert dockerd.mirrors() == ["http://127.0.0.1:1/"]


def test_containerd_keeps_trusting_the_ca_crt_in_certs_d(host, world):
    """Class 5: ca.crt in certs.d/docker.io is how ctr trusts Docker Hub here (no system
    CA). With hub_mirror's hosts.toml and the mirror dead, the fallback still verifies."""
    directory = host.paths["containerd_certs_d"] / "docker.io"
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(world.cert.read_bytes())
    containerd = host.containerd()
    env = dict(host.env)
    env.pop("SSL_CERT_FILE")
    containerd.env = env
    host.ctr_pull(containerd)  # without hub_mirror: trusts ca.crt

    mirror = world.mirrors[0]
    host.set_pillar({"docker.io": mirror.url}, ["containerd"])
    ret = host.apply()
    assert "kept containerd using ca.crt" in line_of(ret, "containerd"), ret
    mirror.stop()
    world.hub.reset_counts()
    host.ctr_pull(containerd)
    assert world.hub.counts()["manifest_get"] >= 1


def test_a_root_umask_of_077_leaves_no_0700_directory_for_non_root_skopeo(host, world):
    """Class 5: salt-call under umask 077 creates registries.conf.d; skopeo as nobody
    reads the drop-in and pulls through the mirror."""
    mirror = world.mirrors[0]
    host.paths["registries_conf_d"].rmdir()
    host.set_pillar({"docker.io": mirror.url}, ["podman"])
    ret = salt_call(host, prefix=["sh", "-c", 'umask 077; exec "$@"', "umask"])
    assert ret["changes"], ret
    assert stat.S_IMODE(host.paths["registries_conf_d"].stat().st_mode) == 0o755
    assert stat.S_IMODE(host.dropin.stat().st_mode) == 0o644

    home = world_traversable_dir(f"/tmp/hm-nobody-{unique_name('')}")
    os.chown(home, 65534, 65534)
    env = dict(host.env, HOME=str(home), XDG_RUNTIME_DIR=str(home), XDG_CONFIG_HOME=str(home),
               REGISTRY_AUTH_FILE=str(home / "auth.json"), DOCKER_CONFIG=str(home))
    served = gets(mirror)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "skopeo", "--override-arch=amd64", "--override-os=linux", "copy", "--retry-times=0",
            "--quiet", f"docker://{REF}", f"oci:{home}/oci:pulled"]
    try:
        result = subprocess.run(
            host.world.netns.command(argv, {"/etc/hosts": host.etc_hosts, "/etc/containers": host.containers}),
            capture_output=True, text=True, timeout=180, env=env, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert gets(mirror) > served
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_a_mirror_that_trickles_holds_the_state_no_longer_than_probe_timeout(host, world, capsys):
    """Class 6: one byte a second; the old probe waited 121 s with probe_timeout 2."""
    mirror = TricklingMirror(repeat=2)
    url, sent = mirror.url, mirror.sent
    host.set_pillar({"docker.io": url}, ["podman"], probe_timeout=2)
    start = time.monotonic()
    ret = salt_call(host, "hub_mirror.client_configure")
    elapsed = time.monotonic() - start
    mirror.close()
    assert f"{url} no answer within 2s" in ret["comment"], ret
    deadline = time.monotonic() + 30
    while not sent and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sent and sent[0] <= 5, sent
    with capsys.disabled():
        print(f"\nsalt-call hub_mirror.client_configure with a 1 byte/s mirror: {elapsed:.1f} s, {sent[0]} bytes sent")


def test_one_broken_runtime_file_costs_that_runtime_only(host, world):
    """Class 1: a k3s registries.yaml with `docker.io: [list]` and a containerd
    config.toml that is not UTF-8 used to abort the run after other runtimes' files
    were written and before they were recorded."""
    mirror = world.mirrors[0]
    k3s = host.paths["k3s_registries"]
    k3s.parent.mkdir(parents=True)
    broken_k3s = "mirrors:\n  docker.io:\n  - http://10.9.9.9:5000\n"
    k3s.write_text(broken_k3s)
    host.paths["containerd_config"].write_bytes(b"version = 2\n# caf\xe9 in latin-1\n")
    host.set_pillar({"docker.io": mirror.url}, ["containerd", "podman", "k3s"])
    ret = host.apply()
    assert ret["result"] is True, ret
    assert "left as it was: its mirrors.docker.io is not a mapping" in line_of(ret, "k3s"), ret
    assert "could not check how containerd picks this up" in line_of(ret, "containerd")
    assert set(ret["changes"]) == {"containerd", "podman"}
    index = json.loads((host.root / "state" / ".client" / "index.json").read_text())
    assert sorted(entry["runtime"] for entry in index["files"].values()) == ["containerd", "podman"]
    served = gets(mirror)
    host.skopeo_pull()
    assert gets(mirror) > served
    cleaned = host.apply("hub_mirror.client.clean")
    assert set(cleaned["changes"]) == {"containerd", "podman"}, cleaned
    assert not host.dropin.exists() and not host.hosts_toml.exists()
    assert k3s.read_text() == broken_k3s


def test_what_each_runtime_does_with_a_mirror_host_written_as_is(host, world, ipv6_mirror, capsys):
    """The facts the validation and the per-runtime rules stand on, measured with the
    config written by hand (not by hub_mirror): an IPv6 literal, a non-ASCII host and a
    quote, each as the mirror of docker.io."""
    port = ipv6_mirror.config["http"]["addr"].rsplit(":", 1)[1]
    hosts = {"ipv6": f"[::1]:{port}", "unicode": f"bücher.example:{port}", "quote": f'a"b:{port}'}
    dockerd = host.dockerd(user_daemon_json(host.root))
    containerd = host.containerd()
    base = json.loads(host.paths["docker_daemon_json"].read_text())
    figures = {}
    for kind, hostport in hosts.items():
        url = f"http://{hostport}"
        seen = {}
        host.paths["docker_daemon_json"].write_text(json.dumps({**base, "registry-mirrors": [url]}))
        os.kill(int(dockerd.pidfile.read_text()), signal.SIGHUP)
        seen["dockerd_mirrors_after_reload"] = dockerd.wait_mirrors([url], timeout=5)

        served = gets(ipv6_mirror, "manifests")
        host.hosts_toml.parent.mkdir(parents=True, exist_ok=True)
        host.hosts_toml.write_text(
            'server = "https://registry-1.docker.io"\n\n'
            f'[host.{json.dumps(url, ensure_ascii=False)}]\n  capabilities = ["pull", "resolve"]\n'
        )
        result = containerd.pull(REF, host.paths["containerd_certs_d"], check=False)
        seen["ctr"] = {"rc": result.returncode, "mirror_manifest_gets": gets(ipv6_mirror, "manifests") - served}

        served = gets(ipv6_mirror, "manifests")
        host.dropin.write_text(
            f'[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n\n[[registry.mirror]]\n'
            f"location = {json.dumps(hostport, ensure_ascii=False)}\ninsecure = true\n"
        )
        result = skopeo_copy(
            host.world.netns, REF, host.root / f"oci-{kind}", host.env,
            {"/etc/hosts": host.etc_hosts, "/etc/containers": host.containers}, check=False,
        )
        seen["skopeo"] = {
            "rc": result.returncode,
            "mirror_manifest_gets": gets(ipv6_mirror, "manifests") - served,
            "error": result.stderr.strip().splitlines()[-1][-160:] if result.returncode else "",
        }
        figures[kind] = seen
    host.dropin.unlink()
    with capsys.disabled():
        print("\nruntimes and mirror hosts written as-is:", json.dumps(figures, indent=2, ensure_ascii=False))
    # What hub_mirror relies on: dockerd takes an IPv6 mirror; containerd 1.6 does not
    # use one; containers/image cannot use one.
    assert figures["ipv6"]["dockerd_mirrors_after_reload"] == [f"http://{hosts['ipv6']}"]
    assert figures["ipv6"]["ctr"]["mirror_manifest_gets"] == 0
    assert figures["ipv6"]["skopeo"]["mirror_manifest_gets"] == 0
    # ... and every containers/image pull of docker.io fails outright (no fallback) with
    # an IPv6, non-ASCII or quoted mirror host: why those are refused or left out.
    assert all("invalid reference format" in figures[kind]["skopeo"]["error"] for kind in hosts), figures
