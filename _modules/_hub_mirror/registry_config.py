"""
The registry's config file for each dialect (2.x and 3.x), the offline config, and
the files written beside it.
"""

import copy
import json
import os

import yaml

from . import front
from .net import REDACTED, hostport, site_of
from .release import binary_version
from .settings import (
    CREDENTIAL_LIFETIME,
    SECRET_CONFIG_KEYS,
    binary_path,
    dialect_of,
    mirror_paths,
)
from .supervisor import program_text, supervise_settings
from .validate import MAX_DEPTH, too_deep


def config_dialect(conf):
    """The dialect to render: the package's installed version, else the pillar version."""
    if conf["install"]["method"] == "package":
        installed = binary_version(binary_path(conf)) if os.path.exists(binary_path(conf)) else None
        return dialect_of(installed or "2.8.0")
    return dialect_of(conf["version"])


def render_config(mirror, dialect, credential_helper=None):
    """
    Return the registry config (a dict) for a completed ``mirror`` in a ``dialect``
    (``"2"`` or ``"3"``). Pure: the caller decides what to do with the token in it.

    2.8 takes the credential as ``proxy.username``/``password``. 3.x asks
    ``credential_helper`` for it (``proxy.exec``), so the config holds no secret and a new
    token needs no restart. 3.x gets ``exec`` for an anonymous mirror too (the helper
    answers empty credentials): without it, 3.0.0 through 3.1.2 ping the upstream at
    start and panic when it is down (distribution issue 4038); with it they start and
    serve the cache (docs/facts.md).
    """
    proxy = {"remoteurl": mirror["upstream"]}
    if dialect == "2":
        if mirror["username"]:
            proxy["username"] = mirror["username"]
            proxy["password"] = mirror["token"]
    else:
        proxy["exec"] = {"command": credential_helper, "lifetime": CREDENTIAL_LIFETIME}
        proxy["ttl"] = mirror["ttl"]
    return {
        "version": 0.1,
        "log": {
            "level": mirror["log_level"],
            "formatter": "text",
            "fields": {"service": "hub-mirror", "mirror": mirror["name"]},
        },
        "storage": {
            **_storage_driver(mirror, dialect),
            # Without delete, TTL expiry fails and cached content stays on disk forever.
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": True, "age": "168h", "interval": "24h", "dryrun": False}},
        },
        "http": {
            **_listener(mirror),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
            "debug": {
                "addr": mirror["debug_listen"],
                "prometheus": {"enabled": True, "path": "/metrics"},
            },
        },
        # Storage only: an upstream check makes the registry answer 503 to every request
        # while the upstream is down, which is exactly when the cache matters.
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
        "proxy": proxy,
        **_redis(mirror, dialect),
    }


def _listener(mirror):
    """The listen address; behind a front, a unix socket the front alone reaches (relative
    to the front's directory, where the supervisor runs the registry)."""
    if front.enabled(mirror):
        return {"net": "unix", "addr": front.SOCKET}
    return {"addr": hostport(mirror["listen_host"], mirror["listen_port"])}


def _storage_driver(mirror, dialect):
    storage = (
        _s3_driver(mirror["s3"], dialect) if mirror["s3"] else {"filesystem": {"rootdirectory": mirror["storage"]}}
    )
    if mirror["redis"]:
        storage["cache"] = {"blobdescriptor": "redis"}
    return storage


def _s3_driver(s3, dialect):
    driver = {"bucket": s3["bucket"], "region": s3["region"], "rootdirectory": s3["rootdirectory"]}
    if s3["accesskey"]:
        driver.update(accesskey=s3["accesskey"], secretkey=s3["secretkey"])
    if s3["endpoint"]:
        driver["regionendpoint"] = s3["endpoint"]
        driver["secure"] = not s3["endpoint"].startswith("http://")
    # 2.8 uses path-style URLs whenever regionendpoint is set; 3.x asks.
    if dialect != "2":
        driver["forcepathstyle"] = s3["path_style"]
    return {"s3": driver}


def _redis(mirror, dialect):
    redis = mirror["redis"]
    if not redis:
        return {}
    # 3.x takes go-redis' UniversalOptions: a list of addresses. It ignores 2.8's `addr`
    # without a word and then panics at start ("redis configuration required").
    address = {"addr": redis["addr"]} if dialect == "2" else {"addrs": [redis["addr"]]}
    return {"redis": {**address, "password": redis["password"], "db": redis["db"]}}


def render_offline_config(config):
    """
    The config the supervisor serves while the upstream is down: the same storage as a
    plain registry, read-only, so every cached tag and blob is served and nothing is
    pulled or pushed.
    """
    offline = copy.deepcopy(config)
    del offline["proxy"]
    offline["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    offline["log"]["fields"]["mode"] = "offline"
    return offline


def config_header(name):
    """The first line of every registry config hub_mirror writes: what marks it as ours."""
    return f"# Managed by Salt (hub_mirror mirror {name}). Local changes are overwritten.\n"


# What hub_mirror before 2026-12 wrote: still ours when it finds an orphan.
LEGACY_CONFIG_HEADER = "# Managed by Salt (hub_mirror). Local changes are overwritten.\n"


def _config_text(name, config):
    return config_header(name) + yaml.safe_dump(config, default_flow_style=False, sort_keys=False)


def config_changes(old_text, new_text):
    """Dotted keys that differ between two config texts, with secrets redacted."""
    try:
        old = yaml.safe_load(old_text) if old_text else {}
    except yaml.YAMLError:
        old = None
    old_flat = _flatten(old) if isinstance(old, dict) else None
    if old_flat is None:
        # A local edit that is not a mapping (a list, broken YAML, an alias that contains
        # itself, a billion laughs): all of it goes.
        return {"config": {"old": "not a registry config (edited by hand)", "new": "rendered from pillar"}}
    new_flat = _flatten(yaml.safe_load(new_text))
    changes = {}
    for key in sorted(set(old_flat) | set(new_flat)):
        if old_flat.get(key) != new_flat.get(key):
            secret = key in SECRET_CONFIG_KEYS
            changes[key] = {
                "old": REDACTED if secret and key in old_flat else old_flat.get(key),
                "new": REDACTED if secret and key in new_flat else new_flat.get(key),
            }
    return changes


def _flatten(config, limit=10000):
    """{dotted key: value} of a config's leaves; None when it is no config of ours: nested
    too deep (a recursive alias) or too big (aliases multiply: a billion laughs)."""
    out, stack = {}, [(config, "")]
    while stack:
        value, prefix = stack.pop()
        if isinstance(value, dict):
            if prefix.count(".") >= MAX_DEPTH or len(out) + len(stack) > limit:
                return None
            stack.extend((sub, f"{prefix}{key}.") for key, sub in value.items())
        elif too_deep(value) is not None:
            return None
        else:
            out[prefix[:-1]] = value
    return out


def credentials_text(spec):
    """The credential helper's file: the credential, and the one site whose token realm
    may have it (the helper answers no other: 3.x hands it any realm an upstream names)."""
    credential = {"Username": spec["username"], "Secret": spec["token"], "Site": site_of(spec["upstream"])}
    return json.dumps(credential, sort_keys=True)


def render_config_files(conf, spec):
    """{paths key: text} of every file ``configure`` writes for a mirror (token included)."""
    paths = mirror_paths(conf, spec["name"])
    rendered = render_config(spec, config_dialect(conf), paths["credential_helper"])
    texts = {
        "config": _config_text(spec["name"], rendered),
        "offline_config": _config_text(spec["name"], render_offline_config(rendered)),
        "supervise_settings": json.dumps(supervise_settings(conf, spec), indent=2, sort_keys=True) + "\n",
    }
    if front.enabled(spec):
        texts["front_conf"] = front.render_conf(spec)
    if "exec" in rendered["proxy"]:
        texts["credential_helper"] = program_text("credential_helper.py")
        texts["credentials"] = credentials_text(spec)
    return texts
