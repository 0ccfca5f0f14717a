"""
How Salt's loader takes hub_mirror, through a real salt-master and salt-minion daemon:

- the private library ``_modules/_hub_mirror/`` syncs with the exec module but is never
  loaded as a module of its own, and ``sys.list_functions hub_mirror`` lists only the user
  commands, each documented with a CLI example;
- a re-synced library takes effect in the running minion, without a restart (the loader
  never reloads a plain ``sys.modules`` entry: the facade must drop a stale one itself).
"""

import shutil

import pytest

from tests.support.saltcall import REPO, unique_name
from tests.support.saltmaster import strip_root_log_handlers

pytestmark = pytest.mark.integration

COMMANDS = {
    "asset_url", "catalog", "client_configure", "client_recheck", "client_remove", "config", "configure",
    "deploy", "endpoint", "gc", "install", "orphans", "probe", "prune", "ratelimit", "release_arch",
    "remove", "settings", "start", "status", "stop", "tags", "uninstall", "usage", "version", "warm",
}  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A state tree holding a copy of the exec module and its library, free to edit."""
    root = tmp_path_factory.mktemp("tree")
    shutil.copytree(REPO / "_modules", root / "_modules", ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def minion(salt_factories, tree):
    master = salt_factories.salt_master_daemon(
        unique_name("master-"), overrides={"file_roots": {"base": [str(tree)]}}
    )
    # Jobs as threads of the minion process, as ``multiprocessing: False`` runs them: the
    # library then stays imported from one job to the next (forked jobs start afresh from
    # a parent that may hold it from its own start).
    minion = master.salt_minion_daemon(unique_name("minion-"), overrides={"multiprocessing": False})
    with master.started(), minion.started():
        cli = master.salt_cli(timeout=120)

        def run(*args):
            result = cli.run(*args, minion_tgt=minion.id)
            assert result.returncode == 0, result
            return result.data

        run("saltutil.sync_modules")
        yield run
    strip_root_log_handlers()


def test_only_the_user_commands_are_listed_and_each_has_a_cli_example(minion):
    listed = {name.split(".", 1)[1] for name in minion("sys.list_functions", "hub_mirror")}
    assert listed == COMMANDS
    docs = minion("sys.doc", "hub_mirror")
    assert set(docs) == {f"hub_mirror.{name}" for name in COMMANDS}
    for name, doc in docs.items():
        assert "CLI Example:" in doc and f"salt '*' {name}" in doc, name
    # The library and the programs it installs are not modules of their own.
    modules = minion("sys.list_modules")
    assert not [name for name in modules if "hub_mirror" in name and name != "hub_mirror"]


def test_a_resynced_library_takes_effect_without_a_minion_restart(minion, tree):
    before = minion("hub_mirror.release_arch")
    assert before == "amd64"
    settings = tree / "_modules" / "_hub_mirror" / "settings.py"
    text = settings.read_text()
    assert '"amd64": "amd64",' in text
    settings.write_text(text.replace('"amd64": "amd64",', '"amd64": "resynced",'))
    try:
        minion("saltutil.sync_modules")
        assert minion("hub_mirror.release_arch") == "resynced"
    finally:
        settings.write_text(text)
        minion("saltutil.sync_modules")
    assert minion("hub_mirror.release_arch") == before
