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
    if outcome.get("warnings"):
        ret["warnings"] = outcome["warnings"]
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
    return _apply(name, "deploy", mirror=name)


def absent(name, purge_storage=False):
    """
    Stop mirror ``name`` and remove its service and config; its cache stays unless
    ``purge_storage`` is True.
    """
    return _apply(name, "remove", mirror=name, purge_storage=purge_storage)


def uninstalled(name):
    """
    Remove the registry binary that ``install:method: archive`` installed.
    """
    return _apply(name, "uninstall")


# --- Inspect and operate the cache -------------------------------------------------------


def warmed(name, images=None, platforms=None, parallel=4):
    """
    Keep images cached by mirror ``name``: pull each one that is not cached (all its
    blobs, for every platform of a multi-arch image or only ``platforms``) through the
    mirror. ``test=True`` reads the cache only.

    name
        The mirror.
    images
        Images as for ``docker pull`` (``library/alpine:3.20``); default: the pillar list
        ``hub_mirror:mirrors:<name>:warm``.
    platforms
        e.g. ``[linux/amd64]``; default: every platform of an index.
    parallel
        How many images are fetched at once.

    .. code-block:: yaml

        hub_mirror-cache-dockerhub-warmed:
          hub_mirror.warmed:
            - name: dockerhub
    """
    return _apply(name, "warm", mirror=name, images=images, platforms=platforms, parallel=parallel)


def pruned(name, max_size=None):
    """
    Keep mirror ``name``'s storage under ``max_size`` (default: the pillar's
    ``hub_mirror:mirrors:<name>:max_size``). When it is over, the oldest cached images
    are expired by the registry and garbage-collected, with the mirror stopped for the
    time it takes (see ``hub_mirror.prune``).

    .. code-block:: yaml

        hub_mirror-cache-dockerhub-pruned:
          hub_mirror.pruned:
            - name: dockerhub
    """
    return _apply(name, "prune", mirror=name, max_size=max_size)


# --- Clients -----------------------------------------------------------------------------


def client_configured(name):
    """
    Point this host's container clients (docker, containerd, podman/cri-o/skopeo,
    buildkit, k3s/rke2) at the mirrors in ``hub_mirror:client:mirrors`` that answer
    ``/v2/`` right now, and take out the ones that stopped answering.

    The result is True even when no mirror answers or a client cannot be configured:
    a dead mirror must never fail a build host's run. The comment says, per runtime,
    what was configured or skipped and why.

    name
        A label for the state; what to configure comes from ``hub_mirror:client``.
    """
    return _with_recheck(_apply(name, "client_configure"), remove=False)


def _with_recheck(ret, remove):
    """``ret`` with the recheck schedule entry brought in line (``client:recheck``), so
    that the one state both configures the clients and keeps them healed."""
    if ret["result"] is False and not remove:
        return ret  # the same refusal would only be said twice
    test = bool(__opts__.get("test"))
    try:
        outcome = __salt__["hub_mirror.client_recheck"](test=test, remove=remove)
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret.update(result=False, comment="\n".join(filter(None, [ret["comment"], str(exc)])))
        return ret
    if outcome["changes"]:
        ret["changes"].update(outcome["changes"])
        if test and ret["result"] is True:
            ret["result"] = None
    ret["comment"] = "\n".join(filter(None, [ret["comment"], outcome["comment"]]))
    return ret


def client_absent(name):
    """
    Give each client config file that ``client_configured`` touched back to its owner:
    the original bytes where the file is still as hub_mirror left it, else the file
    without hub_mirror's part; files hub_mirror created are removed.

    name
        A label for the state.
    """
    return _with_recheck(_apply(name, "client_remove"), remove=True)
