"""The registry config in each dialect: safe defaults, credentials from the helper on 3.x,
S3 and redis, the offline config, and change reports that never show a secret."""

import yaml

from _hub_mirror import registry_config
from tests.unit.host import mirror_spec


def test_render_2x_has_no_3x_only_keys():
    config = registry_config.render_config(mirror_spec(), "2")
    assert "ttl" not in config["proxy"]
    assert config["proxy"] == {
        "remoteurl": "https://registry-1.docker.io",
        "username": "u",
        "password": "t0k3n",
    }


def test_render_3x_sets_ttl():
    config = registry_config.render_config(mirror_spec(ttl="72h"), "3")
    assert config["proxy"]["ttl"] == "72h"


def test_render_defaults_are_the_safe_ones():
    config = registry_config.render_config(mirror_spec(), "3")
    # Behind the front, which listens on 127.0.0.1:5000; a socket path is 107 bytes at most.
    assert config["http"]["net"] == "unix" and config["http"]["addr"] == "registry.sock"
    assert config["http"]["debug"]["addr"] == "127.0.0.1:15000"
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["storage"]["filesystem"]["rootdirectory"] == "/var/lib/hub-mirror/dockerhub"
    assert list(config["health"]) == ["storagedriver"]
    assert "cache" not in config["storage"]  # blobdescriptor cache + TTL serves empty bodies


def test_anonymous_mirror_has_no_credentials_but_the_helper_on_3():
    # exec keeps 3.x from pinging the upstream at start; the helper answers empty ones.
    config = registry_config.render_config(mirror_spec(username="", token=""), "3", "/h")
    assert config["proxy"]["exec"]["command"] == "/h"
    assert set(config["proxy"]) == {"remoteurl", "ttl", "exec"}
    assert set(registry_config.render_config(mirror_spec(username="", token=""), "2")["proxy"]) == {"remoteurl"}


def test_ipv6_and_interface_listen_without_a_front():
    assert registry_config.render_config(mirror_spec(listen="[::1]:5000", front="none"), "3")["http"] == {
        "addr": "[::1]:5000",
        "headers": {"X-Content-Type-Options": ["nosniff"]},
        "debug": {"addr": "127.0.0.1:15000", "prometheus": {"enabled": True, "path": "/metrics"}},
    }
    assert registry_config.render_config(mirror_spec(listen="eth0:5001", front="none"), "3")["http"][
        "addr"
    ] == "192.0.2.10:5001"


def test_an_s3_mirror_has_no_front():
    s3 = {"bucket": "b", "region": "r", "rootdirectory": "/", "accesskey": "", "secretkey": "", "endpoint": ""}
    assert registry_config.render_config(mirror_spec(s3={**s3, "path_style": True}), "3")["http"]["addr"] == "127.0.0.1:5000"


def test_offline_config_serves_the_same_storage_read_only_without_proxy():
    config = registry_config.render_config(mirror_spec(), "2")
    offline = registry_config.render_offline_config(config)
    assert "proxy" not in offline
    assert offline["storage"]["maintenance"] == {"readonly": {"enabled": True}}
    assert offline["storage"]["filesystem"] == config["storage"]["filesystem"]
    assert offline["http"]["addr"] == config["http"]["addr"]
    assert config["proxy"]["password"] == "t0k3n"  # the original is not mutated


def test_config_changes_never_show_the_token():
    spec = mirror_spec(front="none")
    old = registry_config._config_text("dockerhub", registry_config.render_config(spec, "2"))
    spec["token"] = "n3wt0k3n"
    spec["listen_port"] = 5050
    new = registry_config._config_text("dockerhub", registry_config.render_config(spec, "2"))
    changes = registry_config.config_changes(old, new)
    assert changes["proxy.password"] == {"old": "<redacted>", "new": "<redacted>"}
    assert changes["http.addr"] == {"old": "127.0.0.1:5000", "new": "127.0.0.1:5050"}
    assert "t0k3n" not in repr(changes)


def test_config_text_is_yaml_the_registry_reads():
    text = registry_config._config_text("dockerhub", registry_config.render_config(mirror_spec(), "2"))
    assert text.startswith("# Managed by Salt")
    assert yaml.safe_load(text)["version"] == 0.1


def test_render_3x_takes_the_credential_from_the_helper_not_the_config():
    config = registry_config.render_config(mirror_spec(), "3", "/opt/hub-mirror/bin/helper")
    assert config["proxy"]["exec"] == {"command": "/opt/hub-mirror/bin/helper", "lifetime": "10s"}
    assert "password" not in config["proxy"] and "username" not in config["proxy"]
    assert "t0k3n" not in repr(config)


def test_s3_storage_replaces_the_filesystem_and_keeps_its_secret_redacted():
    s3 = {"bucket": "cache", "endpoint": "http://127.0.0.1:9000", "accesskey": "AK", "secretkey": "SK"}
    spec = mirror_spec(s3=s3)
    config = registry_config.render_config(spec, "2")
    assert "filesystem" not in config["storage"]
    assert config["storage"]["s3"] == {
        "bucket": "cache",
        "region": "us-east-1",
        "rootdirectory": "/",
        "accesskey": "AK",
        "secretkey": "SK",
        "regionendpoint": "http://127.0.0.1:9000",
        "secure": False,
    }
    assert registry_config.render_config(spec, "3")["storage"]["s3"]["forcepathstyle"] is True
    old = registry_config._config_text("dockerhub", config)
    spec["s3"]["secretkey"] = "SK2"
    changes = registry_config.config_changes(old, registry_config._config_text("dockerhub", registry_config.render_config(spec, "2")))
    assert changes == {"storage.s3.secretkey": {"old": "<redacted>", "new": "<redacted>"}}


# --- a config the service user rewrote (issue 10) ------------------------------------


def test_a_self_referencing_yaml_config_is_overwritten_not_a_crash():
    # A local edit (or the service user, who owns the file) can make the config recursive.
    changes = registry_config.config_changes("a: &x {b: *x}\n", "version: 0.1\n")
    assert "config" in changes


def test_a_billion_laughs_config_is_overwritten_quickly():
    lines = ['a0: &a0 {x: "lol"}']
    lines += [f"a{i}: &a{i} {{{', '.join(f'k{j}: *a{i - 1}' for j in range(10))}}}" for i in range(1, 9)]
    changes = registry_config.config_changes("\n".join(lines) + "\n", "version: 0.1\n")
    assert "config" in changes
