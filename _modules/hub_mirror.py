"""
Docker Hub pull-through caches with the CNCF distribution ``registry``.

This is hub_mirror's execution module: the user commands, each a thin call into the
private library ``_hub_mirror`` beside it (synced with it by ``saltutil.sync_modules``).
It is the only code that reads Salt's loader data (pillar, grains, opts, other modules);
the library takes what it needs as arguments. Each command that changes the host plans
first and applies the plan unless ``test=True``: the same code path in both modes, so a
test run predicts a live run exactly. The states in ``_states/hub_mirror.py`` pass Salt's
test flag through.

Secrets: each mirror's upstream token is read from pillar here (never passed through
SLS), written only to the mirror's 0600 files, and never returned, logged or put on a
command line. Commands that show configuration redact it.

:depends: requests, PyYAML (both ship with Salt)
:configuration: the ``hub_mirror`` pillar; see ``pillar.example``.
"""

import importlib.util
import os
import sys

from salt.exceptions import CommandExecutionError, SaltInvocationError


def _library_files(root):
    """Every file of the library with its size and mtime: what a re-sync changes."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                info = os.stat(os.path.join(dirpath, filename))
                found.append((dirpath, filename, info.st_size, info.st_mtime_ns))
    return found


# The library is cached under a plain sys.modules name that the loader never reloads: a
# re-synced library would take effect only when the minion restarts. Drop it when it came
# from another directory or its files changed since, and keep it otherwise. It is then
# imported from beside this file by path, whatever else sys.path holds.
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hub_mirror")
_FILES = _library_files(_ROOT)
_LOADED = sys.modules.get("_hub_mirror")


def _forget_library():
    for name in [name for name in sys.modules if name == "_hub_mirror" or name.startswith("_hub_mirror.")]:
        del sys.modules[name]


if _LOADED is not None and (
    os.path.dirname(os.path.abspath(_LOADED.__file__)) != _ROOT or getattr(_LOADED, "LOADED_FROM", _FILES) != _FILES
):
    _forget_library()
try:
    if "_hub_mirror" not in sys.modules:
        _SPEC = importlib.util.spec_from_file_location(
            "_hub_mirror", os.path.join(_ROOT, "__init__.py"), submodule_search_locations=[_ROOT]
        )
        sys.modules["_hub_mirror"] = importlib.util.module_from_spec(_SPEC)
        _SPEC.loader.exec_module(sys.modules["_hub_mirror"])

    # pylint: disable=wrong-import-position
    import _hub_mirror
    from _hub_mirror import (
        inspection,
        maintenance,
        registry_api,
        registry_config,
        release,
        validate,
    )
    from _hub_mirror import mirror as mirrors
    from _hub_mirror import settings as hm_settings
    from _hub_mirror.clients import discovery, runtimes
    from _hub_mirror.clients.validate import client_conf
except BaseException:
    # A library imported halfway (a sync caught midway, a file missing) must not stay
    # cached: the next load starts afresh instead of failing until a restart.
    _forget_library()
    raise
_hub_mirror.LOADED_FROM = _FILES


__virtualname__ = "hub_mirror"


def __virtual__():
    if __grains__.get("kernel") != "Linux":
        return (False, "hub_mirror runs the registry on Linux only")
    return __virtualname__


def _raw_pillar():
    # __pillar__ gives the real values; pillar.get masks them in Salt 3008.
    if "hub_mirror" not in __pillar__ and __opts__.get("master_type") == "disable":
        # A masterless salt-minion daemon never compiles its pillar (Salt 3008 does that
        # only on connecting to a master), and the client_recheck schedule runs there.
        import salt.pillar  # pylint: disable=import-outside-toplevel

        return (
            salt.pillar.get_pillar(
                __opts__,
                dict(__grains__),
                __opts__["id"],
                saltenv=__opts__.get("saltenv"),
                pillarenv=__opts__.get("pillarenv"),
            )
            .compile_pillar()
            .get("hub_mirror", {})
        )
    return __pillar__.get("hub_mirror", {})


def _settings(redact=True):
    return validate.load(_raw_pillar(), __grains__, redact)


def _mirror(name, redact=True):
    conf = _settings(redact=redact)
    if name not in conf["mirrors"]:
        raise SaltInvocationError(
            f"hub_mirror:mirrors has no mirror named {name!r}; known: {', '.join(sorted(conf['mirrors']))}"
        )
    return conf, conf["mirrors"][name]


def settings():
    """
    Return the ``hub_mirror`` settings: defaults merged with pillar, validated.

    Each mirror is complete (listen address resolved, storage and debug listener
    filled in), and every secret (token, S3 secret key, redis password) is redacted.
    Raises an error that names each bad pillar key and its fix.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.settings
    """
    return _settings()


def release_arch():
    """
    Return the release asset arch (``amd64``, ``arm64``, ``armv7``, ...) for this minion.

    The ``osarch`` grain (dpkg or rpm name) decides; ``cpuarch`` (``uname -m``) is the
    fallback. ``None`` when upstream builds nothing for the CPU.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.release_arch
    """
    return hm_settings.release_arch(__grains__)


def asset_url(version, arch, source=hm_settings.RELEASE_URL):
    """
    Return the release tarball URL for ``version`` and release ``arch``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.asset_url 3.0.0 arm64
    """
    return release.asset_url(version, arch, source)


def install(test=False):
    """
    Install the registry the ``hub_mirror`` pillar asks for; idempotent.

    ``method: archive`` downloads the release tarball for this minion's arch, verifies its
    sha256 (built-in digests for 2.8.3 and 3.0.0, else ``install:source_hash``), extracts
    only ``registry``, checks that it runs and reports the right version, and swaps it in
    atomically: any failure leaves the installed binary as it was. A matching install
    downloads nothing. ``method: package`` installs the distribution's ``docker-registry``.

    Returns ``{"changes": {...}, "comment": "..."}``; with ``test=True`` nothing changes
    and ``changes`` says what would.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.install
        salt '*' hub_mirror.install test=True
    """
    return release.install(
        _settings(redact=False), __grains__, __salt__["pkg.version"], __salt__["pkg.install"], test=test
    )


def version():
    """
    Return the version of the installed registry binary, or ``None``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.version
    """
    binary = hm_settings.binary_path(_settings())
    return release.binary_version(binary) if os.path.exists(binary) else None


def config(mirror="dockerhub"):
    """
    Return the registry config rendered for ``mirror``, with the token redacted.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.config
        salt '*' hub_mirror.config mirror=ghcr
    """
    conf, spec = _mirror(mirror)
    helper = hm_settings.mirror_paths(conf, mirror)["credential_helper"]
    return registry_config.render_config(spec, registry_config.config_dialect(conf), helper)


def configure(mirror="dockerhub", test=False):
    """
    Render ``mirror``'s registry config from pillar and write it, 0600, owned by the
    service user, atomically; only when it differs. The storage directory is created.

    A listen address held by another process is refused before anything is written.
    Returns ``{"changes": {...}, "comment": "..."}``: changed config keys with the token
    redacted; ``test=True`` changes nothing.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.configure
        salt '*' hub_mirror.configure mirror=dockerhub test=True
    """
    return mirrors.configure(*_mirror(mirror, redact=False), test=test)


def deploy(mirror="dockerhub", test=False):
    """
    Make ``mirror`` run under its supervisor and serve on its listen address.

    Writes the systemd unit (or, where systemd is not PID 1, an init script and a restart
    loop), enables it and (re)starts the registry only when the binary, the config or the
    service files differ from what it last started with. Success means ``/v2/`` answers
    within ``probe_timeout``: a restart that does not come up restores the last config
    that served, restarts on it and fails. Before a restart, the front's nginx must accept
    its config (``nginx -t``), or nothing restarts. A mirror switched to ``front: none``
    loses the front's directory in its storage once it serves without it.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.deploy
        salt '*' hub_mirror.deploy mirror=dockerhub test=True
    """
    # Unredacted only to fingerprint the rendered config; the token goes nowhere else.
    return mirrors.deploy(*_mirror(mirror, redact=False), test=test)


def probe(mirror="dockerhub", timeout=5):
    """
    Return True when ``mirror`` answers ``GET /v2/`` on its listen address.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.probe
    """
    return registry_api.answers(hm_settings.probe_url(_mirror(mirror)[1]), timeout)


def start(mirror="dockerhub"):
    """
    Start ``mirror``'s registry and wait until it answers ``/v2/``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.start
    """
    return mirrors.start(*_mirror(mirror))


def stop(mirror="dockerhub"):
    """
    Stop ``mirror``'s registry and its supervisor, and anything else still serving its
    config. True once nothing serves it and its port is closed.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.stop
    """
    return mirrors.stop(*_mirror(mirror))


def remove(mirror="dockerhub", purge_storage=False, test=False):
    """
    Stop ``mirror`` and remove its service files, config and fingerprint. The cache in
    its storage directory stays unless ``purge_storage=True``; a purge deletes only what
    the registry wrote, in a directory hub_mirror marked as its cache.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.remove
        salt '*' hub_mirror.remove purge_storage=True
    """
    conf = _settings()
    spec = conf["mirrors"].get(mirror) or mirrors.orphan(conf, mirror)
    if spec is None:
        spec = _mirror(mirror)[1]  # raises: neither in pillar nor on this host
    return mirrors.remove(conf, spec, purge_storage=purge_storage, test=test)


def orphans():
    """
    Return the mirrors this host still has a config for but pillar no longer names.
    ``hub_mirror.service`` removes them (their cache stays), so that dropping one mirror
    from pillar touches only that mirror.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.orphans
    """
    return mirrors.orphans(_settings())


def uninstall(test=False):
    """
    Remove the registry installed by ``method: archive`` (a package is left to the
    package manager).

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.uninstall
    """
    return mirrors.uninstall(_settings(), test=test)


def endpoint():
    """
    Return this host's mirrors as clients should reach them, for the Salt mine: one entry
    per mirror with the registry it mirrors (``docker.io``, ``ghcr.io``, ...), its URL
    (``advertise``, else the listen address) and whether it answers ``/v2/`` right now.
    Without ``advertise``, a mirror that listens on loopback or on every address
    (``0.0.0.0``) publishes a loopback URL and ``loopback_only: True``: it serves only
    this host.

    Publish it with the mine (minion config or pillar):

    .. code-block:: yaml

        mine_functions:
          hub_mirror.endpoint: []

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.endpoint
        salt-run mine.get 'role:mirror' hub_mirror.endpoint tgt_type=grain
    """
    return mirrors.endpoint(_settings())


def catalog(mirror="dockerhub", tags=False, sizes=False, source="api"):  # pylint: disable=redefined-outer-name
    """
    List every repository cached by ``mirror``.

    ``source="api"`` (the default) asks the registry (``/v2/_catalog``), following its
    pagination within the server's ``catalog.maxentries``; ``source="disk"`` reads the
    storage directory instead, and works with the registry stopped. Either way,
    repositories whose cached content has all expired are left out: the registry keeps
    listing them because their directories stay.

    With ``tags=True`` each repository maps to its cached tags and their digests, read
    from local storage: on a proxy, ``/v2/<name>/tags/list`` shows the upstream's tags,
    not what is cached. With ``sizes=True`` each maps to ``{"size": {"bytes", "human"}}``,
    the bytes its cached images take (a layer shared by repositories counts in each),
    and to ``{"tags": ..., "size": ...}`` with both.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.catalog
        salt '*' hub_mirror.catalog tags=True
        salt '*' hub_mirror.catalog sizes=True source=disk
    """
    return inspection.catalog(_mirror(mirror)[1], tags=tags, sizes=sizes, source=source)


def tags(repo, mirror="dockerhub"):
    """
    Return the tags of ``repo`` that ``mirror`` has cached, read from its storage (so it
    works with the registry stopped): for each tag its digest, media type, size, when it
    was cached and when the cache expires it, and the platforms actually cached; for a
    multi-arch index also ``platforms_available``, every platform the index lists.

    ``repo`` is written as for ``docker pull``: ``alpine`` means ``library/alpine`` on
    Docker Hub.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.tags library/alpine
        salt '*' hub_mirror.tags myorg/app mirror=ghcr
    """
    return inspection.tags(_mirror(mirror)[1], repo)


def usage(mirror="dockerhub"):
    """
    Return the storage use of ``mirror``: bytes used (apparent size of every file, as
    ``du -sb``), blob count and bytes, cached repositories, what ``hub_mirror.gc`` would
    reclaim now, the filesystem's free space, and the pillar cap ``max_size`` with
    whether it is exceeded. Reads the storage only: works with the registry stopped.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.usage
        salt '*' hub_mirror.usage mirror=ghcr
    """
    return inspection.usage(_mirror(mirror)[1])


def status(mirror=None, images=False):
    """
    Return the state of each mirror (or only ``mirror``), keyed by mirror name:

    - ``running`` (the service), ``serving`` (``/v2/`` answers), ``mode`` (``proxy``, or
      ``offline`` while the supervisor serves the cache read-only), ``started``,
      ``version``, ``listen``;
    - ``health`` from the debug listener's storage check, ``upstream_reachable``;
    - ``credential``: whether a username and token are configured (never their value);
    - ``repositories`` cached, ``disk`` (used, free) and ``max_size`` / ``over_cap``;
    - ``proxy``: hit and miss counters with hit ratios for blobs and manifests, since
      the registry started.

    ``images=True`` adds ``images``: every cached repository with its cached tags (what
    the ``hub_mirror.fleet`` runner aggregates).

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.status
        salt '*' hub_mirror.status mirror=dockerhub images=True
    """
    conf = _mirror(mirror)[0] if mirror is not None else _settings()
    names = [mirror] if mirror is not None else sorted(conf["mirrors"])
    return inspection.status(conf, names, images=images)


def ratelimit(mirror="dockerhub", timeout=15):
    """
    Return the Docker Hub pull quota left for ``mirror``'s credential (anonymous without
    one): ``limit``, ``remaining`` and the ``window`` they apply to, from a HEAD on
    ``ratelimitpreview/test`` with a token from the realm the upstream advertises. A HEAD
    is not a pull: checking uses up nothing. The token is sent only to that realm.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.ratelimit
    """
    return inspection.ratelimit(_mirror(mirror, redact=False)[1], timeout=timeout)


def warm(images=None, mirror="dockerhub", platforms=None, parallel=4, timeout=300, test=False):
    """
    Pull ``images`` through ``mirror`` so that they are cached before the first build
    needs them: manifest (or index), then config and layers, ``parallel`` images at a
    time. For a multi-arch index every platform is fetched, or only ``platforms`` (e.g.
    ``linux/amd64,linux/arm64``). Without ``images``, the pillar list
    ``hub_mirror:mirrors:<mirror>:warm`` is used.

    Reports per image the digest, the bytes fetched and whether it was already cached.
    ``test=True`` reads the cache only and says which images would be fetched. Images
    that cannot be fetched make it fail after the others are done.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.warm library/alpine:3.20,library/python:3.12-slim
        salt '*' hub_mirror.warm '["alpine:3.20"]' platforms=linux/amd64 parallel=2
        salt '*' hub_mirror.warm test=True
    """
    return maintenance.warm(
        _mirror(mirror)[1], images=images, platforms=platforms, parallel=parallel, timeout=timeout, test=test
    )


def gc(mirror="dockerhub", dry_run=True, delete_untagged=False):
    """
    Garbage-collect ``mirror``'s storage with ``registry garbage-collect`` and report the
    bytes freed. Blobs that no cached manifest references (left by expiry, or by pulls
    that fetched layers of manifests that were never stored) are deleted.

    With ``dry_run=True`` (the default) nothing is deleted and the registry keeps
    serving: the report says what would be freed. Otherwise the mirror is stopped for
    the collection (the registry must not run while files are deleted under it) and
    started again; ``stopped`` says for how many seconds. ``delete_untagged=True`` also
    deletes manifests that no tag points at, which on a pull-through cache includes the
    per-platform manifests of every cached multi-arch image: use it only knowingly.

    A repository with manifests and no layer directory (a manifest fetched alone, a pull
    cut short) stops registry 3.x's collection; it gets an empty one first, named in
    ``layer_dirs_added``, also on a dry run.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.gc
        salt '*' hub_mirror.gc dry_run=False
    """
    return maintenance.gc(*_mirror(mirror), dry_run=dry_run, delete_untagged=delete_untagged)


def prune(mirror="dockerhub", max_size=None, test=False):
    """
    Bring ``mirror``'s storage under its cap (``max_size``, default the pillar's
    ``hub_mirror:mirrors:<mirror>:max_size``), freeing space oldest first, by the
    registry's own means: the oldest cached images are marked expired in its scheduler,
    the registry expires them (with the mirror stopped, on private ports), and
    ``registry garbage-collect`` deletes their blobs; then the mirror serves again.
    Nothing is deleted while the mirror's registry runs.

    An image is the unit: a multi-arch index goes with its platforms, and a layer shared
    with an image that stays is kept. Returns ``{"changes": {...}, "comment": ...}``;
    ``test=True`` says what would be expired and freed.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.prune
        salt '*' hub_mirror.prune max_size=20G test=True
    """
    return maintenance.prune(*_mirror(mirror), max_size=max_size, test=test)


def _discover(client):
    """The mirrors the mine publishes, ranked (``discovery.rank``), with a comment line."""
    discover = client["discover"]
    try:
        found = __salt__["mine.get"](discover["tgt"], discover["function"], tgt_type=discover["tgt_type"])
        same = set()
        grain = discover["same_grain"]
        value = __grains__.get(grain.split(":")[0]) if grain else None
        for part in grain.split(":")[1:] if grain else ():
            value = value.get(part) if isinstance(value, dict) else None
        if value not in (None, "") and not isinstance(value, (dict, list)):
            same = set(__salt__["mine.get"](f"{grain}:{value}", discover["function"], tgt_type="grain"))
    except Exception as exc:  # pylint: disable=broad-except
        # A masterless minion has no mine to ask, and a master that does not answer must
        # not fail a build host's run.
        return client["mirrors"], (
            f"{discovery.source(discover)}: not read ({type(exc).__name__}: {exc}); using hub_mirror:client:mirrors"
        )
    return discovery.rank(client, found, same, __opts__.get("id"))


def client_configure(test=False):
    """
    Point this host's container clients at the mirrors in ``hub_mirror:client:mirrors``,
    but only at those that answer ``GET /v2/`` within ``client:probe_timeout`` right now.

    With ``client:discover``, the mirrors come from the Salt mine: the
    ``hub_mirror.endpoint`` data of the minions ``discover:tgt`` matches, in preference
    order (``prefer``, then the hosts whose ``same_grain`` value is this host's, then by
    minion id), without mirrors that were not serving at the last mine update or that
    listen on another host's loopback. Each registry the mine has no mirror for keeps its
    ``client:mirrors`` list, e.g. on a masterless minion, which has no mine to read.

    Per runtime in ``client:runtimes`` (one that is not installed is skipped):

    - docker: ``registry-mirrors`` merged into daemon.json, every other byte kept as
      written (only docker.io can be mirrored), then dockerd reloaded (``systemctl
      reload docker`` or SIGHUP), never restarted.
    - containerd: ``certs.d/<upstream>/hosts.toml`` with the mirrors in order and the
      upstream as ``server`` fallback; the comment says whether the CRI plugin reads it.
    - podman, cri-o, buildah, skopeo: a ``registries.conf.d`` drop-in.
    - buildkit: ``[registry."<upstream>"] mirrors`` in buildkitd.toml (a marked block).
    - k3s, rke2: ``registries.yaml`` endpoints.

    A mirror configured by an earlier run that no longer answers is taken out; with none
    answering, each client gets its own config back. A problem with one client is
    reported in the comment, never raised: a dead mirror must not fail a build host's
    run. Returns ``{"changes": {...}, "comment": "..."}``; ``test=True`` changes nothing.

    The user's policy is kept and the comment says so: an upstream their own
    registries.conf configures (``blocked = true``, their mirrors), dockerd started with
    ``--registry-mirror`` (its unit, drop-ins or /etc/default/docker, running or not),
    docker-style certs in ``certs.d/<upstream>/`` (named from the new hosts.toml). An
    IPv6 mirror goes to docker, buildkit and k3s only: containerd 1.6 does not use one
    and containers/image cannot parse one. Edits the user made since the last run stay.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_configure
        salt '*' hub_mirror.client_configure test=True
    """
    return runtimes.client_configure(client_conf(_settings()), _discover, test=test)


def client_remove(test=False):
    """
    Give every client config file ``hub_mirror.client_configure`` touched back to its
    owner: a file still exactly as hub_mirror left it gets its original bytes back (or is
    removed, when hub_mirror created it); a file edited since loses only hub_mirror's
    part. dockerd is reloaded when daemon.json changes.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_remove
        salt '*' hub_mirror.client_remove test=True
    """
    return runtimes.client_remove(client_conf(_settings()), test=test)


def _minion_daemon_running():
    """True inside the salt-minion daemon, or beside a running one (salt-call): then the
    schedule is changed through the daemon's event bus, else in its file only."""
    if __opts__.get("__cli") == "salt-minion":
        return True
    try:
        with open(__opts__.get("pidfile") or "", encoding="utf-8") as handle:
            os.kill(int(handle.read().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def client_recheck(test=False, remove=False):  # pylint: disable=redefined-outer-name
    """
    Keep the Salt schedule entry ``hub_mirror-client-recheck`` as ``client:recheck``
    asks: with ``recheck: N`` the minion runs ``hub_mirror.client_configure`` (the very
    function ``hub_mirror.client`` runs) at most N seconds apart, with splay, so a mirror
    that stops answering is out of every client within one interval and back in when it
    answers again. A run that finds the same answering mirrors writes nothing and
    reloads nothing; no run ever restarts a daemon. ``recheck: 0`` (or ``remove=True``,
    as ``hub_mirror.client.clean`` does) removes the entry.

    The schedule runs in the salt-minion daemon, under a master or masterless
    (``file_client: local`` with ``master_type: disable``). From ``salt-call --local``
    without a running daemon the entry is written to ``minion.d/_schedule.conf``, which
    the daemon reads when it starts. Returns ``{"changes": {...}, "comment": "..."}``.

    CLI Example:

    .. code-block:: bash

        salt '*' hub_mirror.client_recheck
        salt '*' hub_mirror.client_recheck remove=True
    """
    seconds = 0 if remove else client_conf(_settings())["recheck"]
    live = _minion_daemon_running()
    where = {} if live else {"offline": True}
    job = discovery.RECHECK_JOB
    jobs = __salt__["schedule.list"](show_all=True, return_yaml=False, **where)
    current = jobs.get(job) if isinstance(jobs, dict) else None
    wanted = discovery.recheck_job(seconds, __opts__.get("master_type") == "disable") if seconds else None
    plan = discovery.recheck_plan(current, wanted, seconds, live)
    if test or plan["action"] is None:
        return plan["result"]
    if plan["action"] == "delete":
        outcome = __salt__["schedule.delete"](job, **where)
    else:
        outcome = __salt__[f"schedule.{plan['action']}"](job, **wanted, **where)
    if not outcome.get("result"):
        raise CommandExecutionError(f"changing the schedule entry {job} failed: {outcome.get('comment')}")
    return plan["done"]
