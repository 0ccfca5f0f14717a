"""The client side's pure logic: rendering each runtime's config, merging into the user's
own file and taking hub_mirror's part out again, byte for byte; pillar validation."""

import json
import tomllib

import pytest
import yaml
from salt.exceptions import SaltInvocationError

from tests.support.modules import lib

render = lib("clients.render")
runtimes = lib("clients.runtimes")
client_validate = lib("clients.validate")
validate = lib("validate")

MIRROR = "http://192.168.128.1:5000"
SECOND = "https://mirror.example.net"
GRAINS = {"ip4_interfaces": {"lo": ["127.0.0.1"]}}

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


@pytest.mark.parametrize(
    "text,expected",
    [
        (None, None),
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n',
         "/etc/containerd/certs.d"),
        ("version = 2\n[plugins.'io.containerd.grpc.v1.cri']\n  registry.config_path = '/a:/b'\n", "/a:/b"),
        ('version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/x"\n', "/x"),
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = "/usr/lib/cni"\n', None),
        ('[plugins."other".registry]\n  config_path = "/y"\n', None),
    ],
)
def test_cri_config_path(text, expected):
    assert runtimes._cri_config_paths(text) == expected


def _validate(client):
    validate._validate({"client": client}, GRAINS)


def test_valid_client_pillar_passes():
    _validate(
        {
            "mirrors": {"docker.io": [MIRROR, SECOND], "ghcr.io": MIRROR, "registry.local:5000": MIRROR},
            "runtimes": ["docker", "containerd"],
            "probe_timeout": 0.5,
            "paths": {"docker_daemon_json": "/tmp/daemon.json"},
        }
    )
    _validate(None)


@pytest.mark.parametrize(
    "client,key,words",
    [
        ({"mirrors": {"docker.io": "192.168.128.1:5000"}}, "client:mirrors:docker.io", "http or https URL"),
        ({"mirrors": {"docker.io": "http://m:5000/v2"}}, "client:mirrors:docker.io", "has a path"),
        ({"mirrors": {"docker.io": "http://u:p@m:5000"}}, "client:mirrors:docker.io", "credentials"),
        ({"mirrors": {"docker.io": []}}, "client:mirrors:docker.io", "non-empty list"),
        ({"mirrors": {"docker.io": [MIRROR, MIRROR + "/"]}}, "client:mirrors:docker.io", "twice"),
        ({"mirrors": {"https://docker.io": MIRROR}}, "client:mirrors:https://docker.io", "registry host"),
        ({"mirrors": ["docker.io"]}, "client:mirrors", "upstream registry host"),
        ({"runtimes": ["docker", "lxc"]}, "client:runtimes", "known runtimes"),
        ({"runtimes": "docker"}, "client:runtimes", "known runtimes"),
        ({"probe_timeout": 0}, "client:probe_timeout", "seconds"),
        ({"probe_timeout": "2"}, "client:probe_timeout", "seconds"),
        ({"paths": {"docker_daemon_json": "daemon.json"}}, "client:paths:docker_daemon_json", "absolute"),
        ({"paths": {"daemon_json": "/x"}}, "client:paths:daemon_json", "unknown key"),
        ({"mirror": {}}, "client:mirror", "unknown key"),
        ("docker.io", "client", "mapping"),
    ],
)
def test_bad_client_pillar_names_the_key_and_the_fix(client, key, words):
    with pytest.raises(SaltInvocationError) as info:
        _validate(client)
    message = str(info.value)
    assert f"hub_mirror:{key}:" in message, message
    assert "u:p@" not in message
    assert words in message, message
    # Every message carries a fix after the problem.
    line = next(line for line in message.splitlines() if f"hub_mirror:{key}:" in line)
    assert "; " in line


def test_client_settings_are_completed_with_defaults():
    client = client_validate.client_conf(
        {"client": {"mirrors": {"docker.io": MIRROR + "/"}}, "lookup": {"state_dir": "/var/lib/x"}}
    )
    assert client["mirrors"] == {"docker.io": [MIRROR]}
    assert client["runtimes"] == list(client_validate.CLIENT_RUNTIMES)
    assert client["probe_timeout"] == 2
    assert client["paths"]["docker_daemon_json"] == "/etc/docker/daemon.json"
    assert client["record_dir"] == "/var/lib/x/.client"
