"""A loopback stand-in for Docker Hub (registry-1.docker.io + auth.docker.io).

The mirror under test must prove that it sends the pillar's token upstream, is
counted against a rate limit the way Hub counts, and copes when Hub is slow or
unreachable. So the stand-in is a real ``registry`` (the backend holding the
images) behind a small Python front that speaks Hub's Bearer token flow,
records what it saw (never a secret), and can be slowed down or switched off.
"""

import base64
import contextlib
import datetime
import hashlib
import hmac
import http.client
import json
import pathlib
import re
import secrets
import socket
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import oci
from .netutil import free_port
from .registry import RegistryProcess

# The stand-in's credentials in the tests and the benchmarks: a made-up token that no
# output may show and nothing else accepts.
HUB_USER = "hubuser"
HUB_TOKEN = "dckr_pat_SECRET0123456789abcdefXYZ"
SERVICE = "registry.docker.io"
TOKEN_LIFETIME = 300
RATELIMIT_WINDOW = 21600
BACKEND_TIMEOUT = 60
STREAM_CHUNK = 64 * 1024

# Headers that describe one hop, not the message: never forwarded either way.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
# Request headers the front owns (credentials stop here; Host is the backend's).
DROP_REQUEST = HOP_BY_HOP | {"authorization", "host", "content-length"}
# Response headers the front writes itself (send_response adds Server and Date).
DROP_RESPONSE = HOP_BY_HOP | {"server", "date", "content-length"}

_ROUTES = (
    ("base", re.compile(r"^/v2/?$")),
    ("catalog", re.compile(r"^/v2/_catalog$")),
    ("manifest", re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")),
    ("blob", re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<ref>[a-z0-9]+:[a-f0-9]+)$")),
    ("tags", re.compile(r"^/v2/(?P<name>.+)/tags/list$")),
    ("other", re.compile(r"^/v2/(?P<name>.+)/blobs/uploads(/.*)?$")),
)


def classify(path):
    """(kind, repository name or None, reference or None) for a registry API path."""
    for kind, pattern in _ROUTES:
        match = pattern.match(path)
        if match:
            groups = match.groupdict()
            return kind, groups.get("name"), groups.get("ref")
    return "other", None, None


def _utc_now_rfc3339():
    # Go's time.Time JSON decoding needs RFC 3339 with a zone; a naive
    # isoformat() makes docker/distribution's token client fail.
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error_body(code, message, detail=None):
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


def _parse_basic(header):
    """(username, password) from an ``Authorization: Basic`` value, else None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class _FrontServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers open connections so block() can cut them."""

    daemon_threads = True
    allow_reuse_address = True
    # Many parallel pulls (benchmarks) must not see refused connects.
    request_queue_size = 128

    def __init__(self, addr, handler, hub):
        self.hub = hub
        self.connections = set()
        self.connections_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        """Quiet about peers hanging up (clients and block() do that); loud otherwise."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def cut_connections(self):
        """Reset every open client connection (keep-alive ones included)."""
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeDockerHub"
    sys_version = ""

    def log_message(self, fmt, *args):
        """Silent: the hub keeps its own structured log, and stderr noise helps no one."""

    def _dispatch(self):
        try:
            self.server.hub._handle(self)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True
        except OSError:
            # block() shut the socket under us.
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch


class FakeDockerHub:
    """Docker Hub's registry + token service, on 127.0.0.1, backed by a real registry.

    ``requests`` logs every call to ``/v2/...`` as {"method", "path", "status",
    "kind", "authorized", "repo", "ref", "user_agent"}; ``token_requests`` logs
    every ``/token`` call as {"method", "username", "password_ok", "accepted",
    "anonymous", "scope", "service", "password_sha256"}. Neither ever holds a
    password, a bearer token or an Authorization header.
    """

    def __init__(self, workdir, username="hubuser", token="dckr_pat_TESTTOKEN", require_auth=True, ratelimit=(100, 97), port=None):
        self.workdir = workdir
        self.username = username
        self.token = token
        self.require_auth = require_auth
        # An HTTP status every manifest request gets instead of its answer (a Hub outage
        # or a rate limit that HEADs meet too); None: answer normally.
        self.manifest_status = None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.hostport = f"127.0.0.1:{self.port}"
        self.realm = f"{self.url}/token"
        self.backend = RegistryProcess(f"{workdir}/backend")
        self.requests = []
        self.token_requests = []
        self.set_ratelimit(*(ratelimit or (None, None)))
        self._delay = 0.0
        self._lock = threading.Lock()
        self._debug_ports = {}  # listen -> the debug port mirror_pillar gave it
        self._tokens = {}  # issued bearer token -> {"anonymous", "username", "expires"}
        self._server = None
        self._thread = None
        self._interrupt = threading.Event()

    # -- lifecycle -----------------------------------------------------------

    def start(self):
        self.backend.start()
        self._listen()
        return self

    def stop(self):
        self.block()
        self.backend.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def mirror_pillar(self, listen, **extra):
        """The pillar of one mirror of this stand-in, with its credentials, listening on
        ``listen`` (``host:port``, or a port on 127.0.0.1); ``extra`` adds or replaces keys.

        The debug listener gets a port of its own, the same for the same ``listen``: the
        default (listen port + 10000) can be any ephemeral port, in use by another test's
        connection (``debug_listen=""`` keeps the default)."""
        if isinstance(listen, int):
            listen = f"127.0.0.1:{listen}"
        debug_port = self._debug_ports.setdefault(listen, free_port())
        return {
            "upstream": self.url,
            "listen": listen,
            "debug_listen": f"127.0.0.1:{debug_port}",
            "username": self.username,
            "token": self.token,
            **extra,
        }

    def __repr__(self):
        # No credential in the repr: it ends up in pytest failure output.
        return f"<FakeDockerHub {self.url} user={self.username!r} backend={self.backend.url}>"

    def _listen(self, timeout=5):
        """Bind the front on self.port, retrying briefly if the port is in TIME_WAIT limbo."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                server = _FrontServer(("127.0.0.1", self.port), _Handler, self)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
        self._interrupt = threading.Event()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True, name=f"fakehub-{self.port}")
        thread.start()
        with self._lock:
            self._server, self._thread = server, thread

    # -- fault injection ---------------------------------------------------

    def block(self):
        """Stop listening and reset open connections: connects get ECONNREFUSED."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        self._interrupt.set()  # wake handlers sleeping in set_delay()
        server.shutdown()
        server.server_close()
        server.cut_connections()
        thread.join(timeout=5)

    def unblock(self):
        """Listen again on the same port."""
        with self._lock:
            if self._server is not None:
                return
        self._listen()

    @property
    def blocked(self):
        return self._server is None

    def set_delay(self, seconds):
        """Delay every answer by ``seconds`` (0 to turn off); block()/stop() cut it short."""
        self._delay = float(seconds)

    def set_ratelimit(self, limit, remaining):
        """Set the Hub-style pull quota; ``limit=None`` drops the rate-limit headers."""
        self.ratelimit_limit = limit
        self.ratelimit_remaining = remaining

    # -- content -------------------------------------------------------------

    def push_image(self, layout_dir, tag, repo, dest_tag=None, all_platforms=True):
        """Push an OCI layout tag straight into the backend (no auth, not logged)."""
        return oci.push(layout_dir, tag, self.backend.hostport, repo, dest_tag=dest_tag, all_platforms=all_platforms)

    def issue_token(self, anonymous=False):
        """Mint a valid bearer token directly (for tests poking the API with requests)."""
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            # Drop expired tokens so a long benchmark does not grow this forever.
            for stale in [t for t, info in self._tokens.items() if info["expires"] <= now]:
                del self._tokens[stale]
            self._tokens[token] = {
                "anonymous": anonymous,
                "username": None if anonymous else self.username,
                "expires": now + TOKEN_LIFETIME,
            }
        return token

    # -- log views -----------------------------------------------------------

    def counts(self):
        """Authorized manifest/blob GETs and HEADs, plus /token calls.

        401 challenges are left out: they never reach the backend and Hub
        does not count them as pulls.
        """
        with self._lock:
            reqs = [r for r in self.requests if r["authorized"]]
            tokens = len(self.token_requests)

        def n(kind, method):
            return sum(1 for r in reqs if r["kind"] == kind and r["method"] == method)

        return {
            "manifest_get": n("manifest", "GET"),
            "manifest_head": n("manifest", "HEAD"),
            "blob_get": n("blob", "GET"),
            "blob_head": n("blob", "HEAD"),
            "token": tokens,
        }

    def reset_counts(self):
        """Forget the request and token logs (the rate-limit quota is kept)."""
        with self._lock:
            self.requests.clear()
            self.token_requests.clear()

    def _record(self, entry, target):
        with self._lock:
            target.append(entry)

    # -- request handling ----------------------------------------------------

    def _handle(self, h):
        delay, interrupt = self._delay, self._interrupt
        if delay > 0:
            interrupt.wait(delay)
            if interrupt.is_set():
                h.close_connection = True
                return
        parsed = urllib.parse.urlsplit(h.path)
        if parsed.path == "/token":
            self._handle_token(h, parsed)
        elif parsed.path == "/v2" or parsed.path.startswith("/v2/"):
            self._handle_registry(h, parsed)
        else:
            self._reply(h, 404, b"404 page not found\n", {"Content-Type": "text/plain; charset=utf-8"})

    def _reply(self, h, status, body=b"", headers=None):
        """Send a complete small response (body omitted for HEAD)."""
        h.send_response(status)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD" and body:
            h.wfile.write(body)

    def _read_body(self, h):
        """The request body, de-chunked if the client used chunked encoding."""
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(h.rfile.read(size))
                h.rfile.readline()
        length = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(length) if length else b""

    # -- /token (auth.docker.io) ------------------------------------------------

    def _handle_token(self, h, parsed):
        """Hub's token endpoint: GET with Basic auth, or POST OAuth2 password grant.

        No credentials at all gets an anonymous token, as on Hub; wrong
        credentials get 401.
        """
        params = dict(urllib.parse.parse_qsl(parsed.query))
        if h.command == "POST":
            form = dict(urllib.parse.parse_qsl(self._read_body(h).decode("utf-8", "replace")))
            params.update({k: v for k, v in form.items() if k in ("service", "scope")})
            if form.get("grant_type") != "password":
                self._reply(h, 400, json.dumps({"error": "unsupported_grant_type"}).encode(), {"Content-Type": "application/json"})
                return
            creds = (form.get("username", ""), form.get("password", ""))
        elif h.command == "GET":
            creds = _parse_basic(h.headers.get("Authorization"))
        else:
            self._reply(h, 405, b"", {"Allow": "GET, POST"})
            return

        entry = self._judge_credentials(h.command, creds, params)
        self._record(entry, self.token_requests)
        if creds is not None and not entry["accepted"]:
            self._reply(h, 401, json.dumps({"details": "incorrect username or password"}).encode(), {"Content-Type": "application/json"})
            return
        token = self.issue_token(anonymous=entry["anonymous"])
        body = {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME, "issued_at": _utc_now_rfc3339()}
        self._reply(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _judge_credentials(self, method, creds, params):
        """A log entry saying whose credentials these were, holding no secret."""
        entry = {
            "method": method,
            "username": None,
            "password_ok": False,
            "accepted": False,
            "anonymous": creds is None,
            "scope": params.get("scope"),
            "service": params.get("service"),
            "password_sha256": None,
        }
        if creds is not None:
            user, password = creds
            password_ok = hmac.compare_digest(password.encode(), self.token.encode())
            entry.update(
                username=user,
                password_ok=password_ok,
                accepted=password_ok and user == self.username,
                password_sha256=hashlib.sha256(password.encode()).hexdigest(),
            )
        return entry

    # -- /v2/ (registry-1.docker.io) -------------------------------------------

    def _bearer_ok(self, header):
        if not header or not header.lower().startswith("bearer "):
            return False
        token = header[7:].strip()
        with self._lock:
            info = self._tokens.get(token)
        return info is not None and info["expires"] > time.monotonic()

    def _challenge(self, h, name):
        value = f'Bearer realm="{self.realm}",service="{SERVICE}"'
        if name:
            action = "pull" if h.command in ("GET", "HEAD") else "pull,push"
            value += f',scope="repository:{name}:{action}"'
        return value

    def _ratelimit_headers(self):
        if self.ratelimit_limit is None:
            return {}
        return {
            "ratelimit-limit": f"{self.ratelimit_limit};w={RATELIMIT_WINDOW}",
            "ratelimit-remaining": f"{max(self.ratelimit_remaining, 0)};w={RATELIMIT_WINDOW}",
            "docker-ratelimit-source": "127.0.0.1",
        }

    def _take_pull(self):
        """Spend one pull of quota; False when none is left (Hub answers 429)."""
        with self._lock:
            if self.ratelimit_limit is None:
                return True
            if self.ratelimit_remaining <= 0:
                return False
            self.ratelimit_remaining -= 1
            return True

    def _handle_registry(self, h, parsed):
        kind, name, ref = classify(parsed.path)
        entry = {
            "method": h.command,
            "path": parsed.path,
            "status": None,
            "kind": kind,
            "authorized": True,
            "repo": name,
            "ref": ref,
            "user_agent": h.headers.get("User-Agent", ""),
        }
        try:
            if self.require_auth and not self._bearer_ok(h.headers.get("Authorization")):
                entry["authorized"] = False
                entry["status"] = 401
                self._reply(
                    h,
                    401,
                    _error_body("UNAUTHORIZED", "authentication required"),
                    {
                        "Content-Type": "application/json",
                        "Docker-Distribution-Api-Version": "registry/2.0",
                        "WWW-Authenticate": self._challenge(h, name),
                    },
                )
                return
            if kind == "manifest" and self.manifest_status:
                entry["status"] = self.manifest_status
                self._reply(h, self.manifest_status, _error_body("UNAVAILABLE", "stand-in fault"), {"Content-Type": "application/json"})
                return
            if kind == "manifest" and h.command == "GET" and not self._take_pull():
                entry["status"] = 429
                self._reply(
                    h,
                    429,
                    _error_body("TOOMANYREQUESTS", "You have reached your pull rate limit (hub_mirror test stand-in)."),
                    {"Content-Type": "application/json", **self._ratelimit_headers()},
                )
                return
            # Read after the decrement, so a GET sees its own pull counted, like Hub.
            extra = self._ratelimit_headers() if kind == "manifest" else {}
            entry["status"] = self._proxy(h, parsed, extra)
        finally:
            self._record(entry, self.requests)

    def _proxy(self, h, parsed, extra_headers):
        """Forward to the backend registry and stream its answer back; return the status."""
        body = self._read_body(h)
        target = parsed.path + (f"?{parsed.query}" if parsed.query else "")
        conn = http.client.HTTPConnection("127.0.0.1", self.backend.port, timeout=BACKEND_TIMEOUT)
        try:
            try:
                self._send_request(conn, h, target, body)
                resp = conn.getresponse()
            except OSError as exc:
                self._reply(h, 502, _error_body("UNAVAILABLE", f"backend unreachable: {exc}"), {"Content-Type": "application/json"})
                return 502
            self._stream_response(h, resp, extra_headers)
            return resp.status
        finally:
            conn.close()

    @staticmethod
    def _send_request(conn, h, target, body):
        """Send the client's request to the backend, repeated headers kept repeated.

        Clients send one ``Accept`` line per media type; collapsing them into a
        dict would make the registry refuse OCI manifests.
        """
        conn.putrequest(h.command, target, skip_accept_encoding=True)
        for name, value in h.headers.items():
            if name.lower() not in DROP_REQUEST:
                conn.putheader(name, value)
        if body or h.command in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)

    def _stream_response(self, h, resp, extra_headers):
        """Copy status, headers and body from the backend response, in chunks."""
        h.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() in DROP_RESPONSE:
                continue
            if name.lower() == "location":
                value = value.replace(self.backend.url, self.url)
            h.send_header(name, value)
        for name, value in extra_headers.items():
            h.send_header(name, value)
        length = resp.getheader("Content-Length")
        no_body = h.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        if length is not None:
            h.send_header("Content-Length", length)
        elif not no_body:
            # Unknown length: delimit by closing, which every HTTP/1.1 client accepts.
            h.close_connection = True
            h.send_header("Connection", "close")
        h.end_headers()
        if no_body:
            return
        while True:
            chunk = resp.read(STREAM_CHUNK)
            if not chunk:
                break
            h.wfile.write(chunk)
        h.wfile.flush()


# -- a stand-in of a test module's own, stocked with more images ------------------------


def build_images(layout):
    """The images the inspect, cap and fleet tests pull, warm, expire and collect, in one
    OCI layout: {key: what :func:`oci.build_image` / :func:`oci.build_index` made}."""
    return {
        "single": oci.build_image(layout, tag="latest", layer_sizes=(2048, 64 * 1024), seed="single"),
        "other": oci.build_image(layout, tag="other", layer_sizes=(4096,), seed="other"),
        "multi": oci.build_index(layout, tag="multi", layer_sizes=(4096,), seed="multi"),
        "warm": oci.build_image(layout, tag="warm", layer_sizes=(8192, 4096), seed="warm"),
        "warmmulti": oci.build_index(layout, tag="warmmulti", layer_sizes=(3000,), seed="warmmulti"),
        "garbage": oci.build_image(layout, tag="garbage", layer_sizes=(32 * 1024,), seed="garbage"),
        "counted": oci.build_image(layout, tag="counted", layer_sizes=(1024,), seed="counted"),
    }


# Repository: the layout tag it holds (as "latest").
STOCK_REPOS = {
    "library/alpine": "latest",
    "library/busybox": "other",
    "library/multi": "multi",
    "library/warmme": "warm",
    "library/warmmulti": "warmmulti",
    "library/garbage": "garbage",
    "library/counted": "counted",
    # Docker Hub's rate-limit probe repository.
    "ratelimitpreview/test": "other",
}


@contextlib.contextmanager
def stocked_hub(workdir):
    """A stand-in of the caller's own (its own quota and request log) under ``workdir``,
    holding :data:`STOCK_REPOS`, with the tests' credentials; ``.images`` is
    :func:`build_images`'s answer. Stopped on exit."""
    layout = pathlib.Path(workdir) / "layout"
    images = build_images(layout)
    hub = FakeDockerHub(pathlib.Path(workdir) / "hub", username=HUB_USER, token=HUB_TOKEN).start()
    try:
        for repo, tag in STOCK_REPOS.items():
            hub.push_image(layout, tag, repo, dest_tag="latest")
        hub.images = images
        yield hub
    finally:
        hub.stop()
