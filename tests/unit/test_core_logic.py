"""Pure logic of the execution module: arch mapping, release URLs and digests, config
rendering per dialect, pagination links, change reports that never show the token."""

import hashlib

import pytest
import yaml
from salt.exceptions import CommandExecutionError, SaltInvocationError

from tests.support.modules import lib

registry_api = lib("registry_api")
registry_config = lib("registry_config")
release = lib("release")
settings_lib = lib("settings")
supervisor = lib("supervisor")
validate = lib("validate")

# Every arch upstream builds, and the grain spellings that must reach it.
GRAIN_TO_ASSET = [
    ({"osarch": "amd64"}, "amd64"),
    ({"osarch": "x86_64"}, "amd64"),
    ({"osarch": "arm64"}, "arm64"),
    ({"osarch": "aarch64"}, "arm64"),
    ({"osarch": "armhf"}, "armv7"),
    ({"osarch": "armv7hl"}, "armv7"),
    ({"osarch": "armel"}, "armv6"),
    ({"osarch": "ppc64el"}, "ppc64le"),
    ({"osarch": "ppc64le"}, "ppc64le"),
    ({"osarch": "s390x"}, "s390x"),
    ({"osarch": "riscv64"}, "riscv64"),
    ({"osarch": "", "cpuarch": "armv7l"}, "armv7"),
    ({"osarch": "", "cpuarch": "armv6l"}, "armv6"),
    ({"osarch": "", "cpuarch": "aarch64"}, "arm64"),
]


@pytest.mark.parametrize("grains,asset_arch", GRAIN_TO_ASSET)
def test_grains_map_to_release_asset_arch(hub_mirror, grains, asset_arch):
    assert settings_lib.release_arch(grains) == asset_arch


def test_unknown_cpu_has_no_release_arch(hub_mirror):
    assert settings_lib.release_arch({"osarch": "mips", "cpuarch": "mips"}) is None


@pytest.mark.parametrize("version", ["2.8.3", "3.0.0"])
def test_every_built_arch_has_a_known_digest_and_asset_url(hub_mirror, version):
    arches = settings_lib.RELEASE_ARCHES_2 if version.startswith("2") else settings_lib.RELEASE_ARCHES_3
    assert set(release.KNOWN_DIGESTS[version]) == set(arches)
    for arch in arches:
        url = hub_mirror.asset_url(version, arch)
        assert url == (
            "https://github.com/distribution/distribution/releases/download/"
            f"v{version}/registry_{version}_linux_{arch}.tar.gz"
        )
        assert len(release._expected_digest(version, arch, "")) == 64


def test_riscv64_only_from_3x(hub_mirror):
    with pytest.raises(CommandExecutionError, match="no release for CPU arch 'riscv64'"):
        release._check_arch_supported("2.8.3", "riscv64", {})
    release._check_arch_supported("3.0.0", "riscv64", {})


def test_unknown_version_without_source_hash_names_the_key_to_add(hub_mirror):
    with pytest.raises(CommandExecutionError) as err:
        release._expected_digest("3.1.1", "amd64", "")
    assert "hub_mirror:install:source_hash" in str(err.value)
    assert "registry_3.1.1_linux_amd64.tar.gz.sha256" in str(err.value)


@pytest.mark.parametrize("given", ["a" * 64, "sha256:" + "A" * 64, "sha256=" + "b" * 64])
def test_source_hash_digest_forms(hub_mirror, given):
    assert release._expected_digest("9.9.9", "amd64", given) == given[-64:].lower()


def test_source_hash_url_is_fetched_and_parsed(hub_mirror, tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "asset.sha256").write_text(digest + "\n")
    assert release._expected_digest("9.9.9", "amd64", f"file://{tmp_path}/asset.sha256") == digest


def _mirror(hub_mirror, **overrides):
    spec = settings_lib.merge(settings_lib.MIRROR_DEFAULTS, {"username": "u", "token": "t0k3n"})
    spec.update(overrides)
    return validate.complete_mirror("dockerhub", spec, settings_lib.DEFAULTS["lookup"], hub_mirror.__grains__)


def test_render_2x_has_no_3x_only_keys(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror), "2")
    assert "ttl" not in config["proxy"]
    assert config["proxy"] == {
        "remoteurl": "https://registry-1.docker.io",
        "username": "u",
        "password": "t0k3n",
    }


def test_render_3x_sets_ttl(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror, ttl="72h"), "3")
    assert config["proxy"]["ttl"] == "72h"


def test_render_defaults_are_the_safe_ones(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror), "3")
    assert config["http"]["addr"] == "127.0.0.1:5000"
    assert config["http"]["debug"]["addr"] == "127.0.0.1:15000"
    assert config["storage"]["delete"] == {"enabled": True}
    assert config["storage"]["filesystem"]["rootdirectory"] == "/var/lib/hub-mirror/dockerhub"
    assert list(config["health"]) == ["storagedriver"]
    assert "cache" not in config["storage"]  # blobdescriptor cache + TTL serves empty bodies


def test_anonymous_mirror_has_no_credentials(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror, username="", token=""), "3")
    assert set(config["proxy"]) == {"remoteurl", "ttl"}


def test_ipv6_and_interface_listen(hub_mirror):
    assert registry_config.render_config(_mirror(hub_mirror, listen="[::1]:5000"), "3")["http"][
        "addr"
    ] == "[::1]:5000"
    assert registry_config.render_config(_mirror(hub_mirror, listen="eth0:5001"), "3")["http"][
        "addr"
    ] == "192.0.2.10:5001"


def test_offline_config_serves_the_same_storage_read_only_without_proxy(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror), "2")
    offline = registry_config.render_offline_config(config)
    assert "proxy" not in offline
    assert offline["storage"]["maintenance"] == {"readonly": {"enabled": True}}
    assert offline["storage"]["filesystem"] == config["storage"]["filesystem"]
    assert offline["http"]["addr"] == config["http"]["addr"]
    assert config["proxy"]["password"] == "t0k3n"  # the original is not mutated


def test_config_changes_never_show_the_token(hub_mirror):
    spec = _mirror(hub_mirror)
    old = registry_config._config_text("dockerhub", registry_config.render_config(spec, "2"))
    spec["token"] = "n3wt0k3n"
    spec["listen_port"] = 5050
    new = registry_config._config_text("dockerhub", registry_config.render_config(spec, "2"))
    changes = registry_config.config_changes(old, new)
    assert changes["proxy.password"] == {"old": "<redacted>", "new": "<redacted>"}
    assert changes["http.addr"] == {"old": "127.0.0.1:5000", "new": "127.0.0.1:5050"}
    assert "t0k3n" not in repr(changes)


def test_config_text_is_yaml_the_registry_reads(hub_mirror):
    text = registry_config._config_text("dockerhub", registry_config.render_config(_mirror(hub_mirror), "2"))
    assert text.startswith("# Managed by Salt")
    assert yaml.safe_load(text)["version"] == 0.1


@pytest.mark.parametrize(
    "header,target",
    [
        ('</v2/_catalog?last=b&n=2>; rel="next"', "/v2/_catalog?last=b&n=2"),
        ("</v2/_catalog?last=a%2Fb&n=100>; rel=next", "/v2/_catalog?last=a%2Fb&n=100"),
        ("", None),
        (None, None),
    ],
)
def test_next_link(hub_mirror, header, target):
    assert registry_api.next_link(header) == target


@pytest.mark.parametrize(
    "version,dialect", [("2.8.3", "2"), ("2.8.2+ds1", "2"), ("v2.8.1", "2"), ("3.0.0", "3"), ("3.1.1", "3")]
)
def test_dialect_follows_the_major_version(hub_mirror, version, dialect):
    assert settings_lib.dialect_of(version) == dialect


def test_unprivileged_ports_drop_every_capability(hub_mirror):
    conf = settings_lib.merge(settings_lib.DEFAULTS, {})
    conf["lookup"]["supervisor"] = "systemd"
    files = supervisor.render_service_files(conf, _mirror(hub_mirror))
    unit = files["/etc/systemd/system/hub-mirror-dockerhub.service"][0]
    assert "CapabilityBoundingSet=\n" in unit
    assert "User=hub-mirror" in unit
    assert 'ReadWritePaths="/var/lib/hub-mirror/dockerhub"' in unit
    assert "Restart=always" in unit
    assert "t0k3n" not in unit


def test_settings_redacts_and_validates(hub_mirror):
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": {"username": "u", "token": "t0k3n"}}}}
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["token"] == "<redacted>"
    assert hub_mirror._settings(redact=False)["mirrors"]["dockerhub"]["token"] == "t0k3n"
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": {"listen": 5000}}}}
    with pytest.raises(SaltInvocationError, match="hub_mirror:mirrors:dockerhub:listen"):
        hub_mirror.settings()


def test_render_3x_takes_the_credential_from_the_helper_not_the_config(hub_mirror):
    config = registry_config.render_config(_mirror(hub_mirror), "3", "/opt/hub-mirror/bin/helper")
    assert config["proxy"]["exec"] == {"command": "/opt/hub-mirror/bin/helper", "lifetime": "5m"}
    assert "password" not in config["proxy"] and "username" not in config["proxy"]
    assert "t0k3n" not in repr(config)


def test_s3_storage_replaces_the_filesystem_and_keeps_its_secret_redacted(hub_mirror):
    s3 = {"bucket": "cache", "endpoint": "http://127.0.0.1:9000", "accesskey": "AK", "secretkey": "SK"}
    spec = _mirror(hub_mirror, s3=s3)
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


def test_redis_needs_a_ttl_free_3x_mirror(hub_mirror):
    redis = {"addr": "127.0.0.1:6379"}
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"m": {"redis": redis}}}}
    with pytest.raises(SaltInvocationError, match="hub_mirror:mirrors:m:redis: the blob descriptor cache"):
        hub_mirror.settings()
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"m": {"redis": dict(redis, password="pw"), "ttl": "0"}}}}
    spec = hub_mirror.settings()["mirrors"]["m"]
    assert spec["redis"]["password"] == "<redacted>"
    config = registry_config.render_config(spec, "3")
    assert config["storage"]["cache"] == {"blobdescriptor": "redis"}
    assert config["redis"]["addr"] == "127.0.0.1:6379"


@pytest.mark.parametrize(
    "s3,key",
    [
        ({"region": "x"}, "s3:bucket"),
        ({"bucket": "b", "accesskey": "a"}, "s3:secretkey"),
        ({"bucket": "b", "endpoint": "ftp://x"}, "s3:endpoint"),
        ({"bucket": "b", "pathstyle": True}, "s3:pathstyle"),
        ({"bucket": "b", "path_style": "yes"}, "s3:path_style"),
    ],
)
def test_bad_s3_settings_name_their_key(hub_mirror, s3, key):
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"m": {"s3": s3}}}}
    with pytest.raises(SaltInvocationError, match=f"hub_mirror:mirrors:m:{key}"):
        hub_mirror.settings()


@pytest.mark.parametrize(
    "mirrors,key",
    [
        ({"a": {"listen": "localhost:5000"}, "b": {"listen": "127.0.0.1:5000"}}, "mirrors:b:listen"),
        ({"a": {"listen": "127.0.0.1:5000"}, "b": {"listen": "127.0.0.1:15000"}}, "mirrors:b:listen"),
        ({"a": {"listen": "0.0.0.0:5000"}, "b": {"listen": "127.0.0.1:5000"}}, "mirrors:b:listen"),
        ({"a": {"storage": "/srv/cache/"}, "b": {"listen": "127.0.0.1:5001", "storage": "/srv/cache"}}, "mirrors:b:storage"),
    ],
)
def test_mirrors_cannot_share_a_socket_or_storage(hub_mirror, mirrors, key):
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": mirrors}}
    with pytest.raises(SaltInvocationError, match=f"hub_mirror:{key}"):
        hub_mirror.settings()


def test_mirrors_on_distinct_sockets_validate(hub_mirror):
    hub_mirror.__pillar__ = {
        "hub_mirror": {
            "mirrors": {
                "a": {"listen": "127.0.0.1:5000"},
                "b": {"listen": "127.0.0.2:5000", "debug_listen": "127.0.0.2:15000"},
            }
        }
    }
    assert set(hub_mirror.settings()["mirrors"]) == {"a", "b"}
