"""hub_mirror installed with pip, the other way users run it: ``pip install`` (a wheel build,
and ``pip install -e``) into a venv that has Salt, then ``salt-call --local`` with a state tree
holding ONLY the SLS (``<repo>/salt``: no ``_modules`` beside it to sync) and no sync at all.
The modules must then come through the package's ``salt.loader`` entry point."""

import json
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import (
    REPO,
    SALT_CALL,
    Masterless,
    unique_name,
    world_traversable_dir,
)

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]

RELEASE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}[platform.machine()]

# What pip's console script for salt-call is: the venv's interpreter runs Salt's entry.
SALT_CALL_SCRIPT = """#!{python}
import sys
from salt.scripts import salt_call
sys.exit(salt_call())
"""

ENTRY_POINT_PROBE = """
import json
from importlib.metadata import entry_points
(point,) = [ep for ep in entry_points(group="salt.loader") if ep.name == "hub_mirror"]
print(json.dumps({"value": point.value, "dirs": point.load()()}))
"""


class PipVenv:
    """A venv whose interpreter sees this test run's Salt, with a copy of the repo
    pip-installed into it (``editable`` or as a built wheel)."""

    def __init__(self, root, editable):
        self.root = Path(root)
        self.editable = editable
        # pip builds in the source tree (build/, *.egg-info): never in the work tree.
        self.source = self.root / "source"
        shutil.copytree(
            REPO,
            self.source,
            ignore=shutil.ignore_patterns(
                ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache"
            ),
        )
        self.venv = self.root / "venv"
        self.python = str(self.venv / "bin" / "python")
        self.salt_call = str(self.venv / "bin" / "salt-call")
        self._create()

    def _create(self):
        # `venv --system-site-packages` from a venv's interpreter exposes the base
        # interpreter's site-packages, not the venv's with Salt: point at those with a .pth.
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(self.venv)], check=True, timeout=120
        )
        site_packages = Path(
            subprocess.run(
                [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
        )
        salt_site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        pth = "".join(f"{path}\n" for path in sorted(salt_site))
        (site_packages / "salt-venv.pth").write_text(pth)
        Path(self.salt_call).write_text(SALT_CALL_SCRIPT.format(python=self.python))
        Path(self.salt_call).chmod(0o755)
        self.site_packages = site_packages
        # Offline: the build backend (setuptools, wheel) comes from the Salt venv, and the
        # dependencies are already there; nothing is fetched from an index.
        install = [
            self.python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
            "--no-build-isolation", "--no-index",
        ]
        install += ["-e", str(self.source)] if self.editable else [str(self.source)]
        proc = subprocess.run(install, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def entry_point(self):
        proc = subprocess.run(
            [self.python, "-c", ENTRY_POINT_PROBE],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)


class StateTreeOnlyMinion(Masterless):
    """A masterless minion whose file_roots hold only the SLS tree: nothing to sync from.
    ``salt_call`` picks the Salt install that runs it."""

    def __init__(self, root, state_tree, salt_call=SALT_CALL):
        super().__init__(root, file_roots=[state_tree], salt_call=salt_call)

    def synced_modules(self):
        return sorted(str(path) for path in self.root.rglob("extmods/*/hub_mirror*.py"))


@pytest.fixture(scope="module", params=["wheel", "editable"])
def installed(request):
    root = world_traversable_dir(f"/tmp/hm-pip-{unique_name('')}")
    try:
        yield PipVenv(root, editable=request.param == "editable")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pip_minion(installed):
    minion = StateTreeOnlyMinion(
        installed.root / unique_name("minion-"),
        installed.source / "salt",
        salt_call=installed.salt_call,
    )
    yield minion
    minion.teardown()
    shutil.rmtree(minion.root, ignore_errors=True)


def test_entry_point_returns_the_installed_module_dirs(installed):
    found = installed.entry_point()
    assert found["value"] == "saltext.hub_mirror:get_loader_dirs"
    (modules,) = found["dirs"]["modules"]
    (states,) = found["dirs"]["states"]
    if installed.editable:
        assert modules == str(installed.source / "_modules")
        assert states == str(installed.source / "_states")
    else:
        assert modules == str(installed.site_packages / "saltext" / "hub_mirror" / "modules")
        assert states == str(installed.site_packages / "saltext" / "hub_mirror" / "states")
    # The library and the programs it installs ship beside the exec module.
    assert (Path(modules) / "_hub_mirror" / "programs" / "supervise.py").is_file()
    assert (Path(modules) / "_hub_mirror" / "clients" / "runtimes.py").is_file()
    assert (Path(modules) / "hub_mirror.py").is_file()
    assert (Path(states) / "hub_mirror.py").is_file()


def test_exec_module_loads_without_sync(pip_minion):
    arch = pip_minion.run("hub_mirror.release_arch")
    assert arch.returncode == 0, arch
    assert arch.data == RELEASE_ARCH
    assert pip_minion.synced_modules() == []


def test_state_apply_without_sync_serves_pulls(
    pip_minion, release_server, clean_hub, image_layout, tmp_path
):
    name, port = unique_name("m"), free_port()
    pip_minion.set_pillar(archive_pillar(release_server, {name: clean_hub.mirror_pillar(port)}))

    applied = pip_minion.apply()
    assert applied.returncode == 0, applied
    assert f"hub_mirror-service-{name}-running" in applied.states, applied
    assert all(ret["result"] is True for ret in applied.states.values()), applied
    assert HUB_TOKEN not in applied.output
    assert pip_minion.synced_modules() == []

    digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "pulled"))
    assert digest == image_layout[1]["single"]["manifest_digest"]
    catalog = pip_minion.run("hub_mirror.catalog", f"mirror={name}")
    assert catalog.data == ["library/alpine"], catalog


def test_without_the_package_the_state_tree_alone_has_no_module():
    """The control: the same state tree under a Salt without the package finds nothing."""
    root = world_traversable_dir(f"/tmp/hm-{unique_name('')}")
    try:
        minion = StateTreeOnlyMinion(root, REPO / "salt")
        arch = minion.run("hub_mirror.release_arch")
        assert arch.returncode != 0
        assert "'hub_mirror.release_arch' is not available" in arch.output
        minion.set_pillar({})
        applied = minion.apply()
        assert applied.returncode != 0
        assert "saltutil.sync_all" in applied.output and "sync_mods=all" in applied.output
    finally:
        shutil.rmtree(root, ignore_errors=True)
