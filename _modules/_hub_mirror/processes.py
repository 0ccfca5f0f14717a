"""
Finding processes: who listens on a port, which registries serve a mirror's config,
and stopping the ones no supervisor owns.
"""

import errno
import os
import shutil
import signal
import socket
import time

from salt.exceptions import CommandExecutionError

from .net import hostport, parse_hostport
from .settings import mirror_paths, probe_url
from .units import iso


def check_listen_free(conf, spec):
    """Refuse an address another process holds. The mirror's own processes may hold it
    (they are told apart by what they serve, not by the address in an old config, which
    a local edit may have changed), so a restart can move or widen the address."""
    ours = None
    for key, host, port in (
        ("listen", spec["listen_host"], spec["listen_port"]),
        ("debug_listen", *parse_hostport(spec["debug_listen"])),
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                continue
            except OSError as exc:
                error = exc
        if error.errno == errno.EADDRINUSE:
            if ours is None:
                ours = set(mirror_processes(mirror_paths(conf, spec["name"])))
            holders = _listeners(port)
            if holders and holders <= ours:
                continue
        reason = (
            "is already in use by another process"
            if error.errno == errno.EADDRINUSE
            else f"cannot be bound here ({error.strerror})"
        )
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:{key}: {hostport(host, port)} {reason}; "
            "choose a free address and port (nothing was changed)"
        )


def _processes():
    """(pid, argv) of every process, from /proc."""
    try:
        pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                args = [arg.decode(errors="replace") for arg in handle.read().split(b"\0") if arg]
        except OSError:
            continue
        yield int(pid), args


def mirror_processes(paths):
    """PIDs of every process that serves a mirror: its registry (proxy or offline mode,
    supervised or orphaned), its supervisor and its front (nginx's master, recognised by its
    config, and the master's workers), recognised by the files they serve and by running as
    the service user. Anyone can put "serve <our config>" in an argv: such a process would
    pass as the mirror's own listener, and root would kill it."""
    uid = _service_uid(paths["user"])
    if uid is None:
        return []
    served = {paths["config"], paths["offline_config"]}
    # nginx writes its title over its argv: one string, "nginx: master process <argv>".
    front = f" -c {paths['front_conf']} "
    ours, others = [], []
    for pid, args in _processes():
        if len(args) >= 3 and args[-2] == "serve" and args[-1] in served:
            ours.append(pid)
        elif len(args) >= 2 and args[-2] == paths["supervise"] and args[-1] == paths["supervise_settings"]:
            ours.append(pid)
        elif args and args[0].startswith("nginx: master process ") and front in " ".join(args) + " ":
            ours.append(pid)
        elif args and args[0].startswith("nginx: "):
            others.append(pid)
    ours += [pid for pid in others if _parent(pid) in ours]
    return [pid for pid in ours if _process_uid(pid) == uid]


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _service_uid(user):
    import pwd  # pylint: disable=import-outside-toplevel

    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _process_uid(pid):
    """The real uid of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _listeners(port):
    """PIDs holding a listening TCP socket on ``port`` (any address), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split()
                    # fields: sl local_address rem_address st ... inode; 0A is LISTEN.
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
        except (OSError, ValueError):
            continue
    holders = set()
    if not inodes:
        return holders
    for pid, _ in _processes():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    holders.add(pid)
                    break
            except OSError:
                continue
    return holders


def stop_leftovers(paths, timeout=15):
    """Stop whatever still serves a mirror after its service stopped: a registry that a
    killed supervisor left behind, or a supervisor its service manager lost track of."""
    pids = mirror_processes(paths)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and mirror_processes(paths):
            time.sleep(0.1)
        pids = mirror_processes(paths)
        if not pids:
            break
    return not pids


def port_closed(spec):
    try:
        host, port = parse_hostport(probe_url(spec)[len("http://") :])
        with socket.create_connection((host.strip("[]"), port), timeout=2):
            return False
    except OSError:
        return True


def registry_process(paths):
    """{"pid", "mode", "started"} of the registry serving a mirror's config, from /proc."""
    wanted = {paths["config"]: "proxy", paths["offline_config"]: "offline"}
    for pid, args in _processes():
        if len(args) >= 3 and args[-2] == "serve" and args[-1] in wanted:
            return {"pid": pid, "mode": wanted[args[-1]], "started": iso(_process_start(pid))}
    return None


def _process_start(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        with open("/proc/stat", encoding="utf-8") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# Where a root daemon finds its tools even when Salt runs with a short PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def find_program(name):
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)
