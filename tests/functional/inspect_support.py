"""Shared pieces of the inspect-and-operate tests: a mirror applied with masterless Salt
from the release asset, as a user runs it, of a stand-in of their own
(:func:`tests.support.hub.stocked_hub`)."""

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from tests.support.hub import HUB_TOKEN, FakeDockerHub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import Masterless, unique_name


@dataclasses.dataclass(eq=False)
class Mirror:
    """A mirror on a masterless minion: ``.call(fn, *args)`` runs ``salt-call``."""

    minion: Masterless
    name: str
    port: int
    hub: FakeDockerHub

    @property
    def hostport(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"http://{self.hostport}"

    def call(self, function, *args):
        """``salt-call <function> <args> mirror=<name>``."""
        return self.minion.run(function, *args, f"mirror={self.name}")

    def data(self, function, *args):
        """What :meth:`call` returns; the call must succeed and not show the token."""
        result = self.call(function, *args)
        assert result.returncode == 0, result
        assert HUB_TOKEN not in result.output
        return result.data

    def pillar(self, **extra):
        """This mirror's pillar, with ``extra`` keys."""
        return self.hub.mirror_pillar(self.hostport, **extra)

    def set_mirror_pillar(self, release_server, **extra):
        """Make this mirror (with ``extra`` keys) the minion's whole pillar."""
        self.minion.set_pillar(archive_pillar(release_server, {self.name: self.pillar(**extra)}))

    @property
    def storage(self):
        return Path(self.minion.lookup["state_dir"]) / self.name

    def scheduled(self):
        """The registry's saved expiry entries ({} before it saved any)."""
        try:
            return json.loads((self.storage / "scheduler-state.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_scheduled(self, repos, timeout=20):
        """Wait until the registry has saved expiry entries for ``repos`` (it saves every 5 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            keys = self.scheduled()
            if all(any(key.startswith(f"{repo}@") for key in keys) for repo in repos):
                return keys
            time.sleep(0.5)
        raise AssertionError(f"no scheduler entries for {repos} after {timeout}s: {sorted(self.scheduled())}")


@contextlib.contextmanager
def applied_mirror(hub, release_server, **extra):
    """A fresh minion with one mirror of ``hub`` (pillar ``extra`` keys), applied; its
    mirrors stopped and its root deleted on exit."""
    mirror = Mirror(Masterless.fresh(), unique_name("m"), free_port(), hub)
    try:
        mirror.set_mirror_pillar(release_server, **extra)
        first = mirror.minion.apply()
        assert first.returncode == 0, first
        yield mirror
    finally:
        mirror.minion.discard()
