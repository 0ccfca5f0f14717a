"""
Every rule a ``hub_mirror`` pillar value must pass, and the settings built from a
valid pillar. Each value is allow-listed where it enters; errors name the key and the fix.
"""

import ipaddress
import os
import re
import urllib.parse

from .accounts import ACCOUNT_RE, account_problems
from .checks import (
    PATH_RE,
    Errors,
    check_keys,
    check_path,
    check_text,
    check_url,
    key_part,
    plain,
    show_value,
)
from .clients.validate import mirror_url_problem, validate_client
from .front import seconds
from .net import (
    HOST_RE,
    REDACTED,
    hostport,
    hosts_overlap,
    is_ip,
    is_loopback_host,
    parse_hostport,
    redact_url,
    resolve_host,
)
from .settings import (
    DEFAULT_VERSION,
    DEFAULTS,
    MIRROR_DEFAULTS,
    REDIS_DEFAULTS,
    RELEASE_URL,
    S3_DEFAULTS,
    SECRET_KEYS,
    default_debug_port,
    dialect_of,
    merge,
    mirror_sockets,
    release_arch,
    storage_path,
)
from .units import DIGEST_RE, parse_image, parse_size

# Patterns are used with fullmatch: "$" would also match before a trailing newline.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

_VERSION_RE = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,4})")


_DURATION_RE = re.compile(r"0|([0-9]{1,9}(\.[0-9]{1,9})?(ns|us|ms|s|m|h)){1,6}")

_PACKAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9@+._-]{0,127}")


_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

# HTTP Basic (requests encodes it as latin-1, raising on anything else) and every registry's
# tokens: printable ASCII; a space is a folded YAML scalar, ':' ends a Basic username.
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")

_USERNAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")


# Storage is owned by the service user and emptied by a purge: never one of these trees...
_SYSTEM_TREES = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/lost+found",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/snap",
    "/sys",
    "/usr",
)

# ...nor one of these directories itself (a directory of its own inside them is fine).
_SHARED_DIRS = (
    "/",
    "/data",
    "/media",
    "/mnt",
    "/opt",
    "/srv",
    "/tmp",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/spool",
    "/var/tmp",
)

_LOG_LEVELS = ("error", "warn", "info", "debug")


def _validate_upstream(errors, prefix, mirror, own):
    """The upstream must be a registry's root URL that is not this mirror itself."""
    key = f"{prefix}:upstream"
    upstream = check_url(errors, key, mirror["upstream"], credentials=True)
    if not upstream:
        return
    if upstream.username or upstream.password:
        errors.add(key, "the URL holds credentials", "put them in username and token instead")
    if upstream.path not in ("", "/") or upstream.query or upstream.fragment:
        errors.add(
            key,
            f"{redact_url(mirror['upstream'])!r} has a path or query",
            "give only scheme and host, e.g. https://ghcr.io",
        )
        return
    port = upstream.port or (443 if upstream.scheme == "https" else 80)
    host = resolve_host(upstream.hostname, {})
    for own_host, own_port in own:
        if port == own_port and host and hosts_overlap(host, own_host):
            errors.add(
                key,
                f"{redact_url(mirror['upstream'])!r} is this mirror's own address",
                "point it at the registry to mirror",
            )


def _validate_mirror(errors, name, mirror, version, grains):
    prefix = f"mirrors:{key_part(name)}"
    if not NAME_RE.fullmatch(name):
        errors.add(
            prefix,
            f"{show_value(name)} is not a valid mirror name",
            "use 1-32 lowercase letters, digits, '-' or '_', starting with a letter or digit",
        )
    check_keys(errors, prefix, mirror, MIRROR_DEFAULTS)
    # Only this mirror's type errors stop its checks: other keys' errors are reported too.
    known_before = len(errors.messages)
    for key in MIRROR_DEFAULTS:
        if key in ("warm", "max_size", "s3", "redis"):
            continue  # checked by _validate_cache_keys and _validate_shared_storage
        value = mirror.get(key)
        if key in ("username", "token") and isinstance(value, str):
            value = value.strip()  # as complete_mirror does: a block scalar's newline goes
        check_text(errors, f"{prefix}:{key}", value, secret=key in SECRET_KEYS)
    if len(errors.messages) > known_before:
        return

    bound = {}
    for key in ("listen", "debug_listen"):
        if key == "debug_listen" and not mirror[key]:
            continue
        try:
            host, port = parse_hostport(mirror[key])
        except ValueError:
            errors.add(
                f"{prefix}:{key}",
                f"{show_value(mirror[key])} is not HOST:PORT with a port from 1 to 65535",
                "write e.g. 127.0.0.1:5000, [::1]:5000 or eth0:5000",
            )
            continue
        resolved = resolve_host(host, grains)
        if resolved is None:
            known = ", ".join(sorted((grains.get("ip4_interfaces") or {}).keys())) or "none"
            errors.add(
                f"{prefix}:{key}",
                f"{host!r} is neither an IP address nor an interface of this host",
                f"use an IP address or one of the interfaces: {known}",
            )
        elif key == "debug_listen" and not is_loopback_host(resolved):
            errors.add(
                f"{prefix}:{key}",
                f"{mirror[key]!r} is not a loopback address",
                "the debug listener exposes pprof and metrics: bind it to 127.0.0.1",
            )
        else:
            bound[key] = (resolved, port)
    # Two listeners on one socket: the registry exits at start, so nothing would serve.
    if (
        len(bound) == 2
        and bound["listen"][1] == bound["debug_listen"][1]
        and (hosts_overlap(bound["listen"][0], bound["debug_listen"][0]))
    ):
        errors.add(
            f"{prefix}:debug_listen",
            f"{mirror['debug_listen']!r} is the listen address too",
            "give the debug listener its own port, or remove it for listen port + 10000",
        )
    _validate_upstream(errors, prefix, mirror, bound.values())

    username, token = mirror["username"].strip(), mirror["token"].strip()
    if token and not username:
        errors.add(
            f"{prefix}:token",
            "a token is set without a username",
            f"set hub_mirror:{prefix}:username to the account the token belongs to",
        )
    if username and not token:
        errors.add(
            f"{prefix}:username",
            "a username is set without a token",
            f"set hub_mirror:{prefix}:token (an access token) or remove the username",
        )
    # Not shown: what follows a ':' in a username is usually the token pasted with it.
    if username and not _USERNAME_RE.fullmatch(username):
        errors.add(
            f"{prefix}:username",
            "holds ':', a space or a character outside printable ASCII",
            "give the account name alone",
        )
    if token and not _TOKEN_RE.fullmatch(token):
        errors.add(
            f"{prefix}:token",
            "holds a space or a character outside printable ASCII",
            "paste the token on one line, exactly as the registry issued it",
        )

    if mirror["storage"]:
        check_path(errors, f"{prefix}:storage", mirror["storage"], f"/var/lib/hub-mirror/{name}")

    if mirror["advertise"]:
        problem = mirror_url_problem(mirror["advertise"])
        host = None if problem else urllib.parse.urlsplit(mirror["advertise"]).hostname
        if host and not (HOST_RE.fullmatch(host) or is_ip(host)):
            # Published to the mine and written into every client's config.
            problem = f"{host!r} is not a host name or IP address"
        if problem:
            errors.add(f"{prefix}:advertise", problem, "write it like http://mirror1.example.net:5000")

    if not _is_duration(mirror["ttl"]):
        errors.add(
            f"{prefix}:ttl",
            f"{show_value(mirror['ttl'])} is not a duration",
            "write e.g. 168h, 30m or 0 (never expire)",
        )
    elif dialect_of(version) == "2" and mirror["ttl"] != MIRROR_DEFAULTS["ttl"]:
        errors.add(
            f"{prefix}:ttl",
            f"registry {version} fixes the cache TTL at 168h",
            "remove ttl or use a 3.x version",
        )

    if mirror["log_level"] not in _LOG_LEVELS:
        errors.add(
            f"{prefix}:log_level",
            f"{show_value(mirror['log_level'])} is not a log level",
            f"use one of {', '.join(_LOG_LEVELS)}",
        )
    if mirror["front"] not in ("nginx", "none"):
        errors.add(
            f"{prefix}:front",
            f"{show_value(mirror['front'])} is not a front",
            "use nginx (the default: hits at the disk's speed, one fill per blob) or none",
        )
    if not _is_duration(mirror["manifest_check_interval"]):
        errors.add(
            f"{prefix}:manifest_check_interval",
            f"{show_value(mirror['manifest_check_interval'])} is not a duration",
            "write e.g. 5m, 1h or 0 (ask the upstream on every tag request)",
        )
    elif seconds(mirror["manifest_check_interval"]) and (mirror["front"] != "nginx" or mirror["s3"]):
        errors.add(
            f"{prefix}:manifest_check_interval",
            "needs the front (front: nginx, filesystem storage)",
            "remove manifest_check_interval or use front: nginx",
        )
    listen = bound.get("listen", ("", 0))[0]
    if mirror["front"] == "nginx" and not mirror["s3"] and _nginx_cannot_listen(listen):
        errors.add(
            f"{prefix}:listen",
            f"the front (nginx) cannot listen on {listen!r} (an IPv6 zone or an IPv4-mapped address)",
            "write the plain address, e.g. 127.0.0.1:5000 or [fe80::1]:5000, or set front: none",
        )
    _validate_cache_keys(errors, prefix, mirror)
    _validate_shared_storage(errors, prefix, mirror, version)


# Go's time.Duration is an int64 of nanoseconds: about 2562047h at most.
_MAX_DURATION_S = (2**63 - 1) // 10**9


def _is_duration(value):
    return bool(_DURATION_RE.fullmatch(value)) and seconds(value) <= _MAX_DURATION_S


def _nginx_cannot_listen(host):
    if "%" in host:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.ipv4_mapped is not None


def _validate_shared_storage(errors, prefix, mirror, version):
    for section, defaults in (("s3", S3_DEFAULTS), ("redis", REDIS_DEFAULTS)):
        value = mirror.get(section)
        if not isinstance(value, dict):
            errors.add(f"{prefix}:{section}", "must be a mapping", "see pillar.example")
            return
        check_keys(errors, f"{prefix}:{section}", value, defaults)
        for key, default in defaults.items():
            if key not in value:
                continue
            if not isinstance(value[key], type(default)) or isinstance(value[key], bool) != isinstance(default, bool):
                errors.add(
                    f"{prefix}:{section}:{key}",
                    f"must be a {type(default).__name__}",
                    "see pillar.example",
                )
            elif isinstance(default, str):
                check_text(errors, f"{prefix}:{section}:{key}", value[key], secret=key in ("secretkey", "password"))
    s3, redis = mirror["s3"], mirror["redis"]
    if s3:
        if not s3.get("bucket"):
            errors.add(f"{prefix}:s3:bucket", "is required with s3", "name the bucket")
        elif isinstance(s3["bucket"], str) and not _BUCKET_RE.fullmatch(s3["bucket"]):
            errors.add(
                f"{prefix}:s3:bucket",
                f"{show_value(s3['bucket'])} is not a bucket name",
                "use 3-63 lowercase letters, digits, '.' or '-'",
            )
        if bool(s3.get("accesskey")) != bool(s3.get("secretkey")):
            errors.add(
                f"{prefix}:s3:secretkey",
                "accesskey and secretkey go together",
                "set both, or neither to use the instance's IAM role",
            )
        if s3.get("endpoint"):
            check_url(errors, f"{prefix}:s3:endpoint", s3["endpoint"])
        if isinstance(s3.get("region", ""), str) and not re.fullmatch(r"[a-z0-9-]{0,64}", s3.get("region", "")):
            errors.add(f"{prefix}:s3:region", f"{show_value(s3['region'])} is not a region", "write e.g. us-east-1")
        if isinstance(s3.get("rootdirectory", "/"), str) and not PATH_RE.fullmatch(s3.get("rootdirectory", "/")):
            errors.add(
                f"{prefix}:s3:rootdirectory",
                "is not a key prefix like /mirror",
                "start it with / and use letters, digits and . _ - /",
            )
    if redis:
        try:
            parse_hostport(redis.get("addr", ""))
        except ValueError:
            errors.add(f"{prefix}:redis:addr", "is not HOST:PORT", "write e.g. 127.0.0.1:6379")
        if (
            not isinstance(redis.get("db", 0), int)
            or isinstance(redis.get("db", 0), bool)
            or not 0 <= redis.get("db", 0) < 1 << 16
        ):
            errors.add(f"{prefix}:redis:db", "is not a database number", "use e.g. 0")
        if dialect_of(version) == "2" or mirror["ttl"] != "0":
            errors.add(
                f"{prefix}:redis",
                "the blob descriptor cache serves stale descriptors once TTL expiry deletes "
                "content (clients then get empty bodies)",
                "use registry 3.x with ttl: '0' for a redis-backed pool, or remove redis",
            )


def validate_storage(errors, key, path, lookup, example):
    """Storage is deleted by a purge and owned by the service user: never a system
    directory or anything inside one, judged after resolving ``..`` and symlinks."""
    real = os.path.realpath(path)
    shown = path if real == path else f"{path} (which resolves to {show_value(real)})"
    # A symlink leads anywhere: what reaches the unit file and rm is where it leads.
    if not PATH_RE.fullmatch(real) or any(len(part) > 255 for part in real.split("/")):
        errors.add(key, f"{shown} is not a path of letters, digits and . _ - + @ /", example)
        return
    for system in _SYSTEM_TREES:
        if real == system or real.startswith(system.rstrip("/") + "/"):
            errors.add(
                key,
                f"{shown} is {'a system directory' if real == system else f'inside the system directory {system}'}",
                example,
            )
            return
    if real in _SHARED_DIRS:
        errors.add(key, f"{shown} is a shared system directory", example)
        return
    for name in _LOOKUP_PATHS:
        other = os.path.realpath(lookup[name])
        # The default storage is <state_dir>/<mirror>: inside state_dir is fine, but not in
        # its dot directories (fingerprints, client records). Nothing of hub_mirror's may be
        # inside the storage either: the service user owns its root and could rename a
        # root-owned directory there and put its own unit file or binary in its place.
        if name == "state_dir":
            below = os.path.relpath(real, other) if _nested(real, other) else ""
            clash = _nested(other, real) or below.startswith(".")
        else:
            clash = _nested(real, other) or _nested(other, real)
        if clash:
            errors.add(key, f"{shown} overlaps lookup:{name} ({lookup[name]})", "give the cache a directory of its own")
            return


# The lookup keys that name a path of hub_mirror's own.
_LOOKUP_PATHS = (
    "prefix",
    "config_dir",
    "state_dir",
    "log_dir",
    "run_dir",
    "unit_dir",
    "init_dir",
    "package_binary",
    "front_binary",
)


def _nested(inner, outer):
    """Whether ``inner`` is ``outer`` or inside it (absolute, resolved paths)."""
    return (inner.rstrip("/") + "/").startswith(outer.rstrip("/") + "/")


def _validate_lookup(errors, lookup):
    check_keys(errors, "lookup", lookup, DEFAULTS["lookup"])
    for name in _LOOKUP_PATHS:
        if name in lookup and check_path(errors, f"lookup:{name}", lookup[name]) == "/":
            errors.add(f"lookup:{name}", "is /", "give a directory of its own")
    for name in ("package", "package_service", "front_package", "front_service"):
        if name in lookup:
            check_text(
                errors, f"lookup:{name}", lookup[name], pattern=_PACKAGE_RE, fix="give a package or service name"
            )
    for name, example in (("package_service", "docker-registry"), ("front_service", "nginx")):
        service = lookup.get(name, "")
        if isinstance(service, str) and (service.startswith("hub-mirror") or service.endswith(".service")):
            # Stopped and disabled when hub_mirror installs its package: never a mirror's own.
            errors.add(f"lookup:{name}", f"{service!r} is not a package's own service", f"write e.g. {example}")
    if lookup.get("supervisor", "") not in ("", "systemd", "sysv"):
        errors.add("lookup:supervisor", "must be systemd, sysv or empty", "remove it to detect")
    user, group = (
        check_text(
            errors,
            f"lookup:{key}",
            lookup.get(key, DEFAULTS["lookup"][key]),
            pattern=ACCOUNT_RE,
            fix="use a name like hub-mirror",
        )
        for key in ("user", "group")
    )
    if user and group:
        for key, problem in account_problems(user, group):
            errors.add(key, problem, "use a dedicated account hub_mirror creates, e.g. hub-mirror (the default)")


# Deeper than any value pillar.example has (5): copy.deepcopy and repr recurse, and a few
# hundred levels (or a YAML alias that contains itself) are a RecursionError. Aliases also
# multiply: nine levels of ten make a billion values.
MAX_DEPTH = 16

_MAX_VALUES = 100000


def too_deep(value, limit=MAX_DEPTH):
    """The key path to the first value nested more than ``limit`` levels deep (or past
    ``_MAX_VALUES`` values in all), or None."""
    stack, seen = [(value, [])], 0
    while stack:
        item, path = stack.pop()
        seen += 1
        if len(path) > limit or seen > _MAX_VALUES:
            return path
        if isinstance(item, dict):
            stack.extend((sub, path + [key]) for key, sub in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((sub, path + [index]) for index, sub in enumerate(item))
    return None


def _validate(raw, grains):
    errors = Errors()
    if not isinstance(raw, dict):
        errors.add("", f"must be a mapping, got {type(raw).__name__}", "see pillar.example")
        errors.raise_if_any()
    deep = too_deep(raw)
    if deep:
        errors.add(
            ":".join(key_part(plain(key)) for key in deep[:3]),
            f"is nested more than {MAX_DEPTH} levels deep, or holds more than {_MAX_VALUES} values",
            "see pillar.example for the shape of each key",
        )
        errors.raise_if_any()
    check_keys(errors, "", raw, list(DEFAULTS) + ["client"])

    version = raw.get("version", DEFAULT_VERSION)
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        errors.add(
            "version",
            f"{show_value(version)} is not a release version like '3.0.0'",
            "quote it in YAML (3.0 unquoted is a number) and give all three parts",
        )
        version = DEFAULT_VERSION

    install = raw.get("install", {})
    if not isinstance(install, dict):
        errors.add("install", "must be a mapping", "see pillar.example")
        install = {}
    check_keys(errors, "install", install, DEFAULTS["install"])
    method = install.get("method", "archive")
    if method not in ("archive", "package"):
        errors.add("install:method", f"{show_value(method)} is not supported", "use archive or package")
    source = install.get("source", RELEASE_URL)
    check_url(errors, "install:source", source, ("http", "https", "file"), credentials=True, placeholders=True)
    source_hash = install.get("source_hash", "")
    if not isinstance(source_hash, str) or (
        source_hash and not DIGEST_RE.fullmatch(source_hash) and not re.match(r"(https?|file)://", source_hash)
    ):
        errors.add(
            "install:source_hash",
            f"{show_value(redact_url(source_hash))} is neither a sha256 digest nor a URL",
            "give 64 hex digits (optionally 'sha256:' first) or the URL of a .sha256 file",
        )
    elif source_hash and not DIGEST_RE.fullmatch(source_hash):
        check_url(
            errors, "install:source_hash", source_hash, ("http", "https", "file"), credentials=True, placeholders=True
        )

    probe_timeout = raw.get("probe_timeout", DEFAULTS["probe_timeout"])
    if not isinstance(probe_timeout, (int, float)) or isinstance(probe_timeout, bool) or not (0 < probe_timeout <= 600):
        errors.add("probe_timeout", f"{show_value(probe_timeout)} is not a number of seconds", "use e.g. 30")

    clean = raw.get("clean", {})
    if not isinstance(clean, dict) or not isinstance(clean.get("purge_storage", False), bool):
        errors.add("clean:purge_storage", "must be true or false", "see pillar.example")
    elif clean:
        check_keys(errors, "clean", clean, DEFAULTS["clean"])

    lookup = raw.get("lookup", {})
    if not isinstance(lookup, dict):
        errors.add("lookup", "must be a mapping", "see pillar.example")
        lookup = {}
    known_before = len(errors.messages)
    _validate_lookup(errors, lookup)
    lookup = merge(DEFAULTS["lookup"], lookup) if len(errors.messages) == known_before else None

    mirrors = raw.get("mirrors", DEFAULTS["mirrors"])
    if not isinstance(mirrors, dict) or not mirrors:
        errors.add("mirrors", "must be a non-empty mapping of mirror names", "see pillar.example")
        mirrors = {}
    sockets, storages = [], {}
    for name, mirror in mirrors.items():
        if not isinstance(name, str):
            errors.add(f"mirrors:{show_value(name)}", f"the mirror name is a {type(name).__name__}", "quote it in YAML")
            continue
        mirror = mirror if mirror is not None else {}
        if not isinstance(mirror, dict):
            errors.add(f"mirrors:{key_part(name)}", "must be a mapping", "see pillar.example")
            continue
        mirror = merge(MIRROR_DEFAULTS, mirror)
        known_before = len(errors.messages)
        _validate_mirror(errors, name, mirror, version, grains)
        for key, host, port in mirror_sockets(mirror, grains):
            for other, other_key, other_host, other_port in sockets:
                if other != name and port == other_port and hosts_overlap(host, other_host):
                    errors.add(
                        f"mirrors:{key_part(name)}:{key}",
                        f"{hostport(host, port)} is also mirror {show_value(other)}'s {other_key}",
                        "give each mirror its own port (debug_listen defaults to listen + 10000)",
                    )
            sockets.append((name, key, host, port))
        if lookup is None or len(errors.messages) > known_before or mirror["s3"]:
            continue
        validate_storage(
            errors,
            f"mirrors:{name}:storage",
            mirror["storage"] or os.path.join(lookup["state_dir"], name),
            lookup,
            f"write e.g. /var/lib/hub-mirror/{name}",
        )
        storage = storage_path(mirror, lookup, name)
        for other, other_storage in storages.items():
            if _nested(storage, other_storage) or _nested(other_storage, storage):
                errors.add(
                    f"mirrors:{name}:storage",
                    f"{storage!r} overlaps mirror {other!r}'s storage {other_storage!r}",
                    "give each mirror its own storage, neither inside the other",
                )
        storages[name] = storage
    validate_client(errors, raw.get("client"))
    errors.raise_if_any()


def complete_mirror(name, mirror, lookup, grains):
    mirror = merge(MIRROR_DEFAULTS, mirror)
    mirror["name"] = name
    # A token pasted as a YAML block scalar (``token: |``) ends in a newline that every
    # upstream login would then send.
    mirror["username"], mirror["token"] = mirror["username"].strip(), mirror["token"].strip()
    host, port = parse_hostport(mirror["listen"])
    mirror["listen_host"] = resolve_host(host, grains)
    mirror["listen_port"] = port
    if mirror["debug_listen"]:
        debug_host, debug_port = parse_hostport(mirror["debug_listen"])
        mirror["debug_listen"] = hostport(resolve_host(debug_host, grains), debug_port)
    else:
        mirror["debug_listen"] = f"127.0.0.1:{default_debug_port(port)}"
    mirror["storage"] = storage_path(mirror, lookup, name)
    if mirror["s3"]:
        mirror["s3"] = merge(S3_DEFAULTS, mirror["s3"])
    if mirror["redis"]:
        mirror["redis"] = merge(REDIS_DEFAULTS, mirror["redis"])
    return mirror


def _validate_cache_keys(errors, prefix, mirror):
    """The per-mirror keys for operating the cache: ``warm`` and ``max_size``."""
    warm = mirror.get("warm")
    if not isinstance(warm, list):
        errors.add(
            f"{prefix}:warm",
            f"must be a list of images, got {type(warm).__name__}",
            "write e.g. warm: [library/alpine:3.20, library/python:3.12-slim]",
        )
    else:
        for index, image in enumerate(warm):
            try:
                parse_image(image, mirror.get("upstream") or MIRROR_DEFAULTS["upstream"])
            except ValueError as exc:
                errors.add(f"{prefix}:warm:{index}", str(exc), "write NAME[:TAG] or NAME@sha256:DIGEST")
    try:
        # A 64-bit count at most: Salt's msgpack cannot carry a larger int in a job return.
        if (parse_size(mirror.get("max_size")) or 0) >= 1 << 63:
            raise ValueError(mirror.get("max_size"))
    except ValueError:
        errors.add(
            f"{prefix}:max_size",
            f"{show_value(mirror.get('max_size'))} is not a size",
            "write e.g. 50G, 500M or a number of bytes; empty for no cap",
        )


def load(raw, grains, redact):
    """The settings from the raw ``hub_mirror`` pillar: validated, merged over the
    defaults, each mirror completed; ``redact=False`` only for code that writes the 0600
    files."""
    _validate(raw, grains)
    merged = merge(DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    merged["mirrors"] = {}
    for name, mirror in (raw.get("mirrors") or DEFAULTS["mirrors"]).items():
        merged["mirrors"][name] = complete_mirror(name, mirror or {}, merged["lookup"], grains)
    merged["arch"] = release_arch(grains)
    if redact:
        for key in ("source", "source_hash"):
            merged["install"][key] = redact_url(merged["install"][key])
        for mirror in merged["mirrors"].values():
            mirror["token"] = REDACTED if mirror["token"] else ""
            for section, key in (("s3", "secretkey"), ("redis", "password")):
                if mirror[section].get(key):
                    mirror[section][key] = REDACTED
    return merged
