"""Test hosts with a real systemd: Debian 12 roots booted under systemd-nspawn.

The root comes from ``.ci/build-testhost-root`` (cached under
``/var/cache/hub-mirror-ci/roots/bookworm-<arch>``). Every :class:`TestHost` boots its own
writable instance of it: an overlayfs (the cached root as the read-only lower layer, a
per-instance upper layer) or, where overlayfs is unavailable, a ``cp -a --reflink=auto``
copy. Files survive ``poweroff()`` + ``boot()``; ``stop()`` removes the instance.

Commands run inside with ``nsenter -t <host pid of the container's PID 1> -a``.

How it boots on a host whose PID 1 is not systemd (a CI container, a sandbox)::

    systemd-nspawn -D ROOT -M NAME --register=no --keep-unit -b --console=read-only \\
        [--private-network | --network-namespace-path=/run/netns/NS]

(``--console=passive`` works the same; ``read-only`` puts systemd's boot and shutdown
messages into the instance's nspawn.log, which failures print.)

``--register=no --keep-unit`` keep nspawn away from systemd-machined and from the host's
service manager (there is none). With ``--keep-unit`` nspawn uses the cgroup it was
started in and creates ``payload/`` (the container) and ``supervisor/`` (itself) below it,
so each instance is first put into a cgroup of its own,
``<hierarchy>/hub-mirror-ci/<name>``, in the cgroup2 hierarchy and in the
``name=systemd`` v1 hierarchy if the host has one (hybrid layout, as here). That keeps
concurrent instances apart and gives a reliable kill switch (``cgroup.kill``) and cleanup.
Processes started by :meth:`TestHost.run` go to ``hub-mirror-ci/<name>/exec`` so they die
with the instance too. On a host booted with systemd, nspawn runs in a transient scope
(``systemd-run --scope``) instead.

Network: by default an instance gets ``--private-network`` (only its own ``lo``). Pass a
:class:`NetNS` (or ``/run/netns/...`` path) to join a namespace the test made, or
``network="host"`` to share the caller's network namespace. Tests must keep traffic on
loopback or inside namespaces they create.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Callable

from . import processes

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / ".ci" / "build-testhost-root"
CACHE_BASE = Path(os.environ.get("HM_CI_CACHE", "/var/cache/hub-mirror-ci"))
ROOT_MARKER = ".hub-mirror-root-complete"
STATE_DIR = Path("/run/hub-mirror-ci/testhosts")
CGROUP_GROUP = "hub-mirror-ci"
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/saltvenv/bin"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}[a-z0-9]$")


class TestHostError(RuntimeError):
    """Raised when a test host cannot be prepared, booted, reached or stopped."""

    __test__ = False  # not a pytest test class


class CommandFailed(TestHostError):
    """A command inside a test host exited non-zero (``run(check=True)``)."""

    def __init__(self, message: str, result: subprocess.CompletedProcess):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.2, fatal: tuple = ()):
    """Poll ``predicate`` until it returns a truthy value (returned); TimeoutError after
    ``timeout`` s. Exceptions from ``predicate`` count as "not yet", except ``fatal`` ones."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - reported below
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def default_root(arch: str = "amd64") -> Path:
    return CACHE_BASE / "roots" / f"bookworm-{arch}"


def ensure_root(arch: str = "amd64", dest: Path | None = None, timeout: float = 3600) -> Path:
    """Return a complete cached root, building it with .ci/build-testhost-root if needed."""
    dest = Path(dest) if dest else default_root(arch)
    if (dest / ROOT_MARKER).is_file():
        return dest
    if not BUILD_SCRIPT.is_file():
        raise TestHostError(f"no root at {dest} and no build script at {BUILD_SCRIPT}")
    proc = subprocess.run([str(BUILD_SCRIPT), arch, str(dest)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not (dest / ROOT_MARKER).is_file():
        raise TestHostError(
            f"{BUILD_SCRIPT} {arch} {dest} failed (rc={proc.returncode}):\n"
            f"{_tail(proc.stderr, 60)}")
    return dest


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def _host_systemd_booted() -> bool:
    return os.path.isdir("/run/systemd/system")


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of the hierarchies nspawn tracks containers in on this host.

    The cgroup2 mount (pure unified: /sys/fs/cgroup; hybrid: /sys/fs/cgroup/unified) and
    the ``name=systemd`` v1 hierarchy when present (hybrid / legacy layouts).
    """
    found: list[Path] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, _source, superopts = (right.split() + ["", "", ""])[:3]
            mnt = Path(fields[4].replace("\\040", " "))
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in superopts.split(",")):
                if mnt not in found and os.access(mnt, os.W_OK):
                    found.append(mnt)
    return found


def _cgroup_rmtree(path: Path) -> None:
    """Remove a cgroup directory tree bottom-up (only directories; no files to delete)."""
    if not path.is_dir():
        return
    for dirpath, _dirnames, _files in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def _cgroup_pids(path: Path) -> set[int]:
    pids: set[int] = set()
    if not path.is_dir():
        return pids
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, "cgroup.procs")) as fh:
                pids.update(int(p) for p in fh.read().split())
    return pids


def _cgroup_kill(paths: Iterable[Path], timeout: float = 10) -> None:
    """SIGKILL every process in the given cgroup trees and wait until they are gone."""
    paths = [p for p in paths if p.is_dir()]
    for path in paths:
        kill_file = path / "cgroup.kill"
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
    deadline = time.monotonic() + timeout
    while True:
        pids = set().union(*(_cgroup_pids(p) for p in paths)) if paths else set()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TestHostError(f"processes survive SIGKILL in {paths}: {sorted(pids)}")
        time.sleep(0.1)


def _enter_cgroups_fn(paths: Sequence[Path]):
    """preexec_fn moving the child into the given cgroups (before it execs)."""
    files = [os.fsencode(str(p / "cgroup.procs")) for p in paths]

    def _enter():
        for f in files:
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return _enter


def _is_mountpoint(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        return any(line.split()[4] == target for line in fh)


# --------------------------------------------------------------------------- NetNS


class NetNS:
    """A private network namespace (``ip netns add``) with only ``lo``, up.

    Use it to confine everything a test runs: pass it to :class:`TestHost` (``network=``),
    run host-side processes in it with :meth:`cmd` / :meth:`popen`.
    """

    __test__ = False

    def __init__(self, name: str | None = None):
        self.name = name or f"hm-{uuid.uuid4().hex[:8]}"
        self.path = Path("/run/netns") / self.name
        self.created = False

    def create(self) -> NetNS:
        if self.path.exists():
            raise TestHostError(f"network namespace {self.name} already exists")
        _run_host(["ip", "netns", "add", self.name])
        self.created = True
        try:
            _run_host(["ip", "-n", self.name, "link", "set", "lo", "up"])
        except Exception:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        if self.path.exists():
            # Processes still inside keep the namespace alive but it leaves /run/netns.
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        self.created = False

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed to run inside this namespace (``ip netns exec NAME ...``)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.cmd(argv), **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(argv), **kwargs)

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.delete()

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"


@contextlib.contextmanager
def private_netns(prefix: str = "hm"):
    """Context manager: a fresh network namespace ``<prefix>-xxxxxxxx``, deleted on exit."""
    ns = NetNS(f"{prefix}-{uuid.uuid4().hex[:8]}")
    ns.create()
    try:
        yield ns
    finally:
        ns.delete()


def _run_host(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise TestHostError(f"{shlex.join(argv)} failed (rc={proc.returncode}): "
                            f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


# --------------------------------------------------------------------------- TestHost


class TestHost:
    """A Debian 12 instance with systemd as PID 1, under systemd-nspawn.

    ::

        with TestHost() as host:          # prepares the instance and boots it
            host.run(["systemctl", "is-system-running"])
            host.poweroff(); host.boot()  # files written before survive

    Parameters:
        root: cached root (default: built/cached by ``.ci/build-testhost-root``).
        arch: ``amd64`` or ``arm64`` (foreign: via qemu-user-static + binfmt_misc).
            Default: the root's arch when ``root`` is given, else the host's.
        name: machine name (also the hostname inside); default ``hm-<random>``.
        network: ``"private"`` (default: own netns, only ``lo``), ``"host"`` (share the
            caller's netns), or a :class:`NetNS` / path to join that namespace.
        mode: ``"auto"`` (overlayfs, else copy), ``"overlay"`` or ``"copy"``.
        workdir: where instance directories go (default: a new dir under /var/tmp).
        keep: keep the instance directory after :meth:`stop` (for debugging).
        bind / bind_ro: ``{host_path: container_path}`` bind mounts.
        nspawn_args: extra systemd-nspawn arguments.
        boot_timeout: default timeout of :meth:`start` / :meth:`boot`.
        console: ``"read-only"`` (default: the container's console output, i.e. systemd's
            boot and shutdown messages, goes to the instance's nspawn.log, shown on
            failures) or ``"passive"`` (console to /dev/null).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, root: str | os.PathLike | None = None, *, arch: str | None = None,
                 name: str | None = None, network: str | NetNS | os.PathLike = "private",
                 mode: str = "auto", workdir: str | os.PathLike | None = None,
                 keep: bool = False, bind: Mapping[str, str] | None = None,
                 bind_ro: Mapping[str, str] | None = None,
                 nspawn_args: Sequence[str] = (), boot_timeout: float = 60,
                 console: str = "read-only"):
        self._arch_given = arch is not None
        self.arch = arch or _host_arch()
        self.lower = Path(root) if root else None
        self.name = name or f"hm-{uuid.uuid4().hex[:8]}"
        if not _NAME_RE.match(self.name):
            raise ValueError(f"invalid machine name {self.name!r}: use [a-z0-9-], 2-32 chars")
        self.network = network
        if mode not in ("auto", "overlay", "copy"):
            raise ValueError("mode must be auto, overlay or copy")
        self.mode = mode
        self._workdir_arg = Path(workdir) if workdir else None
        self.keep = keep
        self.bind = dict(bind or {})
        self.bind_ro = dict(bind_ro or {})
        self.nspawn_args = list(nspawn_args)
        self.boot_timeout = boot_timeout
        if console not in ("read-only", "passive"):
            raise ValueError("console must be read-only or passive")
        self.console = console

        self.instance_dir: Path | None = None
        self.root: Path | None = None  # host path of the container's / (while prepared)
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.leader_pid: int | None = None
        self.boots = 0
        self.boot_seconds: float | None = None
        self.boot_state: str | None = None
        self._log_fh = None
        self._overlay = False
        self._cgroups: list[Path] = []
        self._scope_mode = _host_systemd_booted()

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout: float | None = None) -> TestHost:
        """Prepare the instance (first call) and boot it; wait until systemd is up."""
        try:
            if self.root is None:
                self._prepare()
            self.boot(timeout=timeout)
        except BaseException:
            try:
                self.stop()
            except TestHostError as cleanup_error:
                print(f"[nspawn] {cleanup_error}")
            raise
        return self

    def boot(self, timeout: float | None = None) -> TestHost:
        """Boot the (prepared, not running) instance; return when systemd is running.

        "Up" means ``systemctl is-system-running`` answers ``running`` or ``degraded``.
        """
        if self.root is None:
            raise TestHostError("boot() before start(): the instance is not prepared")
        if self.is_running:
            raise TestHostError(f"{self.name} is already running")
        timeout = self.boot_timeout if timeout is None else timeout
        self._check_prerequisites()
        self._setup_cgroups()
        argv = self._nspawn_argv()
        self.boots += 1
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"\n===== boot {self.boots}: {shlex.join(argv)}\n".encode())
        self._log_fh.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            start_new_session=True, env=self._nspawn_env(),
            preexec_fn=None if self._scope_mode else _enter_cgroups_fn(
                [c for c in self._cgroups]))
        self._write_state()
        try:
            self.leader_pid = wait_until(self._find_leader, min(timeout, 30),
                                         f"the PID 1 of container {self.name}", 0.05,
                                         fatal=(TestHostError,))
            state = wait_until(self._system_up, max(1, timeout - (time.monotonic() - t0)),
                               f"systemd in {self.name} to be up", 0.2, fatal=(TestHostError,))
        except TimeoutError as exc:
            raise TestHostError(self._diagnose(f"{self.name} did not boot: {exc}")) from None
        except TestHostError as exc:
            raise TestHostError(self._diagnose(str(exc))) from None
        self.boot_seconds = time.monotonic() - t0
        self.boot_state = state
        return self

    def poweroff(self, timeout: float = 60) -> int:
        """Shut the instance down cleanly (SIGRTMIN+4 to its systemd, the signal behind
        ``systemctl poweroff``); keep its files. Use this rather than running
        ``systemctl poweroff`` through :meth:`run` (see :meth:`_kill_exec_cgroups`).

        Returns the exit status of systemd-nspawn (0 after a clean poweroff).
        """
        if not self.is_running:
            raise TestHostError(f"{self.name} is not running")
        # Commands started with run()/popen() go first. Their nsenter parents live outside
        # the container: systemd-shutdown's kill(-1, SIGSTOP) stops the command, nsenter
        # (waitpid WUNTRACED) then stops itself and never reaps it, and the shutdown waits
        # for that zombie for 90 s.
        self._kill_exec_cgroups()
        accepted = self._request_poweroff()
        deadline = time.monotonic() + timeout
        resend = time.monotonic() + 2
        while True:
            try:
                rc = self.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            self._kill_exec_cgroups(wait=False)  # run()/popen() calls racing with the shutdown
            if not accepted and time.monotonic() > resend and self.leader_pid:
                # PID 1 ignores signals it has no handler for yet (very early boot): repeat.
                resend = time.monotonic() + 2
                accepted = self._request_poweroff()
            if time.monotonic() > deadline:
                raise TestHostError(self._diagnose(
                    f"{self.name} did not power off within {timeout}s"))
        self._after_exit()
        return rc

    def reboot(self, timeout: float | None = None) -> TestHost:
        """poweroff() + boot() on the same instance."""
        self.poweroff()
        return self.boot(timeout=timeout)

    def stop(self, timeout: float = 20) -> None:
        """Always clean up: power off (bounded), kill what is left, unmount, remove.

        Safe to call repeatedly and on a half-started instance.
        """
        errors: list[str] = []
        if self.is_running:
            try:
                self.poweroff(timeout=timeout)
            except Exception as exc:  # noqa: BLE001 - fall through to the hard stop
                errors.append(f"clean poweroff failed: {exc}")
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # nspawn: SIGTERM = clean halt
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self._kill_exec_cgroups()
            _cgroup_kill(self._cgroups)
        except TestHostError as exc:
            errors.append(str(exc))
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._after_exit()
        for cg in self._cgroups:
            _cgroup_rmtree(cg)
            with contextlib.suppress(OSError):  # shared parent: only when no one else uses it
                cg.parent.rmdir()
        self._cgroups = []
        if self._overlay and self.root is not None:
            for _ in range(50):
                if subprocess.run(["umount", str(self.root)], capture_output=True).returncode == 0:
                    break
                if not _is_mountpoint(self.root):
                    break
                time.sleep(0.1)
            else:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
                errors.append(f"overlay {self.root} was busy: lazily unmounted")
            self._overlay = False
        if self.instance_dir is not None and not self.keep:
            shutil.rmtree(self.instance_dir, ignore_errors=True)
            if self._workdir_arg is None:
                with contextlib.suppress(OSError):
                    self.instance_dir.parent.rmdir()
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{self.name}.json").unlink()
        for leftover in (Path("/run/systemd/nspawn/propagate") / self.name,
                         Path("/run/systemd/nspawn/unix-export") / self.name):
            shutil.rmtree(leftover, ignore_errors=True)
        self.root = None
        if errors:
            raise TestHostError(f"{self.name}: cleanup problems: " + "; ".join(errors))

    def __enter__(self) -> TestHost:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.stop()
        except TestHostError as cleanup_error:
            if exc_type is None:
                raise
            # Do not hide the test's own failure behind a cleanup problem.
            print(f"[nspawn] {cleanup_error}")

    # ---------------------------------------------------------------- running things

    @property
    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 120,
            input: str | bytes | None = None, env: Mapping[str, str] | None = None,
            cwd: str | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the instance (all its namespaces) and capture its output.

        ``cmd``: an argv list, or a string run by ``/bin/sh -c``. The environment is clean
        (PATH includes /opt/saltvenv/bin) plus ``env``. With ``check`` a non-zero exit
        raises :class:`CommandFailed` showing the output.
        """
        argv = self._nsenter_argv(cmd, env=env, cwd=cwd)
        try:
            result = subprocess.run(
                argv, input=input, capture_output=True,
                stdin=subprocess.DEVNULL if input is None else None, text=text, timeout=timeout,
                check=False, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                preexec_fn=self._exec_preexec())
        except subprocess.TimeoutExpired as exc:
            raise TestHostError(f"{self.name}: {self._show(cmd)} timed out after {timeout}s; "
                                f"output so far: {exc.stdout!r} {exc.stderr!r}") from None
        if check and result.returncode != 0:
            raise CommandFailed(
                f"{self.name}: {self._show(cmd)} exited {result.returncode}\n"
                f"--- stdout\n{_tail(self._txt(result.stdout))}\n"
                f"--- stderr\n{_tail(self._txt(result.stderr))}", result)
        return result

    def popen(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``cmd`` inside the instance without waiting (it dies with the instance)."""
        return subprocess.Popen(self._nsenter_argv(cmd, env=env), preexec_fn=self._exec_preexec(),
                                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, **kwargs)

    def sh(self, script: str, **kwargs) -> str:
        """Run a shell snippet; return its stdout stripped."""
        return self.run(script, **kwargs).stdout.strip()

    def path(self, inner: str) -> Path:
        """Host path of a file inside the instance (read/write it directly)."""
        if self.root is None:
            raise TestHostError("the instance is not prepared")
        return self.root / inner.lstrip("/")

    def system_state(self) -> str:
        return self.run(["systemctl", "is-system-running"], check=False, timeout=15).stdout.strip()

    def wait_for_unit(self, unit: str, state: str = "active", timeout: float = 30) -> None:
        wait_until(lambda: self.run(["systemctl", "show", "-P", "ActiveState", unit],
                                    check=False, timeout=15).stdout.strip() == state,
                   timeout, f"{unit} to be {state} in {self.name}")

    def journal(self, lines: int = 100, unit: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines)]
        if unit:
            argv += ["-u", unit]
        return self.run(argv, check=False, timeout=30).stdout

    def nspawn_log(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return _tail(self.log_path.read_text(errors="replace"), lines)

    # ---------------------------------------------------------------- internals

    def _prepare(self) -> None:
        lower = self.lower or ensure_root(self.arch)
        if not (lower / ROOT_MARKER).is_file():
            raise TestHostError(f"{lower} is not a complete test host root (no {ROOT_MARKER}); "
                                f"build it with {BUILD_SCRIPT} {self.arch} {lower}")
        self.lower = lower
        marker = dict(kv.split("=", 1) for kv in (lower / ROOT_MARKER).read_text().split()
                      if "=" in kv)
        if marker.get("arch") and marker["arch"] != self.arch:
            if self._arch_given:
                raise TestHostError(f"{lower} is an {marker['arch']} root, not {self.arch}")
            self.arch = marker["arch"]
        if self._workdir_arg:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            base = self._workdir_arg
        else:
            base = Path(tempfile.mkdtemp(prefix="hm-testhost-", dir="/var/tmp"))
        self.instance_dir = base / self.name
        self.instance_dir.mkdir()
        self.log_path = self.instance_dir / "nspawn.log"
        if self.mode in ("auto", "overlay"):
            try:
                self._prepare_overlay()
                return
            except TestHostError:
                if self.mode == "overlay":
                    raise
        self._prepare_copy()

    def _prepare_overlay(self) -> None:
        upper, work, merged = (self.instance_dir / d for d in ("upper", "work", "root"))
        for d in (upper, work, merged):
            d.mkdir()
        opts = f"lowerdir={self.lower},upperdir={upper},workdir={work}"
        proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            for d in (upper, work, merged):
                shutil.rmtree(d, ignore_errors=True)
            raise TestHostError(f"overlayfs mount failed: {proc.stderr.strip()}")
        self._overlay = True
        self.root = merged
        self._personalise()

    def _personalise(self) -> None:
        # The machine name is the hostname inside (and so the Salt minion id).
        (self.root / "etc/hostname").write_text(self.name + "\n")
        hosts = self.root / "etc/hosts"
        lines = [line for line in hosts.read_text().splitlines() if not line.startswith("127.0.1.1")] \
            if hosts.exists() else ["127.0.0.1\tlocalhost", "::1\t\tlocalhost ip6-localhost ip6-loopback"]
        hosts.write_text("\n".join(lines + [f"127.0.1.1\t{self.name}"]) + "\n")

    def _prepare_copy(self) -> None:
        dest = self.instance_dir / "root"
        _run_host(["cp", "-a", "--reflink=auto", str(self.lower), str(dest)], timeout=600)
        self.root = dest
        self._personalise()

    def _check_prerequisites(self) -> None:
        missing = [t for t in ("systemd-nspawn", "nsenter") if not shutil.which(t)]
        if missing:
            raise TestHostError(f"missing tools on the host: {missing} "
                                "(apt-get install systemd-container util-linux)")
        if os.geteuid() != 0:
            raise TestHostError("test hosts need root (systemd-nspawn, mounts, cgroups)")
        if self.arch != _host_arch():
            status = Path(f"/proc/sys/fs/binfmt_misc/qemu-{_qemu_arch(self.arch)}")
            if not status.exists() or not status.read_text().startswith("enabled"):
                raise TestHostError(
                    f"{self.arch} needs qemu-user-static registered in binfmt_misc: "
                    f"mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                    f"update-binfmts --enable qemu-{_qemu_arch(self.arch)}")
        if isinstance(self.network, (NetNS, os.PathLike)) or (
                isinstance(self.network, str) and self.network not in ("private", "host")):
            path = Path(os.fspath(self.network))
            if not path.exists():
                raise TestHostError(f"network namespace {path} does not exist")

    def _setup_cgroups(self) -> None:
        if self._scope_mode:
            return
        hierarchies = _cgroup_hierarchies()
        if not hierarchies:
            raise TestHostError("no writable cgroup hierarchy (cgroup2 or name=systemd) is "
                                "mounted: mount -t cgroup2 none /sys/fs/cgroup (or the hybrid "
                                "layout) before booting test hosts")
        self._cgroups = []
        for h in hierarchies:
            cg = h / CGROUP_GROUP / self.name
            if cg.exists():  # stale from a previous boot: must be empty of processes
                _cgroup_kill([cg])
                _cgroup_rmtree(cg)
            cg.mkdir(parents=True, exist_ok=True)
            self._cgroups.append(cg)

    def _nspawn_argv(self) -> list[str]:
        argv = ["systemd-nspawn", "-D", str(self.root), "-M", self.name,
                "--register=no", "--keep-unit", "-b", f"--console={self.console}"]
        net = self.network
        if isinstance(net, (NetNS, os.PathLike)):
            argv.append(f"--network-namespace-path={os.fspath(net)}")
        elif net == "private":
            argv.append("--private-network")
        elif net == "host":
            pass
        elif isinstance(net, str):
            argv.append(f"--network-namespace-path={net}")
        for src, dst in self.bind.items():
            argv.append(f"--bind={src}:{dst}")
        for src, dst in self.bind_ro.items():
            argv.append(f"--bind-ro={src}:{dst}")
        argv += self.nspawn_args
        if self._scope_mode:
            argv = ["systemd-run", "--scope", "--quiet", "--collect",
                    f"--unit=hub-mirror-testhost-{self.name}", *argv]
        return argv

    def _nspawn_env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        # Pass SYSTEMD_NSPAWN_* / SYSTEMD_LOG_* knobs through (e.g. for debugging).
        env.update({k: v for k, v in os.environ.items()
                    if k.startswith(("SYSTEMD_NSPAWN_", "SYSTEMD_LOG_"))})
        return env

    def _find_leader(self) -> int | None:
        """Host pid of the container's PID 1: a descendant of nspawn that is pid 1 in
        its own pid namespace."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            raise TestHostError(f"systemd-nspawn exited with status {self.proc.returncode} "
                                "before the container started")
        children: dict[int, list[int]] = {}
        nspid1: set[int] = set()
        for pid in processes.pids():
            fields = processes.status(pid)
            if not fields:
                continue
            children.setdefault(int(fields["PPid"]), []).append(pid)
            ids = fields.get("NSpid", "").split()
            if len(ids) > 1 and ids[-1] == "1":
                nspid1.add(pid)
        queue = [self.proc.pid]
        while queue:
            pid = queue.pop(0)
            for child in children.get(pid, []):
                if child in nspid1:
                    return child
                queue.append(child)
        return None

    def _system_up(self) -> str | None:
        if self.proc.poll() is not None:
            raise TestHostError(f"systemd-nspawn exited with status {self.proc.returncode} "
                                "while the container was booting")
        try:
            state = self.system_state()
        except TestHostError:
            return None
        if state in ("running", "degraded"):
            return state
        # "offline" = systemctl cannot reach PID 1 yet (early boot): keep waiting.
        if state in ("maintenance", "stopping"):
            raise TestHostError(f"systemd in {self.name} is {state!r} instead of running")
        return None

    def _nsenter_argv(self, cmd, env=None, cwd=None) -> list[str]:
        if not self.is_running or self.leader_pid is None:
            raise TestHostError(f"{self.name} is not running")
        if isinstance(cmd, str):
            cmd = ["/bin/sh", "-c", cmd]
        inner_env = {"PATH": INNER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                     "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
        inner_env.update(env or {})
        # Entering the mount namespace puts nsenter at the container's "/" (setns resets
        # root and cwd); nsenter's own --wd would resolve the path on the host: use env -C.
        argv = ["nsenter", "-t", str(self.leader_pid), "-a", "--", "/usr/bin/env", "-i"]
        if cwd:
            argv += ["-C", cwd]
        argv += [*(f"{k}={v}" for k, v in inner_env.items()), *cmd]
        return argv

    def _exec_preexec(self):
        # Put commands into hub-mirror-ci/<name>/exec so that they die with the instance.
        if self._scope_mode or not self._cgroups:
            return None
        targets = []
        for cg in self._cgroups:
            ex = cg / "exec"
            ex.mkdir(exist_ok=True)
            targets.append(ex)
        return _enter_cgroups_fn(targets)

    def _request_poweroff(self) -> bool:
        """Ask systemd to power off; True when it is known to have taken the request."""
        if self.arch == _host_arch():
            # SIGRTMIN+4 to systemd = start poweroff.target (no D-Bus client to lose). A
            # signal says nothing back, and costs nothing to repeat.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader_pid, signal.SIGRTMIN + 4)
            return False
        # Under qemu-user the real-time signals are renumbered (host SIGRTMIN+4 arrives as
        # SIGRTMIN+2 = emergency.target): ask through systemctl instead, once it took it.
        # Each request is a process in the container: one started as systemd-shutdown
        # sweeps the remaining processes can be left a zombie it waits 90 s for (a CI run
        # timed out on "Waiting for process: 708 (env)").
        accepted = False
        with contextlib.suppress(TestHostError, subprocess.TimeoutExpired):
            accepted = self.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=30).returncode == 0
        # That nsenter must not linger into the shutdown (see _kill_exec_cgroups).
        self._kill_exec_cgroups()
        return accepted

    def _kill_exec_cgroups(self, wait: bool = True, timeout: float = 10) -> None:
        """Kill what run()/popen() started, inner processes first.

        The order matters: a process nsenter forked into the container's pid namespace
        has its parent (nsenter) outside it. If nsenter dies first, the orphan is adopted
        by the *host's* PID 1, which on a sandbox/CI host may never reap it; the zombie
        then keeps systemd-shutdown waiting and even blocks the pid namespace's teardown.
        So: SIGKILL the inner processes, SIGCONT the nsenters (systemd-shutdown's
        SIGSTOP broadcast can leave them stopped, see poweroff()) so they reap and exit,
        then SIGKILL whatever nsenter is left.
        """
        paths = [cg / "exec" for cg in self._cgroups if (cg / "exec").is_dir()]
        if not paths:
            return
        deadline = time.monotonic() + (timeout if wait else 0)
        while True:
            pids = set().union(*(_cgroup_pids(p) for p in paths))
            inner = {pid for pid in pids if _pid_ns_depth(pid) > 1}
            outer = pids - inner
            for pid in inner:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for pid in outer:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)
            if not inner or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not wait:
            return
        # Give the nsenters a moment to reap their children and exit on their own.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not set().union(*(_cgroup_pids(p) for p in paths)), 2,
                       "nsenter processes to exit", 0.05)
        _cgroup_kill(paths)

    def _after_exit(self) -> None:
        self.leader_pid = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _write_state(self) -> None:
        with contextlib.suppress(OSError):
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            (STATE_DIR / f"{self.name}.json").write_text(json.dumps({
                "name": self.name, "owner_pid": os.getpid(), "nspawn_pid": self.proc.pid,
                "instance_dir": str(self.instance_dir), "root": str(self.root),
                "overlay": self._overlay, "keep": self.keep,
                "cgroups": [str(c) for c in self._cgroups]}))

    def _diagnose(self, message: str) -> str:
        parts = [message]
        if self.proc is not None and self.proc.poll() is not None:
            parts.append(f"systemd-nspawn exit status: {self.proc.returncode}")
        parts.append(f"--- systemd-nspawn output ({self.log_path}):\n{self.nspawn_log()}")
        if self.is_running and self.leader_pid:
            with contextlib.suppress(Exception):
                parts.append("--- systemctl --failed:\n" + self.run(
                    ["systemctl", "--failed", "--no-legend"], check=False, timeout=10).stdout)
                parts.append("--- journal:\n" + self.journal(40))
        return "\n".join(parts)

    @staticmethod
    def _show(cmd) -> str:
        return cmd if isinstance(cmd, str) else shlex.join(cmd)

    @staticmethod
    def _txt(data) -> str:
        return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")

    def __repr__(self) -> str:
        state = "running" if self.is_running else "stopped"
        return f"<TestHost {self.name} {self.arch} {state} root={self.root}>"


def _pid_ns_depth(pid: int) -> int:
    """How many pid namespaces a process is in (NSpid has one entry per level)."""
    return len(processes.status(pid).get("NSpid", "").split())


def _host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _qemu_arch(arch: str) -> str:
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def reap_stale() -> list[str]:
    """Clean up instances whose owning process died (e.g. a killed pytest run)."""
    reaped = []
    if not STATE_DIR.is_dir():
        return reaped
    for state_file in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        owner = state.get("owner_pid")
        if owner and Path(f"/proc/{owner}").exists():
            continue
        cgroups = [Path(c) for c in state.get("cgroups", [])]
        with contextlib.suppress(TestHostError):
            _cgroup_kill(cgroups)
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(state.get("nspawn_pid"), signal.SIGKILL)
        for cg in cgroups:
            _cgroup_rmtree(cg)
        root = Path(state.get("root") or "/nonexistent")
        if state.get("overlay") and root.is_dir() and _is_mountpoint(root):
            subprocess.run(["umount", "-l", str(root)], capture_output=True)
        inst = state.get("instance_dir")
        if inst and not state.get("keep"):
            shutil.rmtree(inst, ignore_errors=True)
        state_file.unlink(missing_ok=True)
        reaped.append(state.get("name", state_file.stem))
    return reaped
