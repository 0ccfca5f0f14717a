"""Import the extension's modules straight from the repo, for tests of pure logic."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load(name):
    """``_modules/<name>.py`` as a fresh module; the caller sets the loader dunders."""
    spec = importlib.util.spec_from_file_location(f"hm_test_{name}", REPO / "_modules" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
