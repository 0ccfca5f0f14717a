"""A salt-master and Salt minions on systemd test hosts, all in one network namespace.

The system tier runs everything a test needs in a network namespace made for the run
(:class:`tests.support.clients.NetNS`, only ``lo``): the test hosts (systemd-nspawn with
``--network-namespace-path``, so they share its ``lo``), the salt-master, the Docker Hub
stand-in, the release file server and the pulling clients.

Why not the salt-factories master: its start checks and event forwarding go through an
event-listener TCP server in the pytest process's own network namespace, which a master
inside the test namespace cannot reach. So :class:`NetnsMaster` starts the same
``salt-master`` program (from the CI venv) the same way, with the same file_roots
(``[<repo>/salt, <repo>]``, so ``saltutil.sync_all`` ships ``_modules``/``_states``) and
one pillar file per minion, under ``nsenter --net``. The ``salt`` CLI runs there too.

:func:`start_minion` turns a booted :class:`~tests.support.nspawn.TestHost` into a minion of
that master: a ``salt-minion`` unit (enabled, so the minion is back after a reboot) from
the root's ``/opt/saltvenv``, minion id = host name; the master accepts keys on its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .netutil import clean_env
from .nspawn import wait_until
from .processes import stop_group
from .results import StateResult
from .saltcall import STATE_TREE

SALT_TIMEOUT = 300
PR_SET_PDEATHSIG = 1
VENV_BIN = Path(sys.executable).parent

MINION_UNIT = """\
[Unit]
Description=Salt minion (hub_mirror system tests)
After=network.target

[Service]
ExecStart=/usr/local/bin/salt-minion
# Salt's own unit: a state run that restarts the minion must not kill its own job.
KillMode=process
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


class SaltResult(StateResult):
    """One ``salt`` CLI call: ``.returncode``, ``.stdout``, ``.stderr``, ``.data`` (the
    minion's return, parsed from ``--out=json``; the exit status is non-zero when
    the minion's job failed)."""

    def __init__(self, argv, proc, minion_id):
        self.argv = argv
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        self.data = _parse_json_stream(proc.stdout).get(minion_id)

    def __repr__(self):
        failed = {sid: ret.get("comment") for sid, ret in self.states.items() if ret["result"] is not True}
        shown = json.dumps(failed, indent=1) if failed else self.output[-4000:]
        return f"<SaltResult {' '.join(self.argv[-3:])} rc={self.returncode}\n{shown}>"


def _die_with_parent():
    # A killed pytest run must not leave a master behind (nsenter execs it: this persists).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _parse_json_stream(text):
    """Merge the JSON objects ``salt --out=json`` prints (one per returning minion)."""
    decoder, merged, pos = json.JSONDecoder(), {}, 0
    text = text.strip()
    while pos < len(text):
        try:
            value, end = decoder.raw_decode(text, pos)
        except ValueError:
            break
        if isinstance(value, dict):
            merged.update(value)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return merged


def free_port_in(netns):
    with netns.entered(), socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NetnsMaster:
    """``salt-master`` in the network namespace ``netns`` (a clients.NetNS), rooted at
    ``root``, auto-accepting minion keys; :meth:`salt` runs the CLI next to it."""

    def __init__(self, netns, root):
        self.netns = netns
        self.root = Path(root)
        self.conf_dir = self.root / "conf"
        self.pillar_dir = self.root / "pillar"
        self.log_file = self.root / "master.log"
        self.publish_port = free_port_in(netns)
        self.ret_port = free_port_in(netns)
        self.pillars: dict[str, dict] = {}
        # Every salt CLI output, kept for the secret checks.
        self.outputs: list[str] = []
        self.proc = None

    def start(self, timeout=60):
        for directory in (self.conf_dir, self.pillar_dir):
            directory.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "master").write_text(yaml.safe_dump({
            "root_dir": str(self.root),
            "user": "root",
            "interface": "127.0.0.1",
            "publish_port": self.publish_port,
            "ret_port": self.ret_port,
            "auto_accept": True,
            "file_roots": {"base": STATE_TREE},
            "pillar_roots": {"base": [str(self.pillar_dir)]},
            "log_file": str(self.log_file),
            "log_level": "warning",
            "log_level_logfile": "debug",
            # Two cores: a few workers are plenty for a handful of minions.
            "worker_threads": 3,
        }))
        self._write_top()
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={self.netns.path}", str(VENV_BIN / "salt-master"),
             "-c", str(self.conf_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.root / "master.stderr", "wb"),  # pylint: disable=consider-using-with
            env=clean_env(), start_new_session=True, preexec_fn=_die_with_parent)

        def listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"salt-master exited with {self.proc.returncode}: "
                                   f"{(self.root / 'master.stderr').read_text()[-2000:]}")
            with self.netns.entered(), socket.socket() as sock:
                sock.settimeout(1)
                return sock.connect_ex(("127.0.0.1", self.ret_port)) == 0

        wait_until(listening, timeout, "the salt-master to listen", 0.3, fatal=(RuntimeError,))
        return self

    def stop(self):
        """Stop the master (its process group); nothing to do if it is not running."""
        if self.proc is not None:
            stop_group(self.proc, 30)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # ------------------------------------------------------------------ pillar

    def _write_top(self):
        top = {"base": {minion_id: [f"hm_{minion_id.replace('-', '_')}"] for minion_id in self.pillars}}
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump(top))

    def set_pillar(self, minion_id, hub_mirror):
        """Make ``hub_mirror`` the ``hub_mirror`` pillar of ``minion_id`` (applies on the
        next pillar render: every state.apply renders it afresh)."""
        self.pillars[minion_id] = hub_mirror
        sls = self.pillar_dir / f"hm_{minion_id.replace('-', '_')}.sls"
        sls.write_text(yaml.safe_dump({"hub_mirror": hub_mirror}, sort_keys=False))
        os.chmod(sls, 0o600)
        self._write_top()

    # ------------------------------------------------------------------ CLI

    def salt(self, minion_id, *args, timeout=SALT_TIMEOUT) -> SaltResult:
        """``salt <minion_id> <args>`` with JSON output; ``timeout`` bounds the job."""
        argv = ["nsenter", f"--net={self.netns.path}", str(VENV_BIN / "salt"),
                "-c", str(self.conf_dir), "--out=json", f"--timeout={timeout}",
                minion_id, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60,
                              env=clean_env(), check=False)
        result = SaltResult(argv, proc, minion_id)
        self.outputs.append(result.output)
        return result

    def wait_for_minion(self, minion_id, timeout=120):
        """Until ``salt <minion_id> test.ping`` answers True (key accepted, connected)."""
        def pong():
            return self.salt(minion_id, "test.ping", timeout=10).data is True

        t0 = time.monotonic()
        wait_until(pong, timeout, f"minion {minion_id} to answer test.ping", 1)
        return time.monotonic() - t0


def start_minion(host, master, timeout=120):
    """Configure and start a salt-minion of ``master`` in the booted ``host`` (minion id =
    host name), enabled at boot; return once it answers ``test.ping``."""
    host.path("/etc/salt/minion.d").mkdir(parents=True, exist_ok=True)
    host.path("/etc/salt/minion.d/hub-mirror-test.conf").write_text(yaml.safe_dump({
        "id": host.name,
        "master": "127.0.0.1",
        "master_port": master.ret_port,
        "publish_port": master.publish_port,
        "log_level_logfile": "debug",
        "acceptance_wait_time": 1,
        "random_reauth_delay": 0,
        "recon_default": 500,
        "recon_max": 2000,
    }))
    host.path("/etc/systemd/system/salt-minion.service").write_text(MINION_UNIT)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "enable", "--now", "salt-minion.service"])
    return master.wait_for_minion(host.name, timeout)
