"""Import the extension's code straight from the repo, for tests of pure logic and for
registries that tests and benchmarks run themselves on the config hub_mirror renders
(:func:`registry_files`)."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A loopback-only amd64 Linux host, as the exec module's grains.
HOST_GRAINS = {
    "kernel": "Linux",
    "osarch": "amd64",
    "cpuarch": "x86_64",
    "ip4_interfaces": {"lo": ["127.0.0.1"]},
    "ip6_interfaces": {"lo": ["::1"]},
}
# The facade imports its library as the loader lets it: `_hub_mirror` beside it.
if str(REPO / "_modules") not in sys.path:
    sys.path.insert(0, str(REPO / "_modules"))


def load(name, path=None):
    """``_modules/<name>.py`` (or the file ``path``) as a fresh module; the caller sets
    the loader dunders."""
    spec = importlib.util.spec_from_file_location(f"hm_test_{name}", path or REPO / "_modules" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lib(name):
    """The library module ``_hub_mirror.<name>`` (``clients.render``, ``validate``, ...)."""
    return importlib.import_module(f"_hub_mirror.{name}")


def program(name):
    """The path of the program ``_hub_mirror/programs/<name>.py``."""
    return REPO / "_modules" / "_hub_mirror" / "programs" / f"{name}.py"


def exec_module(pillar=None, grains=None):
    """``_modules/hub_mirror.py`` with the loader's dunders stubbed: ``__pillar__`` holds
    ``pillar`` as hub_mirror's, ``__grains__`` are ``grains`` or :data:`HOST_GRAINS`;
    ``__salt__`` is empty, so only what calls no other Salt module works."""
    module = load("hub_mirror")
    module.__grains__ = grains or dict(HOST_GRAINS)
    module.__pillar__ = {"hub_mirror": pillar or {}}
    module.__salt__ = {}
    module.__opts__ = {}
    return module


def registry_files(name, mirror, version, workdir):
    """The config hub_mirror renders for the mirror ``name`` (pillar ``mirror``) at
    registry ``version``, and the environment to run it in: for 3.x, the credential
    helper and its credentials file are written under ``workdir``, as ``configure`` and
    the supervisor set them up. Returns (config, env)."""
    module = exec_module({"version": version, "mirrors": {name: mirror}})
    _, spec = module._mirror(name, redact=False)  # pylint: disable=protected-access
    return spec_files(spec, version, workdir)


def spec_files(spec, version, workdir):
    """:func:`registry_files` for a completed mirror ``spec`` (validation is the caller's),
    for the registry alone: the front is the supervisor's to run."""
    spec = {**spec, "front": "none"}
    dialect = lib("settings").dialect_of(version)
    if dialect == "2":
        return lib("registry_config").render_config(spec, dialect), {}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    helper, credentials = workdir / "credential-helper", workdir / "credentials.json"
    helper.write_text(lib("supervisor").program_text("credential_helper.py"))
    helper.chmod(0o755)
    credentials.write_text(lib("registry_config").credentials_text(spec))
    os.chmod(credentials, 0o600)
    config = lib("registry_config").render_config(spec, dialect, str(helper))
    return config, {"HUB_MIRROR_CREDENTIALS": str(credentials)}
