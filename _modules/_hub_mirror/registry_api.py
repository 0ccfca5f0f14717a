"""
Talking to a registry over HTTP: the one ``/v2/`` probe, catalog paging, manifests
and blobs, the proxy counters, and the upstream's credential check.
"""

import hashlib
import json
import os
import re
import socket
import ssl
import time
import urllib.parse

import requests
from salt.exceptions import CommandExecutionError

from .fsutil import read_file
from .net import http_get, redact_url, same_site
from .settings import probe_url
from .units import size_report


def check_upstream(spec, timeout=10):
    """Warnings about the upstream; raises when it refuses the mirror's credential.

    Asks only what a login asks: ``/v2/`` and, with a credential, the token service the
    upstream names (or ``/v2/`` with Basic auth). No manifest is fetched, so nothing
    counts as a pull. The credential goes only to a realm on the upstream's own site.
    """
    upstream = spec["upstream"].rstrip("/")
    try:
        response = requests.get(f"{upstream}/v2/", timeout=timeout)
    except requests.RequestException as exc:
        return [
            f"mirror {spec['name']}: the upstream {upstream} does not answer ({type(exc).__name__}); "
            "the mirror serves its cache read-only until it does. Check hub_mirror:mirrors:"
            f"{spec['name']}:upstream if it should"
        ]
    if not spec["username"] or response.status_code != 401:
        return []
    scheme, params = parse_challenge(response.headers.get("WWW-Authenticate"))
    auth = (spec["username"], spec["token"])
    realm = params.get("realm", "")
    try:
        if scheme == "basic":
            check = requests.get(f"{upstream}/v2/", auth=auth, timeout=timeout)
        elif scheme == "bearer" and same_site(realm, upstream):
            query = {"service": params["service"]} if params.get("service") else {}
            check = requests.get(realm, params=query, auth=auth, timeout=timeout)
        else:
            return [
                f"mirror {spec['name']}: the credential was not checked (the upstream asks for "
                f"{scheme or 'no'} auth at {redact_url(realm) or 'no realm'})"
            ]
    except requests.RequestException as exc:
        return [
            f"mirror {spec['name']}: the upstream's token service does not answer ({type(exc).__name__}); "
            "the credential was not checked"
        ]
    if check.status_code in (401, 403):
        raise CommandExecutionError(
            f"hub_mirror:mirrors:{spec['name']}:token: the upstream {upstream} refuses the credential "
            f"of {spec['username']!r} (HTTP {check.status_code}); check username and token "
            "(nothing was changed)"
        )
    return []


def probe(url, timeout, ca_file="", deadline=None):
    """None when ``url`` answers ``/v2/`` like a registry before ``deadline``, else why not.

    A raw HTTP/1.1 exchange with every socket wait bounded by the time left, so a mirror
    that trickles bytes cannot stretch the probe (an HTTP library's timeout is per read).
    Salt's proxy environment is ignored: the probe goes where the clients go.
    """
    deadline = deadline if deadline is not None else time.monotonic() + timeout
    parsed = urllib.parse.urlparse(url)
    https = parsed.scheme == "https"
    port = parsed.port or (443 if https else 80)

    def left():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline")
        return remaining

    try:
        sock = socket.create_connection((parsed.hostname, port), timeout=left())
        try:
            if https:
                context = ssl.create_default_context(cafile=ca_file or None)
                sock.settimeout(left())
                sock = context.wrap_socket(sock, server_hostname=parsed.hostname)
            request = (
                f"GET /v2/ HTTP/1.1\r\nHost: {parsed.netloc}\r\nUser-Agent: hub_mirror-probe\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            sock.settimeout(left())
            sock.sendall(request.encode("ascii"))
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                sock.settimeout(left())
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        finally:
            sock.close()
    except (socket.timeout, TimeoutError):
        return f"no answer within {timeout}s"
    except ssl.SSLCertVerificationError as exc:
        return f"its TLS certificate is not trusted ({exc.verify_message}): set hub_mirror:client:ca_file"
    except ssl.SSLError as exc:
        return f"TLS failed ({exc.reason})"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError:
        return "unreachable"
    status_line, _, headers = head.decode("latin-1").partition("\r\n")
    match = re.match(r"HTTP/1\.[01] (\d{3})", status_line)
    if not match:
        return "answered, but not as a registry"
    if match.group(1) not in ("200", "401"):
        return f"answered HTTP {match.group(1)}"
    api = re.search(r"^docker-distribution-api-version:[ \t]*registry/2", headers, re.I | re.M)
    return None if api else "answered, but not as a registry"


def answers(base_url, timeout):
    """True when ``base_url`` answers ``/v2/`` like a registry within ``timeout``."""
    return probe(base_url, timeout) is None


def wait_serving(spec, timeout):
    deadline = time.monotonic() + timeout
    url = probe_url(spec)
    while time.monotonic() < deadline:
        if answers(url, 2):
            return True
        time.sleep(0.5)
    return False


_LINK_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def next_link(header):
    """The target of a ``Link: <...>; rel="next"`` header, or None."""
    match = _LINK_RE.search(header or "")
    return match.group(1) if match else None


def repositories_api(base_url, page_size=1000, timeout=30):
    """Every repository the registry lists, following ``Link`` pagination."""
    # A page size above the server's catalog.maxentries is refused (400): the first
    # page finds the largest size it accepts, by bisection.
    accepted, refused_above = None, page_size
    while True:
        response = requests.get(f"{base_url}/v2/_catalog?n={page_size}", timeout=timeout)
        if response.status_code == 400 and "PAGINATION_NUMBER_INVALID" in response.text:
            refused_above = page_size - 1
            if refused_above < 1:
                response.raise_for_status()
        else:
            response.raise_for_status()
            accepted = (page_size, response)
        low = accepted[0] if accepted else 0
        if low >= refused_above:
            break
        page_size = (low + refused_above + 1) // 2
    response = accepted[1]
    repositories = list(response.json().get("repositories") or [])
    seen = set()
    link = next_link(response.headers.get("Link"))
    url = urllib.parse.urljoin(base_url + "/", link) if link else None
    while url and url not in seen:
        seen.add(url)
        response = requests.get(url, timeout=timeout)
        response.raise_for_status()
        repositories.extend(response.json().get("repositories") or [])
        link = next_link(response.headers.get("Link"))
        url = urllib.parse.urljoin(base_url + "/", link) if link else None
    return repositories


def v2_root(storage):
    return os.path.join(storage, "docker", "registry", "v2")


def cached_tags(storage, repository):
    """{tag: "sha256:..."} for the tags of ``repository`` cached under ``storage``."""
    tags_dir = os.path.join(v2_root(storage), "repositories", repository, "_manifests", "tags")
    tags = {}
    try:
        entries = sorted(os.listdir(tags_dir))
    except FileNotFoundError:
        return tags
    for tag in entries:
        link = read_file(os.path.join(tags_dir, tag, "current", "link"))
        if link:
            tags[tag] = link.strip()
    return tags


MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"

MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


MANIFEST_ACCEPT = ", ".join((MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST))

_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


_PROMETHEUS_RE = re.compile(
    r'^registry_proxy_(requests|hits|misses|pulled_bytes)(?:_total)?\{[^}]*type="(blob|manifest)"[^}]*\}\s+(\S+)',
    re.MULTILINE,
)


def proxy_counters(expvar=None, metrics=None, dialect="3"):
    """
    Hit and miss counters of the proxy for blobs and manifests.

    3.x exports them as Prometheus ``registry_proxy_*_total{type=...}``; 2.8 only in
    ``/debug/vars``, where every served manifest counts as a hit (hits = requests -
    misses) and blob misses are not counted at all.
    """
    counters = {}
    found = {(kind, name): float(value) for name, kind, value in _PROMETHEUS_RE.findall(metrics or "")}
    proxy = ((expvar or {}).get("registry") or {}).get("proxy") or {}
    for kind, plural in (("blob", "blobs"), ("manifest", "manifests")):
        if found:
            requests_, hits, misses, pulled = (
                int(found.get((kind, key), 0)) for key in ("requests", "hits", "misses", "pulled_bytes")
            )
            note = None
        elif proxy.get(plural):
            raw = proxy[plural]
            requests_, misses, pulled = raw.get("Requests", 0), raw.get("Misses", 0), raw.get("BytesPulled", 0)
            hits, note = raw.get("Hits", 0), None
            if dialect == "2" and kind == "manifest":
                hits = max(requests_ - misses, 0)
            elif dialect == "2":
                requests_ = hits = misses = pulled = None
                note = "registry 2.8 does not count blob cache misses (3.x does)"
        else:
            counters[plural] = None
            continue
        counters[plural] = {
            "requests": requests_,
            "hits": hits,
            "misses": misses,
            "hit_ratio": round(hits / requests_, 3) if requests_ else None,
            "pulled": size_report(pulled),
        }
        if note:
            counters[plural]["note"] = note
    return counters


def health(debug_url):
    response = http_get(f"{debug_url}/debug/health", 3)
    if response is None:
        return None
    if response.status_code == 200:
        return "ok"
    return f"unhealthy: {response.text.strip()[:500]}"


def upstream_reachable(upstream, timeout=5):
    """Any HTTP answer from ``/v2/`` (401 included) means the upstream is reachable."""
    return http_get(upstream.rstrip("/") + "/v2/", timeout) is not None


def parse_ratelimit(headers):
    """(limit, remaining, window seconds, source) from Docker Hub's rate-limit headers."""

    def split(value):
        if not value:
            return None, None
        count, _, rest = value.partition(";")
        window = re.search(r"w=(\d+)", rest)
        try:
            return int(count.strip()), int(window.group(1)) if window else None
        except ValueError:
            return None, None

    limit, window = split(headers.get("ratelimit-limit"))
    remaining, remaining_window = split(headers.get("ratelimit-remaining"))
    return limit, remaining, window or remaining_window, headers.get("docker-ratelimit-source")


def parse_challenge(header):
    scheme, _, params = (header or "").partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM_RE.findall(params))


def get_manifest(session, base, repo, reference, timeout):
    response = session.get(
        f"{base}/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT}, timeout=timeout
    )
    if response.status_code != 200:
        raise CommandExecutionError(
            f"{repo}:{reference}: the mirror answered HTTP {response.status_code}: {response.text.strip()[:300]}"
        )
    body = response.content
    digest = response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise CommandExecutionError(f"{repo}:{reference}: the manifest is not JSON") from exc
    return digest, doc, len(body)


def fetch_blob(session, base, repo, digest, timeout):
    fetched = 0
    with session.get(f"{base}/v2/{repo}/blobs/{digest}", stream=True, timeout=timeout) as response:
        if response.status_code != 200:
            raise CommandExecutionError(f"{repo}@{digest}: the mirror answered HTTP {response.status_code}")
        for chunk in response.iter_content(1 << 20):
            fetched += len(chunk)
    return fetched
