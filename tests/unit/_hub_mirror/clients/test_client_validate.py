"""The ``client:`` pillar: every bad value refused by its key with the fix, hostile ones
included, and the client settings completed with their defaults."""

import pytest
import yaml
from salt.exceptions import SaltInvocationError

from _hub_mirror import validate
from _hub_mirror.clients import validate as client_validate
from tests.unit.host import GRAINS, MIRROR

SECOND = "https://mirror.example.net"


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


@pytest.mark.parametrize(
    "pillar_yaml,words",
    [
        # A YAML block scalar keeps its final newline.
        ("mirrors:\n  docker.io: |\n    http://192.168.128.1:5000\n", "'\\n'"),
        ("mirrors:\n  docker.io: \"http://192.168.128.1:5000\\r\"\n", "'\\r'"),
        ("mirrors:\n  docker.io: 'http://a\"b:5000'\n", "'\"'"),
        ("mirrors:\n  docker.io: 'http://bücher.example:5000'\n", "xn--bcher-kva.example"),
        ("mirrors:\n  docker.io: 'http://[::1'\n", "not a URL"),
        ("mirrors:\n  docker.io: 'http://[fe80::1%25eth0]:5000'\n", "bracketed IPv6"),
        ("mirrors:\n  \"docker.io\\n\": http://m:5000\n", "registry host"),
        ("ca_file: relative/ca.pem\n", "absolute"),
        ("ca_file: /nonexistent/ca.pem\n", "does not exist"),
        ("paths:\n  docker_daemon_json: \"/etc/docker/daemon.json\\n\"\n", "absolute path"),
    ],
)
def test_hostile_client_pillar_is_refused_by_key(pillar_yaml, words):
    with pytest.raises(SaltInvocationError) as info:
        _validate(yaml.safe_load(pillar_yaml))
    message = str(info.value)
    assert "hub_mirror:client:" in message and words in message, message


def test_ipv6_mirrors_pass_and_a_ca_file_that_exists_passes(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM\n")
    _validate({"mirrors": {"docker.io": ["http://[::1]:5000", "https://[2001:db8::1]"]}, "ca_file": str(ca)})


@pytest.mark.parametrize("value", [0, 5, 60, 86400])
def test_good_recheck_passes(value):
    _validate({"mirrors": {"docker.io": MIRROR}, "recheck": value})


@pytest.mark.parametrize("value", [4, -1, 86401, True, 60.5, "60", "1m", None])
def test_bad_recheck_names_the_key_and_the_fix(value):
    with pytest.raises(SaltInvocationError) as info:
        _validate({"mirrors": {"docker.io": MIRROR}, "recheck": value})
    line = next(line for line in str(info.value).splitlines() if "hub_mirror:client:recheck:" in line)
    assert "use e.g. 60" in line


def test_discover_settings_are_completed_with_defaults():
    client = client_validate.client_conf({"client": {"discover": {"tgt": "m*"}}, "lookup": {"state_dir": "/x"}})
    assert client["discover"] == {
        "tgt": "m*",
        "tgt_type": "glob",
        "function": "hub_mirror.endpoint",
        "same_grain": "",
        "prefer": [],
    }
    assert client_validate.client_conf({"client": {}, "lookup": {"state_dir": "/x"}})["discover"] == {}


def test_valid_discover_pillar_passes():
    _validate(
        {
            "discover": {
                "tgt": "G@role:mirror and G@zone:a",
                "tgt_type": "compound",
                "function": "hub_mirror_endpoints",
                "same_grain": "location:rack",
                "prefer": ["mirror1"],
            }
        }
    )


@pytest.mark.parametrize(
    "raw,key,words",
    [
        ({"client": {"discover": "G@role:mirror"}}, "client:discover", "mapping"),
        ({"client": {"discover": {"tgt_type": "compound"}}}, "client:discover:tgt", "is required"),
        ({"client": {"discover": {"tgt": "  "}}}, "client:discover:tgt", "is required"),
        ({"client": {"discover": {"tgt": "*", "tgt_type": "zone"}}}, "client:discover:tgt_type", "target type"),
        ({"client": {"discover": {"tgt": "*", "function": ""}}}, "client:discover:function", "mine function"),
        ({"client": {"discover": {"tgt": "*", "function": "a,b"}}}, "client:discover:function", "mine function"),
        ({"client": {"discover": {"tgt": "*", "same_grain": ["zone"]}}}, "client:discover:same_grain", "grain"),
        ({"client": {"discover": {"tgt": "*", "prefer": "mirror1"}}}, "client:discover:prefer", "minion ids"),
        ({"client": {"discover": {"tgt": "*", "zone": "a"}}}, "client:discover:zone", "unknown key"),
        ({"mirrors": {"hub": {"advertise": "mirror1:5000"}}}, "mirrors:hub:advertise", "http or https URL"),
        ({"mirrors": {"hub": {"advertise": "http://m:5000/v2"}}}, "mirrors:hub:advertise", "has a path"),
        ({"mirrors": {"hub": {"advertise": 5000}}}, "mirrors:hub:advertise", "must be a string"),
    ],
)
def test_bad_discover_and_advertise_pillar_names_the_key_and_the_fix(raw, key, words):
    with pytest.raises(SaltInvocationError) as info:
        validate._validate(raw, GRAINS)
    line = next(line for line in str(info.value).splitlines() if f"hub_mirror:{key}:" in line)
    assert words in line, line
    assert "; " in line
