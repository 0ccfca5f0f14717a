"""
Masterless Salt, the way a user runs it: ``salt-call --local`` with this repo as file_root.

Each :class:`Masterless` owns a private minion config, pillar and cache under its root, and
points every ``hub_mirror:lookup`` path at that root too, so tests never touch the host's
own mirror. Only the init scripts (or units) live where the service manager reads them, named
after each test's unique mirror names.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from .results import StateResult

REPO = Path(__file__).resolve().parents[2]
SALT_CALL = str(Path(sys.executable).parent / "salt-call")
# The state tree of every test minion and master: the SLS, and the repo root so that
# saltutil.sync_all ships _modules and _states.
STATE_TREE = [str(REPO / "salt"), str(REPO)]


def unique_name(prefix="t"):
    """``prefix`` and 8 random hex digits: names no other test or run uses."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def world_traversable_dir(path):
    """Make ``path`` and its parents traversable by the service user (pytest's tmp is 0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for part in [path, *path.parents]:
        if str(part) in ("/", "/tmp"):
            break
        os.chmod(part, os.stat(part).st_mode | 0o711)
    return path


class CallResult(StateResult):
    """One ``salt-call --local --out=json`` run; ``.data`` is its ``local`` return."""

    def __init__(self, proc):
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        try:
            self.data = json.loads(proc.stdout)["local"] if proc.stdout.strip() else None
        except (ValueError, KeyError, TypeError):
            self.data = None

    def __repr__(self):
        return f"<CallResult rc={self.returncode} {self.output[-3000:]}>"


class Masterless:
    """One masterless minion under ``root``. ``file_roots`` replaces the state tree
    (default :data:`STATE_TREE`), ``salt_call`` the program that runs it (another Salt
    install's), ``grains`` adds static grains, ``lookup`` overrides lookup paths."""

    def __init__(self, root, minion_id=None, lookup=None, grains=None, file_roots=None, salt_call=SALT_CALL):
        self.root = world_traversable_dir(root)
        self.minion_id = minion_id or unique_name("minion-")
        self.salt_call = salt_call
        self.conf_dir = self.root / "etc"
        self.pillar_dir = self.root / "pillar"
        # Salt prepends root_dir to an absolute log_file: name the file where it lands.
        self.log_file = self.root / "salt-root" / "minion.log"
        self.lookup = {
            "prefix": str(self.root / "opt"),
            "config_dir": str(self.root / "etc-hub-mirror"),
            "state_dir": str(self.root / "var-lib"),
            "log_dir": str(self.root / "log"),
            "run_dir": str(self.root / "run"),
            **(lookup or {}),
        }
        for directory in (self.conf_dir, self.pillar_dir):
            directory.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "minion").write_text(
            yaml.safe_dump(
                {
                    "id": self.minion_id,
                    "file_client": "local",
                    "root_dir": str(self.root / "salt-root"),
                    "file_roots": {"base": [str(path) for path in (file_roots or STATE_TREE)]},
                    "pillar_roots": {"base": [str(self.pillar_dir)]},
                    "log_file": "minion.log",
                    "log_level_logfile": "debug",
                    # Static grains override detected ones, e.g. a CPU arch this host is not.
                    **({"grains": grains} if grains else {}),
                }
            )
        )
        (self.pillar_dir / "top.sls").write_text("base:\n  '*':\n    - hub_mirror\n")
        self.pillar = {}

    @classmethod
    def fresh(cls, sync=True, **kwargs):
        """A minion under a new root in /tmp (pytest's tmp is too deep and private for the
        service user), ``saltutil.sync_all``-ed unless ``sync`` is False."""
        minion = cls(world_traversable_dir(f"/tmp/hm-{unique_name('')}"), **kwargs)
        if sync:
            minion.sync()
        return minion

    def set_pillar(self, hub_mirror):
        """Write the hub_mirror pillar; ``lookup`` paths default to this root."""
        hub_mirror = dict(hub_mirror)
        hub_mirror["lookup"] = {**self.lookup, **hub_mirror.get("lookup", {})}
        self.pillar = hub_mirror
        self.write_raw_pillar(yaml.safe_dump({"hub_mirror": hub_mirror}, sort_keys=False))

    def write_raw_pillar(self, text):
        """Pillar text as a user would write it, bad YAML types included. The file holds
        the stand-in's token: as private as /srv/pillar (salt-call runs as root)."""
        sls = self.pillar_dir / "hub_mirror.sls"
        sls.write_text(text)
        os.chmod(sls, 0o600)

    def run(self, *args, timeout=300, prefix=()):
        """``salt-call --local --out=json <args>`` as this minion, run through ``prefix``
        (e.g. ``unshare ...``) when given."""
        proc = subprocess.run(
            [*prefix, self.salt_call, "-c", str(self.conf_dir), "--local", "--out=json", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.root),
            check=False,
        )
        return CallResult(proc)

    def sync(self):
        """``saltutil.sync_all``, which must succeed."""
        result = self.run("saltutil.sync_all")
        assert result.returncode == 0, result
        return result

    def apply(self, sls="hub_mirror", test=False, timeout=300):
        """``state.apply <sls>`` (``test=True`` when ``test``)."""
        args = ["state.apply", sls]
        if test:
            args.append("test=True")
        return self.run(*args, timeout=timeout)

    def mirror_names(self):
        return list((self.pillar.get("mirrors") or {}).keys())

    def teardown(self):
        """Stop every mirror this minion started; the cache goes with the tmp dir."""
        for name in self.mirror_names():
            self.run("hub_mirror.remove", f"mirror={name}")

    def discard(self, stop_mirrors=True):
        """Stop this minion's mirrors (unless ``stop_mirrors`` is False: a minion that
        shares another's mirrors) and delete its root."""
        if stop_mirrors:
            self.teardown()
        shutil.rmtree(self.root, ignore_errors=True)
