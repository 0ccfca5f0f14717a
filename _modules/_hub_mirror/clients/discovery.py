"""
Finding mirrors for clients: probing them in parallel, ranking the ones the Salt mine
publishes, and the recheck schedule entry.
"""

import threading
import time

from ..registry_api import probe
from .render import REGISTRY_HOST_RE
from .validate import mirror_url_problem

# The Salt schedule entry client_recheck manages.
RECHECK_JOB = "hub_mirror-client-recheck"


def probe_mirrors(urls, timeout, ca_file=""):
    """{url: None or why it does not answer}, probed in parallel and bounded by
    ``timeout`` in total: a probe still running then (e.g. stuck in a name lookup) is
    abandoned in a daemon thread and counts as no answer."""
    deadline = time.monotonic() + timeout
    results = {}

    def run(url):
        results[url] = probe(url, timeout, ca_file, deadline)

    threads = [threading.Thread(target=run, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
    return {url: results.get(url, f"no answer within {timeout}s") for url in urls}


def endpoint_problem(entry, own):
    """Why a mine entry of ``hub_mirror.endpoint`` is no mirror for this host, or None."""
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("registry"), str)
        or not REGISTRY_HOST_RE.fullmatch(entry["registry"])
        or mirror_url_problem(entry.get("url"))
    ):
        return "not a hub_mirror.endpoint entry"
    if entry.get("loopback_only") and not own:
        return "listens on loopback only: set advertise on that mirror"
    if entry.get("serving") is not True:
        return "not serving at the last mine update"
    return None


def recheck_job(seconds, masterless=False):
    """The schedule entry for ``client:recheck: seconds``: Salt adds a random 1..splay to
    each interval, so ``seconds - splay`` keeps two runs at most ``seconds`` apart while a
    fleet's probes spread over the last fifth of it. Without a master there is nobody to
    return the job to (trying logs an error every run)."""
    splay = max(1, seconds // 5)
    return {
        "function": "hub_mirror.client_configure",
        "seconds": seconds - splay,
        "splay": splay,
        "maxrunning": 1,
        "return_job": not masterless,
    }


def rank(client, found, same, own):
    """(mirrors, comment line) from the mine's answer ``found``: ``client:mirrors`` where
    each registry the mine has a mirror for gets the mine's mirrors instead, in preference
    order: ``prefer`` first, then the minions in ``same`` (same ``same_grain`` value),
    then by minion id. ``own`` is this minion's id."""
    discover, static = client["discover"], client["mirrors"]
    prefer = discover["prefer"]
    ranked, skipped = [], []
    for minion, endpoints in (found if isinstance(found, dict) else {}).items():
        for entry in endpoints if isinstance(endpoints, list) else [endpoints]:
            problem = endpoint_problem(entry, minion == own)
            name = f"{minion}/{entry['mirror']}" if isinstance(entry, dict) and "mirror" in entry else minion
            if problem:
                skipped.append(f"{name} ({problem})")
                continue
            order = (
                prefer.index(minion) if minion in prefer else len(prefer),
                minion not in same,
                minion,
                str(entry.get("mirror")),
            )
            ranked.append((order, entry["registry"], entry["url"].rstrip("/")))
    discovered = {}
    for _, registry, url in sorted(ranked):
        urls = discovered.setdefault(registry, [])
        if url not in urls:
            urls.append(url)
    mirrors = {**static, **{registry: discovered[registry] for registry in sorted(discovered)}}
    line = f"{source(discover)}: {describe(discovered) if discovered else 'no mirror'}"
    if skipped:
        line += f"; skipped {', '.join(sorted(skipped))}"
    kept = [upstream for upstream in static if upstream not in discovered]
    if kept:
        line += f"; from hub_mirror:client:mirrors: {', '.join(kept)}"
    return mirrors, line


def source(discover):
    """How the comment names the mine lookup."""
    return f"Mine ({discover['function']} of {discover['tgt']!r})"


def describe(mirrors):
    """``upstream -> url, url; ...`` for a comment."""
    return "; ".join(f"{upstream} -> {', '.join(urls)}" for upstream, urls in mirrors.items())


def recheck_plan(current, wanted, seconds, live):
    """What changing the schedule entry from ``current`` to ``wanted`` takes: the
    schedule ``action`` (None, add, modify or delete), the ``result`` to return without
    acting (no change, or ``test=True``) and the one once ``done``."""
    have = {key: current.get(key) for key in recheck_job(60)} if current else None
    how = "" if live else " (no salt-minion runs now: it takes the entry when it starts)"
    scheduled = f"Recheck: every {seconds} s at most, scheduled{how}"
    if have == wanted:
        return {"action": None, "result": {"changes": {}, "comment": scheduled if wanted else ""}}
    changes = {"recheck": {"old": have, "new": wanted}}
    if wanted is None:
        action, done = "delete", f"Recheck: schedule entry {RECHECK_JOB} removed{how}"
    else:
        action, done = ("modify" if current else "add"), scheduled
    return {
        "action": action,
        "result": {"changes": changes, "comment": f"Recheck: the schedule entry {RECHECK_JOB} would change{how}"},
        "done": {"changes": changes, "comment": done},
    }
