"""
One mirror's life on a host: configure, deploy (start or restart only on change, roll
back a config that does not serve), start, stop, remove, and the orphans pillar dropped.
"""

import hashlib
import json
import os
import shutil
import subprocess
import urllib.parse

import yaml
from salt.exceptions import CommandExecutionError, SaltInvocationError

from .accounts import service_ids, service_user_kwargs
from .checks import Errors, check_path, show_value
from .front import FRONT_DIR
from .front import check_conf as check_front_conf
from .front import enabled as front_enabled
from .fsutil import open_dir, read_file, sha256_file, write_atomic
from .net import REDACTED, is_loopback_host, parse_hostport
from .processes import check_listen_free, mirror_processes, stop_leftovers
from .registry_api import answers, check_upstream, wait_serving
from .registry_config import (
    LEGACY_CONFIG_HEADER,
    config_changes,
    config_header,
    render_config_files,
)
from .release import asset_url
from .settings import DOCKER_HUB, DOCKER_HUB_HOSTS, binary_path, mirror_paths, probe_url, record_path
from .storage import STORAGE_MARKER, own_storage, storage_plan, storage_writable
from .supervisor import render_service_files, run_systemctl, stop_service, supervisor_for
from .validate import NAME_RE, validate_storage


def configure(conf, spec, test=False):
    """Render the mirror ``spec``'s registry config from pillar and write it, 0600, owned by the service
    user, atomically; only when it differs. The storage directory is created."""
    mirror = spec["name"]
    paths = mirror_paths(conf, mirror)
    texts = render_config_files(conf, spec)
    check_listen_free(conf, spec)

    changes = {}
    for key, text in texts.items():
        old = read_file(paths[key])
        if old is None:
            changes[key] = {"old": "", "new": paths[key]}
        elif old != text and key == "config":
            changes[key] = config_changes(old, text)
        elif old != text and key == "credentials":
            changes[key] = {"old": REDACTED, "new": REDACTED}
        elif old != text:
            changes[key] = "updated"
    # The credential files of a mirror that no longer has a credential (a token taken out
    # of pillar, or a dialect without the helper) go: no old token stays on disk.
    stale = [
        key
        for key in ("credentials", "credential_helper", "front_conf")
        if key not in texts and os.path.lexists(paths[key])
    ]
    for key in stale:
        changes[key] = {"old": paths[key], "new": ""}
    ids = service_ids(conf, required=False)
    storage = storage_plan(spec, ids)
    if storage:
        changes["storage"] = storage
    warnings = []
    if {"config", "credentials"} & set(changes):
        # Before anything is written: a refused credential changes nothing.
        warnings = check_upstream(spec)
    if not changes:
        return {"changes": {}, "comment": f"Mirror {mirror} config is up to date", "warnings": warnings}
    if test:
        return {"changes": changes, "comment": f"Mirror {mirror} config would be updated", "warnings": warnings}

    uid, gid = service_ids(conf)
    if storage:
        own_storage(spec["storage"], uid, gid, f"hub_mirror:mirrors:{mirror}:storage")
    for key in stale:
        os.unlink(paths[key])
    for key, text in texts.items():
        if key == "credential_helper" and key in changes:
            write_atomic(paths[key], text, 0o755)
        elif key in changes:
            write_atomic(paths[key], text, 0o600, uid, gid)
    return {"changes": changes, "comment": f"Mirror {mirror} config updated", "warnings": warnings}


def _fingerprint(conf, spec, files, texts):
    """
    What the mirror must serve with: the binary the pillar asks for, the configs rendered
    from pillar (``texts``, from ``render_config_files``) and the service files
    (``files``). Computed from pillar, not from disk, so that a test run sees the restart
    a pending install or config change will cause. The credentials file is left out:
    registry 3.x rereads it without a restart. The front's nginx is read from disk: a
    package upgrade replaces it under a running front, which keeps the old code until the
    next apply restarts the mirror.
    """
    digest = hashlib.sha256()
    binary = binary_path(conf)
    if conf["install"]["method"] == "archive":
        digest.update(asset_url(conf["version"], conf["arch"], conf["install"]["source"]).encode())
    elif os.path.exists(binary):
        digest.update(sha256_file(binary).encode())
    front_binary = conf["lookup"]["front_binary"]
    if front_enabled(spec) and os.path.isfile(front_binary):
        digest.update(sha256_file(front_binary).encode())
    for key in ("config", "offline_config", "supervise_settings", "front_conf"):
        digest.update(texts.get(key, "").encode())
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path][0].encode())
    return digest.hexdigest()


def deploy(conf, spec, test=False):
    """Make the mirror ``spec`` run under its supervisor and serve on its listen address."""
    mirror = spec["name"]
    paths = mirror_paths(conf, mirror)
    if not os.path.exists(binary_path(conf)) and not test:
        raise CommandExecutionError(
            f"the registry binary {binary_path(conf)} is missing; apply hub_mirror.install first"
        )
    if front_enabled(spec) and not os.path.exists(conf["lookup"]["front_binary"]) and not test:
        raise CommandExecutionError(
            f"the front's nginx {conf['lookup']['front_binary']} is missing; apply hub_mirror.install "
            f"first, or set hub_mirror:mirrors:{mirror}:front: none"
        )
    texts = render_config_files(conf, spec)
    # A test run predicts from pillar alone.
    unconfigured = [] if test else [paths[key] for key in texts if not os.path.exists(paths[key])]
    if unconfigured:
        raise CommandExecutionError(
            f"mirror {mirror}: {', '.join(unconfigured)} missing; apply hub_mirror.configure first"
        )
    files = render_service_files(conf, spec)
    stale = {path: entry for path, entry in files.items() if read_file(path) != entry[0]}
    supervisor = supervisor_for(conf)
    is_running = supervisor.running(mirror)
    fingerprint = _fingerprint(conf, spec, files, texts)
    changed = fingerprint != (read_file(paths["fingerprint"]) or "").strip()
    # Serving without its service: what a supervisor killed by older versions left behind.
    leftovers = [] if is_running else mirror_processes(paths)
    storage_writable(conf, spec)

    changes = {}
    for path in stale:
        changes[path] = "updated" if os.path.exists(path) else "created"
    if not supervisor.enabled(mirror):
        changes["enabled"] = True
    if leftovers:
        changes["unsupervised"] = {
            "old": f"pids {', '.join(map(str, leftovers))} serve without a supervisor",
            "new": "stopped",
        }
    if not is_running:
        changes["started"] = True
    elif changed:
        changes["restarted"] = True
    if not changes and not wait_serving(spec, min(conf["probe_timeout"], 5)):
        changes["restarted"] = True
    unused_front = _unused_front_dir(spec)
    if unused_front:
        changes[unused_front] = "removed"
    if not changes:
        return {"changes": {}, "comment": f"Mirror {mirror} is running and answers /v2/"}
    if test:
        return {"changes": changes, "comment": f"Mirror {mirror} would be brought up"}
    if front_enabled(spec) and ("started" in changes or "restarted" in changes):
        _check_front(conf, spec, paths)

    for path, (text, mode) in stale.items():
        write_atomic(path, text, mode)
    if stale:
        supervisor.files_changed()
    if "enabled" in changes:
        supervisor.enable(mirror)
    if leftovers and not stop_leftovers(paths):
        raise CommandExecutionError(
            f"mirror {mirror}: processes {leftovers} serving it without a supervisor do not stop"
        )
    if "started" in changes or "restarted" in changes:
        supervisor.start(mirror, restart=is_running)
    if not wait_serving(spec, conf["probe_timeout"]):
        raise CommandExecutionError(_rollback(conf, spec, paths))
    # 0600: a digest over the rendered config is still derived from the token.
    write_atomic(paths["fingerprint"], fingerprint + "\n", 0o600)
    _save_last_good(paths, files)
    comment = f"Mirror {mirror} runs and answers /v2/"
    if unused_front:
        # Only now: until the restart above, the old front used it. What serves has
        # changed and is recorded: a directory that will not go is said, not raised.
        try:
            _remove_from_storage(spec, [unused_front])
        except (OSError, CommandExecutionError) as exc:
            del changes[unused_front]
            comment += f"; {unused_front}, which it no longer uses, could not be removed ({exc}): remove it by hand"
    return {"changes": changes, "comment": comment}


def _check_front(conf, spec, paths):
    """Before the running front stops: the nginx to start must accept its config (an
    upgraded nginx may not, and a rollback cannot bring back the old binary). Refused,
    the files of the setup that serves are put back, and nothing restarts."""
    binary = conf["lookup"]["front_binary"]
    refused = check_front_conf(binary, read_file(paths["front_conf"]) or "", service_user_kwargs(conf))
    if refused:
        _, kept = _restore_last_good(paths, _read_last_good(paths))
        raise CommandExecutionError(
            f"mirror {spec['name']}: {binary} refuses the front's config, so nothing was restarted: {refused}"
            + "".join(f"; the new config is kept as {path}.failed" for path in kept)
        )


def _save_last_good(paths, service_files):
    """Keep every file the mirror just served with (configs and service files), with
    owner and mode, so that a later change that does not come up can be undone whole."""
    snapshot = {}
    fronted = [paths["front_conf"]] if os.path.exists(paths["front_conf"]) else []
    for path in [paths["config"], paths["offline_config"], paths["supervise_settings"], *fronted, *service_files]:
        info = os.stat(path)
        snapshot[path] = {
            "text": read_file(path),
            "mode": info.st_mode & 0o7777,
            "uid": info.st_uid,
            "gid": info.st_gid,
        }
    # 0600: the config in it holds the token (2.8).
    write_atomic(paths["last_good"], json.dumps(snapshot), 0o600)


def _rollback(conf, spec, paths):
    """Bring back every file of the last setup that served; return the failure message."""
    name = spec["name"]
    message = (
        f"mirror {name} did not answer {probe_url(spec)}/v2/ within "
        f"{conf['probe_timeout']}s. Recent log:\n{supervisor_for(conf).recent_log(name)}"
    )
    snapshot = _read_last_good(paths)
    restored, failed = _restore_last_good(paths, snapshot)
    if not restored:
        return message
    supervisor = supervisor_for(conf)
    if paths["unit"] in restored:
        supervisor.files_changed()
    supervisor.start(name, restart=True)
    # The restored setup serves on its own address, which may not be the new one (the
    # supervisor's settings name it, front or not).
    host, port = parse_hostport(json.loads(snapshot[paths["supervise_settings"]]["text"])["listen"])
    restored = wait_serving(dict(spec, listen_host=host, listen_port=port), conf["probe_timeout"])
    return message + (
        "\nRestored the last setup that served "
        f"({'it serves again' if restored else 'it does not answer either'})"
        + "".join(f"; the new config is kept as {path}.failed" for path in failed)
    )


def _read_last_good(paths):
    try:
        with open(paths["last_good"], encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _restore_last_good(paths, snapshot):
    """Write back every file of the last setup that served (``snapshot``) which differs
    now; the new configs that failed stay beside them, to be read (``.failed``). Returns
    the files written back and the configs kept as failed."""
    restore = {path: f for path, f in snapshot.items() if read_file(path) != f["text"]}
    failed = [path for path in (paths["config"], paths["front_conf"]) if path in restore and os.path.exists(path)]
    for path in failed:
        shutil.copy2(path, path + ".failed")
    for path, saved in restore.items():
        write_atomic(path, saved["text"], saved["mode"], saved["uid"], saved["gid"])
    return restore, failed


def orphans(conf):
    """Return the mirrors this host still has a config for but pillar no longer names.
    ``hub_mirror.service`` removes them (their cache stays), so that dropping one mirror
    from pillar touches only that mirror."""
    try:
        entries = os.listdir(conf["lookup"]["config_dir"])
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry[: -len(".yml")]
        if not entry.endswith(".yml") or name in conf["mirrors"] or not NAME_RE.fullmatch(name):
            continue
        try:
            with open(os.path.join(conf["lookup"]["config_dir"], entry), encoding="utf-8") as handle:
                first = handle.readline()
        except (OSError, UnicodeDecodeError):
            continue
        # Only configs hub_mirror wrote: notes.yml, a backup or a package's config.yml stay.
        if first in (config_header(name), LEGACY_CONFIG_HEADER):
            found.append(name)
    return sorted(found)


def _registry_host(upstream):
    """The name clients use for an upstream: docker.io for Docker Hub's endpoint."""
    host = urllib.parse.urlparse(upstream).netloc
    return DOCKER_HUB if host in DOCKER_HUB_HOSTS else host


def endpoint(conf):
    """Return this host's mirrors as clients should reach them, for the Salt mine: one entry
    per mirror with the registry it mirrors (``docker.io``, ``ghcr.io``, ...), its URL
    (``advertise``, else the listen address) and whether it answers ``/v2/`` right now.
    Without ``advertise``, a mirror that listens on loopback or on every address
    (``0.0.0.0``) publishes a loopback URL and ``loopback_only: True``: it serves only this
    host."""
    endpoints = []
    for name, spec in sorted(conf["mirrors"].items()):
        local_url = probe_url(spec)
        url = spec["advertise"].rstrip("/") or local_url
        endpoints.append(
            {
                "mirror": name,
                "registry": _registry_host(spec["upstream"]),
                "url": url,
                "loopback_only": not spec["advertise"] and is_loopback_host(urllib.parse.urlparse(url).hostname),
                # The advertised address may be a NAT's, which this host need not reach.
                "serving": answers(local_url, 2),
            }
        )
    return endpoints


def stop(conf, spec):
    """Stop the mirror ``spec``'s registry and its supervisor, and anything else still serving its
    config. True once nothing serves it and its port is closed."""
    return stop_service(conf, spec)


def start(conf, spec):
    """Start the mirror ``spec``'s registry and wait until it answers ``/v2/``."""
    mirror = spec["name"]
    supervisor = supervisor_for(conf)
    if not supervisor.running(mirror):
        stop_leftovers(mirror_paths(conf, mirror))
        supervisor.start(mirror)
    return wait_serving(spec, conf["probe_timeout"])


def _purge_targets(storage):
    """What a purge deletes: only what the registry and the front wrote, in a directory
    marked as ours."""
    if not storage or not os.path.isfile(os.path.join(storage, STORAGE_MARKER)):
        return []
    names = ["docker", FRONT_DIR] + [entry for entry in os.listdir(storage) if entry.startswith("scheduler-state.json")]
    return [
        os.path.join(storage, entry)
        for entry in names + [STORAGE_MARKER]
        if os.path.lexists(os.path.join(storage, entry))
    ]


def _remove_from_storage(spec, paths):
    """Delete ``paths``, entries of the storage directory, through a descriptor of that
    directory: the service user owns it and may swap it for a symlink meanwhile. The
    storage marker, if among them, goes last and only once the rest has gone: a purge that
    fails halfway can be run again.

    By GNU rm, not shutil.rmtree: Python's walk (before 3.13) opens what it found to be a
    directory without O_NONBLOCK, so a FIFO swapped in meanwhile holds root's run for
    ever, and it recurses, so a tree deep enough raises. rm's walk opens with O_DIRECTORY,
    O_NOFOLLOW and O_NONBLOCK, goes as deep as the tree does, and removes a symlink itself."""
    storage_fd = open_dir(spec["storage"], f"hub_mirror:mirrors:{spec['name']}:storage")
    names = [os.path.basename(path) for path in paths]
    try:
        # By the fd's own /proc link (rm inherits the fd), which stays on the opened directory.
        pinned = f"/proc/self/fd/{storage_fd}"
        doomed = [f"{pinned}/{name}" for name in names if name != STORAGE_MARKER]
        # In batches: the service user can make as many scheduler-state.json* names as it
        # likes, and one argument list holds at most ARG_MAX bytes.
        for start in range(0, len(doomed), 500):
            proc = subprocess.run(
                ["/bin/rm", "-rf", "--one-file-system", "--", *doomed[start:start + 500]],
                pass_fds=(storage_fd,), capture_output=True, text=True, env={}, check=False,
            )
            if proc.returncode != 0:
                errors = proc.stderr.replace(pinned, spec["storage"]).strip().splitlines()
                errors = errors or [f"rm exit status {proc.returncode}"]
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                raise CommandExecutionError(f"removing in {spec['storage']} failed: {errors[0]}{more}")
        if STORAGE_MARKER in names:
            try:
                os.unlink(STORAGE_MARKER, dir_fd=storage_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                marker = os.path.join(spec["storage"], STORAGE_MARKER)
                raise CommandExecutionError(f"removing {marker} failed: {exc.strerror}") from exc
    finally:
        os.close(storage_fd)


def _unused_front_dir(spec):
    """The front's directory in the storage of a mirror that runs without a front now:
    its fill cache may hold gigabytes nobody empties any more."""
    storage = spec["storage"]
    if front_enabled(spec) or not storage or not os.path.isfile(os.path.join(storage, STORAGE_MARKER)):
        return None
    path = os.path.join(storage, FRONT_DIR)
    return path if os.path.lexists(path) else None


def remove(conf, spec, purge_storage=False, test=False):
    """Stop the mirror ``spec`` and remove its service files, config and fingerprint. The cache in its
    storage directory stays unless ``purge_storage=True``; a purge deletes only what the
    registry wrote, in a directory hub_mirror marked as its cache."""
    mirror = spec["name"]
    paths = mirror_paths(conf, mirror)
    candidates = [
        paths[k]
        for k in (
            "unit",
            "init",
            "config",
            "offline_config",
            "supervise_settings",
            "credentials",
            "front_conf",
            "last_good",
            "fingerprint",
        )
    ]
    candidates += [paths["config"] + ".failed", paths["front_conf"] + ".failed"]
    present = [path for path in candidates if os.path.exists(path)]
    purge = _purge_targets(spec["storage"]) if purge_storage else []
    supervisor = supervisor_for(conf)
    is_running = supervisor.running(mirror) or bool(mirror_processes(paths))
    changes = {path: "removed" for path in present}
    comment = ""
    if purge:
        changes[spec["storage"]] = "purged"
    elif purge_storage and spec["storage"] and os.path.isdir(spec["storage"]):
        comment = f"; {spec['storage']} is not marked as a hub_mirror cache, so it was left as it is"
    if is_running:
        changes["stopped"] = True
    if not changes or test:
        comment = (f"Mirror {mirror} would be removed" if changes else f"Mirror {mirror} is absent") + comment
        return {"changes": changes, "comment": comment}
    stopped = stop_service(conf, spec)
    supervisor.disable(mirror)
    if not stopped:
        raise CommandExecutionError(f"mirror {mirror} still serves after its service was stopped: nothing was removed")
    if purge:
        # Stopping takes seconds: the storage chosen before must still be that directory.
        _remove_from_storage(spec, purge)
    for path in present:
        os.unlink(path)
    if purge:
        try:
            os.rmdir(spec["storage"])
        except OSError:
            pass  # something of the user's is in it: it stays
    if paths["unit"] in present and shutil.which("systemctl"):
        # A unit was removed: systemd must forget it, whichever supervisor runs mirrors now.
        run_systemctl("daemon-reload", check=False)
    return {"changes": changes, "comment": f"Mirror {mirror} removed" + comment}


def uninstall(conf, test=False):
    """Remove the registry installed by ``method: archive`` (a package is left to the package manager)."""
    present = [
        path
        for path in (
            binary_path(conf),
            record_path(conf),
            mirror_paths(conf, "x")["supervise"],
            mirror_paths(conf, "x")["credential_helper"],
        )
        if conf["install"]["method"] == "archive" and os.path.exists(path)
    ]
    changes = {path: "removed" for path in present}
    if test or not changes:
        return {"changes": changes, "comment": "registry would be removed" if changes else "registry is absent"}
    for path in present:
        os.unlink(path)
    return {"changes": changes, "comment": "registry removed"}


def orphan(conf, name):
    """The mirror ``name`` as only its files on this host still describe it (no longer
    in pillar), or None when it has none."""
    # The name becomes file names in config_dir, unit_dir, init_dir: "../x" would not.
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SaltInvocationError(
            f"{show_value(name)} is not a mirror name: give one of pillar's or of hub_mirror.orphans"
        )
    paths = mirror_paths(conf, name)
    text = read_file(paths["config"])
    if text is None and not os.path.exists(paths["init"]) and not os.path.exists(paths["unit"]):
        return None
    try:
        storage = ((yaml.safe_load(text or "") or {}).get("storage") or {}).get("filesystem") or {}
        storage = storage.get("rootdirectory", "") if isinstance(storage, dict) else ""
    except (yaml.YAMLError, AttributeError):
        storage = ""  # an edited config: the cache stays where it is
    # The config is the service user's (0600, its own): what it names is checked like
    # pillar storage before a purge may go there.
    errors = Errors()
    storage = check_path(errors, "", storage) if storage else None
    if storage:
        validate_storage(errors, "", storage, conf["lookup"], "")
    storage = os.path.realpath(storage) if storage and not errors.messages else ""
    return {"name": name, "storage": storage, "s3": {}}
