"""Unit tests import the library as ``_hub_mirror.<module>`` and the facade with
``tests.support.modules.load``, which also puts ``_modules`` on sys.path for them. The
facade's tests give it the loader's data with salt-factories' ``configure_loader_modules``;
what several test files share is in ``tests/unit/host.py``."""

import tests.support.modules  # noqa: F401  (puts _modules on sys.path before any test file imports)
