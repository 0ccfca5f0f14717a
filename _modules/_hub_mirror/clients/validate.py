"""
The ``hub_mirror:client`` pillar: its defaults and rules.
"""

import ipaddress
import os
import unicodedata
import urllib.parse

from ..checks import check_keys
from ..settings import merge
from .render import MIRROR_HOST_RE, REGISTRY_HOST_RE, RUNTIMES, URL_FORBIDDEN

# The client side runs on build hosts and VMs that may not run a mirror themselves. It
# never fails a run because a mirror is down: it configures only mirrors that answer now,
# takes out the ones that stopped answering, and reports per runtime what it did.
#
# Every file it touches is recorded under <state_dir>/.client (0700): whether the file
# existed, its original bytes and a digest of what hub_mirror last wrote. A file still
# holding exactly what hub_mirror wrote gets its original bytes back; one the user has
# edited since loses only hub_mirror's part (a daemon.json key, a marked block, or
# hub_mirror's endpoints in a registries.yaml).

CLIENT_RUNTIMES = tuple(RUNTIMES)

CLIENT_DEFAULTS = {
    # Upstream registry host -> mirror URLs, in preference order.
    "mirrors": {},
    # Take the mirrors from the Salt mine (DISCOVER_DEFAULTS); empty: only "mirrors".
    "discover": {},
    "runtimes": list(CLIENT_RUNTIMES),
    # A mirror on the LAN answers in milliseconds; this bounds what a dead one costs.
    "probe_timeout": 2,
    # A CA bundle for https mirrors signed by a private CA: the probe verifies with it,
    # and containerd and buildkit get it for those mirrors.
    "ca_file": "",
    # Seconds: re-probe the mirrors at most this far apart from a Salt schedule entry
    # (client_recheck) and take a dead one out of every client without a state run.
    # 0: no schedule.
    "recheck": 0,
    "paths": {
        "docker_daemon_json": "/etc/docker/daemon.json",
        "docker_pidfile": "/var/run/docker.pid",
        "docker_socket": "/var/run/docker.sock",
        "containerd_config": "/etc/containerd/config.toml",
        "containerd_certs_d": "/etc/containerd/certs.d",
        "registries_conf": "/etc/containers/registries.conf",
        "registries_conf_d": "/etc/containers/registries.conf.d",
        "buildkitd_toml": "/etc/buildkit/buildkitd.toml",
        "k3s_registries": "/etc/rancher/k3s/registries.yaml",
        "rke2_registries": "/etc/rancher/rke2/registries.yaml",
        # Where docker.service and its drop-ins may be (first match wins, as in systemd).
        "systemd_units": (
            "/etc/systemd/system:/run/systemd/system:/usr/local/lib/systemd/system:"
            "/usr/lib/systemd/system:/lib/systemd/system"
        ),
        "docker_default": "/etc/default/docker",
    },
}

DISCOVER_DEFAULTS = {
    # The mirror hosts whose mine to read, e.g. 'G@role:mirror and G@zone:a'.
    "tgt": "",
    "tgt_type": "glob",
    # The mine function (or alias) the mirror hosts publish hub_mirror.endpoint under.
    "function": "hub_mirror.endpoint",
    # A grain such as zone: mirror hosts with this host's value come first.
    "same_grain": "",
    # Minion ids that come first, in this order (before the same_grain matches).
    "prefer": [],
}

# The target types the master's mine lookup understands.
DISCOVER_TGT_TYPES = (
    "glob",
    "pcre",
    "list",
    "grain",
    "grain_pcre",
    "pillar",
    "pillar_pcre",
    "pillar_exact",
    "ipcidr",
    "compound",
    "nodegroup",
)

# The shortest recheck interval: each run probes every mirror, and one that hangs costs
# probe_timeout.
RECHECK_MIN = 5


def validate_client(errors, client):
    """Validate ``hub_mirror:client``; called from ``_validate``."""
    if client is None:
        return
    if not isinstance(client, dict):
        errors.add("client", f"must be a mapping, got {type(client).__name__}", "see pillar.example")
        return
    check_keys(errors, "client", client, CLIENT_DEFAULTS)

    mirrors = client.get("mirrors") or {}
    if not isinstance(mirrors, dict):
        errors.add(
            "client:mirrors",
            "must map an upstream registry host to mirror URLs",
            "write e.g. {docker.io: ['http://192.168.128.1:5000']}",
        )
        mirrors = {}
    for upstream, urls in mirrors.items():
        key = f"client:mirrors:{upstream}"
        if not isinstance(upstream, str) or not REGISTRY_HOST_RE.fullmatch(upstream):
            errors.add(
                key,
                f"{upstream!r} is not a registry host",
                "use the host images are pulled from, e.g. docker.io, ghcr.io or quay.io",
            )
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not urls:
            errors.add(
                key,
                "must be a mirror URL or a non-empty list of them",
                "write e.g. ['http://192.168.128.1:5000']",
            )
            continue
        for url in urls:
            problem = mirror_url_problem(url)
            if problem:
                errors.add(key, problem, "write it like http://192.168.128.1:5000 (scheme, host, port only)")
        if len({str(url).rstrip("/") for url in urls}) != len(urls):
            errors.add(key, "lists a mirror twice", "list each mirror once, in preference order")

    runtimes = client.get("runtimes", CLIENT_DEFAULTS["runtimes"])
    if not isinstance(runtimes, list) or any(r not in CLIENT_RUNTIMES for r in runtimes):
        errors.add(
            "client:runtimes",
            f"{runtimes!r} is not a list of known runtimes",
            f"use a list of: {', '.join(CLIENT_RUNTIMES)}",
        )

    discover = client.get("discover") or {}
    if not isinstance(discover, dict):
        errors.add(
            "client:discover",
            f"must be a mapping, got {type(discover).__name__}",
            "write e.g. {tgt: 'G@role:mirror', tgt_type: compound}",
        )
    elif discover:
        _validate_discover(errors, discover)

    timeout = client.get("probe_timeout", CLIENT_DEFAULTS["probe_timeout"])
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= 60:
        errors.add(
            "client:probe_timeout",
            f"{timeout!r} is not a number of seconds from 0 to 60",
            "use e.g. 2: a mirror that answers at all answers in milliseconds",
        )

    ca_file = client.get("ca_file") or ""
    problem = _ca_file_problem(ca_file) if ca_file else None
    if problem:
        errors.add(
            "client:ca_file",
            problem,
            "give the absolute path of the PEM bundle that signed the https mirrors, or leave it out",
        )

    recheck = client.get("recheck", CLIENT_DEFAULTS["recheck"])
    if (
        not isinstance(recheck, int)
        or isinstance(recheck, bool)
        or not (recheck == 0 or RECHECK_MIN <= recheck <= 86400)
    ):
        errors.add(
            "client:recheck",
            f"{recheck!r} is not 0 or a whole number of seconds from {RECHECK_MIN} to 86400",
            "use e.g. 60 (a dead mirror is out of every client within a minute), or 0 for no schedule",
        )

    paths = client.get("paths") or {}
    if not isinstance(paths, dict):
        errors.add("client:paths", "must be a mapping", "see pillar.example")
        return
    check_keys(errors, "client:paths", paths, CLIENT_DEFAULTS["paths"])
    for name, value in paths.items():
        if name in CLIENT_DEFAULTS["paths"] and (
            not isinstance(value, str)
            or not all(os.path.isabs(part) for part in value.split(":"))
            or any(unicodedata.category(c)[0] == "C" for c in value)
            or (":" in value and name != "systemd_units")
        ):
            errors.add(
                f"client:paths:{name}",
                f"{value!r} is not an absolute path",
                f"write e.g. {CLIENT_DEFAULTS['paths'][name]}",
            )


def _validate_discover(errors, discover):
    check_keys(errors, "client:discover", discover, DISCOVER_DEFAULTS)
    tgt = discover.get("tgt")
    if not isinstance(tgt, str) or not tgt.strip():
        errors.add(
            "client:discover:tgt",
            "is required: the mirror hosts whose mine to read",
            "write e.g. 'G@role:mirror' with tgt_type: compound",
        )
    tgt_type = discover.get("tgt_type", DISCOVER_DEFAULTS["tgt_type"])
    if tgt_type not in DISCOVER_TGT_TYPES:
        errors.add(
            "client:discover:tgt_type",
            f"{tgt_type!r} is not a target type the mine understands",
            f"use one of: {', '.join(DISCOVER_TGT_TYPES)}",
        )
    function = discover.get("function", DISCOVER_DEFAULTS["function"])
    if not isinstance(function, str) or not function.strip() or "," in function:
        errors.add(
            "client:discover:function",
            f"{function!r} is not the name of one mine function",
            "use hub_mirror.endpoint, or the alias mine_functions publishes it under",
        )
    same_grain = discover.get("same_grain", "")
    if not isinstance(same_grain, str):
        errors.add(
            "client:discover:same_grain",
            f"{same_grain!r} is not a grain name",
            "write e.g. zone (or a nested one like location:rack)",
        )
    prefer = discover.get("prefer", [])
    if not isinstance(prefer, list) or not all(isinstance(minion, str) for minion in prefer):
        errors.add(
            "client:discover:prefer",
            f"{prefer!r} is not a list of minion ids",
            "write e.g. [mirror1.example.net, mirror2.example.net]",
        )


def _host_problem(host):
    """Why ``host`` (a URL's host, IPv6 in brackets) is no registry host every runtime's
    reference grammar accepts, or None."""
    if host.startswith("["):
        try:
            # No zone (fe80::1%eth0): no runtime's config takes one.
            ipaddress.IPv6Address(host[1:-1] if host.endswith("]") and "%" not in host else "x")
        except ValueError:
            return "is not a bracketed IPv6 address"
        return None
    if not host.isascii():
        try:
            ascii_form = host.encode("idna").decode("ascii")
        except UnicodeError:
            return "is not a host name"
        # Docker's and containers/image's reference grammars take ASCII host names only.
        return f"is not ASCII: write its IDNA form {ascii_form}"
    if not MIRROR_HOST_RE.fullmatch(host):
        return "is not a host name or IP address"
    return None


def mirror_url_problem(url):
    """Why ``url`` cannot be a mirror for every runtime, or None. Applied to every source
    of a mirror URL (pillar, the mine, a mirror's ``advertise``): what passes here is
    written into JSON, TOML and YAML and parsed by each runtime's reference grammar."""
    if not isinstance(url, str):
        return f"{url!r} is not a URL"
    if "@" in url:
        # Not echoed: the part before the @ may be a password.
        return "a mirror URL holds credentials (not shown here)"
    # urllib silently drops tab/CR/LF, so check the raw text: a newline in a mirror
    # makes dockerd refuse daemon.json and TOML files invalid.
    bad = [c for c in url if unicodedata.category(c)[0] in "CZ" or c in URL_FORBIDDEN]
    if bad:
        return f"{url!r} holds {bad[0]!r}, which no runtime's config takes in a mirror URL"
    try:
        parsed = urllib.parse.urlparse(url)
    except ValueError:
        # e.g. brackets that hold no IPv6 address
        return f"{url!r} is not a URL"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{url!r} is not an absolute http or https URL"
    try:
        _ = parsed.port  # raises ValueError: port out of range
    except ValueError:
        return f"{url!r} has an invalid port"
    # Docker's registry-mirrors and buildkit's mirrors take a host, nothing more.
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment or parsed.params:
        return f"{url!r} has a path"
    host = parsed.netloc.rsplit(":", 1)[0] if parsed.port is not None else parsed.netloc
    problem = _host_problem(host)
    if problem:
        return f"{url!r}: its host {problem}"
    return None


def _ca_file_problem(path):
    if not isinstance(path, str) or not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if any(unicodedata.category(c)[0] == "C" for c in path):
        return f"{path!r} holds a control character"
    if not os.path.isfile(path):
        return f"{path} does not exist on this host"
    return None


def client_conf(conf):
    """The completed ``client`` settings: defaults, URL lists, the record directory."""
    raw = conf.get("client") or {}
    client = merge(CLIENT_DEFAULTS, {k: v for k, v in raw.items() if k != "mirrors"})
    client["mirrors"] = {
        upstream: [url.rstrip("/") for url in ([urls] if isinstance(urls, str) else urls)]
        for upstream, urls in (raw.get("mirrors") or {}).items()
    }
    if raw.get("discover"):
        client["discover"] = merge(DISCOVER_DEFAULTS, raw["discover"])
    client["record_dir"] = os.path.join(conf["lookup"]["state_dir"], ".client")
    return client
