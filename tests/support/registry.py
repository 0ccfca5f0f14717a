"""Run a real CNCF distribution ``registry`` binary on loopback for tests.

The project's promise is "tested with real processes", so the mirror under test
and the Docker Hub stand-in are both the genuine binary, not a mock.
"""

import copy
import os
import pathlib
import signal
import subprocess
import time

import yaml

from .netutil import clean_env, free_port, wait_http
from .processes import stop_group

DEFAULT_BINARY = "/usr/bin/docker-registry"
STOP_GRACE_SECONDS = 5


def default_config(storage_dir, port):
    """A plain (non-proxy) registry with deletable filesystem storage."""
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}"},
    }


def proxy_config(storage_dir, remote, username=None, password=None, port=None):
    """A pull-through cache of ``remote`` (logging in as ``username`` when given) on
    deletable filesystem storage, listening on 127.0.0.1:``port`` (a free one by default)."""
    config = default_config(storage_dir, port or free_port())
    config["proxy"] = {"remoteurl": remote}
    if username is not None:
        config["proxy"].update(username=username, password=password)
    return config


def _port_from_addr(addr):
    """Port number from an ``http.addr`` like ``127.0.0.1:5000`` or ``:5000``."""
    return int(str(addr).rsplit(":", 1)[1])


class RegistryProcess:
    """A ``registry serve CONFIG`` subprocess in its own process group.

    The config dict is written to ``workdir/config.yml``; stdout and stderr go
    to ``workdir/registry.log`` so a failing test can show what the registry
    said. ``http.addr`` is filled in (127.0.0.1:<port>) unless the caller's
    config already has one.
    """

    def __init__(self, workdir, config=None, binary=DEFAULT_BINARY, port=None, env=None):
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binary = str(binary)
        self.env = dict(env or {})
        self.config = self._resolve_config(config, port)
        self.port = _port_from_addr(self.config["http"]["addr"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.hostport = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.proc = None
        self._log_file = None

    def _resolve_config(self, config, port):
        """Copy the caller's config and make sure it listens somewhere known."""
        if config is None:
            return default_config(self.workdir / "storage", port or free_port())
        config = copy.deepcopy(config)
        http = config.setdefault("http", {})
        if port is not None or "addr" not in http:
            http["addr"] = f"127.0.0.1:{port or free_port()}"
        return config

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=20):
        """Write the config, spawn the registry, wait for ``/v2/`` to answer."""
        if self.running:
            return self
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        # The config may hold a proxy password: keep it private like the real one.
        os.chmod(self.config_path, 0o600)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=str(self.workdir),
            # 3.x exports traces to localhost by default; keep it quiet.
            env=clean_env({"OTEL_TRACES_EXPORTER": "none", **self.env}),
            start_new_session=True,
        )
        try:
            wait_http(self.url + "/v2/", timeout=timeout, abort=self._exit_reason)
        except (TimeoutError, RuntimeError) as exc:
            self.kill()
            raise RuntimeError(f"{exc}\n--- registry log tail ---\n{self.log_tail()}") from None
        return self

    def _exit_reason(self):
        """Why waiting is pointless (process exited), or None while it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"registry exited with status {self.proc.returncode}"
        return None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        """SIGTERM the process group, SIGKILL it if still alive after 5 s."""
        if self.proc is None:
            return
        stop_group(self.proc, STOP_GRACE_SECONDS)
        self._close_log()

    def kill(self):
        """SIGKILL at once: simulates a crash (no cleanup by the registry)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.proc.wait(timeout=STOP_GRACE_SECONDS)
        self._close_log()

    def restart(self, timeout=20):
        """Stop and start again with the current ``self.config``."""
        self.stop()
        return self.start(timeout=timeout)

    def _signal_group(self, sig):
        # The registry is a session leader (start_new_session), so its pgid is its pid.
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _close_log(self):
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- inspection ----------------------------------------------------------

    def log_text(self):
        """The registry's whole stdout+stderr so far ("" before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=40):
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, needle, timeout=10):
        """Wait until ``needle`` appears in the log; True if it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return True
            time.sleep(0.1)
        return needle in self.log_text()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return f"<RegistryProcess {self.url} {state}>"
