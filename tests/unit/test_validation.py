"""Validation of the hub_mirror pillar, as pure logic: every bad value is refused with a
message that names its pillar key and the fix, all problems are reported at once, and no
message ever shows the token, wherever a user put it."""

import pytest
from salt.exceptions import SaltInvocationError

from tests.support.modules import lib

net = lib("net")

TOKEN = "dckr_pat_UNIT0123456789abcdefXYZ"
USER = "hubuser"


def good_mirror(**changes):
    mirror = {"upstream": "https://registry-1.docker.io", "listen": "127.0.0.1:5000", "username": USER, "token": TOKEN}
    for key, value in changes.items():
        if value is None:
            mirror.pop(key)
        else:
            mirror[key] = value
    return mirror


def pillar(mirror=None, **top):
    return {"version": "2.8.3", "mirrors": {"dockerhub": mirror or good_mirror()}, **top}


def test_settings_redact_the_token_unless_asked(hub_mirror):
    hub_mirror.__pillar__ = {"hub_mirror": pillar()}
    assert TOKEN not in repr(hub_mirror.settings())
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["token"] == "<redacted>"
    assert hub_mirror._settings(redact=False)["mirrors"]["dockerhub"]["token"] == TOKEN
