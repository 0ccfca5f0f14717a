"""Rendering each runtime's config, merging into the user's own file and taking
hub_mirror's part out again, byte for byte; each format as the runtime that reads it
defines it."""

import json
import re
import urllib.parse

import pytest
import tomllib
import yaml

from _hub_mirror.clients import render, runtimes
from tests.unit.host import MIRROR

SECOND = "https://mirror.example.net"

DAEMON_JSONS = [
    '{\n  "log-driver": "json-file",\n  "data-root": "/srv/docker"\n}\n',
    '{\n    "insecure-registries": ["10.0.0.1:5000"],\n    "debug": true\n}',
    '{"log-driver":"journald"}',
    '{\n\t"registry-mirrors": [ "https://mine.example" ],\n\t"debug": false\n}\n',
    "{}\n",
    '  {\r\n  "a": {"nested": [1, 2]},\r\n  "b": "x"\r\n}\r\n',
]


@pytest.mark.parametrize("text", DAEMON_JSONS)
def test_daemon_json_member_edits_touch_nothing_else(text):
    added = render.json_set_member(text, "zz-new", '["x"]')
    assert json.loads(added)["zz-new"] == ["x"]
    assert {k: v for k, v in json.loads(added).items() if k != "zz-new"} == json.loads(text)
    if json.loads(text):
        assert render.json_drop_member(added, "zz-new") == text


def test_daemon_json_render_puts_ours_first_and_keeps_the_users_mirrors():
    text = DAEMON_JSONS[3]
    rendered = render.render_daemon_json(text, {"docker.io": [MIRROR, SECOND]})
    assert json.loads(rendered)["registry-mirrors"] == [MIRROR, SECOND, "https://mine.example"]
    # Only the value of registry-mirrors changed.
    assert rendered.startswith('{\n\t"registry-mirrors": [')
    assert rendered.endswith('],\n\t"debug": false\n}\n')


def test_daemon_json_strip_gives_back_the_users_own_value_verbatim():
    text = DAEMON_JSONS[3]
    record = {"existed": True, "mirrors": {"docker.io": [MIRROR]}}
    record.update(render.remember_daemon_json(text))
    rendered = render.render_daemon_json(text, {"docker.io": [MIRROR]})
    assert render._strip_daemon_json(rendered, record) == text


def test_daemon_json_strip_keeps_later_user_edits():
    text = DAEMON_JSONS[0]
    record = {"existed": True, "mirrors": {"docker.io": [MIRROR]}}
    record.update(render.remember_daemon_json(text))
    rendered = render.render_daemon_json(text, {"docker.io": [MIRROR]})
    edited = rendered.replace('"json-file"', '"local"')
    stripped = render._strip_daemon_json(edited, record)
    assert stripped == text.replace('"json-file"', '"local"')


def test_daemon_json_created_by_us_goes_away():
    rendered = render.render_daemon_json(None, {"docker.io": [MIRROR]})
    assert json.loads(rendered) == {"registry-mirrors": [MIRROR]}
    record = {"existed": False, "mirrors": {"docker.io": [MIRROR]}, "user_mirrors_raw": None}
    assert render._strip_daemon_json(rendered, record) is None


def test_daemon_json_render_refuses_what_is_not_an_object():
    with pytest.raises(ValueError):
        render.render_daemon_json("[1, 2]", {"docker.io": [MIRROR]})
    with pytest.raises(ValueError):
        render.render_daemon_json('{"a": 1,}', {"docker.io": [MIRROR]})


@pytest.mark.parametrize("base", [None, "", "debug = true\n", "debug = true", "# only a comment\n\n"])
def test_marked_block_comes_out_exactly(base):
    added = render.add_block(base, "x = 1\n")
    assert render.BLOCK_BEGIN in added
    assert render.add_block(added, "x = 2\n").count(render.BLOCK_BEGIN) == 1
    stripped = render.strip_block(added)
    assert stripped == (base or "")


def test_hosts_toml_lists_mirrors_in_order_then_the_upstream():
    text = render.render_hosts_toml(None, {"docker.io": [MIRROR, SECOND]})
    parsed = tomllib.loads(text)
    assert parsed["server"] == "https://registry-1.docker.io"
    assert list(parsed["host"]) == [MIRROR, SECOND]
    assert all(h["capabilities"] == ["pull", "resolve"] for h in parsed["host"].values())
    assert tomllib.loads(render.render_hosts_toml(None, {"ghcr.io": [MIRROR]}))["server"] == (
        "https://ghcr.io"
    )


def test_hosts_toml_of_the_users_own_gets_our_hosts_appended():
    own = 'server = "https://registry-1.docker.io"\n\n[host."https://own.example"]\n  ca = "/x.pem"\n'
    text = render.render_hosts_toml(own, {"docker.io": [MIRROR]})
    assert text.startswith(own)
    assert list(tomllib.loads(text)["host"]) == ["https://own.example", MIRROR]
    assert render.strip_block(text) == own
    assert render.hosts_toml_conflict(own, {"docker.io": ["https://own.example"]})
    assert render.hosts_toml_conflict(own, {"docker.io": [MIRROR]}) is None


def test_registries_conf_drop_in():
    text = render.render_registries_conf(None, {"docker.io": [MIRROR, SECOND], "ghcr.io": [MIRROR]})
    parsed = tomllib.loads(text)
    hub, ghcr = parsed["registry"]
    assert (hub["prefix"], hub["location"]) == ("docker.io", "docker.io")
    assert hub["mirror"] == [
        {"location": "192.168.128.1:5000", "insecure": True},
        {"location": "mirror.example.net"},
    ]
    assert ghcr["prefix"] == "ghcr.io"


def test_buildkitd_toml_merges_below_the_users_settings():
    own = 'debug = true\n\n[worker.oci]\n  gc = true\n'
    text = render.render_buildkitd_toml(own, {"docker.io": [MIRROR, SECOND]})
    parsed = tomllib.loads(text)
    assert parsed["debug"] is True and parsed["worker"]["oci"]["gc"] is True
    assert parsed["registry"]["docker.io"]["mirrors"] == ["192.168.128.1:5000", "mirror.example.net"]
    assert parsed["registry"]["192.168.128.1:5000"] == {"http": True}
    assert "mirror.example.net" not in parsed["registry"]
    assert render.strip_block(text) == own


@pytest.mark.parametrize(
    "own",
    [
        '[registry."docker.io"]\n  mirrors = ["x"]\n',
        "[registry.'docker.io']\n  mirrors = ['x']\n",
        '[registry."192.168.128.1:5000"]\n  http = true\n',
        "[registry]\n",
        'registry."docker.io".mirrors = ["x"]\n',
    ],
)
def test_buildkitd_toml_of_a_user_who_set_the_same_registry_is_left_alone(own):
    assert render.buildkitd_conflict(own, {"docker.io": [MIRROR]})


def test_buildkitd_toml_without_registry_tables_is_no_conflict():
    assert render.buildkitd_conflict('[worker.oci]\n  gc = true\n', {"docker.io": [MIRROR]}) is None


def test_registries_yaml_merge_and_strip():
    own = "mirrors:\n  docker.io:\n    endpoint:\n    - https://own.example\nconfigs: {}\n"
    text = render.render_registries_yaml(own, {"docker.io": [MIRROR], "ghcr.io": [MIRROR]})
    data = yaml.safe_load(text)
    assert data["mirrors"]["docker.io"]["endpoint"] == [MIRROR, "https://own.example"]
    assert data["mirrors"]["ghcr.io"]["endpoint"] == [MIRROR]
    record = {"existed": True, "mirrors": {"docker.io": [MIRROR], "ghcr.io": [MIRROR]}}
    assert yaml.safe_load(render._strip_registries_yaml(text, record)) == yaml.safe_load(own)
    created = render.render_registries_yaml(None, {"docker.io": [MIRROR]})
    assert created.startswith("# Managed by Salt")
    assert render._strip_registries_yaml(created, dict(record, existed=False)) is None


def test_every_containerd_mirror_host_gets_a_dial_timeout():
    # What a black-holed mirror costs containerd is bounded per host.
    own = 'server = "https://registry-1.docker.io"\n\n[host."https://own.example"]\n  ca = "/x.pem"\n'
    for base in (None, own):
        hosts = tomllib.loads(render.render_hosts_toml(base, {"docker.io": [MIRROR, "https://10.0.0.2:5443"]}))["host"]
        ours = {url: host for url, host in hosts.items() if url != "https://own.example"}
        assert list(ours) == [MIRROR, "https://10.0.0.2:5443"]
        assert all(host["dial_timeout"] == "2s" for host in ours.values())
        # The user's own host is theirs: no timeout added to it.
        assert "dial_timeout" not in hosts.get("https://own.example", {})


def test_a_mirror_host_that_is_also_an_upstream_gets_one_buildkit_table():
    mirrors = {"docker.io": ["http://m.example:5000"], "m.example:5000": ["http://x.example:5000"]}
    text = render.render_buildkitd_toml(None, mirrors)
    registry = tomllib.loads(text)["registry"]
    assert registry["m.example:5000"] == {"mirrors": ["x.example:5000"], "http": True}
    assert registry["docker.io"] == {"mirrors": ["m.example:5000"]}


def test_docker_style_cert_names_reach_hosts_toml_escaped(tmp_path):
    certs = tmp_path / "docker.io"
    certs.mkdir()
    for name in ('odd"name.crt', "c\x7fa.crt", "plain.crt"):
        (certs / name).write_text("x")
    (certs / b"bad\xff.crt".decode("utf-8", "surrogateescape")).write_text("x")
    found = runtimes._docker_style_certs(str(certs))
    text = render.render_hosts_toml(None, {"docker.io": [MIRROR]}, server_certs=found)
    assert tomllib.loads(text)["ca"] == [str(certs / 'odd"name.crt'), str(certs / "plain.crt")]


# --- k3s and rke2: registries.yaml against its documented schema ---------------------------
#
# k3s and rke2 cannot run here (each is a whole Kubernetes node: kubelet, its own
# containerd, cgroup and iptables setup), so their ``registries.yaml`` is checked against
# the schema their docs define instead (docs.k3s.io/installation/private-registry and
# docs.rke2.io/install/containerd_registry_configuration; the Go type is ``Registry`` in
# github.com/rancher/wharfie/pkg/registries):
#
#     mirrors: {<registry host>: {endpoint: [<URL>...], rewrite: {<regex>: <replacement>}}}
#     configs: {<registry host>: {auth: {username, password, auth, identitytoken},
#                                 tls: {cert_file, key_file, ca_file, insecure_skip_verify}}}
#
# An endpoint is a URL with scheme (``http://`` for a plain-HTTP registry); containerd
# tries the endpoints in order and always tries the registry's default endpoint last
# (``https://index.docker.io/v2`` for docker.io), so the mirror list must not name the
# upstream itself for the fallback to work.

K3S_SECOND = "https://10.0.0.2:5443"

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
def test_rendered_registries_yaml_follows_the_documented_schema(base):
    text = render.render_registries_yaml(USER_FILES[base], {"docker.io": [MIRROR, K3S_SECOND], "ghcr.io": [MIRROR]})
    assert schema_problems(text) == []
    data = yaml.safe_load(text)
    endpoints = data["mirrors"]["docker.io"]["endpoint"]
    # Ours first, in order, then the user's; never the upstream: k3s tries that last anyway.
    assert endpoints[:2] == [MIRROR, K3S_SECOND]
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


def test_stripping_ours_leaves_a_file_that_still_follows_the_schema():
    base = USER_FILES["own docker.io mirror with rewrite"]
    ours = {"docker.io": [MIRROR]}
    rendered = render.render_registries_yaml(base, ours)
    stripped = render._strip_registries_yaml(rendered, {"mirrors": ours, "existed": True})
    assert schema_problems(stripped) == []
    assert yaml.safe_load(stripped) == yaml.safe_load(base)
