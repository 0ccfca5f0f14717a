"""
dockerd: its daemon.json, whether its command line already sets mirrors, and a
reload (never a restart).
"""

import http.client
import http.server
import json
import os
import re
import signal
import subprocess
import time

from ..fsutil import ensure_dir, read_file, remove_exact, write_exact
from ..processes import find_program
from ..programs.supervise import UnixConnection
from ..supervisor import run_systemctl
from .render import json_member_value, json_set_member


def _dockerd_pid(client):
    """The pid of the running dockerd named by the pidfile, or None."""
    pid_text = (read_file(client["paths"]["docker_pidfile"], strict=True) or "").strip()
    if not pid_text.isdigit():
        return None
    try:
        comm = read_file(f"/proc/{pid_text}/comm", strict=True)
    except OSError:
        return None
    return int(pid_text) if (comm or "").strip() == "dockerd" else None


def _docker_unit_args(client):
    """[(file, dockerd arguments)] from the docker.service unit in force and its drop-ins
    (systemd's precedence, ``ExecStart=`` resetting the list) and ``DOCKER_OPTS`` in
    /etc/default/docker: how dockerd starts next time, whether it runs now or not."""
    paths = client["paths"]
    unit_dirs = paths["systemd_units"].split(":")
    found = []
    unit = next(
        (os.path.join(d, "docker.service") for d in unit_dirs if os.path.isfile(os.path.join(d, "docker.service"))),
        None,
    )
    dropins = {}
    for directory in reversed(unit_dirs):
        dropin_dir = os.path.join(directory, "docker.service.d")
        if os.path.isdir(dropin_dir):
            for name in os.listdir(dropin_dir):
                if name.endswith(".conf"):
                    dropins[name] = os.path.join(dropin_dir, name)
    exec_starts = []
    for path in ([unit] if unit else []) + [dropins[name] for name in sorted(dropins)]:
        try:
            text = read_file(path, strict=True) or ""
        except (OSError, ValueError):
            continue
        for line in text.replace("\\\n", " ").splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "ExecStart":
                exec_starts = exec_starts + [(path, value.split())] if value.strip() else []
    found += exec_starts
    try:
        default = read_file(paths["docker_default"], strict=True) or ""
    except (OSError, ValueError):
        default = ""
    for line in default.splitlines():
        if re.match(r"^\s*(export\s+)?DOCKER_OPTS\s*=", line):
            found.append((paths["docker_default"], line.split("=", 1)[1].strip("\"' ").split()))
    return found


def _docker_args_blocked(client, where, args):
    if any(arg.startswith("--registry-mirror") for arg in args):
        # dockerd refuses a key set both as a flag and in daemon.json, at reload and start.
        return (
            f"dockerd {where} with --registry-mirror: kept it, daemon.json was left alone "
            "(dockerd refuses registry-mirrors set in both); move its mirrors into daemon.json"
        )
    config_files = [arg.split("=", 1)[1] for arg in args if arg.startswith("--config-file=")]
    if config_files and os.path.realpath(config_files[-1]) != os.path.realpath(client["paths"]["docker_daemon_json"]):
        return (
            f"dockerd {where} reads {config_files[-1]}, not {client['paths']['docker_daemon_json']}: "
            "set hub_mirror:client:paths:docker_daemon_json to it"
        )
    return None


def docker_blocked(client):
    """Why merging registry-mirrors into daemon.json would break dockerd, now or at its
    next start, or None."""
    pid = _dockerd_pid(client)
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                args = handle.read().decode("utf-8", "replace").split("\0")
        except OSError:
            args = []
        blocked = _docker_args_blocked(client, "runs", args)
        if blocked:
            return blocked
    for path, args in _docker_unit_args(client):
        blocked = _docker_args_blocked(client, f"is started ({path})", args)
        if blocked:
            return blocked
    return None


def _docker_reload(client, test):
    """Make dockerd re-read daemon.json without a restart; say how, or None if not running."""
    pid = _dockerd_pid(client)
    if pid is None:
        return None
    systemctl = find_program("systemctl") if os.path.isdir("/run/systemd/system") else None
    if systemctl:
        # Only when docker.service is the dockerd of our pidfile: another one (a second
        # daemon, or client:paths pointing elsewhere) gets its own SIGHUP.
        main = subprocess.run(
            [systemctl, "show", "--property=MainPID", "--value", "docker"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        if main == str(pid):
            if not test:
                run_systemctl("reload", "docker")
            return "systemctl reload docker"
    if not test:
        os.kill(pid, signal.SIGHUP)
    return f"SIGHUP to dockerd (pid {pid})"


def _dockerd_mirrors(socket_path):
    """The registry mirrors the running dockerd uses (Docker API ``/info``), or None."""
    # HTTP over a unix socket: how the Docker API is reached.
    connection = UnixConnection(socket_path, 5)
    try:
        connection.request("GET", "/info")
        response = connection.getresponse()
        if response.status != 200:
            return None
        info = json.loads(response.read())
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return [url.rstrip("/") for url in (info.get("RegistryConfig") or {}).get("Mirrors") or []]


def _wait_dockerd_mirrors(socket_path, expected, timeout=10):
    """Poll until dockerd reports ``expected``; return what it reports last (None: no API)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = _dockerd_mirrors(socket_path)
        if seen is None or seen == expected or time.monotonic() >= deadline:
            return seen
        time.sleep(0.2)


def docker_apply(client, old_ours, test):
    """
    Make the running dockerd use the daemon.json just written; return (how, notes).

    A reload applies only the keys present in the file: dockerd keeps mirrors whose key
    was removed. So when hub_mirror's mirrors go and the user's file has no
    registry-mirrors key, dockerd first reloads a copy holding an empty list, and then
    the user's own file goes back in place.
    """
    path = client["paths"]["docker_daemon_json"]
    socket_path = client["paths"]["docker_socket"]
    how = _docker_reload(client, test=True)
    if how is None:
        return None, ["dockerd is not running: it reads daemon.json when it starts"]
    if test:
        return how, []
    final = read_file(path, strict=True)
    _, expected = json_member_value(final, "registry-mirrors") if final else (None, None)
    if expected is None:
        running = _dockerd_mirrors(socket_path)
        if running is None:
            _docker_reload(client, test=False)
            return how, [
                f"could not ask dockerd at {socket_path} for its mirrors: a reload keeps "
                "mirrors whose key left daemon.json, so restart dockerd if `docker info` "
                f"still lists {', '.join(old_ours)}"
            ]
        if not set(running) & set(old_ours):
            _docker_reload(client, test=False)
            return how, []
        created = ensure_dir(os.path.dirname(path))
        write_exact(path, json_set_member(final or "{}\n", "registry-mirrors", "[]"))
        try:
            _docker_reload(client, test=False)
            _wait_dockerd_mirrors(socket_path, [])
        finally:
            if final is None:
                remove_exact(path)
                for directory in reversed(created):
                    os.rmdir(directory)
            else:
                write_exact(path, final)
        expected = []
    else:
        _docker_reload(client, test=False)
    expected = [url.rstrip("/") for url in expected]
    seen = _wait_dockerd_mirrors(socket_path, expected)
    if seen is None:
        return how, [f"could not ask dockerd at {socket_path} whether it applied daemon.json"]
    if seen != expected:
        return how, [f"dockerd still uses mirrors {seen} after the reload: see its log, it refused daemon.json"]
    return how, []
