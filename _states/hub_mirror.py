"""
States for hub_mirror: thin, idempotent wrappers over the ``hub_mirror`` execution module.

Every state asks the execution module to plan and, unless ``test=True``, apply; the plan
is the same code path in both modes, so a test run predicts a live run exactly. Settings,
tokens included, come from the ``hub_mirror`` pillar, read by the execution module: no
secret ever passes through SLS or state arguments.

.. code-block:: yaml

    hub_mirror-install-registry-installed:
      hub_mirror.installed:
        - name: registry

    hub_mirror-config-dockerhub-configured:
      hub_mirror.configured:
        - name: dockerhub

    hub_mirror-service-dockerhub-running:
      hub_mirror.running:
        - name: dockerhub
"""

from salt.exceptions import CommandExecutionError, SaltInvocationError

__virtualname__ = "hub_mirror"


def __virtual__():
    if "hub_mirror.install" not in __salt__:
        return (False, "the hub_mirror execution module is not loaded")
    return __virtualname__


def _apply(name, function, **kwargs):
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    test = bool(__opts__.get("test"))
    try:
        outcome = __salt__[f"hub_mirror.{function}"](test=test, **kwargs)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret.update(result=False, comment=str(exc))
        return ret
    ret["changes"] = outcome["changes"]
    ret["comment"] = outcome["comment"]
    if test and ret["changes"]:
        ret["result"] = None
    return ret


def installed(name):
    """
    Install the registry binary the ``hub_mirror`` pillar asks for (``version``,
    ``install:method``, ``install:source``, ``install:source_hash``), for this minion's arch.
    A failure leaves the installed binary in place.

    name
        A label for the state; the binary's location comes from ``hub_mirror:lookup``.
    """
    return _apply(name, "install")


def configured(name):
    """
    Render and write mirror ``name``'s registry config (0600, service user) from pillar.
    """
    return _apply(name, "configure", mirror=name)


def running(name):
    """
    Run mirror ``name`` under systemd (or an init script with a restart loop where systemd
    is not PID 1), restart it only when its binary, config or service files changed, and
    succeed only once it answers ``/v2/``.
    """
    return _apply(name, "running", mirror=name)


def absent(name, purge_storage=False):
    """
    Stop mirror ``name`` and remove its service and config; its cache stays unless
    ``purge_storage`` is True.
    """
    return _apply(name, "absent", mirror=name, purge_storage=purge_storage)


def uninstalled(name):
    """
    Remove the registry binary that ``install:method: archive`` installed.
    """
    return _apply(name, "uninstall")


# --- Inspect and operate the cache -------------------------------------------------------


# --- Clients -----------------------------------------------------------------------------
