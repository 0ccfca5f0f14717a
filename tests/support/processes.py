"""The processes behind a mirror, read from /proc: what serves a config, and who started it."""

import time
from pathlib import Path


def cmdline(pid):
    try:
        return [arg.decode(errors="replace") for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]
    except OSError:
        return []


def registry_pids(config_path):
    """PIDs of registry processes serving ``config_path`` (whatever supervises them)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and cmdline(proc.name)[1:3] == ["serve", str(config_path)]:
            pids.append(int(proc.name))
    return sorted(pids)


def parent_pid(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(predicate, timeout, what):
    """``predicate()``'s first truthy value within ``timeout`` seconds; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
