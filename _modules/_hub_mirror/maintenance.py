"""
Changing what is cached: warm (pull images through the mirror), gc (registry
garbage-collect) and prune (expire the oldest images by the registry's own means).
"""

import concurrent.futures
import http.client
import http.server
import json
import os
import subprocess
import tempfile
import threading
import time

import requests
from salt.exceptions import CommandExecutionError, SaltInvocationError

from .accounts import service_user_kwargs
from .fsutil import write_atomic
from .net import free_loopback_port
from .processes import mirror_processes, registry_process
from .registry_api import answers, fetch_blob, get_manifest, wait_serving
from .registry_config import config_dialect
from .settings import binary_path, mirror_paths, probe_url
from .storage import CacheView, add_missing_layer_dirs, read_schedule, storage_view, tree_bytes
from .supervisor import stop_service, supervisor_for
from .units import (
    GC_ELIGIBLE_RE,
    as_list,
    human_size,
    parse_image,
    parse_size,
    platform_name,
    platform_wanted,
    size_report,
)

# Go parses this as a time long past: the registry's scheduler expires such entries at once.
EXPIRED = "1970-01-01T00:00:00Z"


def _warm_one(spec, base, image, repo, reference, platforms, timeout):
    """Pull one image through the mirror into its cache; a report, never an exception."""
    before = CacheView(spec["storage"])
    report = {"image": image, "repository": repo, "reference": reference}
    fetched = 0
    # Read before the GET: the GET itself stores the manifest.
    prior = reference if reference.startswith("sha256:") else before.tag_links(repo).get(reference)
    prior = prior if prior and before.live(repo, prior) else None
    try:
        with requests.Session() as session:
            digest, doc, size = get_manifest(session, base, repo, reference, timeout)
            report["digest"] = digest
            was_cached = digest == prior
            fetched += 0 if was_cached else size
            manifests = [(digest, doc)]
            if isinstance(doc.get("manifests"), list):
                chosen = [
                    entry
                    for entry in doc["manifests"]
                    if isinstance(entry, dict) and platform_wanted(platform_name(entry.get("platform")), platforms)
                ]
                if not chosen:
                    available = [platform_name(e.get("platform")) for e in doc["manifests"] if isinstance(e, dict)]
                    raise CommandExecutionError(
                        f"{image}: the index has none of the platforms {platforms}; it has {available}"
                    )
                report["platforms"] = [platform_name(entry.get("platform")) for entry in chosen]
                manifests = []
                for entry in chosen:
                    child_cached = before.live(repo, entry["digest"])
                    child_digest, child_doc, child_size = get_manifest(session, base, repo, entry["digest"], timeout)
                    was_cached = was_cached and child_cached
                    fetched += 0 if child_cached else child_size
                    manifests.append((child_digest, child_doc))
            blobs = []
            for _, manifest in manifests:
                config = manifest.get("config") or {}
                blobs += [config["digest"]] if config.get("digest") else []
                blobs += [layer["digest"] for layer in manifest.get("layers") or [] if layer.get("digest")]
            missing = [blob for blob in dict.fromkeys(blobs) if not before.layer_cached(repo, blob)]
            for blob in missing:
                fetched += fetch_blob(session, base, repo, blob, timeout)
        # The registry stores a blob it fetched upstream in the background after serving
        # it: wait for it, or the next pull would miss again.
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            after = CacheView(spec["storage"])
            missing = [blob for blob in missing if not after.layer_cached(repo, blob)]
            if missing:
                time.sleep(0.2)
        if missing:
            raise CommandExecutionError(f"{image}: the mirror did not store {len(missing)} blob(s) within {timeout}s")
        report.update(
            already_cached=was_cached and fetched == 0,
            fetched=size_report(fetched),
            blobs=len(set(blobs)),
            error=None,
        )
    except (requests.RequestException, CommandExecutionError) as exc:
        report.update(already_cached=False, fetched=size_report(fetched), error=str(exc))
    return report


def _cached_for(view, repo, reference, platforms):
    """Whether ``repo:reference`` is cached with all wanted platforms (disk only)."""
    digest = reference if reference.startswith("sha256:") else view.tag_links(repo).get(reference)
    if not digest or not view.live(repo, digest):
        return False
    children, _ = view.references(digest)
    if not children:
        return view.complete(repo, digest)
    wanted = [c for c in children if platform_wanted(platform_name(c.get("platform")), platforms)]
    return bool(wanted) and all(view.complete(repo, child["digest"]) for child in wanted)


def warm(spec, images=None, platforms=None, parallel=4, timeout=300, test=False):
    """Pull ``images`` through the mirror ``spec`` so that they are cached before the first build needs
    them: manifest (or index), then config and layers, ``parallel`` images at a time. For a
    multi-arch index every platform is fetched, or only ``platforms`` (e.g.
    ``linux/amd64,linux/arm64``). Without ``images``, the pillar list
    ``hub_mirror:mirrors:<mirror>:warm`` is used."""
    mirror = spec["name"]
    images = as_list(spec["warm"] if images is None else images)
    platforms = as_list(platforms) or None
    try:
        parallel = int(parallel)
        timeout = float(timeout)
    except (TypeError, ValueError) as exc:
        raise SaltInvocationError("parallel and timeout must be numbers") from exc
    if parallel < 1:
        raise SaltInvocationError("parallel must be 1 or more")
    parsed, bad = [], []
    for image in images:
        try:
            parsed.append((image, *parse_image(image, spec["upstream"])))
        except ValueError as exc:
            bad.append(str(exc))
    if bad:
        raise SaltInvocationError("cannot warm: " + "; ".join(bad))
    if not parsed:
        return {"changes": {}, "comment": f"No images to warm for mirror {mirror}", "images": {}}

    if test:
        view = CacheView(spec["storage"])
        missing = [img for img, repo, ref in parsed if not _cached_for(view, repo, ref, platforms)]
        return {
            "changes": {image: "would be fetched" for image in missing},
            "comment": (
                f"{len(missing)} of {len(parsed)} images would be fetched into mirror {mirror}"
                if missing
                else f"All {len(parsed)} images are cached by mirror {mirror}"
            ),
            "images": {img: {"already_cached": img not in missing} for img, _, _ in parsed},
        }

    base = probe_url(spec)
    if not answers(base, 5):
        raise CommandExecutionError(
            f"mirror {mirror} does not answer at {base}: nothing was warmed "
            f"(start it: hub_mirror.start mirror={mirror})"
        )
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(parallel, len(parsed))) as pool:
        reports = list(pool.map(lambda item: _warm_one(spec, base, *item, platforms, timeout), parsed))
    results = {report.pop("image"): report for report in reports}
    changes = {
        image: {"digest": r["digest"], "fetched": r["fetched"]}
        for image, r in results.items()
        if not r["error"] and not r["already_cached"]
    }
    failed = {image: r["error"] for image, r in results.items() if r["error"]}
    total = sum(r["fetched"]["bytes"] for r in results.values())
    comment = (
        f"Mirror {mirror}: {len(changes)} image(s) fetched ({human_size(total)}), "
        f"{sum(1 for r in results.values() if r['already_cached'])} already cached"
    )
    if failed:
        raise CommandExecutionError(
            f"{comment}; {len(failed)} failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
        )
    return {"changes": changes, "comment": comment, "images": results}


def _registry_env(**overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env["OTEL_TRACES_EXPORTER"] = "none"
    env.update(overrides)
    return env


def _wait_stopped(paths, timeout=30):
    deadline = time.monotonic() + timeout
    while registry_process(paths) and time.monotonic() < deadline:
        time.sleep(0.2)
    return registry_process(paths) is None


def _while_stopped(conf, spec, action):
    """Run ``action()`` with the mirror's service stopped, then bring it back.

    Returns (action's result, {"stopped": seconds, "serving": bool or None}). The
    registry must be gone before ``action`` runs: the caller deletes files under it.
    """
    name = spec["name"]
    paths = mirror_paths(conf, name)
    supervisor = supervisor_for(conf)
    was_running = supervisor.running(name)
    began = time.monotonic()
    if was_running or mirror_processes(paths):
        stop_service(conf, spec)
    serving = None
    try:
        if not _wait_stopped(paths):
            raise CommandExecutionError(
                f"the registry of mirror {name} still runs (pid {registry_process(paths)['pid']}): nothing was deleted"
            )
        result = action()
    finally:
        if was_running:
            supervisor.start(name)
            serving = wait_serving(spec, conf["probe_timeout"])
        stopped = time.monotonic() - began
    if was_running and not serving:
        raise CommandExecutionError(
            f"mirror {name} did not answer again within {conf['probe_timeout']}s after the "
            f"maintenance. Recent log:\n{supervisor.recent_log(name)}"
        )
    return result, {"stopped": round(stopped, 1) if was_running else None, "serving": serving}


def _run_gc(conf, paths, dry_run, delete_untagged):
    command = [binary_path(conf), "garbage-collect"]
    command += ["--dry-run"] if dry_run else []
    command += ["--delete-untagged"] if delete_untagged else []
    command.append(paths["config"])
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
            env=_registry_env(),
            **service_user_kwargs(conf),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CommandExecutionError(f"cannot run {' '.join(command)}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise CommandExecutionError(f"{' '.join(command)} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def gc(conf, spec, dry_run=True, delete_untagged=False):
    """Garbage-collect the mirror ``spec``'s storage with ``registry garbage-collect`` and report the
    bytes freed. Blobs that no cached manifest references (left by expiry, or by pulls that
    fetched layers of manifests that were never stored) are deleted."""
    mirror = spec["name"]
    paths = mirror_paths(conf, mirror)
    if not os.path.exists(paths["config"]):
        raise CommandExecutionError(
            f"mirror {mirror} has no registry config {paths['config']}; apply hub_mirror.config first"
        )
    view = storage_view(spec)
    report = {"mirror": mirror, "dry_run": bool(dry_run), "delete_untagged": bool(delete_untagged)}
    if not os.path.isdir(view.repos_root):
        return dict(report, blobs=0, manifests=0, freed=size_report(0), comment="Nothing is cached: nothing to collect")
    # A repair, not a change of content: needed even for a dry run, which 3.x fails too.
    added = add_missing_layer_dirs(spec["storage"], f"hub_mirror:mirrors:{mirror}:storage")
    if added:
        report["layer_dirs_added"] = added
    before = view.blob_files()
    if dry_run:
        output = _run_gc(conf, paths, True, delete_untagged)
        window = None
    else:
        output, window = _while_stopped(conf, spec, lambda: _run_gc(conf, paths, False, delete_untagged))
    eligible = GC_ELIGIBLE_RE.findall(output)
    if dry_run:
        freed = sum(before.get(digest, 0) for kind, digest in eligible if kind == "blob")
    else:
        after = CacheView(spec["storage"]).blob_files()
        freed = sum(size for digest, size in before.items() if digest not in after)
    report.update(
        blobs=sum(1 for kind, _ in eligible if kind == "blob"),
        manifests=sum(1 for kind, _ in eligible if kind == "manifest"),
        freed=size_report(freed),
    )
    if window:
        report.update(window)
    verb = "would free" if dry_run else "freed"
    report["comment"] = f"garbage-collect {verb} {human_size(freed)} in {report['blobs']} blob(s)" + (
        f"; the mirror was stopped for {window['stopped']}s" if window and window["serving"] else ""
    )
    return report


def _plan_prune(units, used, unreferenced, cap):
    """
    Which cached images to expire, oldest first, to bring ``used`` bytes to ``cap``.

    ``units`` are {"id", "order", "blobs": {digest: size}}; a blob shared by images is
    freed only when the last image using it goes, and ``unreferenced`` bytes go with the
    garbage collection anyway. Returns (chosen ids, bytes freed, bytes used after).
    """
    refcount = {}
    for unit in units:
        for digest in unit["blobs"]:
            refcount[digest] = refcount.get(digest, 0) + 1
    projected = used - unreferenced
    chosen, freed = [], unreferenced
    for unit in sorted(units, key=lambda u: (u["order"], u["id"])):
        if projected <= cap:
            break
        chosen.append(unit["id"])
        for digest, size in unit["blobs"].items():
            refcount[digest] -= 1
            if refcount[digest] == 0:
                projected -= size
                freed += size
    return chosen, freed, projected


def _prune_units(view):
    """One unit per top-level cached manifest (an index with its platforms)."""
    units = []
    for repo in view.repositories():
        revisions = view.revisions(repo)
        children = set()
        for digest in revisions:
            children.update(c["digest"] for c in view.references(digest)[0])
        for digest in revisions:
            if digest in children or f"{repo}@{digest}" not in view.schedule:
                continue
            members = view.closure(repo, digest, linked=lambda r, d, revisions=revisions: d in revisions)
            units.append(
                {
                    "id": f"{repo}@{digest}",
                    "repo": repo,
                    "order": view.expires(repo, digest) or 0,
                    "manifests": [d for d in members if d in revisions],
                    "blobs": {d: view.blob_size(d) or 0 for d in members},
                }
            )
    return units


class _StubUpstream(http.server.BaseHTTPRequestHandler):
    """Answers ``/v2/`` with no auth challenge: all a maintenance registry needs to start."""

    def do_GET(self):  # pylint: disable=invalid-name
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):  # pylint: disable=arguments-differ
        pass


def _expire_now(conf, spec, keys, timeout=120):
    """
    Make the registry itself expire scheduler entries ``keys`` now: mark them overdue
    in ``scheduler-state.json`` and run the registry, on the mirror's own config, until
    its scheduler has processed them. It runs on private loopback ports with a stub
    upstream (the proxy refuses to start without one), so it serves and fetches nothing.
    The mirror's service must be stopped.
    """
    state_path = os.path.join(spec["storage"], "scheduler-state.json")
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CommandExecutionError(
            f"cannot read the expiry schedule {state_path} of mirror {spec['name']}: {exc}; nothing was expired"
        ) from exc
    keys = [key for key in keys if key in state]
    for key in keys:
        state[key]["ExpiryData"] = EXPIRED
    info = os.stat(state_path)
    try:
        write_atomic(state_path, json.dumps(state), info.st_mode & 0o777, info.st_uid, info.st_gid)
    except OSError as exc:
        raise CommandExecutionError(
            f"cannot write the expiry schedule {state_path} of mirror {spec['name']}: {exc}; nothing was expired"
        ) from exc

    paths = mirror_paths(conf, spec["name"])
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubUpstream)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    env = _registry_env(
        # TCP on loopback, also for a mirror whose registry sits behind a front.
        REGISTRY_HTTP_NET="tcp",
        REGISTRY_HTTP_ADDR=f"127.0.0.1:{free_loopback_port()}",
        REGISTRY_HTTP_DEBUG_ADDR=f"127.0.0.1:{free_loopback_port()}",
        REGISTRY_PROXY_REMOTEURL=f"http://127.0.0.1:{stub.server_address[1]}",
    )
    with tempfile.TemporaryFile() as log_file:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [binary_path(conf), "serve", paths["config"]],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            **service_user_kwargs(conf),
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                pending = set(keys) & set(read_schedule(spec["storage"]))
                if not pending:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log_file.seek(0)
                    tail = "\n".join(log_file.read().decode(errors="replace").splitlines()[-10:])
                    raise CommandExecutionError(
                        f"the registry did not expire {len(pending)} cached item(s) of mirror "
                        f"{spec['name']} within {timeout}s. Its log:\n{tail}"
                    )
                time.sleep(0.5)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            stub.shutdown()
            stub.server_close()


def prune(conf, spec, max_size=None, test=False):
    """Bring the mirror ``spec``'s storage under its cap (``max_size``, default the pillar's
    ``hub_mirror:mirrors:<mirror>:max_size``), freeing space oldest first, by the registry's
    own means: the oldest cached images are marked expired in its scheduler, the registry
    expires them (with the mirror stopped, on private ports), and ``registry garbage-
    collect`` deletes their blobs; then the mirror serves again. Nothing is deleted while
    the mirror's registry runs."""
    mirror = spec["name"]
    try:
        cap = parse_size(spec["max_size"] if max_size is None else max_size)
    except ValueError as exc:
        raise SaltInvocationError(f"max_size: {max_size!r} is not a size; write e.g. 50G") from exc
    if not cap:
        return {"changes": {}, "comment": f"Mirror {mirror} has no max_size: nothing to enforce"}
    view = CacheView(spec["storage"])
    used = tree_bytes(spec["storage"]) if os.path.isdir(spec["storage"]) else 0
    if used <= cap:
        return {
            "changes": {},
            "comment": f"Mirror {mirror} uses {human_size(used)}, within max_size {human_size(cap)}",
        }
    if config_dialect(conf) != "2" and str(spec["ttl"]) == "0":
        raise CommandExecutionError(
            f"mirror {mirror} keeps cached content forever (hub_mirror:mirrors:{mirror}:ttl: 0), so "
            "the registry cannot expire any of it: set a ttl or raise max_size"
        )
    blobs = view.blob_files()
    keep = view.marked()
    unreferenced = sum(size for digest, size in blobs.items() if digest not in keep)
    units = _prune_units(view)
    chosen, freed, projected = _plan_prune(units, used, unreferenced, cap)
    by_id = {unit["id"]: unit for unit in units}
    expire = [f"{by_id[i]['repo']}@{d}" for i in chosen for d in by_id[i]["manifests"]]
    surviving = set()
    for unit in units:
        if unit["id"] not in chosen:
            surviving.update(unit["blobs"])
    for unit_id in chosen:
        repo = by_id[unit_id]["repo"]
        expire += [
            f"{repo}@{d}"
            for d in by_id[unit_id]["blobs"]
            if d not in surviving and f"{repo}@{d}" in view.schedule and view.schedule[f"{repo}@{d}"][1] == "blob"
        ]
    expire = sorted(set(expire))
    changes = {
        "expired": sorted(chosen),
        "freed": size_report(freed),
        "used": {"old": size_report(used), "new": size_report(projected)},
    }
    if projected > cap:
        changes["warning"] = f"everything expirable is expired and {human_size(projected)} remain"
    if test:
        return {
            "changes": changes,
            "comment": f"Mirror {mirror} would expire {len(chosen)} image(s) to free {human_size(freed)}",
        }
    paths = mirror_paths(conf, mirror)
    if not os.path.exists(paths["config"]):
        raise CommandExecutionError(
            f"mirror {mirror} has no registry config {paths['config']}; apply hub_mirror.config first"
        )

    def maintenance():
        if expire:
            _expire_now(conf, spec, expire)
        added = add_missing_layer_dirs(spec["storage"], f"hub_mirror:mirrors:{mirror}:storage")
        if added:
            changes["layer_dirs_added"] = added
        _run_gc(conf, paths, False, False)

    _, window = _while_stopped(conf, spec, maintenance)
    after = tree_bytes(spec["storage"])
    changes["freed"] = size_report(max(used - after, 0))
    changes["used"]["new"] = size_report(after)
    changes.pop("warning", None)
    if after > cap:
        changes["warning"] = f"{human_size(after)} remain above max_size {human_size(cap)}"
    return {
        "changes": changes,
        "comment": (
            f"Mirror {mirror}: expired {len(chosen)} image(s), freed {human_size(used - after)}"
            + (f"; it was stopped for {window['stopped']}s" if window["serving"] else "")
        ),
    }
