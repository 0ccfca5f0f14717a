"""
The error collector and the checks every pillar value goes through: keys, text,
paths, URLs.
"""

import os
import re
import string
import unicodedata
import urllib.parse

from salt.exceptions import SaltInvocationError

from .net import HOST_RE, is_ip, redact_url

# Paths reach unit files, init scripts and rm: letters, digits and . _ - + @ / only.
PATH_RE = re.compile(r"/[A-Za-z0-9._@+/-]{0,4095}")


class Errors:
    """Collects validation errors, each naming its pillar key and the fix."""

    def __init__(self):
        self.messages = []

    def add(self, key, problem, fix):
        self.messages.append(f"hub_mirror{':' if key else ''}{key}: {problem}; {fix}")

    def raise_if_any(self):
        if self.messages:
            raise SaltInvocationError(
                "Invalid hub_mirror pillar (nothing was changed):\n  - " + "\n  - ".join(self.messages)
            )


def check_keys(errors, prefix, value, known):
    for key in value:
        if key not in known:
            errors.add(
                f"{prefix}:{key_part(plain(key))}" if prefix else key_part(plain(key)),
                "unknown key",
                f"remove it or use one of: {', '.join(sorted(known))}",
            )


def show_value(value, limit=80):
    """``value`` fit for an error message: quoted, a newline shown as \\n, and short."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return plain(value)
    return text if len(text) <= limit else text[:limit] + "..."


def plain(value):
    """``str(value)``, or a stand-in where str() raises: YAML reads a 5000-digit literal as
    an int that Python refuses to print (ValueError)."""
    try:
        return str(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__} too large to show>"


def key_part(name):
    """A pillar key as it may appear in a message: control characters escaped."""
    return repr(name)[1:-1] if has_control(name) else name


def has_control(text):
    """A control, format or line-separator character: in a unit file or script a newline is
    a new directive, and invisible characters make a value differ from what it looks like."""
    return any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs") for char in text)


def check_text(errors, key, value, secret=False, pattern=None, fix="see pillar.example"):
    """``value`` if it is a string without control characters (and matches ``pattern``)."""
    shown = "a secret" if secret else show_value(value)
    if not isinstance(value, str):
        errors.add(key, f"must be a string, got {type(value).__name__} ({shown})", "quote the value in YAML")
        return None
    if has_control(value):
        errors.add(key, "holds a newline or another control character", "write it on one line, without them")
        return None
    if pattern is not None and not pattern.fullmatch(value):
        errors.add(key, f"{shown} is not allowed here", fix)
        return None
    return value


def check_path(errors, key, value, example="/var/lib/hub-mirror"):
    """An absolute, normalized path of safe characters (it reaches unit files and scripts)."""
    path = check_text(errors, key, value)
    if path is None:
        return None
    if not PATH_RE.fullmatch(path):
        errors.add(
            key,
            f"{show_value(path)} is not an absolute path of letters, digits and . _ - + @ /",
            f"write e.g. {example} (no spaces, quotes, $, % or other shell characters)",
        )
        return None
    if any(part in (".", "..") for part in path.split("/")):
        errors.add(key, f"{path!r} has . or .. parts", "write the path without them")
        return None
    # NAME_MAX: mkdir would fail with ENAMETOOLONG at configure, after validation said yes.
    if any(len(part) > 255 for part in path.split("/")):
        errors.add(key, f"{show_value(path)} has a part longer than 255 characters", "shorten it")
        return None
    # normpath keeps a leading "//" (POSIX leaves its meaning open): "//" is "/" here.
    return "/" + os.path.normpath(path).lstrip("/")


def check_url(errors, key, value, schemes=("http", "https"), credentials=False, placeholders=False):
    """The parsed URL, or None after adding what is wrong with it."""
    if check_text(errors, key, value) is None:
        return None
    if " " in value:
        errors.add(key, f"{redact_url(value)!r} holds a space", "percent-encode it as %20")
        return None
    if placeholders:
        problem = _placeholder_problem(value)
        if problem:
            errors.add(
                key,
                problem,
                "use only {version} and {arch}, e.g. .../v{version}/registry_{version}_linux_{arch}.tar.gz",
            )
            return None
        value = value.format(version="0.0.0", arch="amd64")
    try:
        parsed = urllib.parse.urlsplit(value)
        _ = parsed.port  # raises ValueError: port out of range
        host = parsed.hostname
    except ValueError:
        errors.add(
            key,
            f"{redact_url(value)!r} is not a valid URL (bad host or port)",
            "write it like https://registry-1.docker.io",
        )
        return None
    if parsed.scheme not in schemes or (parsed.scheme != "file" and not host):
        errors.add(
            key,
            f"{redact_url(value)!r} is not an absolute {'/'.join(schemes)} URL",
            "write it like https://registry-1.docker.io",
        )
        return None
    if host and not (HOST_RE.fullmatch(host) or is_ip(host)):
        errors.add(key, f"{host!r} is not a host name or IP address", "write it like https://registry-1.docker.io")
        return None
    if (parsed.username or parsed.password) and not credentials:
        errors.add(key, "the URL holds credentials", "put them in username and token instead")
        return None
    return parsed


def _placeholder_problem(template):
    """Why a URL template is unusable: only bare ``{version}`` and ``{arch}`` may appear
    (``str.format`` would also follow ``{version.__class__}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"is not a valid URL template ({exc})"
    for _, field, spec, conversion in parsed:
        if field is not None and (field not in ("version", "arch") or spec or conversion):
            return f"has the placeholder {{{show_value(field)}}}"
    return None
