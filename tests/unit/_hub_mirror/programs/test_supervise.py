"""The supervisor's own logic, without a registry: healing the expiry schedule that a
full disk leaves empty (registry 2.8 panics on it at every start)."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _hub_mirror.programs import supervise
from tests.support.modules import program


def test_an_empty_schedule_is_moved_aside(tmp_path):
    (tmp_path / "scheduler-state.json").write_text("")
    aside = supervise.set_aside_broken_schedule(str(tmp_path))
    assert aside and aside.startswith(str(tmp_path / "scheduler-state.json.broken-"))
    assert not (tmp_path / "scheduler-state.json").exists()


def test_a_valid_or_missing_schedule_is_left_alone(tmp_path):
    assert supervise.set_aside_broken_schedule(str(tmp_path)) is None
    state = {"library/alpine@sha256:ab": {"Key": "k", "Expiry": "2026-12-01T00:00:00Z", "EntryType": 0}}
    (tmp_path / "scheduler-state.json").write_text(json.dumps(state))
    assert supervise.set_aside_broken_schedule(str(tmp_path)) is None
    assert json.loads((tmp_path / "scheduler-state.json").read_text()) == state
    assert supervise.set_aside_broken_schedule("") is None


def test_settings_come_from_one_file_and_a_bad_one_is_a_config_error(tmp_path, capsys):
    good = {"binary": "/opt/r", "config": "/etc/m.yml", "offline_config": "/etc/m.offline.yml",
            "listen": "127.0.0.1:5000", "upstream": "https://registry-1.docker.io"}
    (tmp_path / "good.json").write_text(json.dumps(good))
    settings = supervise.Settings(str(tmp_path / "good.json"))
    assert (settings.binary, settings.recheck, settings.log) == ("/opt/r", 15, "")
    (tmp_path / "bad.json").write_text(json.dumps({**good, "binary": ""}))
    assert supervise.main([str(tmp_path / "bad.json")]) == 78
    assert supervise.main(["--binary=/opt/r"]) == 2
    assert "missing binary" in capsys.readouterr().err


def test_the_registry_dies_with_its_supervisor(tmp_path):
    """A child started the supervisor's way gets SIGTERM when its parent is SIGKILLed."""
    pidfile = tmp_path / "child.pid"
    parent = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c",
         "import os, subprocess, sys, time\n"
         f"sys.path.insert(0, {str(program('supervise').parent)!r})\n"
         "import supervise as s\n"
         "child = subprocess.Popen(['sleep', '600'], preexec_fn=s.die_with_parent(os.getpid()))\n"
         f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
         "time.sleep(600)\n"])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            state = open(f"/proc/{child}/stat", encoding="ascii").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the child {child} outlived its parent")


def test_the_front_starts_in_its_directory_without_old_fills_and_backs_off_when_it_fails(tmp_path, monkeypatch):
    """A fake nginx that records its arguments and fails at once, as one whose port is taken."""
    fake = tmp_path / "nginx"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/calls\nexit 1\n")
    fake.chmod(0o755)
    front_dir = tmp_path / "front"
    (front_dir / "fill" / "a").mkdir(parents=True)
    monkeypatch.chdir(front_dir)
    args = type("Args", (), {"front_binary": str(fake), "front_dir": str(front_dir), "front_conf": "/etc/m.front.conf"})
    front = supervise.Front(args)
    front.keep()
    front.process.wait()
    assert not (front_dir / "fill").exists() and (front_dir / "temp").is_dir()
    front.keep()  # it failed: the next start waits
    assert front.process is None and front.backoff == 4
    front.keep()
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"-c /etc/m.front.conf -p {front_dir}/ -e stderr -g daemon off;"
    ]
    front.next_start = 0
    front.keep()
    front.process.wait()
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
    # The manifest cache is off the storage, in a private directory that goes with the front.
    private = (front_dir / "manifests").resolve()
    assert (front_dir / "manifests").is_symlink() and private.parent == Path(tempfile.gettempdir())
    assert private.stat().st_mode & 0o777 == 0o700
    front.stop()
    assert not private.exists()
