"""
Running a mirror under a supervisor: a hardened systemd unit, or, where systemd is not
PID 1 (containers, CI machines), an init script that runs the supervisor program under
start-stop-daemon. ``supervisor_for(conf)`` picks one; both answer the same questions.
The distribution's own registry service is handled here too.
"""

import os
import shlex
import shutil
import subprocess

from salt.exceptions import CommandExecutionError

from . import front
from .accounts import service_python
from .checks import has_control
from .fsutil import read_file
from .processes import SYSTEM_PATH, mirror_processes, port_closed, stop_leftovers
from .settings import binary_path, mirror_paths, probe_url

UNIT_TEMPLATE = """\
# Managed by Salt (hub_mirror). Local changes are overwritten.
[Unit]
Description=hub_mirror pull-through cache {name}
Documentation=https://distribution.github.io/distribution/about/configuration/
After=network-online.target
Wants=network-online.target
# The registry panics at start while an authenticated upstream is unreachable: keep
# retrying for as long as that lasts instead of giving up after five starts.
StartLimitIntervalSec=0

[Service]
Type=simple
User={user}
Group={group}
ExecStart={command}
Restart=always
RestartSec=2
UMask=0027
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={read_write}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
{private_ipc}ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RemoveIPC=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
{capabilities}SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
DevicePolicy=closed

[Install]
WantedBy=multi-user.target
"""


# Every value below is shell-quoted where it is filled in; none comes from pillar but the
# lookup paths and the account, which validation limits to safe characters first.
INIT_TEMPLATE = """\
#!/bin/sh
# Managed by Salt (hub_mirror). Local changes are overwritten.
### BEGIN INIT INFO
# Provides:          hub-mirror-{name}
# Required-Start:    $network $remote_fs
# Required-Stop:     $network $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: hub_mirror pull-through cache {name}
### END INIT INFO
PIDFILE={pidfile}
LOG={log}
start() {{
    # Only called when nothing runs: a pidfile left now names a dead or zombie process,
    # which start-stop-daemon would take for a running one.
    rm -f "$PIDFILE"
    mkdir -p {run_dir} {log_dir}
    touch "$LOG"
    chown {owner} {log_dir} "$LOG"
    chmod 0750 {log_dir}
    chmod 0640 "$LOG"
    # A clean environment, as systemd gives: nothing leaks in from whoever ran this. The
    # supervisor sends its output (and the registry's) to $LOG itself.
    env -i PATH={path} LANG=C.UTF-8 \\
    start-stop-daemon --start --quiet --background --make-pidfile --pidfile "$PIDFILE" \\
        --chuid {owner} --umask 027 --startas {python} -- {supervise} {settings}
}}
stop() {{
    start-stop-daemon --stop --quiet --retry TERM/10/KILL/5 --pidfile "$PIDFILE" --remove-pidfile
}}
running() {{
    start-stop-daemon --status --pidfile "$PIDFILE" || return 1
    # A killed supervisor stays a zombie where PID 1 does not reap (a container's shell,
    # a CI agent): that is not running.
    ! grep -qs '^State:[[:space:]]*Z' "/proc/$(cat "$PIDFILE")/status"
}}
case "$1" in
    start) running || start ;;
    stop) stop || true ;;
    restart|force-reload) stop || true; start ;;
    status) if running; then echo running; else echo stopped; exit 3; fi ;;
    *) echo "usage: $0 {{start|stop|restart|force-reload|status}}" >&2; exit 2 ;;
esac
"""


def _systemd_quote(value, exec_line=False):
    """One word of a unit file setting, quoted so systemd reads back exactly ``value``:
    backslash and quote escaped, ``%`` specifiers doubled, and on Exec lines ``$`` too."""
    if has_control(value):
        raise ValueError(f"a control character cannot go into a unit file: {value!r}")
    value = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if exec_line:
        value = value.replace("$", "$$")
    return f'"{value}"'


def supervisor_for(conf):
    """The supervisor of this host: ``lookup:supervisor``, else systemd where it is PID 1."""
    chosen = conf["lookup"]["supervisor"]
    # Salt's own test (salt.utils.systemd.booted); systemctl alone proves nothing.
    if not chosen:
        chosen = "systemd" if os.path.isdir("/run/systemd/system") else "sysv"
    return Systemd(conf) if chosen == "systemd" else Sysv(conf)


def service_name(name):
    return f"hub-mirror-{name}"


def program_text(filename):
    """A program of ``programs/``, with a shebang for this host's Python."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
    with open(os.path.join(here, filename), encoding="utf-8") as handle:
        return f"#!{service_python()}\n" + handle.read()


def supervise_settings(conf, spec):
    """What the supervisor needs, as the settings file it reads: pillar values reach it
    only as JSON, never through a unit file, a script or a command line."""
    paths = mirror_paths(conf, spec["name"])
    with_front = front.enabled(spec)
    return {
        "binary": binary_path(conf),
        "front_binary": conf["lookup"]["front_binary"] if with_front else "",
        "front_conf": paths["front_conf"] if with_front else "",
        "front_dir": front.front_dir(spec) if with_front else "",
        "socket": front.SOCKET if with_front else "",
        "config": paths["config"],
        "offline_config": paths["offline_config"],
        "listen": probe_url(spec)[len("http://") :],
        "upstream": spec["upstream"],
        "credentials": paths["credentials"],
        "storage": "" if spec["s3"] else spec["storage"],
        # systemd's journal takes the output; an init script has only a file.
        "log": "" if supervisor_for(conf).kind == "systemd" else paths["log"],
    }


def render_service_files(conf, spec):
    """The files that define the service, as {path: (text, mode)}."""
    paths = mirror_paths(conf, spec["name"])
    command = [service_python(), paths["supervise"], paths["supervise_settings"]]
    files = {paths["supervise"]: (program_text("supervise.py"), 0o755)}
    files.update(supervisor_for(conf).files(spec, command))
    return files


def stop_service(conf, spec):
    """Stop the service and anything else serving the mirror; True once its port is closed."""
    supervisor = supervisor_for(conf)
    paths = mirror_paths(conf, spec["name"])
    supervisor.stop(spec["name"])
    stop_leftovers(paths)
    return (
        not supervisor.running(spec["name"])
        and not mirror_processes(paths)
        and ("listen_port" not in spec or port_closed(spec))
    )


def _run(command, check=True, timeout=120):
    proc = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandExecutionError(f"{' '.join(command)} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc


def run_systemctl(*args, check=True):
    return _run(["systemctl", *args], check=check)


def _user_mode_emulated():
    """True when systemd here runs under qemu-user emulation (binfmt_misc), as in an arm64
    root on an x86-64 machine: PID 1's executable is then the emulator. (qemu shows each
    process the guest binary as its own /proc/self/exe, but not other processes'.)"""
    try:
        return os.path.basename(os.readlink("/proc/1/exe")).startswith("qemu-")
    except OSError:
        return False


class Systemd:
    """A hardened unit ``hub-mirror-<name>.service`` per mirror."""

    kind = "systemd"

    def __init__(self, conf):
        self.conf = conf

    def files(self, spec, command):
        lookup = self.conf["lookup"]
        if spec["listen_port"] < 1024:
            capabilities = "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n"
        else:
            capabilities = "CapabilityBoundingSet=\nAmbientCapabilities=\n"
        text = UNIT_TEMPLATE.format(
            name=spec["name"],
            command=" ".join(_systemd_quote(word, exec_line=True) for word in command),
            read_write=_systemd_quote(spec["storage"]),
            capabilities=capabilities,
            # qemu-user cannot set up an IPC namespace (226/NAMESPACE); nothing here
            # uses SysV IPC and RemoveIPC= stays, so only emulated hosts go without.
            private_ipc="" if _user_mode_emulated() else "PrivateIPC=yes\n",
            user=lookup["user"],
            group=lookup["group"],
        )
        return {mirror_paths(self.conf, spec["name"])["unit"]: (text, 0o644)}

    def files_changed(self, check=True):
        run_systemctl("daemon-reload", check=check)

    def running(self, name):
        return run_systemctl("is-active", "--quiet", service_name(name), check=False).returncode == 0

    def enabled(self, name):
        return run_systemctl("is-enabled", "--quiet", service_name(name), check=False).returncode == 0

    def enable(self, name):
        run_systemctl("enable", "--quiet", service_name(name))

    def disable(self, name):
        run_systemctl("disable", "--quiet", service_name(name), check=False)

    def start(self, name, restart=False):
        run_systemctl("restart" if restart else "start", service_name(name))

    def stop(self, name):
        run_systemctl("stop", service_name(name), check=False)

    def recent_log(self, name, lines=15):
        command = ["journalctl", "-u", service_name(name), "-n", str(lines), "--no-pager", "-q"]
        return _run(command, check=False, timeout=30).stdout.strip()

    def package_active(self, service):
        """Whether the distribution's own registry service runs or would start at boot."""
        return any(
            run_systemctl(verb, "--quiet", f"{service}.service", check=False).returncode == 0
            for verb in ("is-active", "is-enabled")
        )

    def package_disable(self, service):
        run_systemctl("disable", "--now", "--quiet", f"{service}.service", check=False)


class Sysv:
    """An init script per mirror, with start links where ``update-rc.d`` exists."""

    kind = "sysv"

    def __init__(self, conf):
        self.conf = conf

    def files(self, spec, command):
        lookup = self.conf["lookup"]
        paths = mirror_paths(self.conf, spec["name"])
        quote = shlex.quote
        text = INIT_TEMPLATE.format(
            name=spec["name"],
            pidfile=quote(paths["pidfile"]),
            log=quote(paths["log"]),
            run_dir=quote(lookup["run_dir"]),
            log_dir=quote(lookup["log_dir"]),
            owner=quote(f"{lookup['user']}:{lookup['group']}"),
            path=quote(SYSTEM_PATH),
            python=quote(command[0]),
            supervise=quote(command[1]),
            settings=quote(command[2]),
        )
        return {paths["init"]: (text, 0o755)}

    def files_changed(self, check=True):
        pass  # an init script is read anew on each call

    def _script(self, name, action, check=True):
        script = mirror_paths(self.conf, name)["init"]
        if not check and not os.path.exists(script):
            return None
        return _run([script, action], check=check)

    def running(self, name):
        proc = self._script(name, "status", check=False)
        return proc is not None and proc.returncode == 0

    def enabled(self, name):
        return bool(_rc_links(service_name(name)))

    def enable(self, name):
        if shutil.which("update-rc.d"):
            _run(["update-rc.d", service_name(name), "defaults"], check=False, timeout=60)

    def disable(self, name):
        if shutil.which("update-rc.d") and os.path.exists(mirror_paths(self.conf, name)["init"]):
            _run(["update-rc.d", "-f", service_name(name), "remove"], check=False, timeout=60)

    def start(self, name, restart=False):
        self._script(name, "restart" if restart else "start")

    def stop(self, name):
        self._script(name, "stop", check=False)

    def recent_log(self, name, lines=15):
        text = read_file(mirror_paths(self.conf, name)["log"]) or ""
        # A Go panic's goroutine dump says little: keep the lines before it.
        text = text.split("\ngoroutine ")[0]
        return "\n".join(text.strip().splitlines()[-lines:])

    def package_active(self, service):
        """Whether the distribution's own registry service runs or would start at boot."""
        script = os.path.join(self.conf["lookup"]["init_dir"], service)
        running = os.path.exists(script) and _run([script, "status"], check=False, timeout=60).returncode == 0
        return running or bool(_rc_links(service))

    def package_disable(self, service):
        # Salt's service.dead would answer "OFFLINE mode" where systemd is not PID 1.
        script = os.path.join(self.conf["lookup"]["init_dir"], service)
        if os.path.exists(script):
            _run([script, "stop"], check=False, timeout=60)
        if shutil.which("update-rc.d"):
            _run(["update-rc.d", service, "disable"], check=False, timeout=60)


def _rc_links(service):
    """The sysv start links of ``service`` (S<nn><service> in /etc/rc[2-5].d)."""
    return [
        os.path.join(path, entry)
        for level in "2345"
        for path in [f"/etc/rc{level}.d"]
        if os.path.isdir(path)
        for entry in os.listdir(path)
        if entry.startswith("S") and entry[3:] == service
    ]
