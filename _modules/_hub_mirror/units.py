"""
Parsing and showing the values the registry and Docker Hub use: sizes, Go times,
image references, platforms.
"""

import re
import time
import urllib.parse

from .settings import DOCKER_HUB_HOSTS, DOCKER_HUB_URL

DIGEST_RE = re.compile(r"(?:sha256[:=])?([0-9a-fA-F]{64})")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


_GO_TIME_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")

_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

GC_ELIGIBLE_RE = re.compile(r"^(blob|manifest) eligible for deletion: (sha256:[0-9a-f]{64})", re.MULTILINE)


def human_size(num):
    """``1.5 MiB`` for 1572864: binary units, one decimal."""
    if num is None:
        return None
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return None


def size_report(num):
    return {"bytes": num, "human": human_size(num)} if num is not None else None


def parse_size(value):
    """
    Bytes for a size: an integer, or a string such as ``500M``, ``20G`` or ``1.5TiB``
    (K, M, G, T, P are powers of 1024, with or without ``i``/``B``). Empty or 0: None.
    Raises ValueError for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if value in (None, "", 0):
        return None
    if isinstance(value, (int, float)):
        if value < 0 or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(value)
        return int(value) or None
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(value)
    unit = match.group(2).lower()
    factor = 1024 ** ("kmgtp".index(unit) + 1) if unit else 1
    return int(float(match.group(1)) * factor) or None


def iso(timestamp):
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def parse_go_time(text):
    """Seconds since the epoch for an RFC 3339 time as Go writes it (nanoseconds, Z or offset)."""
    match = _GO_TIME_RE.match(str(text or ""))
    if not match:
        return None
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    days = _days_from_civil(year, month, day)
    seconds = days * 86400 + hour * 3600 + minute * 60 + second + float(match.group(7) or 0)
    zone = match.group(8)
    if zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    return seconds


def _days_from_civil(year, month, day):
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def as_list(value):
    """A list of strings from a list or a comma-separated string (the CLI's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part).strip() for part in value if str(part).strip()]


def _is_docker_hub(upstream):
    return (urllib.parse.urlparse(upstream).hostname or "") in DOCKER_HUB_HOSTS


def parse_image(image, upstream=DOCKER_HUB_URL):
    """
    ``(repository, reference)`` for an image as users write it: ``alpine``,
    ``alpine:3.20``, ``docker.io/library/alpine``, ``ghcr.io/org/app@sha256:...``.

    A leading registry host is dropped (a mirror serves one upstream) and, for Docker Hub,
    one-part names get ``library/``. Raises ValueError for a malformed reference.
    """
    text = str(image or "").strip()
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        text = rest
    if "@" in text:
        name, reference = text.split("@", 1)
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]
        if not DIGEST_RE.fullmatch(reference) or not reference.startswith("sha256:"):
            raise ValueError(f"{image!r}: {reference!r} is not a sha256:<64 hex> digest")
    else:
        name, reference = text, "latest"
        if ":" in text.rsplit("/", 1)[-1]:
            name, reference = text.rsplit(":", 1)
        if not _TAG_RE.fullmatch(reference):
            raise ValueError(f"{image!r}: {reference!r} is not a valid tag")
    if "/" not in name and _is_docker_hub(upstream):
        name = f"library/{name}"
    if not _REPO_RE.fullmatch(name):
        raise ValueError(f"{image!r}: {name!r} is not a valid repository name")
    return name, reference


def platform_name(platform):
    """``linux/arm/v7`` for an OCI platform object (or an image config)."""
    if not isinstance(platform, dict):
        return "unknown"
    parts = [platform.get("os") or "unknown", platform.get("architecture") or "unknown"]
    if platform.get("variant"):
        parts.append(platform["variant"])
    return "/".join(parts)


def platform_wanted(name, platforms):
    if platforms is None:
        # Build attestations are index entries too; no runtime pulls them.
        return not name.startswith("unknown/")
    return any(name == wanted or name.startswith(wanted.rstrip("/") + "/") for wanted in platforms)
