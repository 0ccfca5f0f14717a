"""
The mirror's front: nginx from the distribution, run by the mirror's supervisor as the
service user on the mirror's listen address, with the registry behind it on a unix socket.

Why (measured; docs/architecture.md, "The front"):

- The registry does not coalesce: in 2.8 and through 3.1 every request for a blob that is
  still being fetched copies it from the upstream again and stores nothing. nginx's
  ``proxy_cache_lock`` lets one request per digest through and makes the others wait for
  it, so N clients pulling one cold image cost one fill per blob. Waiting clients get their
  first byte when the fill ends (nginx cannot stream a fill to a waiter), and nginx looks
  again every 500 ms.
- A cached blob is a file named by its digest
  (``docker/registry/v2/blobs/sha256/<2>/<64>/data``, written under another name and
  renamed into place once complete): nginx serves it with ``sendfile``, at the disk's
  speed and without the registry's CPU.
- Everything else (tags, catalog, the registry's errors, pushes it refuses) goes to the
  registry unchanged.

S3 mirrors run without a front: their blobs are not local files. Pillar ``front: none``
turns it off for a mirror.
"""

import math
import os
import re
import shutil
import stat
import subprocess
import tempfile
from decimal import Decimal

from salt.exceptions import CommandExecutionError

from .fsutil import write_atomic
from .net import hostport
from .programs.supervise import parse_totals, tally
from .units import size_report

# Inside the storage: the only directory the hardened unit lets the service write.
FRONT_DIR = ".hub-mirror-front"

# Relative to the front's directory, the registry's and nginx's working directory: a unix
# socket's path is limited to 107 bytes and the storage path is the user's to choose.
SOCKET = "registry.sock"

HITS_LOG = "hits.log"
HITS_TOTALS = "hits.json"

# How long a client may wait for another's fill of the same blob (nginx's default is 5 s,
# after which the waiter fetches on its own and stores nothing): a big layer over a slow
# link takes minutes.
LOCK_WAIT = "15m"

_GO_UNITS = {"ns": Decimal("1e-9"), "us": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": 1, "m": 60, "h": 3600}


def enabled(spec):
    return spec.get("front") == "nginx" and not spec["s3"]


def front_dir(spec):
    return os.path.join(spec["storage"], FRONT_DIR)


def seconds(duration):
    """Whole seconds (rounded up) of a validated Go duration such as ``90s`` or ``1h30m``."""
    # Decimal, not float: 8.3m is 498 s, not 499.
    parts = re.findall(r"([0-9.]+)(ns|us|ms|s|m|h)", duration)
    total = sum(Decimal(number) * _GO_UNITS[unit] for number, unit in parts)
    return math.ceil(total)


# A tag asked by many clients at once is asked of the registry once (which asks the
# upstream: a HEAD, and a counted GET on a cold cache); the others share its answer, which
# the front then keeps for manifest_check_interval, and for at least this long.
TAG_ANSWER_MIN = 1

CONF_TEMPLATE = """\
# Managed by Salt (hub_mirror mirror {name}). Local changes are overwritten.
# The front of the registry: hits as files, one fill per digest, the rest proxied.
worker_processes {workers};
pid nginx.pid;
error_log stderr warn;
events {{
    # Within the 1024 open files a service gets by default (a proxied client takes two).
    worker_connections 512;
}}
http {{
    server_tokens off;
    access_log off;
    sendfile on;
    tcp_nopush on;
    types {{ }}
    default_type application/octet-stream;
    client_body_temp_path temp/body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    # A blob: "-" for a file served, HIT for a waiter served from another's fill, MISS for
    # a fill. A manifest: HIT when the front answered it without the registry.
    log_format blobs 'blob $upstream_cache_status $status $body_bytes_sent';
    log_format manifests 'manifest $upstream_cache_status $status $body_bytes_sent';
    # Transient: each fill lands here too (the registry keeps its own copy), so waiting
    # clients are served from it; gone 10 s after its last reader began (a reader keeps
    # its open file), so a finished fill holds the disk twice only briefly.
    proxy_cache_path fill levels=1:2 keys_zone=fill:4m max_size=4g min_free=1g inactive=10s use_temp_path=off;
    # Manifests (small): kept as long as manifest_check_interval asks, idle or not; off
    # the storage (the supervisor links it to a private directory under /tmp), so that a
    # full storage does not cut cached manifests.
    proxy_cache_path manifests levels=1:2 keys_zone=manifests:2m max_size=256m inactive=7d use_temp_path=off;
    upstream registry {{
        server unix:{socket};
        keepalive 16;
    }}
    server {{
        listen {listen}{listen_options};{listen_v6}
        # Pushes go to the registry, which refuses them in proxy mode: it answers them.
        client_max_body_size 0;
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_read_timeout 10m;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_ignore_headers Cache-Control Expires Set-Cookie
                             X-Accel-Expires X-Accel-Buffering X-Accel-Redirect X-Accel-Limit-Rate X-Accel-Charset;
        proxy_cache_convert_head off;
        # Where a cache lock is on: how long a client may wait for another's fill.
        proxy_cache_lock_timeout {lock_wait};
        proxy_cache_lock_age {lock_wait};
        location / {{
            proxy_pass http://registry;
        }}
        location ~ "^/v2/.+/blobs/sha256:(?<d2>[0-9a-f]{{2}})(?<d62>[0-9a-f]{{62}})$" {{
            root {blobs};
            try_files /$d2/$d2$d62/data @fill;
            # A file answers GET and HEAD; the registry answers the rest (it refuses them).
            error_page 405 = @registry;
            access_log {hits_log} blobs;
            etag off;
            add_header Docker-Content-Digest sha256:$d2$d62;
            add_header Docker-Distribution-Api-Version registry/2.0;
            add_header ETag "\\"sha256:$d2$d62\\"";
            add_header Cache-Control "max-age=31536000";
            add_header X-Content-Type-Options nosniff;
        }}
        location @registry {{
            proxy_pass http://registry;
        }}
        location @fill {{
            proxy_pass http://registry;
            proxy_buffering on;
            proxy_cache fill;
            proxy_cache_key "$request_method sha256:$d2$d62";
            proxy_cache_valid 200 1m;
            proxy_cache_lock on;
            # A client that goes away does not abort the fill the others wait for.
            proxy_ignore_client_abort on;
            access_log {hits_log} blobs;
        }}
        # By digest a manifest never changes: concurrent requests share one fetch. The
        # registry answers by the Accept headers, of which nginx 1.22 sees only the first
        # line ($http_accept): the User-Agent (a client's version and, for docker, its arch)
        # keeps clients that may accept other types apart.
        location ~ "^/v2/.+/manifests/sha256:[0-9a-f]{{64}}$" {{
            proxy_pass http://registry;
            proxy_buffering on;
            proxy_cache manifests;
            proxy_cache_key "$request_method $uri $http_accept $http_user_agent";
            proxy_cache_valid 200 1m;
            proxy_cache_lock on;
            proxy_ignore_client_abort on;
            access_log {hits_log} manifests;
        }}
        # A tag's answer is kept {tag_valid}s; a stale one serves while the registry fails
        # (429 and 5xx from the upstream the registry answers itself, from the cache).
        location ~ "^/v2/.+/manifests/[^/]+$" {{
            proxy_pass http://registry;
            proxy_buffering on;
            proxy_cache manifests;
            proxy_cache_key "$request_method $uri $http_accept $http_user_agent";
            proxy_cache_valid 200 {tag_valid}s;
            proxy_cache_lock on;
            proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
            access_log {hits_log} manifests;
        }}
    }}
}}
"""

_NGINX_SAFE = re.compile(r"[A-Za-z0-9._@+/:\[\]-]+")


def _safe(value, key):
    """Values written into nginx's config carry no quote, space, ``;``, brace or ``$``:
    validation allow-lists them already; this keeps a future caller honest."""
    if not _NGINX_SAFE.fullmatch(value):
        raise CommandExecutionError(f"{key}: {value!r} cannot go into the front's config")
    return value


def render_conf(spec):
    """nginx's config for the front of a completed mirror ``spec`` (paths relative to the
    front's directory, nginx's prefix)."""
    host = spec["listen_host"]
    interval = seconds(spec.get("manifest_check_interval") or "0")
    # Go's registry listened on both families for 0.0.0.0 and for ::; so does the front
    # (IPv6 where the host has it: nginx would not start without).
    both = host == "0.0.0.0" and os.path.exists("/proc/net/if_inet6")
    return CONF_TEMPLATE.format(
        name=spec["name"],
        workers=min(os.cpu_count() or 1, 4),
        socket=SOCKET,
        listen=_safe(hostport(host, spec["listen_port"]), "listen"),
        listen_options=" ipv6only=off" if host == "::" else "",
        listen_v6=f"\n        listen [::]:{spec['listen_port']} ipv6only=on;" if both else "",
        blobs=_safe(os.path.join(spec["storage"], "docker/registry/v2/blobs/sha256"), "storage"),
        hits_log=HITS_LOG,
        lock_wait=LOCK_WAIT,
        tag_valid=max(interval, TAG_ANSWER_MIN),
    )


# The supervisor folds the log at 1 MB: more is no log of ours.
_LOG_LIMIT = 4 << 20


def _read_own(directory_fd, name):
    """The text of ``name`` in the front's directory, opened without following a symlink
    (the service user owns the directory; root reads it) and read up to a limit."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory_fd)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return ""
        return handle.read(_LOG_LIMIT).decode("ascii", errors="replace")


def counters(spec):
    """What the front served itself since the cache began, which the registry never saw:
    blob files, waiters served from another's fill, manifests from its own cache, and
    their bytes."""
    totals = {}
    try:
        directory_fd = os.open(front_dir(spec), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        directory_fd = None
    if directory_fd is not None:
        try:
            totals = parse_totals(_read_own(directory_fd, HITS_TOTALS))
            for name in (HITS_LOG + ".1", HITS_LOG):
                tally(_read_own(directory_fd, name).splitlines(), totals)
        finally:
            os.close(directory_fd)
    return {
        "blob_files": totals.get("files", 0),
        "coalesced": totals.get("coalesced", 0),
        "manifests": totals.get("manifests", 0),
        "served": size_report(totals.get("bytes", 0)),
    }


def check_conf(binary, text, user_kwargs):
    """nginx's own check (``nginx -t``) of the front's config ``text``, run as the service
    user (``user_kwargs`` for subprocess) in a private prefix: a config, or an upgraded
    nginx, that the front cannot run is found while the running front still serves. The
    error, or None.

    The listen address is left to the start itself (and to the rollback when it fails):
    ``nginx -t`` binds it, and the service may bind where the check may not (systemd gives
    it CAP_NET_BIND_SERVICE below port 1024). The check listens on sockets of its own."""
    sockets = iter(range(1 << 16))
    text = re.sub(r"(?m)^( *)listen [^;]*;", lambda line: f"{line.group(1)}listen unix:{next(sockets)}.sock;", text)
    prefix = tempfile.mkdtemp(prefix="hub-mirror-front-check-")
    try:
        # Everything is made while the prefix is root's alone, and handed over last, links
        # not followed: the service user could otherwise put a link where root chowns.
        temp = os.path.join(prefix, "temp")
        os.mkdir(temp, 0o700)
        conf_path = os.path.join(prefix, "front.conf")
        write_atomic(conf_path, text, 0o600, user_kwargs.get("user", -1), user_kwargs.get("group", -1))
        if "user" in user_kwargs:
            for path in (temp, prefix):
                os.chown(path, user_kwargs["user"], user_kwargs["group"], follow_symlinks=False)
        try:
            proc = subprocess.run(
                [binary, "-t", "-q", "-c", conf_path, "-p", prefix + "/", "-e", "stderr"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env={},
                cwd=prefix,  # where the check's own sockets are
                **user_kwargs,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return str(exc)
    finally:
        _remove_as(prefix, user_kwargs)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit status {proc.returncode}")


def _remove_as(path, user_kwargs):
    """Remove ``path``, a tree the service user wrote in, as that user: root walking it
    could be held up (a FIFO swapped in) or sent too deep."""
    if "user" not in user_kwargs:
        shutil.rmtree(path, ignore_errors=True)
        return
    subprocess.run(["/bin/rm", "-rf", "--", path], capture_output=True, timeout=60, check=False, env={}, **user_kwargs)


def install(conf, pkg_version, pkg_install, supervisor, test=False):
    """Install nginx where a mirror has a front and it is missing. The distribution's own
    nginx service (a welcome page on port 80) is not started (see
    ``release.install``), and disabled; an nginx that was there before is left alone."""
    package = conf["lookup"]["front_package"]
    if os.path.exists(conf["lookup"]["front_binary"]) or pkg_version(package):
        return {}
    if test:
        return {"front": {"old": "", "new": f"{package} (its own service stopped and disabled)"}}
    result = pkg_install(package, refresh=True)
    current = pkg_version(package)
    if not current or not os.path.exists(conf["lookup"]["front_binary"]):
        raise CommandExecutionError(
            f"installing package {package} failed: {result}; install it, set lookup:front_binary "
            "to its nginx, or set front: none on each mirror"
        )
    supervisor.package_disable(conf["lookup"]["front_service"])
    return {"front": {"old": "", "new": f"{package} {current}, its own service stopped and disabled"}}
