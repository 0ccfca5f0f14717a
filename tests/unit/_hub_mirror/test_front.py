"""The front's config (checked by the real nginx), its tally of what it served, and its
install: nginx where a mirror has a front, the distribution's own nginx service off."""

import os
import pathlib
import pwd
import shutil
import string
import subprocess
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from salt.exceptions import CommandExecutionError

from _hub_mirror import front
from _hub_mirror.programs import supervise
from tests.support.netutil import free_port
from tests.unit.host import mirror_spec

NGINX = shutil.which("nginx", path="/usr/sbin:/usr/bin")


def nginx_accepts(text, tmp_path):
    """``nginx -t`` on ``text``, with the front's directory as its prefix."""
    (tmp_path / "front.conf").write_text(text)
    (tmp_path / "temp").mkdir(exist_ok=True)
    proc = subprocess.run(
        [NGINX, "-t", "-q", "-p", f"{tmp_path}/", "-e", "stderr", "-c", str(tmp_path / "front.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("interval", ["0", "90s", "1h30m"])
def test_nginx_accepts_the_rendered_config(tmp_path, interval):
    spec = mirror_spec(listen=f"127.0.0.1:{free_port()}", storage=str(tmp_path / "cache"), manifest_check_interval=interval)
    accepted, errors = nginx_accepts(front.render_conf(spec), tmp_path)
    assert accepted, errors


def test_the_config_serves_blob_files_and_coalesces_the_rest():
    spec = mirror_spec(storage="/srv/cache", manifest_check_interval="10m")
    text = front.render_conf(spec)
    assert "listen 127.0.0.1:5000;" in text
    assert "root /srv/cache/docker/registry/v2/blobs/sha256;" in text
    assert "try_files /$d2/$d2$d62/data @fill;" in text
    assert "server unix:registry.sock;" in text
    assert "proxy_cache_valid 200 600s;" in text  # the tag, for manifest_check_interval
    assert text.count("proxy_cache_lock on;") == 3  # blobs, manifests by digest, tags
    assert "proxy_ignore_client_abort on;" in text
    assert "proxy_cache_valid 200 1s;" in front.render_conf(mirror_spec())
    assert "listen [::]:5000 ipv6only=off;" in front.render_conf(mirror_spec(listen="[::]:5000"))


@pytest.mark.parametrize(("duration", "expected"), [("0", 0), ("90s", 90), ("1h30m", 5400), ("1.5s", 2), ("500ms", 1), ("8.3m", 498), ("32.2m", 1932)])
def test_seconds_of_a_go_duration_round_up(duration, expected):
    assert front.seconds(duration) == expected


# Validation refuses "." and ".." parts (and storage is resolved before it is rendered).
@given(st.text(alphabet=string.ascii_letters + string.digits + "._@+-", min_size=1, max_size=40).filter(lambda p: p not in (".", "..")))
@settings(max_examples=200, deadline=None)
def test_an_allowed_storage_path_goes_into_the_config_as_it_is(part):
    storage = f"/srv/{part}"
    text = front.render_conf(mirror_spec(storage=storage))
    assert f"    root {storage}/docker/registry/v2/blobs/sha256;\n" in text


@given(st.text(min_size=1, max_size=20).filter(lambda s: any(c in s for c in " ;{}$\"'\\\n#")))
@settings(max_examples=200, deadline=None)
def test_a_value_nginx_would_read_differently_is_refused(bad):
    # Validation allow-lists storage paths before this; the renderer refuses on its own.
    with pytest.raises(CommandExecutionError):
        front.render_conf({**mirror_spec(), "storage": f"/srv/{bad}"})


def test_counters_add_the_totals_and_the_logs(tmp_path):
    spec = mirror_spec(storage=str(tmp_path))
    directory = tmp_path / front.FRONT_DIR
    directory.mkdir()
    (directory / "hits.log").write_text(
        "blob - 200 100\nblob HIT 200 50\nblob MISS 200 999\nblob - 404 0\nbroken\nblob - 206 10\n"
        "manifest HIT 200 7\nmanifest MISS 200 7\nmanifest EXPIRED 200 7\nmanifest STALE 200 3\nmanifest UPDATING 200 3\n"
        "- 200 1\nHIT 200 2\nblob - 404 5 extra\n"  # lines of a front from before manifests were logged
    )
    (directory / "hits.log.1").write_text("blob - 200 1000\n")
    supervise.fold_hits(str(directory))
    assert not (directory / "hits.log.1").exists()
    assert front.counters(spec) == {
        "blob_files": 4,
        "coalesced": 2,
        "manifests": 2,
        "served": {"bytes": 1173, "human": "1.1 KiB"},
    }
    (directory / "hits.json").write_text("[not a dict]")
    assert front.counters(spec)["blob_files"] == 3


class Packages:
    """pkg.version and pkg.install of a host without nginx."""

    def __init__(self, binary, works=True):
        self.binary, self.works, self.installed = binary, works, []

    def version(self, name):
        return "1.22.1" if self.installed else ""

    def install(self, name, refresh=False):
        self.installed.append(name)
        if self.works:
            self.binary.write_text("")
        return {name: {"new": "1.22.1"}} if self.works else "E: unable to locate package"


class Supervisor:
    def __init__(self):
        self.disabled = []

    def package_disable(self, service):
        self.disabled.append(service)


def install_conf(tmp_path):
    lookup = {"front_binary": str(tmp_path / "nginx"), "front_package": "nginx", "front_service": "nginx"}
    return {"lookup": lookup}


def test_nginx_is_installed_where_missing_and_its_own_service_turned_off(tmp_path):
    conf, supervisor = install_conf(tmp_path), Supervisor()
    packages = Packages(tmp_path / "nginx")
    assert front.install(conf, packages.version, packages.install, supervisor, test=True)["front"]["old"] == ""
    assert packages.installed == [] and supervisor.disabled == []
    assert "stopped and disabled" in front.install(conf, packages.version, packages.install, supervisor)["front"]["new"]
    assert packages.installed == ["nginx"] and supervisor.disabled == ["nginx"]
    assert front.install(conf, packages.version, packages.install, supervisor) == {}
    assert supervisor.disabled == ["nginx"]  # an nginx that is there is left alone


def test_a_failed_nginx_install_says_how_to_go_on(tmp_path):
    packages = Packages(tmp_path / "nginx", works=False)
    with pytest.raises(CommandExecutionError, match="front: none"):
        front.install(install_conf(tmp_path), packages.version, packages.install, Supervisor())


def test_counters_follow_no_symlink_the_service_user_put_there(tmp_path):
    """Root reads the front's directory, which the service user owns: a log or a directory
    swapped for a symlink to somewhere else is not read."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "hits.log").write_text("blob - 200 100\n")
    storage = tmp_path / "storage"
    (storage / front.FRONT_DIR).mkdir(parents=True)
    (storage / front.FRONT_DIR / "hits.log").symlink_to(elsewhere / "hits.log")
    assert front.counters(mirror_spec(storage=str(storage)))["blob_files"] == 0
    (storage / front.FRONT_DIR / "hits.log").unlink()
    (storage / front.FRONT_DIR).rmdir()
    (storage / front.FRONT_DIR).symlink_to(elsewhere)
    assert front.counters(mirror_spec(storage=str(storage)))["blob_files"] == 0


def test_the_check_before_a_restart_runs_nginx_on_the_config(tmp_path):
    spec = mirror_spec(listen=f"127.0.0.1:{free_port()}", storage=str(tmp_path / "cache"))
    text = front.render_conf(spec)
    checks = set(pathlib.Path(tempfile.gettempdir()).glob("hub-mirror-front-check-*"))
    assert front.check_conf(NGINX, text, {}) is None
    refused = front.check_conf(NGINX, text.replace("proxy_cache_lock on;", "proxy_cache_lock_age_unknown on;", 1), {})
    assert 'unknown directive "proxy_cache_lock_age_unknown"' in refused
    assert "No such file" in front.check_conf(str(tmp_path / "no-nginx"), text, {})
    assert set(pathlib.Path(tempfile.gettempdir()).glob("hub-mirror-front-check-*")) == checks  # its prefix goes


def test_the_check_leaves_the_address_to_the_start(tmp_path):
    # nginx -t binds, and a privileged port is one the service may bind (systemd gives it
    # CAP_NET_BIND_SERVICE below 1024) where the check, run without it, may not.
    nobody = pwd.getpwnam("nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    for listen in ("0.0.0.0:80", "[::]:443", "127.0.0.1:5000"):
        assert front.check_conf(NGINX, front.render_conf(mirror_spec(listen=listen, storage=str(tmp_path))), as_nobody) is None


def test_the_check_hands_the_service_user_nothing_it_could_redirect(tmp_path, monkeypatch):
    """Found by an adversarial pass: the check's prefix was the service user's before root
    chowned what is in it, so a link planted there (``temp`` -> /etc) took root's chown
    elsewhere. Root now hands the prefix over last, and removes it as the service user."""
    nobody = pwd.getpwnam("nobody")
    as_nobody = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    victim = tmp_path / "victim"  # stands for /etc
    victim.mkdir()
    tmp_path.chmod(0o755)
    real_chown = os.chown

    def chown(path, *args, **kwargs):
        real_chown(path, *args, **kwargs)
        if os.path.basename(str(path)).startswith("hub-mirror-front-check-"):
            # The service user, the moment it may write in the prefix.
            plant = 'rm -rf "$0/temp"; ln -s "$1" "$0/temp"'
            subprocess.run(["sh", "-c", plant, str(path), str(victim)], check=False, **as_nobody)

    monkeypatch.setattr(os, "chown", chown)
    front.check_conf(NGINX, front.render_conf(mirror_spec(storage=str(tmp_path / "cache"))), as_nobody)
    assert victim.stat().st_uid == 0
    assert victim.exists()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("hits.json", b"[" * 100000),
        ("hits.json", b'{"files": Infinity}'),
        ("hits.json", b'{"bytes": 1e308}'),
        ("hits.log", b"blob - 200 " + b"9" * 5000 + b"\n"),
        ("hits.log", b"blob - 200 " + b"9" * 400 + b"\n"),
    ],
)
def test_the_counters_survive_whatever_the_service_user_writes(tmp_path, name, data):
    # Found by an adversarial pass: each of these was a traceback in root's status.
    (tmp_path / front.FRONT_DIR).mkdir()
    (tmp_path / front.FRONT_DIR / name).write_bytes(data)
    report = front.counters(mirror_spec(storage=str(tmp_path)))
    assert all(0 <= report[key] < 1 << 63 for key in ("blob_files", "coalesced", "manifests"))
    assert 0 <= report["served"]["bytes"] < 1 << 63
