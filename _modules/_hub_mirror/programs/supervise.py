"""
The hub_mirror supervisor: keeps one mirror's registry serving, whatever the upstream does.

``hub_mirror.deploy`` copies this file to the host and runs it
(as the mirror's unprivileged user) from the systemd unit or the init script. It needs only
the Python standard library.

Why it exists: the registry in proxy mode pings its upstream at start and panics when the
upstream does not answer (distribution issue 4038), so a host that boots during a Docker Hub
outage would serve nothing, exactly when its cache matters most. The supervisor then serves
the same storage as a plain read-only registry ("offline mode": every cached tag and blob,
no pulls from upstream, no push), checks the upstream every ``--recheck`` seconds, and goes
back to proxy mode as soon as the upstream answers. It also restarts the registry when it
exits, with a short backoff, like systemd's ``Restart=always``.

Its only argument is the path of the mirror's supervisor settings, a JSON file that
``hub_mirror.configure`` writes (0600, the service user's): no pillar value ever reaches a
unit file, an init script or a command line.

The registry runs as the supervisor's child and dies with it (``PR_SET_PDEATHSIG``): a
supervisor killed with SIGKILL cannot leave a registry serving unsupervised.

With a front (``front_binary`` set), the supervisor also runs nginx on the listen address,
restarts it when it exits, and works in the front's directory inside the storage, where
the registry's unix socket is. Every few seconds it folds nginx's log of the hits it served
into a running total (``hits.json``), so the log stays small.
"""

import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def log(message):
    print(f"hub-mirror-supervise: {message}", file=sys.stderr, flush=True)


def http_answers(url, timeout):
    """True when ``url`` gives any HTTP answer (401 included) within ``timeout``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the registry's behind a front; the Docker API's)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def socket_answers(path, timeout):
    """True when the registry answers any HTTP on its unix socket within ``timeout``."""
    connection = UnixConnection(path, timeout)
    try:
        connection.request("GET", "/v2/")
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def set_aside_broken_schedule(storage):
    """
    Move an unreadable ``scheduler-state.json`` out of the registry's way.

    While the disk is full, registry 2.8 truncates the file and then fails to write it;
    at its next start it panics on the empty file ("unexpected end of JSON input"), so a
    full disk would keep the mirror down for good. Without the file the registry starts
    with an empty expiry schedule: cached content then simply lives on. Returns the new
    name, or None.
    """
    if not storage:
        return None
    path = os.path.join(storage, "scheduler-state.json")
    try:
        with open(path, encoding="utf-8") as handle:
            json.load(handle)
        return None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        aside = f"{path}.broken-{int(time.time())}"
        try:
            os.replace(path, aside)
        except OSError:
            return None
        log(f"moved the unreadable expiry schedule aside: {aside}")
        return aside


# <linux/prctl.h>
PR_SET_PDEATHSIG = 1


def die_with_parent(parent):
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when the
    supervisor dies, and give up at once if it already has (the race before prctl)."""

    def preexec():
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(70)  # pylint: disable=protected-access

    return preexec


class Settings:
    """The supervisor's settings file, with defaults for what it may leave out."""

    DEFAULTS = {
        "storage": "",
        "credentials": "",
        "log": "",
        "recheck": 15,
        "probe_timeout": 5,
        "front_binary": "",
        "front_conf": "",
        "front_dir": "",
        "socket": "",
    }
    REQUIRED = ("binary", "config", "offline_config", "listen", "upstream")

    def __init__(self, path):
        with open(path, encoding="utf-8") as handle:
            values = {**self.DEFAULTS, **json.load(handle)}
        missing = [key for key in self.REQUIRED if not values.get(key)]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        for key, value in values.items():
            setattr(self, key, value)


def log_to(path):
    """Send our output, and the registry's, to ``path`` (the init-script path; under
    systemd the journal takes stdout)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# Fold the front's hit log into its totals once it is this big.
HITS_LOG_LIMIT = 1 << 20


class Front:
    """nginx on the listen address, restarted when it exits."""

    def __init__(self, args):
        self.args = args
        self.process = None
        self.started = self.next_start = 0
        self.backoff = 2
        self.private = None

    def keep(self):
        if self.process is not None and self.process.poll() is None:
            self.fold_hits()
            return
        if time.monotonic() < self.next_start:
            return
        if self.process is not None:
            # Workers outlive a master killed with SIGKILL, and would hold the port.
            self.kill_group(signal.SIGKILL)
            self.back_off(f"front exited with {self.process.returncode}")
            return
        # The fills of a front that stopped go: they are in the registry's storage (or
        # failed), and a blob that gc or prune deleted meanwhile must not be served again.
        shutil.rmtree("fill", ignore_errors=True)
        os.makedirs("temp", exist_ok=True)
        self.keep_manifests_off_the_storage()
        # -c first: nginx writes its title over its argv, truncated to the argv's space.
        command = [self.args.front_binary, "-c", self.args.front_conf, "-p", self.args.front_dir + "/"]
        command += ["-e", "stderr", "-g", "daemon off;"]
        self.started = time.monotonic()
        try:
            # Its own process group: the master and its workers go together.
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                command, preexec_fn=die_with_parent(os.getpid()), start_new_session=True
            )
        except OSError as exc:
            self.back_off(f"cannot start the front {self.args.front_binary}: {exc}")

    def keep_manifests_off_the_storage(self):
        """The manifest cache is a link to a private directory under /tmp (the unit's own
        /tmp under systemd): nginx cuts a response whose cache file it cannot write, so a
        cache on a full storage would stop cached manifests from being served."""
        if self.private is None or not os.path.isdir(self.private):
            self.private = tempfile.mkdtemp(prefix="hub-mirror-front-")
        if os.path.islink("manifests"):
            # Left by a supervisor that was killed: its directory goes too (it is ours).
            left = os.readlink("manifests")
            prefix = os.path.join(tempfile.gettempdir(), "hub-mirror-front-")
            if left != self.private and left.startswith(prefix) and "/" not in left[len(prefix) :]:
                shutil.rmtree(left, ignore_errors=True)
            os.unlink("manifests")
        elif os.path.exists("manifests"):
            shutil.rmtree("manifests", ignore_errors=True)
        os.symlink(self.private, "manifests")

    def back_off(self, why):
        """A front that keeps failing at once (its port taken) is retried less often."""
        lived = time.monotonic() - self.started
        self.backoff = 2 if lived > 60 else min(self.backoff * 2, 30)
        log(f"{why}; restarting in {self.backoff}s")
        self.process, self.next_start = None, time.monotonic() + self.backoff

    def kill_group(self, sig):
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def fold_hits(self):
        """Rotate the hit log (nginx reopens it on SIGUSR1) and add it to the totals."""
        try:
            if os.path.exists("hits.log.1") or os.path.getsize("hits.log") > HITS_LOG_LIMIT:
                if not os.path.exists("hits.log.1"):
                    os.replace("hits.log", "hits.log.1")
                    self.process.send_signal(signal.SIGUSR1)
                    time.sleep(1)
                fold_hits(".")
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log(f"cannot fold the front's hit log: {exc}")

    def stop(self):
        if self.process is not None:
            self.kill_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            self.kill_group(signal.SIGKILL)
            self.process.wait()
        if self.private:
            shutil.rmtree(self.private, ignore_errors=True)


TOTALS = ("files", "coalesced", "manifests", "bytes")
# What each log line ``<blob|manifest> <cache status> <status> <bytes>`` counts as. A MISS
# or EXPIRED went to the registry, which counts it itself, and so did a STALE manifest
# (served because the registry failed).
_KINDS = {
    ("blob", "-"): "files",
    **{("blob", status): "coalesced" for status in ("HIT", "STALE", "UPDATING")},
    **{("manifest", status): "manifests" for status in ("HIT", "UPDATING")},
}


# The service user writes the log and the totals that root reads: a count is at most 18
# digits, or it is not one.
_COUNT = re.compile(r"[0-9]{1,18}")


def parse_totals(text):
    """The front's running totals (``TOTALS``) from their JSON, {} if there are none or
    they are no totals of ours."""
    try:
        totals = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(totals, dict):
        return {}
    return {key: totals[key] for key in TOTALS if type(totals.get(key)) is int and 0 <= totals[key] < 10**18}


def tally(lines, totals):
    """Add the front's log lines to ``totals``."""
    for line in lines:
        fields = line.split()
        if len(fields) == 3:
            fields = ["blob", *fields]  # written before manifests were logged too
        if len(fields) != 4 or not _COUNT.fullmatch(fields[3]) or fields[2] not in ("200", "206"):
            continue
        kind = _KINDS.get((fields[0], fields[1]))
        if kind:
            totals[kind] = totals.get(kind, 0) + 1
            totals["bytes"] = totals.get("bytes", 0) + int(fields[3])
    return totals


def fold_hits(directory):
    """Add ``hits.log.1`` into ``hits.json`` and drop it."""
    totals_path = os.path.join(directory, "hits.json")
    try:
        with open(totals_path, encoding="ascii", errors="replace") as handle:
            totals = parse_totals(handle.read())
    except OSError:
        totals = {}
    with open(os.path.join(directory, "hits.log.1"), encoding="ascii", errors="replace") as handle:
        tally(handle, totals)
    with open(totals_path + ".tmp", "w", encoding="ascii") as handle:
        json.dump(totals, handle)
    os.replace(totals_path + ".tmp", totals_path)
    os.unlink(os.path.join(directory, "hits.log.1"))


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.child = None
        self.stopping = False
        self.front = Front(args) if args.front_binary else None

    def handle_signal(self, signum, _frame):
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signum)

    def keep_front(self):
        if self.front is not None and not self.stopping:
            self.front.keep()

    def registry_answers(self, timeout):
        if self.args.socket:
            return socket_answers(self.args.socket, timeout)
        return http_answers(f"http://{self.args.listen}/v2/", timeout)

    def spawn(self, config):
        # OTEL: 3.x exports traces to localhost by default. HUB_MIRROR_CREDENTIALS: the
        # credential helper's file (3.x proxy.exec passes the helper no arguments).
        env = dict(
            os.environ,
            OTEL_TRACES_EXPORTER="none",
            HUB_MIRROR_CREDENTIALS=self.args.credentials,
        )
        if self.args.socket and os.path.exists(self.args.socket):
            os.unlink(self.args.socket)  # left by a registry that died: it would not bind
        self.child = subprocess.Popen(  # pylint: disable=consider-using-with
            [self.args.binary, "serve", config], env=env, preexec_fn=die_with_parent(os.getpid())
        )
        return self.child

    def upstream_up(self):
        return http_answers(self.args.upstream.rstrip("/") + "/v2/", self.args.probe_timeout)

    def serve_proxy(self):
        """Run in proxy mode; True if it served before it exited, False if it never came up."""
        set_aside_broken_schedule(self.args.storage)
        child = self.spawn(self.args.config)
        served = False
        while child.poll() is None:
            self.keep_front()
            if not served and self.registry_answers(1):
                served = True
                log("serving in proxy mode")
            time.sleep(0.5 if not served else 2)
        return served or self.stopping

    def serve_offline(self):
        """Serve the cache read-only until the upstream answers again (or a stop)."""
        log(f"upstream {self.args.upstream} does not answer: serving the cache read-only")
        child = self.spawn(self.args.offline_config)
        next_check = time.monotonic() + self.args.recheck
        while child.poll() is None and not self.stopping:
            self.keep_front()
            if time.monotonic() >= next_check:
                if self.upstream_up():
                    log("upstream answers again: back to proxy mode")
                    child.terminate()
                    try:
                        child.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                    return
                next_check = time.monotonic() + self.args.recheck
            time.sleep(0.5)

    def run(self):
        signal.signal(signal.SIGTERM, self.handle_signal)
        signal.signal(signal.SIGINT, self.handle_signal)
        if self.front is not None:
            # The socket is relative to it (a socket path has at most 107 bytes).
            os.makedirs(self.args.front_dir, mode=0o750, exist_ok=True)
            os.chdir(self.args.front_dir)
            self.keep_front()
        backoff = 1
        while not self.stopping:
            if not self.upstream_up():
                self.serve_offline()
                continue
            if self.serve_proxy():
                backoff = 1
            elif not self.stopping and not self.upstream_up():
                continue  # it died on the start-up ping: offline mode next round
            if self.stopping:
                break
            log(f"registry exited with {self.child.returncode}; restarting in {backoff}s")
            self.keep_front()
            time.sleep(backoff)
            backoff = min(backoff * 2, 30)
        if self.child and self.child.poll() is None:
            self.child.wait()
        if self.front is not None:
            self.front.stop()
        return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: hub-mirror-supervise SETTINGS.json", file=sys.stderr)
        return 2
    try:
        settings = Settings(argv[0])
    except (OSError, ValueError) as exc:
        log(f"cannot read the settings: {exc}")
        return 78  # EX_CONFIG: systemd and the init script show it; retrying will not help
    if settings.log:
        log_to(settings.log)
    return Supervisor(settings).run()


if __name__ == "__main__":
    sys.exit(main())
