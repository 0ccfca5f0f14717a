"""Attacks the hostile-pillar work did not foresee (issue 10): each test is one input an
attacker who controls one minion's pillar, a local user, a compromised service account or a
careless operator can produce, and what hub_mirror must do with it instead of what it did.
"""

import os
import pwd

import pytest
import yaml
from salt.exceptions import CommandExecutionError, SaltInvocationError

from tests.support.modules import lib

accounts = lib("accounts")
processes = lib("processes")
registry_config = lib("registry_config")
settings_lib = lib("settings")
storage_lib = lib("storage")
mirror_lib = lib("mirror")
supervisor_lib = lib("supervisor")

TOKEN = "dckr_pat_ATTACK0123456789abcdefXYZ"
M = "hub_mirror:mirrors:dockerhub"


def mirror(**changes):
    entry = {"upstream": "https://registry-1.docker.io", "listen": "127.0.0.1:5000"}
    entry.update(changes)
    return entry


def refusal(hub_mirror, raw):
    hub_mirror.__pillar__ = {"hub_mirror": raw}
    with pytest.raises(SaltInvocationError) as refused:
        hub_mirror.settings()
    return str(refused.value)


def lookup_in(tmp_path):
    return {
        "prefix": str(tmp_path / "opt"),
        "config_dir": str(tmp_path / "etc"),
        "state_dir": str(tmp_path / "state"),
        "log_dir": str(tmp_path / "log"),
        "run_dir": str(tmp_path / "run"),
        "unit_dir": str(tmp_path / "units"),
        "init_dir": str(tmp_path / "init.d"),
        "supervisor": "sysv",
    }


# --- (d) credentials in messages -------------------------------------------------------


def test_upstream_with_credentials_that_is_the_mirror_itself_does_not_show_them(hub_mirror):
    # Two problems with one URL: the second message printed it whole.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(upstream=f"http://hubuser:{TOKEN}@127.0.0.1:5000")}})
    assert f"{M}:upstream" in message
    assert TOKEN not in message


def test_a_token_pasted_into_username_is_not_shown(hub_mirror):
    # "user:token" is what `docker login` prints and what people paste.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(username=f"hubuser:{TOKEN}", token=TOKEN)}})
    assert f"{M}:username" in message
    assert TOKEN not in message


# --- (a) tracebacks instead of key-named errors ----------------------------------------


HUGE = 10**5000  # a YAML integer literal of 5001 digits: str() of it raises ValueError


@pytest.mark.parametrize(
    "raw",
    [
        {"version": HUGE},
        {"probe_timeout": HUGE},
        {"mirrors": {HUGE: {}}},
        {HUGE: 1},
        {"lookup": {"user": HUGE}},
        {"lookup": {HUGE: "x"}},
        {"mirrors": {"dockerhub": mirror(listen=HUGE)}},
        {"mirrors": {"dockerhub": mirror(token=HUGE, username="u")}},
        {"mirrors": {"dockerhub": mirror(max_size=HUGE)}},
        {"mirrors": {"dockerhub": mirror(s3={"bucket": HUGE})}},
        {"install": {"source_hash": HUGE}},
        {"install": {"method": HUGE}},
    ],
    ids=["version", "probe_timeout", "mirror-name", "top-key", "lookup-user", "lookup-key", "listen", "token", "max_size", "s3-bucket", "source_hash", "method"],
)
def test_an_integer_too_long_to_print_is_refused_by_key(hub_mirror, raw):
    assert "hub_mirror" in refusal(hub_mirror, raw)


def nested(depth, leaf="x"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "raw",
    [
        {"mirrors": {"dockerhub": mirror(warm=nested(3000))}},
        {"mirrors": {"dockerhub": mirror(s3={"bucket": nested(3000)})}},
        {"lookup": {"user": nested(3000)}},
        {"nonsense": nested(3000)},
    ],
    ids=["warm", "s3-bucket", "lookup-user", "unknown-key"],
)
def test_a_deeply_nested_value_is_refused_by_key(hub_mirror, raw):
    # copy.deepcopy and repr recurse: a few hundred levels were a RecursionError.
    assert "hub_mirror:" in refusal(hub_mirror, raw)


def test_a_path_component_longer_than_the_filesystem_allows_is_refused(hub_mirror):
    # mkdir would raise ENAMETOOLONG at configure, after validation said yes.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(storage="/srv/" + "a" * 256)}})
    assert f"{M}:storage" in message


@pytest.mark.parametrize("token", ["dckr_pat_ab\u20acc", "dckr pat", "\u00e9t\u00e9"])
def test_a_token_that_http_basic_cannot_carry_is_refused(hub_mirror, token):
    # requests encodes Basic auth as latin-1: UnicodeEncodeError at configure, after a
    # green validation; a space is a folded YAML scalar, never part of a registry token.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(username="hubuser", token=token)}})
    assert f"{M}:token" in message
    assert token not in message


def test_a_username_that_http_basic_cannot_carry_is_refused(hub_mirror):
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(username="\u043f\u0440\u0438\u0432\u0435\u0442", token=TOKEN)}})
    assert f"{M}:username" in message


# --- (b) values that change meaning in a sink -----------------------------------------


@pytest.mark.parametrize("target", ["cache\nExecStartPre=+id", "my cache$(id)", "c\"ache"])
def test_storage_that_resolves_to_an_unsafe_name_is_refused(hub_mirror, tmp_path, target):
    # The pillar path is allow-listed, but what realpath makes of it is what is used.
    (tmp_path / target).mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / target)
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(storage=str(tmp_path / "cache"))}})
    assert f"{M}:storage" in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("listen", '[fe80::1%a"b]:5000'),
        ("listen", "[fe80::1%$(id)]:5000"),
        ("debug_listen", "[::1%`id`]:15000"),
    ],
)
def test_an_ipv6_scope_is_allow_listed_like_any_host(hub_mirror, key, value):
    # ipaddress accepts any text after %: it went into the config and, via the mine,
    # into other minions' client files.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(**{key: value})}})
    assert f"{M}:{key}" in message


@pytest.mark.parametrize("url", ['http://mirror"x:5000', "http://mi'rror:5000", "http://a\\b:5000", "http://a%0ab:5000"])
def test_advertise_host_is_allow_listed(hub_mirror, url):
    # advertise is published to the mine and written into every client's config.
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(advertise=url)}})
    assert f"{M}:advertise" in message


# --- (c) owning and deleting what is not ours ------------------------------------------


@pytest.mark.parametrize("name", ["prefix", "config_dir", "unit_dir", "init_dir", "run_dir", "log_dir"])
def test_storage_must_not_hold_a_lookup_directory(hub_mirror, name):
    # The service user owns the storage root: it could rename a root-owned directory in
    # it and put its own unit file, init script or registry binary in its place.
    raw = {"lookup": {name: "/srv/hubcache/sub"}, "mirrors": {"dockerhub": mirror(storage="/srv/hubcache")}}
    message = refusal(hub_mirror, raw)
    assert f"{M}:storage" in message


def test_storage_must_not_hold_the_package_binary(hub_mirror):
    raw = {
        "install": {"method": "package"},
        "lookup": {"package_binary": "/srv/hubcache/bin/registry"},
        "mirrors": {"dockerhub": mirror(storage="/srv/hubcache")},
    }
    assert f"{M}:storage" in refusal(hub_mirror, raw)


@pytest.mark.parametrize("own", [".fingerprints", ".client"])
def test_storage_must_not_be_hub_mirrors_own_records(hub_mirror, own):
    message = refusal(hub_mirror, {"mirrors": {"dockerhub": mirror(storage=f"/var/lib/hub-mirror/{own}")}})
    assert f"{M}:storage" in message


def test_absent_takes_only_a_mirror_name(hub_mirror, tmp_path, monkeypatch):
    # `hub_mirror.absent mirror=../../x` joined the name into config_dir and deleted
    # ../../x.yml, x.offline.yml, x.credentials.json and x.last-good.json wherever they are.
    lookup = lookup_in(tmp_path)
    os.makedirs(lookup["config_dir"])
    (tmp_path / "victim.yml").write_text("precious: true\n")
    hub_mirror.__pillar__ = {"hub_mirror": {"lookup": lookup, "mirrors": {"dockerhub": mirror()}}}
    for supervisor in (supervisor_lib.Systemd, supervisor_lib.Sysv):
        monkeypatch.setattr(supervisor, "running", lambda self, name: False)
    monkeypatch.setattr(mirror_lib, "mirror_processes", lambda paths: [])
    monkeypatch.setattr(mirror_lib, "stop_service", lambda conf, spec: True)
    with pytest.raises(SaltInvocationError):
        hub_mirror.remove("../victim")
    assert (tmp_path / "victim.yml").exists()
