"""A mirror's life on the host: what it publishes to the mine, and what configure, remove
and orphans do when a local user or the service user races or rewrites them (issue 10)."""

import json
import os
import subprocess

import pytest
import yaml
from salt.exceptions import CommandExecutionError

from _hub_mirror import mirror, registry_config, storage, supervisor
from tests.unit.host import lookup_in, pillar_mirror, settings_of


@pytest.mark.parametrize(
    "entry,url,loopback_only",
    [
        ({"listen": "127.0.0.1:5000"}, "http://127.0.0.1:5000", True),
        # Every address, nothing advertised: the published URL is loopback.
        ({"listen": "0.0.0.0:5000"}, "http://127.0.0.1:5000", True),
        ({"listen": "eth0:5000"}, "http://192.0.2.10:5000", False),
        ({"listen": "0.0.0.0:5000", "advertise": "http://mirror1.example.net:5000/"}, "http://mirror1.example.net:5000", False),
        # Advertised as given, even on loopback (a port forward, or several test hosts on one machine).
        ({"listen": "127.0.0.11:5000", "advertise": "http://127.0.0.11:5000"}, "http://127.0.0.11:5000", False),
    ],
)
def test_endpoint_publishes_the_advertised_url(monkeypatch, entry, url, loopback_only):
    probed = []
    monkeypatch.setattr(mirror, "answers", lambda base, timeout: probed.append(base) or True)
    (published,) = mirror.endpoint(settings_of({"mirrors": {"hub": entry}}, redact=True))
    assert published == {"mirror": "hub", "registry": "docker.io", "url": url, "loopback_only": loopback_only, "serving": True}
    # Serving is checked where the mirror listens, not through the (maybe NATed) advertised URL.
    assert probed == [url if "advertise" not in entry else f"http://{entry['listen'].replace('0.0.0.0', '127.0.0.1')}"]


def test_an_orphan_config_cannot_point_a_purge_at_a_system_directory(tmp_path):
    # The config is the service user's file (0600, its own): it can rewrite rootdirectory.
    lookup = lookup_in(tmp_path)
    os.makedirs(lookup["config_dir"])
    for name, root in (("old", "/etc"), ("older", "/tmp"), ("oldest", "/var/lib/../../root")):
        text = registry_config.config_header(name) + yaml.safe_dump({"storage": {"filesystem": {"rootdirectory": root}}})
        with open(os.path.join(lookup["config_dir"], f"{name}.yml"), "w", encoding="utf-8") as handle:
            handle.write(text)
    conf = settings_of({"lookup": lookup, "mirrors": {"dockerhub": pillar_mirror()}}, redact=True)
    assert mirror.orphans(conf) == ["old", "older", "oldest"]
    for name in ("old", "older", "oldest"):
        assert mirror.orphan(conf, name)["storage"] == ""


@pytest.fixture
def swapped_storage(tmp_path):
    """A storage directory in a parent another user can write, a victim directory the
    storage is swapped for (a symlink) in the middle of a hub_mirror call, and the pillar."""
    parent = tmp_path / "alice"
    cache = parent / "cache"
    cache.mkdir(parents=True)
    victim = tmp_path / "victim"
    (victim / "docker").mkdir(parents=True)
    (victim / "docker" / "precious").write_text("not a cache\n")
    (victim / storage.STORAGE_MARKER).write_text("planted\n")

    def swap():
        os.rename(cache, parent / "cache.real")
        os.symlink(victim, cache)

    raw = {"lookup": lookup_in(tmp_path), "mirrors": {"dockerhub": pillar_mirror(storage=str(cache))}}
    return cache, victim, swap, raw


def test_configure_does_not_chown_a_symlink_swapped_in_for_the_storage(swapped_storage, monkeypatch):
    # The upstream check (up to 10 s) sits between the storage plan and the chown.
    _, victim, swap, raw = swapped_storage
    monkeypatch.setattr(mirror, "check_listen_free", lambda conf, spec: None)
    monkeypatch.setattr(mirror, "service_ids", lambda conf, required=True: (54321, 54321))
    monkeypatch.setattr(mirror, "check_upstream", lambda spec, timeout=10: swap() or [])
    conf = settings_of(raw)
    with pytest.raises(CommandExecutionError, match="storage"):
        mirror.configure(conf, conf["mirrors"]["dockerhub"])
    assert os.stat(victim).st_uid == 0
    assert os.stat(victim / "docker").st_uid == 0


def test_a_purge_does_not_follow_a_symlink_swapped_in_for_the_storage(swapped_storage, monkeypatch):
    # Stopping the mirror (up to 15 s) sits between choosing what to delete and deleting it.
    cache, victim, swap, raw = swapped_storage
    (cache / "docker").mkdir()
    (cache / storage.STORAGE_MARKER).write_text("ours\n")
    for kind in (supervisor.Systemd, supervisor.Sysv):
        monkeypatch.setattr(kind, "running", lambda self, name: False)
    monkeypatch.setattr(mirror, "mirror_processes", lambda paths: [])
    monkeypatch.setattr(mirror, "stop_service", lambda conf, spec: swap() or True)
    conf = settings_of(raw, redact=True)
    with pytest.raises(CommandExecutionError, match="storage"):
        mirror.remove(conf, conf["mirrors"]["dockerhub"], purge_storage=True)
    assert (victim / "docker" / "precious").exists()
    assert (victim / storage.STORAGE_MARKER).exists()


def test_a_token_taken_out_of_pillar_leaves_it_in_no_file(tmp_path, monkeypatch):
    # 3.x reads the token from a 0600 file beside the config: once the mirror is anonymous
    # that file holds empty credentials; on 2.8, which has no helper, it and the helper go.
    monkeypatch.setattr(mirror, "check_listen_free", lambda conf, spec: None)
    monkeypatch.setattr(mirror, "check_upstream", lambda spec, timeout=10: [])
    monkeypatch.setattr(mirror, "service_ids", lambda conf, required=True: (os.getuid(), os.getgid()))
    lookup = lookup_in(tmp_path)
    storage_dir = str(tmp_path / "cache")

    def configure(version="3.0.0", **credential):
        entry = pillar_mirror(storage=storage_dir, **credential)
        conf = settings_of({"version": version, "lookup": lookup, "mirrors": {"hub": entry}})
        return conf, mirror.configure(conf, conf["mirrors"]["hub"])

    conf, first = configure(username="u", token="dckr_pat_GONE")
    paths = mirror.mirror_paths(conf, "hub")
    assert "credentials" in first["changes"] and os.path.exists(paths["credentials"])
    _, second = configure()
    assert "credentials" in second["changes"]
    with open(paths["credentials"], encoding="utf-8") as handle:
        stored = json.load(handle)
    assert (stored["Username"], stored["Secret"]) == ("", "")
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or b"dckr_pat_GONE" not in path.read_bytes(), path
    assert configure()[1]["changes"] == {}
    _, third = configure(version="2.8.2")
    assert third["changes"]["credentials"] == {"old": paths["credentials"], "new": ""}
    assert third["changes"]["credential_helper"] == {"old": paths["credential_helper"], "new": ""}
    assert not os.path.lexists(paths["credentials"]) and not os.path.lexists(paths["credential_helper"])
    assert configure(version="2.8.2")[1]["changes"] == {}


def test_an_upgraded_nginx_restarts_the_front_at_the_next_apply(tmp_path):
    # A package upgrade replaces nginx under a running front, which keeps the old code.
    nginx = tmp_path / "nginx"
    nginx.write_bytes(b"1.22.1")
    lookup = {**lookup_in(tmp_path), "front_binary": str(nginx)}
    conf = settings_of({"lookup": lookup, "mirrors": {"hub": pillar_mirror(storage=str(tmp_path / "cache"))}})
    spec = conf["mirrors"]["hub"]

    def fingerprint():
        files = supervisor.render_service_files(conf, spec)
        return mirror._fingerprint(conf, spec, files, registry_config.render_config_files(conf, spec))

    before = fingerprint()
    assert fingerprint() == before
    nginx.write_bytes(b"1.22.1-7+deb12u1")
    assert fingerprint() != before
    # A mirror without a front does not restart for it.
    unfronted = {**spec, "front": "none"}
    unfronted_texts = registry_config.render_config_files(conf, unfronted)
    without = mirror._fingerprint(conf, unfronted, {}, unfronted_texts)
    nginx.write_bytes(b"1.22.1-7+deb12u2")
    assert mirror._fingerprint(conf, unfronted, {}, unfronted_texts) == without


@pytest.mark.parametrize("front", ["nginx", "none"])
def test_deploy_before_configure_says_to_configure(tmp_path, front):
    lookup = lookup_in(tmp_path)
    os.makedirs(os.path.join(lookup["prefix"], "bin"))
    os.symlink("/bin/true", os.path.join(lookup["prefix"], "bin", "registry"))
    lookup["front_binary"] = "/bin/true"
    conf = settings_of({"lookup": lookup, "mirrors": {"hub": pillar_mirror(front=front)}})
    assert mirror.deploy(conf, conf["mirrors"]["hub"], test=True)["changes"]  # a test run predicts
    with pytest.raises(CommandExecutionError) as raised:
        mirror.deploy(conf, conf["mirrors"]["hub"])
    message = str(raised.value)
    assert message.startswith(f"mirror hub: {lookup['config_dir']}/hub.yml, ")
    assert message.endswith(" missing; apply hub_mirror.configure first")
    assert (f"{lookup['config_dir']}/hub.front.conf" in message) == (front == "nginx")
    assert not os.path.exists(lookup["init_dir"])  # nothing written


@pytest.fixture
def purge_ready(swapped_storage, monkeypatch):
    """A marked cache whose mirror is stopped, and the settings to purge it with."""
    cache, _, _, raw = swapped_storage
    (cache / storage.STORAGE_MARKER).write_text("ours\n")
    for kind in (supervisor.Systemd, supervisor.Sysv):
        monkeypatch.setattr(kind, "running", lambda self, name: False)
    monkeypatch.setattr(mirror, "mirror_processes", lambda paths: [])
    monkeypatch.setattr(mirror, "stop_service", lambda conf, spec: True)
    return cache, settings_of(raw, redact=True)


def test_a_purge_removes_a_tree_deeper_than_python_can_walk(purge_ready, request):
    # The registry (the service user) writes the cache: it may make it as deep as it likes.
    cache, conf = purge_ready
    # Should the purge fail, pytest's own clean-up (rmtree) must not meet the tree.
    request.addfinalizer(lambda: subprocess.run(["rm", "-rf", str(cache)], check=False))
    fd = os.open(cache, os.O_RDONLY)
    for _ in range(1500):  # shutil.rmtree recurses once per level
        os.mkdir("docker", dir_fd=fd)
        deeper = os.open("docker", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)
    assert mirror.remove(conf, conf["mirrors"]["dockerhub"], purge_storage=True)["changes"] == {str(cache): "purged"}
    assert not cache.exists()


def test_a_purge_that_fails_halfway_keeps_the_marker_and_says_where(purge_ready, monkeypatch):
    cache, conf = purge_ready
    (cache / "docker" / "registry").mkdir(parents=True)
    (cache / "docker" / "registry" / "blob").write_text("x")
    # What rm says when the service user keeps writing into a directory it empties.
    real_run = mirror.subprocess.run

    def failing_rm(argv, **kwargs):
        proc = real_run(["sh", "-c", f"echo \"rm: cannot remove '{argv[-1]}/registry': Directory not empty\" >&2; exit 1"],
                        **kwargs)
        return proc

    monkeypatch.setattr(mirror.subprocess, "run", failing_rm)
    with pytest.raises(CommandExecutionError) as raised:
        mirror.remove(conf, conf["mirrors"]["dockerhub"], purge_storage=True)
    assert str(raised.value) == (
        f"removing in {cache} failed: "
        f"rm: cannot remove '{cache}/docker/registry': Directory not empty"
    )
    assert (cache / storage.STORAGE_MARKER).exists()  # so the purge can be run again
    monkeypatch.setattr(mirror.subprocess, "run", real_run)
    assert mirror.remove(conf, conf["mirrors"]["dockerhub"], purge_storage=True)["changes"] == {str(cache): "purged"}
    assert not cache.exists()


def test_a_purge_removes_more_entries_than_one_command_line_holds(purge_ready):
    # Found by an adversarial pass: 12,000 long scheduler-state names overflowed ARG_MAX.
    cache, conf = purge_ready
    for index in range(12_000):
        (cache / f"scheduler-state.json{'x' * 200}{index}").touch()
    assert mirror.remove(conf, conf["mirrors"]["dockerhub"], purge_storage=True)["changes"] == {str(cache): "purged"}
    assert not cache.exists()
