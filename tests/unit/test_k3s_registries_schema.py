"""k3s and rke2 cannot run here (each is a whole Kubernetes node: kubelet, its own
containerd, cgroup and iptables setup), so their ``registries.yaml`` is checked against
the schema their docs define instead (docs.k3s.io/installation/private-registry and
docs.rke2.io/install/containerd_registry_configuration; the Go type is ``Registry`` in
github.com/rancher/wharfie/pkg/registries):

    mirrors: {<registry host>: {endpoint: [<URL>...], rewrite: {<regex>: <replacement>}}}
    configs: {<registry host>: {auth: {username, password, auth, identitytoken},
                                tls: {cert_file, key_file, ca_file, insecure_skip_verify}}}

An endpoint is a URL with scheme (``http://`` for a plain-HTTP registry); containerd
tries the endpoints in order and always tries the registry's default endpoint last
(``https://index.docker.io/v2`` for docker.io), so the mirror list must not name the
upstream itself for the fallback to work.
"""

import re
import urllib.parse

import pytest
import yaml

from tests.support.modules import lib

render = lib("clients.render")

MIRROR = "http://192.168.128.1:5000"
SECOND = "https://10.0.0.2:5443"

TOP_KEYS = {"mirrors", "configs"}
MIRROR_KEYS = {"endpoint", "rewrite"}
CONFIG_KEYS = {"auth", "tls"}
AUTH_KEYS = {"username", "password", "auth", "identitytoken"}
TLS_KEYS = {"cert_file", "key_file", "ca_file", "insecure_skip_verify"}


def schema_problems(text):
    """Every way ``text`` departs from the documented registries.yaml schema."""
    data = yaml.safe_load(text)
    problems = []
    if not isinstance(data, dict):
        return [f"top level is {type(data).__name__}, not a mapping"]
    problems += [f"unknown top-level key {key!r}" for key in set(data) - TOP_KEYS]
    for registry, mirror in (data.get("mirrors") or {}).items():
        if not isinstance(registry, str) or not registry:
            problems.append(f"mirror name {registry!r}")
        if not isinstance(mirror, dict):
            problems.append(f"mirrors.{registry} is not a mapping")
            continue
        problems += [f"mirrors.{registry}: unknown key {key!r}" for key in set(mirror) - MIRROR_KEYS]
        endpoints = mirror.get("endpoint", [])
        if not isinstance(endpoints, list) or not all(isinstance(url, str) for url in endpoints):
            problems.append(f"mirrors.{registry}.endpoint is not a list of strings")
            continue
        for url in endpoints:
            parsed = urllib.parse.urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                problems.append(f"mirrors.{registry}.endpoint {url!r} is not an http(s) URL")
            if url != url.strip():
                problems.append(f"mirrors.{registry}.endpoint {url!r} has surrounding space")
        rewrite = mirror.get("rewrite", {})
        if not isinstance(rewrite, dict):
            problems.append(f"mirrors.{registry}.rewrite is not a mapping")
        else:
            for pattern in rewrite:
                re.compile(pattern)
    for registry, config in (data.get("configs") or {}).items():
        if not isinstance(config, dict):
            problems.append(f"configs.{registry} is not a mapping")
            continue
        problems += [f"configs.{registry}: unknown key {key!r}" for key in set(config) - CONFIG_KEYS]
        problems += [f"configs.{registry}.auth: unknown key {k!r}" for k in set(config.get("auth") or {}) - AUTH_KEYS]
        problems += [f"configs.{registry}.tls: unknown key {k!r}" for k in set(config.get("tls") or {}) - TLS_KEYS]
    return problems


USER_FILES = {
    "none": None,
    "empty": "",
    "configs only": (
        "configs:\n  registry.example.com:5000:\n    auth:\n      username: ci\n      password: not-a-real-password\n"
        "    tls:\n      ca_file: /etc/ssl/private-ca.pem\n"
    ),
    "own docker.io mirror with rewrite": (
        "mirrors:\n  docker.io:\n    endpoint:\n      - https://registry.example.com:5000\n"
        "    rewrite:\n      '^rancher/(.*)': 'mirrorproject/rancher-images/$1'\n"
        "  registry.example.com:5000:\n    endpoint: ['https://registry.example.com:5000']\n"
    ),
}


@pytest.mark.parametrize("base", list(USER_FILES))
def test_rendered_registries_yaml_follows_the_documented_schema(hub_mirror, base):
    text = render.render_registries_yaml(USER_FILES[base], {"docker.io": [MIRROR, SECOND], "ghcr.io": [MIRROR]})
    assert schema_problems(text) == []
    data = yaml.safe_load(text)
    endpoints = data["mirrors"]["docker.io"]["endpoint"]
    # Ours first, in order, then the user's; never the upstream: k3s tries that last anyway.
    assert endpoints[:2] == [MIRROR, SECOND]
    assert not any("docker.io" in url for url in endpoints)
    assert data["mirrors"]["ghcr.io"]["endpoint"] == [MIRROR]
    user = yaml.safe_load(USER_FILES[base] or "") or {}
    # Whatever else the user had is still there.
    assert data.get("configs") == user.get("configs")
    for registry, mirror in (user.get("mirrors") or {}).items():
        assert data["mirrors"][registry].get("rewrite") == mirror.get("rewrite")
        assert set(mirror["endpoint"]) <= set(data["mirrors"][registry]["endpoint"])


def test_the_schema_check_itself_refuses_what_k3s_would_not_read():
    assert schema_problems("mirrors:\n  docker.io:\n    endpoints: [http://m:5000]\n")
    assert schema_problems("mirrors:\n  docker.io:\n    endpoint: 192.168.128.1:5000\n")
    assert schema_problems("mirrors:\n  docker.io:\n    endpoint: ['192.168.128.1:5000']\n")
    assert schema_problems("mirror:\n  docker.io: {}\n")
    assert schema_problems("configs:\n  m:5000:\n    tls: {insecure: true}\n")


def test_stripping_ours_leaves_a_file_that_still_follows_the_schema(hub_mirror):
    base = USER_FILES["own docker.io mirror with rewrite"]
    ours = {"docker.io": [MIRROR]}
    rendered = render.render_registries_yaml(base, ours)
    stripped = render._strip_registries_yaml(rendered, {"mirrors": ours, "existed": True})
    assert schema_problems(stripped) == []
    assert yaml.safe_load(stripped) == yaml.safe_load(base)
