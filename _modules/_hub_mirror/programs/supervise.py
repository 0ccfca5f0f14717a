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
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
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

    DEFAULTS = {"storage": "", "credentials": "", "log": "", "recheck": 15, "probe_timeout": 5}
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


class Supervisor:
    def __init__(self, args):
        self.args = args
        self.child = None
        self.stopping = False

    def handle_signal(self, signum, _frame):
        self.stopping = True
        if self.child and self.child.poll() is None:
            self.child.send_signal(signum)

    def spawn(self, config):
        # OTEL: 3.x exports traces to localhost by default. HUB_MIRROR_CREDENTIALS: the
        # credential helper's file (3.x proxy.exec passes the helper no arguments).
        env = dict(
            os.environ,
            OTEL_TRACES_EXPORTER="none",
            HUB_MIRROR_CREDENTIALS=self.args.credentials,
        )
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
        local = f"http://{self.args.listen}/v2/"
        served = False
        while child.poll() is None:
            if not served and http_answers(local, 1):
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
            time.sleep(backoff)
            backoff = min(backoff * 2, 30)
        if self.child and self.child.poll() is None:
            self.child.wait()
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
