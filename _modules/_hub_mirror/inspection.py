"""
Reading a mirror: catalog, tags, usage, status and the Docker Hub rate limit.
"""

import os
import time

import requests
from salt.exceptions import CommandExecutionError, SaltInvocationError

from . import front
from .net import http_get
from .processes import registry_process
from .registry_api import (
    MANIFEST_ACCEPT,
    answers,
    health,
    parse_challenge,
    parse_ratelimit,
    proxy_counters,
    repositories_api,
    upstream_reachable,
)
from .release import binary_version
from .settings import binary_path, dialect_of, mirror_paths, probe_url
from .storage import CacheView, storage_usage, storage_view
from .supervisor import supervisor_for
from .units import iso, parse_image, parse_size, size_report


def catalog(spec, tags=False, sizes=False, source="api"):
    """List every repository cached by the mirror ``spec``."""
    mirror = spec["name"]
    if source not in ("api", "disk"):
        raise SaltInvocationError(
            f"source={source!r}: use api (the registry's /v2/_catalog) or disk (the storage "
            "directory; works with the registry stopped)"
        )
    if source == "api":
        base_url = probe_url(spec)
        try:
            repositories = repositories_api(base_url)
        except requests.RequestException as exc:
            reason = "no connection" if isinstance(exc, requests.ConnectionError) else str(exc)
            raise CommandExecutionError(
                f"mirror {mirror} does not answer at {base_url} ({reason}); is it running? "
                f"(salt-call hub_mirror.deploy mirror={mirror}), or read the storage "
                "directly with source=disk"
            ) from exc
        view = CacheView(spec["storage"])
    else:
        view = storage_view(spec)
        repositories = view.repositories()
    live = {repo: set(view.live_revisions(repo)) for repo in repositories}
    repositories = [repo for repo in repositories if live[repo]]
    if not tags and not sizes:
        return repositories
    result = {}
    for repo in repositories:
        cached = {tag: digest for tag, digest in view.tag_links(repo).items() if digest in live[repo]}
        if not sizes:
            result[repo] = cached
            continue
        entry = {"size": size_report(view.repository_bytes(repo, live[repo]))}
        result[repo] = {"tags": cached, **entry} if tags else entry
    return result


# Docker Hub's documented way to read the pull quota: a HEAD here is not a pull.
RATELIMIT_REPOSITORY = "ratelimitpreview/test"


def tags(spec, repo):
    """Return the tags of ``repo`` that the mirror ``spec`` has cached, read from its storage (so it
    works with the registry stopped): for each tag its digest, media type, size, when it was
    cached and when the cache expires it, and the platforms actually cached; for a multi-
    arch index also ``platforms_available``, every platform the index lists."""
    mirror = spec["name"]
    try:
        name, _ = parse_image(repo, spec["upstream"])
    except ValueError as exc:
        raise SaltInvocationError(f"repo: {exc}") from exc
    view = storage_view(spec)
    live = set(view.live_revisions(name))
    if not live:
        expired = os.path.isdir(os.path.join(view.repos_root, name, "_manifests"))
        raise CommandExecutionError(
            f"mirror {mirror} holds no cached content for {name}"
            + (" (what it cached has expired)" if expired else "")
            + f"; 'hub_mirror.catalog mirror={mirror} source=disk' lists what is cached"
        )
    return {tag: view.describe(name, digest) for tag, digest in view.tag_links(name).items() if digest in live}


def usage(spec):
    """Return the storage use of the mirror ``spec``: bytes used (apparent size of every file, as ``du
    -sb``), blob count and bytes, cached repositories, what ``hub_mirror.gc`` would reclaim
    now, the filesystem's free space, and the pillar cap ``max_size`` with whether it is
    exceeded. Reads the storage only: works with the registry stopped."""
    mirror = spec["name"]
    view = CacheView(spec["storage"])
    report, blobs = storage_usage(view, spec)
    keep = view.marked()
    report["repositories"] = sum(1 for repo in view.repositories() if view.live_revisions(repo))
    report["reclaimable"] = size_report(sum(size for digest, size in blobs.items() if digest not in keep))
    cap = parse_size(spec["max_size"])
    report["over_by"] = size_report(report["used"]["bytes"] - cap) if report["over_cap"] else None
    return {"mirror": mirror, **report}


def status(conf, names, images=False):
    """The state of each mirror in ``names``, keyed by name (see the facade's ``status``)."""
    binary = binary_path(conf)
    installed = binary_version(binary) if os.path.exists(binary) else None
    return {name: _mirror_status(conf, conf["mirrors"][name], installed, images) for name in names}


def _count_front_hits(counters, served):
    """The registry's counters never see what the front served: blob files, waiters
    served from another's fill and manifests from the front's cache are hits too."""
    for kind, extra in (("blobs", served["blob_files"] + served["coalesced"]), ("manifests", served["manifests"])):
        entry = (counters or {}).get(kind)
        if not entry or entry.get("hits") is None:
            continue
        entry["requests"] += extra
        entry["hits"] += extra
        entry["hit_ratio"] = round(entry["hits"] / entry["requests"], 3) if entry["requests"] else None


def _mirror_status(conf, spec, installed, images):
    name = spec["name"]
    paths = mirror_paths(conf, name)
    process = registry_process(paths)
    running = supervisor_for(conf).running(name)
    serving = answers(probe_url(spec), 3)
    debug_url = f"http://{spec['debug_listen']}"
    counters = None
    if serving or process:
        expvar_response = http_get(f"{debug_url}/debug/vars", 5)
        metrics_response = http_get(f"{debug_url}/metrics", 5)
        try:
            expvar = expvar_response.json() if expvar_response is not None else None
        except ValueError:
            expvar = None
        metrics = metrics_response.text if metrics_response is not None else None
        if expvar or metrics:
            counters = proxy_counters(expvar, metrics, dialect_of(installed or conf["version"]))
    view = CacheView(spec["storage"])
    disk, _ = storage_usage(view, spec)
    repositories = [repo for repo in view.repositories() if view.live_revisions(repo)]
    report = {
        "running": running,
        "serving": serving,
        "mode": process["mode"] if process else None,
        "started": process["started"] if process else None,
        "version": installed,
        "listen": probe_url(spec)[len("http://") :],
        "upstream": spec["upstream"],
        "upstream_reachable": upstream_reachable(spec["upstream"]),
        "health": health(debug_url) if (serving or process) else None,
        "credential": bool(spec["username"] and spec["token"]),
        "repositories": len(repositories),
        "disk": {"used": disk["used"], "free": (disk["filesystem"] or {}).get("free")},
        "max_size": disk["max_size"],
        "over_cap": disk["over_cap"],
        "proxy": counters,
    }
    if front.enabled(spec):
        report["front"] = front.counters(spec)
        _count_front_hits(counters, report["front"])
    if images:
        report["images"] = {
            repo: {tag: digest for tag, digest in view.tag_links(repo).items() if view.live(repo, digest)}
            for repo in repositories
        }
    if not running and process:
        comment = (
            f"a registry (pid {process['pid']}) serves without its supervisor: apply hub_mirror "
            f"or run hub_mirror.stop mirror={name} to heal it"
        )
    elif not running and not serving:
        comment = f"not running (start it: hub_mirror.start mirror={name})"
    elif not serving:
        comment = f"the service runs but {report['listen']} does not answer /v2/"
    else:
        comment = f"serving in {report['mode'] or 'unknown'} mode"
    if report["health"] not in (None, "ok"):
        comment += "; storage health check fails"
    if disk["over_cap"]:
        comment += (
            f"; storage use {disk['used']['human']} exceeds max_size {disk['max_size']['human']}"
            f" (apply hub_mirror.pruned or run hub_mirror.prune mirror={name})"
        )
    report["comment"] = comment
    return report


def ratelimit(spec, timeout=15):
    """Return the Docker Hub pull quota left for the mirror ``spec``'s credential (anonymous without
    one): ``limit``, ``remaining`` and the ``window`` they apply to, from a HEAD on
    ``ratelimitpreview/test`` with a token from the realm the upstream advertises. A HEAD is
    not a pull: checking uses up nothing. The token is sent only to that realm."""
    mirror = spec["name"]
    upstream = spec["upstream"].rstrip("/")
    target = f"{upstream}/v2/{RATELIMIT_REPOSITORY}/manifests/latest"
    headers = {"Accept": MANIFEST_ACCEPT}
    authenticated = bool(spec["username"] and spec["token"])
    try:
        response = requests.head(target, headers=headers, timeout=timeout)
        if response.status_code == 401:
            scheme, params = parse_challenge(response.headers.get("WWW-Authenticate"))
            if scheme != "bearer" or not params.get("realm"):
                raise CommandExecutionError(
                    f"the upstream {upstream} of mirror {mirror} asks for {scheme or 'no'} "
                    "authentication, not a Docker Hub style bearer token"
                )
            query = {"scope": f"repository:{RATELIMIT_REPOSITORY}:pull"}
            if params.get("service"):
                query["service"] = params["service"]
            auth = (spec["username"], spec["token"]) if authenticated else None
            token_response = requests.get(params["realm"], params=query, auth=auth, timeout=timeout)
            if token_response.status_code in (401, 403):
                raise CommandExecutionError(
                    f"the token service of {upstream} refused the credential of mirror {mirror}: "
                    f"check hub_mirror:mirrors:{mirror}:username and :token"
                )
            token_response.raise_for_status()
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            response = requests.head(target, headers={**headers, "Authorization": f"Bearer {token}"}, timeout=timeout)
    except requests.RequestException as exc:
        raise CommandExecutionError(
            f"cannot ask the upstream {upstream} of mirror {mirror} for its rate limit: {type(exc).__name__}: {exc}"
        ) from exc
    except ValueError as exc:
        raise CommandExecutionError(f"the token service of {upstream} answered no JSON token") from exc
    limit, remaining, window, source = parse_ratelimit(response.headers)
    report = {
        "mirror": mirror,
        "upstream": upstream,
        "authenticated": authenticated,
        "limit": limit,
        "remaining": remaining,
        "window": {"seconds": window, "human": f"{window / 3600:g}h"} if window else None,
        "source": source,
        "checked": iso(time.time()),
    }
    if limit is None:
        report["comment"] = (
            f"the upstream sent no rate-limit headers (HTTP {response.status_code}): no pull "
            "limit applies to this credential, or the upstream is not Docker Hub"
        )
    else:
        report["comment"] = f"{remaining} of {limit} pulls left in the current {report['window']['human']} window" + (
            "" if authenticated else " (anonymous: per IP address)"
        )
    return report
