"""The processes behind a mirror, read from /proc: what serves a config, and who started it.

The one place the tests and the benchmarks look through /proc for processes; a process
that goes away while it is read is simply not there (never an error).
"""

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def pids():
    """The pid of every process there is now (this pid namespace's /proc)."""
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def cmdline(pid):
    """The arguments of ``pid`` (``[]`` once it is gone or for a kernel thread)."""
    try:
        return [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]
    except OSError:
        return []


def stat_fields(pid):
    """The fields of /proc/<pid>/stat after the command name: [0] is the state, [1] the
    parent, [2] the process group, [11:15] the CPU ticks; None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def status(pid):
    """/proc/<pid>/status as {field: value} (``Uid``, ``CapEff``, ``NSpid``, ...); {} once gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def environ(pid):
    """The raw environment block of ``pid``."""
    return Path(f"/proc/{pid}/environ").read_bytes()


def registry_pids(config_path):
    """PIDs of registry processes serving ``config_path`` (whatever supervises them)."""
    return sorted(pid for pid in pids() if cmdline(pid)[1:3] == ["serve", str(config_path)])


def parent_pid(pid):
    """The parent of ``pid``."""
    return int(stat_fields(pid)[1])


def alive(pid):
    """``pid`` exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def process_group(pgid):
    """The pids of the live processes in process group ``pgid``."""
    members = []
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None and int(fields[2]) == pgid:
            members.append(pid)
    return members


def cpu_seconds(pid):
    """User+system CPU seconds of ``pid`` and its waited-for children, or None once gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime: fields 14-17 (1-based) of stat, 11-14 here.
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def stop_group(proc, grace):
    """Stop the process group ``proc`` leads (a Popen started with start_new_session):
    SIGTERM, then SIGKILL if ``proc`` has not exited within ``grace`` seconds. Nothing to
    do once it has exited."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


def wait_for(predicate, timeout, what, interval=0.2):
    """``predicate()``'s first truthy value within ``timeout`` seconds; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
