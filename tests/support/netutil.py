"""Small network helpers for tests that must only ever talk to loopback.

Every helper here refuses non-loopback hosts: the test harness promises never to
send a packet off the machine, and a typo in a URL should fail loudly rather than
reach the real Docker Hub.
"""

import ipaddress
import os
import socket
import threading
import time
import urllib.parse

import requests

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}

# Proxy variables would route loopback traffic elsewhere (or leak it off the host).
PROXY_ENV_VARS = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "ftp_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "FTP_PROXY",
)


def is_loopback_host(host):
    """True when ``host`` names the loopback interface (127/8, ::1, localhost)."""
    host = (host or "").strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def assert_loopback_url(url):
    """Raise ValueError unless ``url`` points at loopback; returns the URL."""
    host = urllib.parse.urlsplit(url).hostname
    if not is_loopback_host(host):
        raise ValueError(f"refusing non-loopback URL {url!r}: tests stay on 127.0.0.1")
    return url


def assert_loopback_hostport(hostport):
    """Same guard for ``HOST:PORT`` strings as used by skopeo references."""
    assert_loopback_url(f"http://{hostport}/")
    return hostport


def clean_env(extra=None):
    """A copy of os.environ without proxy settings, plus ``extra``.

    Child processes (registry, skopeo) honour proxy variables; removing them
    keeps their traffic on loopback whatever the caller's shell has set.
    """
    # AWS_* too: a CA bundle or profile from the caller's shell breaks the S3 driver.
    env = {
        k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS and not k.startswith("AWS_")
    }
    env["NO_PROXY"] = env["no_proxy"] = "*"
    if extra:
        env.update(extra)
    return env


def loopback_session():
    """A requests Session that ignores proxy env vars and netrc (trust_env=False)."""
    session = requests.Session()
    session.trust_env = False
    return session


def free_port(host="127.0.0.1"):
    """Return a TCP port that is free right now on ``host``.

    There is an unavoidable race between closing this socket and the caller
    binding it; on a test machine that is acceptable.
    """
    if not is_loopback_host(host):
        raise ValueError(f"free_port only hands out loopback ports, not {host!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http(url, timeout=20, ok=(200, 401), abort=None):
    """Poll ``url`` with GET until it answers with a status in ``ok``.

    Returns the final Response. Raises TimeoutError carrying the last error or
    status seen when ``timeout`` seconds pass. ``abort`` is an optional
    callable returning a reason string when waiting is pointless (e.g. the
    server process died); that raises RuntimeError at once instead of burning
    the whole timeout.
    """
    assert_loopback_url(url)
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    with loopback_session() as session:
        while True:
            if abort is not None:
                reason = abort()
                if reason:
                    raise RuntimeError(f"gave up waiting for {url}: {reason}")
            try:
                resp = session.get(url, timeout=2)
                if resp.status_code in ok:
                    return resp
                last = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                last = repr(exc)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{url} not ready after {timeout}s: {last}")
            time.sleep(0.1)


def listening_socket(address, backlog):
    """A TCP socket listening on ``address`` (host, port) with SO_REUSEADDR, whose
    accept() times out every 0.2 s so that an accept loop sees its stop flag."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(backlog)
    sock.settimeout(0.2)
    return sock


def accepted(sock, stop):
    """Each connection accepted on ``sock`` (a :func:`listening_socket`) until the
    threading.Event ``stop`` is set or the socket is closed under it."""
    while not stop.is_set():
        try:
            conn, _ = sock.accept()
        except (socket.timeout, OSError):
            continue
        yield conn


class TricklingMirror:
    """A "registry" on loopback that answers ``GET /v2/`` one byte a second: every read
    returns in time, the whole answer never does. ``sent`` holds, once it hung up, how
    many bytes it got to send."""

    ANSWER = b"HTTP/1.1 200 OK\r\nDocker-Distribution-Api-Version: registry/2.0\r\n\r\n"

    def __init__(self, repeat=2):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.sent = []
        self.thread = threading.Thread(target=self._trickle, args=(self.ANSWER * repeat,), daemon=True)
        self.thread.start()

    def _trickle(self, answer):
        conn, _ = self.server.accept()
        count = 0
        try:
            for byte in answer:
                conn.sendall(bytes([byte]))
                count += 1
                time.sleep(1)
        except OSError:
            pass
        finally:
            self.sent.append(count)
            conn.close()

    def close(self):
        self.server.close()
