"""
Per runtime (docker, containerd, podman, buildkit, k3s): which files it reads, what
the user's own config already decides, and syncing them with the answering mirrors.
"""

import json
import os
import re
import subprocess

from salt.exceptions import CommandExecutionError

from ..fsutil import read_file
from ..processes import find_program
from ..settings import DOCKER_HUB
from .discovery import describe, probe_mirrors
from .docker import docker_apply, docker_blocked
from .files import ClientRecord, apply_file, block_span, plan_file, read_marked
from .render import (
    BLOCK_KINDS,
    REGISTRIES_DROPIN,
    RUNTIMES,
    TOML_HEADER_RE,
    V1_REGISTRIES_RE,
    is_ipv6_url,
    toml_table,
    utf8,
)
from .validate import CLIENT_RUNTIMES


def _runtime_present(runtime, paths):
    """None when ``runtime`` is on this host (its program or its config), else why not."""
    known = RUNTIMES[runtime]
    key, directory = known["marker"]
    marker = os.path.dirname(paths[key]) if directory else paths[key]
    if any(find_program(program) for program in known["programs"]) or os.path.exists(marker):
        return None
    return f"not installed (no {' or '.join(known['programs'])} on PATH, no {marker})"


def _cri_config_paths(text):
    """The CRI plugin's registry ``config_path`` set in a containerd config.toml, or None."""
    table = ""
    for line in (text or "").splitlines():
        header = toml_table(line)
        if header:
            table = header
            continue
        match = re.match(r"""^\s*((?:registry\s*\.\s*)?)config_path\s*=\s*["']([^"']*)["']""", line)
        if not match:
            continue
        where = table + ("." if table and match.group(1) else "") + ("registry" if match.group(1) else "")
        if where.endswith(".registry") and "cri" in where:
            return match.group(2)
    return None


def _containerd_major():
    program = find_program("containerd")
    if not program:
        return None
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\s v?(\d+)\.\d+", out)
    return int(match.group(1)) if match else None


def _containerd_note(client):
    """Whether the CRI plugin (kubelet, crictl) reads the certs.d hub_mirror writes."""
    config = client["paths"]["containerd_config"]
    certs_d = client["paths"]["containerd_certs_d"]
    configured = _cri_config_paths(read_file(config, strict=True))
    if configured is None and (_containerd_major() or 1) >= 2:
        configured = "/etc/containerd/certs.d:/etc/docker/certs.d"
    if certs_d in (configured or "").split(":"):
        return f"the CRI plugin reads {certs_d}: nothing to restart"
    return (
        f'the CRI plugin does not read {certs_d}: set config_path = "{certs_d}" under '
        f'[plugins."io.containerd.grpc.v1.cri".registry] in {config} (and drop any '
        "registry.mirrors there), then restart containerd; ctr --hosts-dir and nerdctl "
        "use the hosts already"
    )


def _user_registries_confs(client):
    """The registries.conf files other than hub_mirror's drop-in, in load order."""
    paths = client["paths"]
    candidates = [paths["registries_conf"]]
    if os.path.isdir(paths["registries_conf_d"]):
        candidates += [
            os.path.join(paths["registries_conf_d"], name)
            for name in sorted(os.listdir(paths["registries_conf_d"]))
            if name.endswith(".conf") and name != REGISTRIES_DROPIN
        ]
    texts = []
    for path in candidates:
        try:
            text = read_file(path, strict=True)
        except (OSError, ValueError):
            continue
        if text:
            texts.append((path, text))
    return texts


def _podman_blocked(client):
    """Why a v2 drop-in would break containers/image here, or None."""
    for path, text in _user_registries_confs(client):
        if V1_REGISTRIES_RE.search(text):
            return (
                f"{path} uses the old v1 format ([registries.search]); containers/image "
                "refuses to mix it with a v2 drop-in: convert it to v2 first"
            )
    return None


def _registries_conf_registries(text):
    """The ``[[registry]]`` tables of a registries.conf, read line by line (no TOML
    library needed on Salt's Python): ``[{"keys": {key: raw value}, "mirrors": n}]``.
    Anything it cannot read as a plain key counts as a key, so a registry it does not
    understand is taken as the user's own policy."""
    registries, current, in_mirror = [], None, False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = TOML_HEADER_RE.match(line)
        if header:
            name = re.sub(r"\s*\.\s*", ".", header.group(1))
            in_mirror = False
            if name == "registry" and stripped.startswith("[["):
                current = {"keys": {}, "mirrors": 0}
                registries.append(current)
            elif name == "registry.mirror" and current is not None:
                current["mirrors"] += 1
                in_mirror = True
            else:
                current = None
            continue
        if current is None or in_mirror:
            continue
        match = re.match(r"""^\s*([A-Za-z0-9_-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|(\S+))""", line)
        key = match.group(1) if match else stripped
        value = next((g for g in match.groups()[1:] if g is not None), "") if match else ""
        current["keys"][key] = value
    return registries


def _podman_user_policy(client, upstreams):
    """{upstream: why hub_mirror leaves it to the user} for each upstream that the user's
    own registries.conf files configure: a later drop-in's [[registry]] of the same
    prefix replaces theirs, lifting a ``blocked = true`` or dropping their mirrors."""
    kept = {}
    for path, text in _user_registries_confs(client):
        for registry in _registries_conf_registries(text):
            keys = registry["keys"]
            prefix = keys.get("prefix") or keys.get("location")
            if prefix not in upstreams or prefix in kept:
                continue
            if keys.get("blocked") == "true":
                kept[prefix] = f"{prefix} is blocked in {path} (blocked = true): kept it blocked, no mirror added"
            elif registry["mirrors"] or set(keys) - {"prefix", "location"} or keys.get("location", prefix) != prefix:
                kept[prefix] = (
                    f"{path} has a [[registry]] of its own for {prefix}: kept it (a drop-in would "
                    "replace it); add the mirror to it yourself"
                )
    return kept


def _docker_style_certs(directory):
    """containerd's docker-style files in a certs.d host directory: ``*.crt`` CAs and
    ``*.cert``/``*.key`` client pairs, which it reads only while there is no hosts.toml."""
    try:
        # A name that is not UTF-8 could not be written into hosts.toml: left to the user.
        names = sorted(name for name in os.listdir(directory) if name.isprintable() and utf8(name))
    except OSError:
        return {}
    ca = [os.path.join(directory, name) for name in names if name.endswith(".crt")]
    client = [
        [os.path.join(directory, name), os.path.join(directory, name[: -len(".cert")] + ".key")]
        for name in names
        if name.endswith(".cert") and name[: -len(".cert")] + ".key" in names
    ]
    return {key: value for key, value in (("ca", ca), ("client", client)) if value}


def _runtime_files(runtime, client, alive):
    """([(path, kind, mirrors, render args)] that ``runtime`` should have given the
    answering mirrors, [notes])."""
    paths = client["paths"]
    ca_file = client.get("ca_file") or ""
    if runtime == "docker":
        ours = {DOCKER_HUB: alive[DOCKER_HUB]} if DOCKER_HUB in alive else {}
        return [(paths["docker_daemon_json"], "daemon_json", ours, {})], []
    if runtime == "containerd":
        files, notes = [], []
        # containerd 1.6 does not use a [host."http://[::1]:port"] (measured: it pulls
        # from the next host): an IPv6 mirror only costs it a detour.
        v6 = [url for urls in alive.values() for url in urls if is_ipv6_url(url)]
        if v6:
            notes.append(
                f"left out {', '.join(dict.fromkeys(v6))}: containerd does not use an IPv6 address "
                "as a mirror host, give it a host name"
            )
        alive = {up: [url for url in urls if url not in v6] for up, urls in alive.items()}
        alive = {up: urls for up, urls in alive.items() if urls}
        for upstream in client["mirrors"]:
            directory = os.path.join(paths["containerd_certs_d"], upstream)
            certs = _docker_style_certs(directory)
            if certs and upstream in alive:
                names = ", ".join(
                    os.path.basename(p) for p in certs.get("ca", []) + [c[0] for c in certs.get("client", [])]
                )
                notes.append(f"kept containerd using {names} in {directory}: hosts.toml names it for {upstream}")
            mirrors = {upstream: alive[upstream]} if upstream in alive else {}
            files.append(
                (
                    os.path.join(directory, "hosts.toml"),
                    "hosts_toml",
                    mirrors,
                    {"ca_file": ca_file, "server_certs": certs},
                )
            )
        return files, notes
    if runtime == "podman":
        notes = []
        kept = _podman_user_policy(client, set(alive))
        mirrors = {}
        for upstream, urls in alive.items():
            if upstream in kept:
                notes.append(kept[upstream])
                continue
            # containers/image's reference grammar has no IPv6 literal: such a location
            # fails every pull of the upstream ("invalid reference format").
            v6 = [url for url in urls if is_ipv6_url(url)]
            if v6:
                notes.append(
                    f"left out {', '.join(v6)}: podman/skopeo cannot use an IPv6 address as a mirror, "
                    "give it a host name"
                )
            if len(v6) < len(urls):
                mirrors[upstream] = [url for url in urls if url not in v6]
        path = os.path.join(paths["registries_conf_d"], REGISTRIES_DROPIN)
        return [(path, "registries_conf", mirrors, {})], notes
    if runtime == "buildkit":
        return [(paths["buildkitd_toml"], "buildkitd_toml", alive, {"ca_file": ca_file})], []
    return [(paths[f"{runtime}_registries"], "registries_yaml", alive, {})], []


def _runtime_notes(runtime, client, alive, changes, configured, test):
    """What the user should know about ``runtime`` after this run: reloads, restarts."""
    notes = []
    if runtime == "docker":
        others = sorted(set(alive) - {DOCKER_HUB})
        if others:
            notes.append(f"docker mirrors only docker.io; {', '.join(others)} is left to the other runtimes")
        path = client["paths"]["docker_daemon_json"]
        if path in changes:
            old_ours = changes[path]["old"].get(DOCKER_HUB, [])
            try:
                how, reload_notes = docker_apply(client, old_ours, test)
            except (OSError, ValueError, CommandExecutionError) as exc:
                how, reload_notes = None, [f"reloading dockerd failed: {exc}"]
            if how:
                changes["reload"] = how
            notes += reload_notes
    elif runtime == "containerd" and configured:
        notes.append(_containerd_note(client))
    elif runtime == "buildkit" and changes:
        notes.append(
            "buildkitd reads buildkitd.toml at start: restart it, or recreate buildx builders "
            f"with --config {client['paths']['buildkitd_toml']}"
        )
    elif runtime in ("k3s", "rke2") and changes:
        notes.append(f"{runtime} reads registries.yaml at start: restart {runtime} to apply it")
    elif runtime == "podman" and changes and find_program("crio"):
        notes.append("cri-o re-reads registries.conf on reload: systemctl reload crio")
    return notes


def _plan_runtime(record, client, runtime, alive, wanted, cleaning=False):
    """Everything one runtime's files should become, decided from their bytes now,
    before anything is written: ``{"files": [(path, kind, current, plan | None)],
    "notes": [...], "absent": why not installed, "blocked": why left alone}``. A file
    that cannot be read or rendered gets plan None and a note; nothing is raised."""
    absent = _runtime_present(runtime, client["paths"]) if wanted else None
    recorded = [path for path, entry in record.files.items() if entry["runtime"] == runtime]
    plan = {"files": [], "notes": [], "absent": absent, "blocked": None}
    if absent and not recorded:
        return plan
    files, notes = _runtime_files(runtime, client, alive) if wanted and not absent else ([], [])
    if cleaning and runtime in client["runtimes"]:
        # Blocks of ours that a lost record no longer names: clean finds them by marker.
        candidates, _ = _runtime_files(runtime, client, {})
        files += [
            (path, kind, {}, {})
            for path, kind, _, _ in candidates
            if kind in BLOCK_KINDS and path not in record.files and block_span(read_marked(path))
        ]
    plan["notes"] += notes
    files += [(path, RUNTIMES[runtime]["kind"], {}, {}) for path in recorded if path not in {f[0] for f in files}]
    if wanted and runtime == "podman":
        plan["blocked"] = _podman_blocked(client)
    elif wanted and runtime == "docker":
        plan["blocked"] = docker_blocked(client)
    for path, kind, mirrors, render_args in files:
        if plan["blocked"]:
            mirrors = {}
        entry = record.files.get(path)
        try:
            if os.path.isdir(path):
                raise ValueError("it is a directory")
            current = read_file(path, strict=True)
            base, desired, written, note, separated = plan_file(
                kind, entry, current, record.original(path) if entry else None, mirrors, **render_args
            )
        except json.JSONDecodeError as exc:
            plan["notes"].append(f"{path} is not valid JSON ({exc}): fix it; it was left as it was")
            plan["files"].append((path, kind, None, None))
            continue
        except Exception as exc:  # pylint: disable=broad-except
            # Whatever a user's file holds, it costs this file only, never the run.
            plan["notes"].append(f"{path} was left as it was: {exc}")
            plan["files"].append((path, kind, None, None))
            continue
        if note:
            plan["notes"].append(f"{path}: {note}")
        plan["files"].append((path, kind, current, (base, desired, written, separated)))
    return plan


def _sync_runtime(record, client, runtime, plan, alive, wanted, test, cleaning=False):
    """Write one runtime's planned files, each recorded once written; return (changes,
    one comment line). A file that cannot be written is reported on the line and left
    unrecorded (or recorded as it was); the other files go on."""
    changes, notes, configured, emptied_dirs = {}, list(plan["notes"]), {}, []
    failed = False
    for path, kind, current, file_plan in plan["files"]:
        if file_plan is None:
            failed = True
            continue
        try:
            change, emptied = apply_file(record, runtime, path, kind, file_plan, current, test)
        except OSError as exc:
            notes.append(f"{path} could not be written ({exc.strerror or exc}); it is as it was")
            failed = True
            continue
        finally:
            notes += _save_record(record, test)
        if change:
            changes[path] = change
        emptied_dirs += emptied
        for upstream, urls in file_plan[2].items():
            configured.setdefault(upstream, urls)
    # Deepest first; a directory that holds something else stays.
    for directory in sorted(set(emptied_dirs), key=len, reverse=True):
        try:
            os.rmdir(directory)
        except OSError:
            pass
    try:
        notes = _runtime_notes(runtime, client, alive if wanted else {}, changes, configured, test) + notes
    except Exception as exc:  # pylint: disable=broad-except
        notes.insert(0, f"could not check how {runtime} picks this up: {exc}")
    if plan["blocked"]:
        notes.insert(0, plan["blocked"])

    has_mirror = DOCKER_HUB in client["mirrors"] if runtime == "docker" else bool(client["mirrors"])
    restored = "would restore its own config" if test else "restored its own config"
    if configured:
        verb = "would configure" if test and changes else "configured"
        line = f"{runtime}: {verb} {describe(configured)}"
    elif cleaning:
        line = f"{runtime}: {restored if changes else 'nothing to restore'}"
    else:
        if not wanted:
            line = f"{runtime}: not in hub_mirror:client:runtimes"
        elif plan["absent"]:
            line = f"{runtime}: skipped: {plan['absent']}"
        elif failed or plan["blocked"] or plan["notes"]:
            line = f"{runtime}: left alone"
        elif not has_mirror:
            line = f"{runtime}: no mirror for it in hub_mirror:client:mirrors"
        else:
            line = f"{runtime}: no mirror answers for it, pulls go direct"
        if changes:
            line += f"; {restored}"
    if notes:
        line += " (" + "; ".join(notes) + ")"
    return changes, line


def _sync_all(client, record, alive, test, cleaning=False):
    """Plan every runtime, then write them one by one; (changes, comment lines)."""
    plans = {}
    lines = [f"Record: {note}" for note in record.repaired]
    for runtime in CLIENT_RUNTIMES:
        wanted = runtime in client["runtimes"] and not cleaning
        recorded = any(e["runtime"] == runtime for e in record.files.values())
        if not wanted and not recorded and not (cleaning and runtime in client["runtimes"]):
            continue
        try:
            plans[runtime] = (_plan_runtime(record, client, runtime, alive, wanted, cleaning), wanted)
        except Exception as exc:  # pylint: disable=broad-except
            lines.append(f"{runtime}: left alone: {type(exc).__name__}: {exc}")
    changes = {}
    for runtime, (plan, wanted) in plans.items():
        try:
            runtime_changes, line = _sync_runtime(record, client, runtime, plan, alive, wanted, test, cleaning)
        except Exception as exc:  # pylint: disable=broad-except
            runtime_changes, line = {}, f"{runtime}: failed: {type(exc).__name__}: {exc}"
        if runtime_changes:
            changes[runtime] = runtime_changes
        lines.append(line)
    lines += [f"Record: {note}" for note in _save_record(record, test)]
    return changes, lines


def _save_record(record, test):
    """Save the record if it changed; [why it could not be saved]."""
    if test or not record.dirty:
        return []
    try:
        record.save()
    except OSError as exc:
        return [f"{record.index_path} could not be saved ({exc.strerror or exc}): fix that, then re-run"]
    return []


def client_configure(client, discover, test=False):
    """Point this host's container clients at the mirrors in ``hub_mirror:client:mirrors``, but
    only at those that answer ``GET /v2/`` within ``client:probe_timeout`` right now."""
    lines = []
    if client["discover"]:
        client["mirrors"], line = discover(client)
        lines.append(line)
    urls = list(dict.fromkeys(url for urls in client["mirrors"].values() for url in urls))
    probed = probe_mirrors(urls, client["probe_timeout"], client.get("ca_file") or "")
    alive = {upstream: [url for url in urls if probed[url] is None] for upstream, urls in client["mirrors"].items()}
    alive = {upstream: urls for upstream, urls in alive.items() if urls}

    if urls:
        lines.append("Mirrors: " + "; ".join(f"{url} {probed[url] or 'answers'}" for url in urls))
    elif client["discover"]:
        lines.append("Neither the mine nor hub_mirror:client:mirrors names a mirror to point clients at")
    else:
        lines.append("hub_mirror:client:mirrors is empty: there is no mirror to point clients at")
    record = ClientRecord(client["record_dir"])
    changes, runtime_lines = _sync_all(client, record, alive, test)
    return {"changes": changes, "comment": "\n".join(lines + runtime_lines)}


def client_remove(client, test=False):
    """Give every client config file ``hub_mirror.client_configure`` touched back to its owner:
    a file still exactly as hub_mirror left it gets its original bytes back (or is removed,
    when hub_mirror created it); a file edited since loses only hub_mirror's part. dockerd
    is reloaded when daemon.json changes."""
    record = ClientRecord(client["record_dir"])
    changes, lines = _sync_all(client, record, {}, test, cleaning=True)
    return {
        "changes": changes,
        "comment": "\n".join(lines) or "No client config of hub_mirror's is left to restore",
    }
