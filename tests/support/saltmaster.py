"""
A salt-master with salt-minion daemons (pytest-salt-factories), driven with the ``salt`` CLI
the way a user runs hub_mirror through a master.

The master serves this repo as its state tree (``salt/`` for the SLS, the repo root for
``_modules``/``_states``, so ``saltutil.sync_all`` ships them) and one pillar file per minion.
Each minion's ``hub_mirror:lookup`` paths point under the cluster's root, as
:class:`~tests.support.saltcall.Masterless` does, so tests never touch the host's own mirror.
"""

import contextlib
import logging
import shutil

import yaml

from tests.support.saltcall import STATE_TREE, unique_name, world_traversable_dir

SALT_TIMEOUT = 300


class ClusterMinion:
    def __init__(self, daemon, lookup, pillar):
        self.daemon = daemon
        self.id = daemon.id
        self.lookup = lookup
        self.pillar = pillar

    @property
    def log_file(self):
        return self.daemon.config["log_file"]

    @property
    def mirror_name(self):
        """The name of this minion's one mirror."""
        (name,) = self.pillar["mirrors"]
        return name

    @property
    def mirror_listen(self):
        return self.pillar["mirrors"][self.mirror_name]["listen"]


class SaltCluster:
    """One master under ``root``; :meth:`add_minion` configures minions with their pillar."""

    def __init__(self, salt_factories, root):
        self.root = world_traversable_dir(root)
        self.pillar_dir = self.root / "pillar"
        self.pillar_dir.mkdir(exist_ok=True)
        self.minions = {}
        # Every salt CLI output, kept for the secret checks.
        self.outputs = []
        self.master = salt_factories.salt_master_daemon(
            unique_name("master-"),
            defaults={"root_dir": str(self.root / "master")},
            overrides={
                "file_roots": {"base": STATE_TREE},
                "pillar_roots": {"base": [str(self.pillar_dir)]},
                "log_level_logfile": "debug",
            },
        )
        self.salt_cli = self.master.salt_cli(timeout=SALT_TIMEOUT)
        self._write_top()

    def _write_top(self):
        top = {"base": {minion_id: [f"hub_mirror_{n}"] for n, minion_id in enumerate(self.minions)}}
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump(top))

    def add_minion(self, hub_mirror, id_prefix="minion-", grains=None, extra_pillar=None):
        """A configured (not started) minion whose ``hub_mirror`` pillar is ``hub_mirror``
        with ``lookup`` paths under its own directory; ``extra_pillar`` adds other top-level
        keys (e.g. ``mine_functions``), ``grains`` static grains to its config."""
        minion_id = unique_name(id_prefix)
        home = self.root / minion_id
        lookup = {
            "prefix": str(home / "opt"),
            "config_dir": str(home / "etc-hub-mirror"),
            "state_dir": str(home / "var-lib"),
            "log_dir": str(home / "log"),
            "run_dir": str(home / "run"),
        }
        pillar = {**hub_mirror, "lookup": {**lookup, **hub_mirror.get("lookup", {})}}
        daemon = self.master.salt_minion_daemon(
            minion_id,
            defaults={"root_dir": str(home / "salt")},
            overrides={"log_level_logfile": "debug", **({"grains": grains} if grains else {})},
        )
        sls = self.pillar_dir / f"hub_mirror_{len(self.minions)}.sls"
        sls.write_text(yaml.safe_dump({**(extra_pillar or {}), "hub_mirror": pillar}, sort_keys=False))
        minion = ClusterMinion(daemon, lookup, pillar)
        self.minions[minion_id] = minion
        self._write_top()
        return minion

    def salt(self, minion, *args, timeout=SALT_TIMEOUT):
        """``salt <minion> <args>``; ``minion`` may be a glob instead. The result has
        ``.returncode``, ``.data`` (``{minion id: return}`` for a glob), ``.stdout``; read a
        state run's ``.data`` with :func:`tests.support.results.states_of`."""
        tgt = minion if isinstance(minion, str) else minion.id
        result = self.salt_cli.run(*args, minion_tgt=tgt, _timeout=timeout + 30)
        self.outputs.append(result.stdout + result.stderr)
        return result

    @contextlib.contextmanager
    def running(self):
        """The master and every minion added so far, started. On exit, while the minions
        still answer, each removes the mirrors of its pillar (a no-op for one that never
        started); then the daemons stop, Salt's log handlers go and the root is deleted."""
        try:
            with contextlib.ExitStack() as daemons:
                daemons.enter_context(self.master.started())
                for minion in self.minions.values():
                    daemons.enter_context(minion.daemon.started())
                try:
                    yield self
                finally:
                    for minion in self.minions.values():
                        for name in minion.pillar.get("mirrors") or {}:
                            self.salt(minion, "hub_mirror.remove", f"mirror={name}")
        finally:
            strip_root_log_handlers()
            shutil.rmtree(self.root, ignore_errors=True)

    def log_files(self):
        return [self.master.config["log_file"]] + [m.log_file for m in self.minions.values()]


def strip_root_log_handlers():
    """Salt's deferred handler on the root logger holds every record the daemons forwarded and
    flushes them at exit to a stderr that pytest has closed: "Logging error" noise. Drop it
    and its queue."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__module__.startswith("salt."):
            root.removeHandler(handler)
            drain = getattr(handler, "sync_with_handlers", None)
            if drain:
                drain(())
