"""What every benchmark shares: the run context, statistics, the machine, and the harness
pieces from ``tests/support`` set up the way the benchmarks need them.

Every figure a benchmark reports is a ratio against a baseline measured in the same run,
with the runs interleaved (baseline, subject, baseline, subject, ...) so that load from
anything else on the machine hits both alike.
"""

import contextlib
import datetime
import os
import pathlib
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid

import yaml

from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.modules import registry_files
from tests.support.registry import RegistryProcess
from tests.support.release import REGISTRY_BINARY, RELEASE_VERSION, registry_binary
from tests.support.saltcall import STATE_TREE, Masterless, world_traversable_dir

MB = 1000 * 1000


def log(message):
    """Progress goes to stderr; stdout carries only the JSON document."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


class Context:
    """One benchmark run: a private root directory, run counts, and cleanups that run in
    reverse order however the benchmark ends."""

    def __init__(self, root, runs, quick=False):
        self.run_id = uuid.uuid4().hex[:6]
        self.root = world_traversable_dir(root)
        self.runs = runs
        self.quick = quick
        self.stack = contextlib.ExitStack()

    def dir(self, *parts):
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def defer(self, function, *args, **kwargs):
        """Run ``function`` at the end, even on failure; errors in it are logged, not raised."""

        def guarded():
            try:
                function(*args, **kwargs)
            except Exception as exc:  # pylint: disable=broad-except
                log(f"cleanup {getattr(function, '__qualname__', function)} failed: {exc!r}")

        self.stack.callback(guarded)

    def netns_name(self, role):
        """A namespace name unique to this run (other helpers' namespaces are never ours)."""
        return f"hmb{self.run_id}-{role}"

    def close(self):
        self.stack.close()


# -- statistics ---------------------------------------------------------------------------


def summary(samples, digits=4):
    """Median, range and spread of a list of measurements."""
    samples = [float(s) for s in samples]
    if not samples:
        return {"n": 0}
    median = statistics.median(samples)
    low, high = min(samples), max(samples)
    return {
        "median": round(median, digits),
        "min": round(low, digits),
        "max": round(high, digits),
        # (max - min) / median: how far apart the runs were.
        "spread_pct": round(100 * (high - low) / median, 1) if median else None,
        "n": len(samples),
        "samples": [round(s, digits) for s in samples],
    }


def ratio(subject, baseline, digits=3):
    """subject/baseline per run (the runs are paired: measured back to back), summarised.

    ``of_medians`` is median(subject)/median(baseline), which is what the per-run median
    approximates when the runs are not paired.
    """
    per_run = [s / b for s, b in zip(subject, baseline) if b]
    out = summary(per_run, digits)
    if subject and baseline and statistics.median(baseline):
        out["of_medians"] = round(statistics.median(subject) / statistics.median(baseline), digits)
    return out


def timed(function, *args, **kwargs):
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


# -- the machine ----------------------------------------------------------------------------


def _first_line(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine():
    cpu = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import salt.version  # pylint: disable=import-outside-toplevel

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "salt": salt.version.__version__,
        "registry": _first_line([REGISTRY_BINARY, "--version"])
        + "; 3.x: built by .ci/build-registry from the Go module proxy",
        "skopeo": _first_line(["skopeo", "--version"]),
        "containerd": _first_line(["containerd", "--version"]),
        "nginx": _first_line(["nginx", "-v"]),
    }


# -- the registry config hub_mirror renders ---------------------------------------------------


def mirror_process(name, workdir, upstream, addresses, storage, version=RELEASE_VERSION, username=HUB_USER, token=HUB_TOKEN):
    """A registry of ``version`` (Debian's 2.8.2, or a 3.x built by .ci/build-registry)
    on the config hub_mirror renders for one mirror, with its credential helper on 3.x,
    for a registry the benchmark runs itself. ``addresses`` comes from
    :func:`mirror_addresses`. Not started."""
    workdir = pathlib.Path(workdir)
    mirror = {
        "upstream": upstream,
        "listen": addresses["listen"],
        "debug_listen": addresses["debug_listen"],
        "storage": str(storage),
    }
    if username:
        mirror.update(username=username, token=token)
    config, env = registry_files(name, mirror, version, workdir / "helper")
    binary = registry_binary(version, workdir / "binary")
    return RegistryProcess(workdir / "registry", config=config, binary=binary, env=env)


_HANDED_OUT = set()


def _port_free(port):
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def mirror_addresses():
    """``{"port", "listen", "debug_listen"}`` for a mirror: two free loopback ports
    below the kernel's ephemeral range, so that no outgoing connection takes them
    between now and the moment the mirror starts (a mirror is configured long before
    it starts in the fleet benchmark)."""
    try:
        low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = min(low, 32768)
    for _ in range(1000):
        port = random.randrange(top - 12000, top - 6000)
        debug = port + 6000
        if port in _HANDED_OUT or not _port_free(port) or not _port_free(debug):
            continue
        _HANDED_OUT.update((port, debug))
        return {"port": port, "listen": f"127.0.0.1:{port}", "debug_listen": f"127.0.0.1:{debug}"}
    raise RuntimeError("no free port pair found below the ephemeral port range")


# -- masterless Salt with a private extra file_root ----------------------------------------------


def bench_minion(root, extra_roots=()):
    """A masterless minion whose file_roots add ``extra_roots`` after the repo's (for the
    benchmark's own SLS files, which must not live in the repository)."""
    return Masterless(root, file_roots=[*STATE_TREE, *extra_roots])


def noop_sls(directory, count, name="bench_noop"):
    """An SLS of ``count`` states that succeed without changes; returns its name."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    states = {
        f"bench-noop-{index}": {"test.succeed_without_changes": [{"name": f"noop {index}"}]}
        for index in range(count)
    }
    (directory / f"{name}.sls").write_text(yaml.safe_dump(states))
    return name


def rmtree(path):
    shutil.rmtree(path, ignore_errors=True)
