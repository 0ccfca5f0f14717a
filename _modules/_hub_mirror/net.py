"""
Addresses and URLs: host:port parsing, interface names, loopback, and redaction of
credentials in URLs and messages.
"""

import ipaddress
import re
import socket
import urllib.parse

import requests

REDACTED = "<redacted>"

HOST_RE = re.compile(r"[A-Za-z0-9_.@-]{1,253}")


def parse_hostport(text):
    """Split ``host:port``, ``[v6]:port`` or ``iface:port``; raise ValueError.

    An IPv6 address must be bracketed: ``::1:5000`` is ambiguous, and the registry refuses it.
    """
    text = str(text).strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if sep:
            ipaddress.IPv6Address(host)  # ValueError unless an IPv6 address
            if not is_ip(host):
                raise ValueError(text)
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(text)
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port):
        raise ValueError(text)
    if not text.startswith("[") and not HOST_RE.fullmatch(host):
        raise ValueError(text)
    if not 0 < int(port) < 65536:
        raise ValueError(text)
    return host, int(port)


def resolve_host(host, grains):
    """An IP for a listen host that is an IP, ``localhost`` or an interface name."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    for grain in ("ip4_interfaces", "ip6_interfaces"):
        addresses = (grains.get(grain) or {}).get(host) or []
        if addresses:
            return addresses[0]
    return None


def is_ip(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    # ipaddress takes any text after an IPv6 % as the zone: allow-list it like a host.
    return "%" not in host or bool(HOST_RE.fullmatch(host.partition("%")[2]))


def is_loopback_host(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(value):
    """``value`` fit to show or store: userinfo and query (where tokens go) redacted.

    Works on text that does not parse as a URL too: everything before the last ``@`` goes.
    """
    if not isinstance(value, str):
        return value
    scheme, sep, rest = value.partition("://")
    if "@" in value:
        if not sep:
            return REDACTED
        rest = f"{REDACTED}@{rest.rpartition('@')[2]}"
    rest, query, _ = rest.partition("#")[0].partition("?")
    return f"{scheme}{sep}{rest}" + (f"?{REDACTED}" if query else "")


def redact_text(text, *urls):
    """``text`` (an error message) with every secret part of ``urls`` redacted."""
    text = str(text)
    for url in urls:
        if not isinstance(url, str):
            continue
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            continue
        text = text.replace(url, redact_url(url))
        secrets = [parts.query, parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""]
        secrets += [urllib.parse.quote(secret, safe="=&") for secret in secrets]
        for secret in secrets:
            if secret:
                text = text.replace(secret, REDACTED)
    return text


def hosts_overlap(one, other):
    return one == other or {one, other} & {"0.0.0.0", "::"}


def hostport(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def site_of(url):
    """The site of a URL's host: its registrable domain (the last two labels), or the IP
    itself; "" if it has no host. Credentials go to no token realm of another site: 3.1
    does so for username and password, hub_mirror for its check and its helper."""
    try:
        host = urllib.parse.urlsplit(url).hostname
    except ValueError:
        return ""
    if not host:
        return ""
    return host if is_ip(host) else ".".join(host.split(".")[-2:])


def same_site(url, other):
    """Whether two URLs' hosts are of one site (:func:`site_of`)."""
    one = site_of(url)
    return bool(one) and one == site_of(other)


def http_get(url, timeout, **kwargs):
    try:
        return requests.get(url, timeout=timeout, **kwargs)
    except requests.RequestException:
        return None


def free_loopback_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
