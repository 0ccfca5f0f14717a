"""hub_mirror: Docker Hub pull-through caches as a Salt extension.

Salt calls :func:`get_loader_dirs` through the ``salt.loader`` entry point. It returns the
directories of the installed ``_modules``, ``_states`` and ``_runners`` copies, which works for both
``pip install .`` and ``pip install -e .`` (a plain package entry point finds nothing under an
editable install).
"""

import importlib.util
import os


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return os.path.dirname(spec.origin)


def get_loader_dirs():
    return {
        "modules": [_package_dir("saltext.hub_mirror.modules")],
        "states": [_package_dir("saltext.hub_mirror.states")],
        "runners": [_package_dir("saltext.hub_mirror.runners")],
    }
