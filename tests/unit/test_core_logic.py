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


def test_settings_redacts_and_validates(hub_mirror):
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": {"username": "u", "token": "t0k3n"}}}}
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["token"] == "<redacted>"
    assert hub_mirror._settings(redact=False)["mirrors"]["dockerhub"]["token"] == "t0k3n"
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": {"listen": 5000}}}}
    with pytest.raises(SaltInvocationError, match="hub_mirror:mirrors:dockerhub:listen"):
        hub_mirror.settings()


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
