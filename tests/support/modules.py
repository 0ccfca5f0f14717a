"""Import the extension's code straight from the repo, for tests of pure logic."""

import importlib
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The facade imports its library as the loader lets it: `_hub_mirror` beside it.
if str(REPO / "_modules") not in sys.path:
    sys.path.insert(0, str(REPO / "_modules"))


def load(name):
    """``_modules/<name>.py`` as a fresh module; the caller sets the loader dunders."""
    spec = importlib.util.spec_from_file_location(f"hm_test_{name}", REPO / "_modules" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lib(name):
    """The library module ``_hub_mirror.<name>`` (``clients.render``, ``validate``, ...)."""
    return importlib.import_module(f"_hub_mirror.{name}")


def program(name):
    """The path of the program ``_hub_mirror/programs/<name>.py``."""
    return REPO / "_modules" / "_hub_mirror" / "programs" / f"{name}.py"
