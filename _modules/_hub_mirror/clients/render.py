"""
Pure renderers of each client's config: daemon.json, hosts.toml, registries.conf,
buildkitd.toml, registries.yaml, and the marked blocks inside user files.
"""

import json
import re
import urllib.parse

import yaml

from ..settings import DOCKER_HUB, DOCKER_HUB_URL

# containerd >= 2.1 gives up connecting to a black-holed mirror host after this, instead
# of the kernel's SYN retries (about 2 min); older containerd ignores the key.
HOSTS_TOML_DIAL_TIMEOUT = "2s"

# Loaded in name order after registries.conf; a user file sorting later can override it.
REGISTRIES_DROPIN = "50-hub-mirror.conf"

BLOCK_BEGIN = "# BEGIN hub_mirror: managed by Salt; `state.apply hub_mirror.client.clean` removes it"


BLOCK_END = "# END hub_mirror"

REGISTRY_HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::\d{1,5})?$")


# A DNS name (any case, as the reference grammars allow) or an IPv4 address.
MIRROR_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")

# Characters that end or escape a string in JSON, TOML or YAML, or no URL host has.
URL_FORBIDDEN = set("\\\"'<>`{}|^")

_JSON_SPACE_RE = re.compile(r"[ \t\n\r]*")


TOML_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\[\]#]+?)\s*\]\]?\s*(?:#.*)?$")

V1_REGISTRIES_RE = re.compile(r"^\s*\[\s*registries\s*\.\s*(search|insecure|block)\s*\]", re.M)


# -- pure rendering: daemon.json ---------------------------------------------------------


def json_members(text):
    """
    The members of the top-level JSON object in ``text``, as
    ``[(key, key_start, value_start, value_end)]``, plus the offsets of its braces.

    Lets daemon.json be edited one key at a time, leaving every other byte as the user
    wrote it. Raises ValueError when ``text`` is not a JSON object.
    """
    json.loads(text)
    decoder = json.JSONDecoder()
    index = _JSON_SPACE_RE.match(text, 0).end()
    if text[index : index + 1] != "{":
        raise ValueError("daemon.json does not hold a JSON object")
    opening = index
    index = _JSON_SPACE_RE.match(text, index + 1).end()
    members = []
    while text[index : index + 1] != "}":
        key, after = json.decoder.scanstring(text, index + 1)
        colon = _JSON_SPACE_RE.match(text, after).end()
        value_start = _JSON_SPACE_RE.match(text, colon + 1).end()
        _, value_end = decoder.raw_decode(text, value_start)
        members.append((key, index, value_start, value_end))
        index = _JSON_SPACE_RE.match(text, value_end).end()
        if text[index : index + 1] == ",":
            index = _JSON_SPACE_RE.match(text, index + 1).end()
    return members, opening, index


def json_set_member(text, key, value_text):
    """``text`` with top-level ``key`` set to the JSON ``value_text``; other bytes kept."""
    members, opening, closing = json_members(text)
    for name, _, value_start, value_end in members:
        if name == key:
            return text[:value_start] + value_text + text[value_end:]
    member = f"{json.dumps(key)}: {value_text}"
    if not members:
        return text[: opening + 1] + f"\n  {member}\n" + text[closing:]
    # Insert first, indented like the member that follows it.
    spacing = text[opening + 1 : members[0][1]]
    return text[: opening + 1] + spacing + member + "," + text[opening + 1 :]


def json_drop_member(text, key):
    """``text`` without top-level ``key``; the inverse of inserting it with json_set_member."""
    members, opening, closing = json_members(text)
    for position, (name, key_start, _, value_end) in enumerate(members):
        if name != key:
            continue
        if position + 1 < len(members):
            return text[:key_start] + text[members[position + 1][1] :]
        if position > 0:
            return text[: members[position - 1][3]] + text[value_end:]
        return text[: opening + 1] + text[closing:]
    return text


def json_member_value(text, key):
    """(raw text, parsed value) of a top-level member, or (None, None)."""
    members, _, _ = json_members(text)
    for name, _, value_start, value_end in members:
        if name == key:
            raw = text[value_start:value_end]
            return raw, json.loads(raw)
    return None, None


def render_daemon_json(base, mirrors):
    """daemon.json text with ``registry-mirrors`` = our docker.io mirrors first, then the
    user's own; ``base`` None means there is no daemon.json yet."""
    ours = list(mirrors.get(DOCKER_HUB, []))
    if base is None:
        return json.dumps({"registry-mirrors": ours}, indent=2) + "\n"
    _, theirs = json_member_value(base, "registry-mirrors")
    if not isinstance(theirs, (list, type(None))):
        raise ValueError("its registry-mirrors is not a list: fix it")
    merged = ours + [url for url in (theirs or []) if url.rstrip("/") not in ours]
    return json_set_member(base, "registry-mirrors", json.dumps(merged))


def _strip_daemon_json(current, record):
    """daemon.json without hub_mirror's mirrors; the user's original value where it is intact."""
    ours = {url for urls in record.get("mirrors", {}).values() for url in urls}
    _, listed = json_member_value(current, "registry-mirrors")
    listed = listed if isinstance(listed, list) else []
    theirs = [url for url in listed if str(url).rstrip("/") not in ours]
    original_raw = record.get("user_mirrors_raw")
    if original_raw is not None and theirs == json.loads(original_raw):
        text = json_set_member(current, "registry-mirrors", original_raw)
    elif original_raw is None and not theirs:
        text = json_drop_member(current, "registry-mirrors")
    else:
        text = json_set_member(current, "registry-mirrors", json.dumps(theirs))
    if not record.get("existed") and not json.loads(text):
        return None
    return text


def remember_daemon_json(base):
    raw, _ = json_member_value(base, "registry-mirrors") if base is not None else (None, None)
    return {"user_mirrors_raw": raw}


# -- pure rendering: marked blocks (TOML and registries.conf) ------------------------------


def strip_block(text, separated=True):
    """``text`` without hub_mirror's marked block, and without the newline add_block put
    before it when it was ``separated`` from the user's text (the record says; a user who
    later wrote lines above a block that began the file wrote that newline themselves)."""
    if text is None:
        return None
    begin = text.find(BLOCK_BEGIN + "\n")
    if begin < 0 or (begin > 0 and text[begin - 1] != "\n"):
        return text
    end = text.find(BLOCK_END + "\n", begin)
    if end < 0:
        return text
    end += len(BLOCK_END) + 1
    return text[: max(begin - 1, 0) if separated else begin] + text[end:]


def add_block(base, body):
    """``base`` with a marked block holding ``body`` appended; ``base`` None: the block alone."""
    block = f"{BLOCK_BEGIN}\n{body}{BLOCK_END}\n"
    base = strip_block(base)
    return block if not base else f"{base}\n{block}"


def _strip_block_file(current, record):
    text = strip_block(current, record.get("separated", True))
    if not text and not record.get("existed"):
        return None
    return text


def toml_table(line):
    """The normalised header (quotes and spacing unified) if ``line`` opens a TOML table."""
    match = TOML_HEADER_RE.match(line)
    return re.sub(r"\s*\.\s*", ".", match.group(1).replace("'", '"')) if match else None


def _toml_tables(text):
    """Normalised headers of the TOML tables in ``text``."""
    return {table for table in map(toml_table, (text or "").splitlines()) if table}


def _mirror_host(url):
    """``host:port`` of a mirror URL, IPv6 in brackets, as buildkit and registries.conf
    take it."""
    return urllib.parse.urlparse(url).netloc


def is_ipv6_url(url):
    return _mirror_host(url).startswith("[")


def _toml_str(text):
    """A TOML basic string: JSON's escaping is TOML's, except that TOML also escapes DEL
    and takes non-ASCII as it is (JSON's surrogate-pair escapes are not TOML)."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _toml_array(value):
    """A TOML array of strings (or of arrays of strings), each element TOML-escaped."""
    return "[" + ", ".join(_toml_array(item) if isinstance(item, list) else _toml_str(item) for item in value) + "]"


def upstream_server(upstream):
    """The URL a client pulls ``upstream`` from when no mirror is configured."""
    return DOCKER_HUB_URL if upstream == DOCKER_HUB else f"https://{upstream}"


def render_hosts_toml(base, mirrors, ca_file="", server_certs=None):
    """containerd ``certs.d/<upstream>/hosts.toml``: each mirror as a pull/resolve host, in
    order, then ``server`` (the upstream). In a user's own file the hosts are appended in a
    marked block after the user's own. ``server_certs`` ({"ca": [...], "client": [[cert,
    key]]}) are the docker-style files found in that directory: containerd stops reading
    them once a hosts.toml exists, so the file names them."""
    ((upstream, urls),) = mirrors.items()
    lines = []
    if not strip_block(base):
        lines += [f"server = {_toml_str(upstream_server(upstream))}"]
        for key, value in (server_certs or {}).items():
            if value:
                lines.append(f"{key} = {_toml_array(value)}")
        lines.append("")
    for url in urls:
        lines += [
            f"[host.{_toml_str(url)}]",
            '  capabilities = ["pull", "resolve"]',
            f"  dial_timeout = {_toml_str(HOSTS_TOML_DIAL_TIMEOUT)}",
        ]
        if ca_file and url.startswith("https://"):
            lines.append(f"  ca = {_toml_str(ca_file)}")
        lines.append("")
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def hosts_toml_conflict(base, mirrors):
    tables = _toml_tables(base)
    taken = [url for urls in mirrors.values() for url in urls if f'host."{url}"' in tables]
    if taken:
        return f'it already has a [host."{taken[0]}"] table of its own'
    return None


def render_registries_conf(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    """A containers-registries.conf(5) v2 drop-in: per upstream a ``[[registry]]`` with its
    mirrors in order; http mirrors are marked insecure. (containers/image takes a CA from
    /etc/containers/certs.d/<host>/, not from this file.)"""
    lines = []
    for upstream, urls in mirrors.items():
        lines += ["[[registry]]", f"prefix = {_toml_str(upstream)}", f"location = {_toml_str(upstream)}", ""]
        for url in urls:
            lines += ["[[registry.mirror]]", f"location = {_toml_str(_mirror_host(url))}"]
            if url.startswith("http://"):
                lines.append("insecure = true")
            lines.append("")
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def render_buildkitd_toml(base, mirrors, ca_file=""):
    """buildkitd.toml: ``[registry."<upstream>"] mirrors`` in order, and ``http = true``
    for each plain-http mirror host (``ca`` for https ones with ``client:ca_file``), in a
    marked block after the user's settings."""
    # One table per name: a mirror host that is also an upstream gets both its mirrors
    # and its http/ca setting there (a TOML table defined twice stops buildkitd).
    tables = {}
    for upstream, urls in mirrors.items():
        hosts = [_mirror_host(url) for url in urls]
        tables.setdefault(upstream, []).append(f"  mirrors = {_toml_array(hosts)}")
    for url in (url for urls in mirrors.values() for url in urls):
        setting = (
            "  http = true" if url.startswith("http://") else f"  ca = [{_toml_str(ca_file)}]" if ca_file else None
        )
        table = tables.setdefault(_mirror_host(url), [])
        if setting and not any(line.split("=")[0] == setting.split("=")[0] for line in table):
            table.append(setting)
    lines = []
    for name, settings in tables.items():
        if settings:
            lines += [f"[registry.{_toml_str(name)}]", *settings, ""]
    return add_block(base, "\n".join(lines[:-1]) + "\n")


def buildkitd_conflict(base, mirrors):
    tables = _toml_tables(strip_block(base))
    if "registry" in tables:
        return "it has a [registry] table of its own; add the mirrors there yourself"
    ours = list(mirrors) + [_mirror_host(url) for urls in mirrors.values() for url in urls]
    for name in ours:
        if f'registry."{name}"' in tables:
            return f'it already configures [registry."{name}"]; add the mirrors there yourself'
    if re.search(r"^\s*registry\s*\.", strip_block(base) or "", re.M):
        return "it sets registry keys with dotted names; add the mirrors there yourself"
    return None


# -- pure rendering: k3s / rke2 registries.yaml -------------------------------------------


def _registries_yaml_data(text):
    """The mapping of a registries.yaml, or ValueError saying what is wrong with it."""
    data = yaml.safe_load(text) if text else None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("mirrors") or {}, dict):
        raise ValueError("it does not hold a mapping with a mirrors mapping: fix it")
    for upstream, entry in (data.get("mirrors") or {}).items():
        if entry is not None and (not isinstance(entry, dict) or not isinstance(entry.get("endpoint") or [], list)):
            raise ValueError(f"its mirrors.{upstream} is not a mapping with an endpoint list: fix it")
    return data


def render_registries_yaml(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    """k3s/rke2 ``registries.yaml`` with our endpoints first under ``mirrors.<upstream>``."""
    data = _registries_yaml_data(base)
    header = ""
    if not base or yaml.safe_load(base) is None:
        header = "# Managed by Salt (hub_mirror): `state.apply hub_mirror.client.clean` removes it.\n"
    if data.get("mirrors") is None:
        data["mirrors"] = {}
    section = data["mirrors"]
    for upstream, urls in mirrors.items():
        entry = section.get(upstream) or {}
        section[upstream] = entry
        theirs = [url for url in entry.get("endpoint") or [] if url not in urls]
        entry["endpoint"] = list(urls) + theirs
    return header + yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def _strip_registries_yaml(current, record):
    data = _registries_yaml_data(current)
    ours = record.get("mirrors", {})
    section = data.get("mirrors")
    if isinstance(section, dict):
        for upstream, urls in ours.items():
            entry = section.get(upstream)
            if not isinstance(entry, dict):
                continue
            entry["endpoint"] = [url for url in entry.get("endpoint") or [] if url not in urls]
            if not entry["endpoint"]:
                del entry["endpoint"]
            if not entry:
                del section[upstream]
        if not section:
            del data["mirrors"]
    if not data and not record.get("existed"):
        return None
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=False)


def _render_daemon_json(base, mirrors, ca_file=""):  # pylint: disable=unused-argument
    return render_daemon_json(base, mirrors)


CLIENT_KINDS = {
    "daemon_json": (_render_daemon_json, _strip_daemon_json),
    "hosts_toml": (render_hosts_toml, _strip_block_file),
    "registries_conf": (render_registries_conf, _strip_block_file),
    "buildkitd_toml": (render_buildkitd_toml, _strip_block_file),
    "registries_yaml": (render_registries_yaml, _strip_registries_yaml),
}

# Each runtime hub_mirror configures: the kind of file it gets, and what shows it is on
# this host (one of its programs on PATH, or the path of its config in client:paths,
# whose directory is enough for k3s and rke2: the file itself is what hub_mirror writes).
RUNTIMES = {
    "docker": {"kind": "daemon_json", "programs": ("dockerd",), "marker": ("docker_daemon_json", False)},
    "containerd": {"kind": "hosts_toml", "programs": ("containerd",), "marker": ("containerd_config", False)},
    "podman": {
        "kind": "registries_conf",
        "programs": ("podman", "buildah", "skopeo", "crio"),
        "marker": ("registries_conf", False),
    },
    "buildkit": {"kind": "buildkitd_toml", "programs": ("buildkitd",), "marker": ("buildkitd_toml", False)},
    "k3s": {"kind": "registries_yaml", "programs": ("k3s",), "marker": ("k3s_registries", True)},
    "rke2": {"kind": "registries_yaml", "programs": ("rke2",), "marker": ("rke2_registries", True)},
}

# Kinds where hub_mirror's part is a marked block: found and taken out by its markers
# even when the record of it is lost.
BLOCK_KINDS = ("hosts_toml", "registries_conf", "buildkitd_toml")
