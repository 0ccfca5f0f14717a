"""Attacks the hostile-pillar work did not foresee (issue 10), through the facade: each
test is one pillar an attacker who controls one minion's pillar or a careless operator
can write, and what hub_mirror must do with it instead of what it did. The attacks of a
local user or a compromised service account are in the tests of the library module they
attack (accounts, processes, registry_config, mirror)."""

import os

import pytest
from salt.exceptions import SaltInvocationError

from _hub_mirror import mirror, supervisor
from tests.support.modules import load
from tests.unit.host import GRAINS, lookup_in, pillar_mirror

hub_mirror = load("hub_mirror")

TOKEN = "dckr_pat_ATTACK0123456789abcdefXYZ"
M = "hub_mirror:mirrors:dockerhub"


@pytest.fixture
def configure_loader_modules():
    return {hub_mirror: {"__grains__": dict(GRAINS), "__pillar__": {}, "__salt__": {}, "__opts__": {}}}


def refusal(raw):
    hub_mirror.__pillar__["hub_mirror"] = raw
    with pytest.raises(SaltInvocationError) as refused:
        hub_mirror.settings()
    return str(refused.value)


# --- (d) credentials in messages -------------------------------------------------------


def test_upstream_with_credentials_that_is_the_mirror_itself_does_not_show_them():
    # Two problems with one URL: the second message printed it whole.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(upstream=f"http://hubuser:{TOKEN}@127.0.0.1:5000")}})
    assert f"{M}:upstream" in message
    assert TOKEN not in message


def test_a_token_pasted_into_username_is_not_shown():
    # "user:token" is what `docker login` prints and what people paste.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(username=f"hubuser:{TOKEN}", token=TOKEN)}})
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
        {"mirrors": {"dockerhub": pillar_mirror(listen=HUGE)}},
        {"mirrors": {"dockerhub": pillar_mirror(token=HUGE, username="u")}},
        {"mirrors": {"dockerhub": pillar_mirror(max_size=HUGE)}},
        {"mirrors": {"dockerhub": pillar_mirror(s3={"bucket": HUGE})}},
        {"install": {"source_hash": HUGE}},
        {"install": {"method": HUGE}},
    ],
    ids=["version", "probe_timeout", "mirror-name", "top-key", "lookup-user", "lookup-key", "listen", "token", "max_size", "s3-bucket", "source_hash", "method"],
)
def test_an_integer_too_long_to_print_is_refused_by_key(raw):
    assert "hub_mirror" in refusal(raw)


def nested(depth, leaf="x"):
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "raw",
    [
        {"mirrors": {"dockerhub": pillar_mirror(warm=nested(3000))}},
        {"mirrors": {"dockerhub": pillar_mirror(s3={"bucket": nested(3000)})}},
        {"lookup": {"user": nested(3000)}},
        {"nonsense": nested(3000)},
    ],
    ids=["warm", "s3-bucket", "lookup-user", "unknown-key"],
)
def test_a_deeply_nested_value_is_refused_by_key(raw):
    # copy.deepcopy and repr recurse: a few hundred levels were a RecursionError.
    assert "hub_mirror:" in refusal(raw)


def test_a_path_component_longer_than_the_filesystem_allows_is_refused():
    # mkdir would raise ENAMETOOLONG at configure, after validation said yes.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(storage="/srv/" + "a" * 256)}})
    assert f"{M}:storage" in message


@pytest.mark.parametrize("token", ["dckr_pat_ab\u20acc", "dckr pat", "\u00e9t\u00e9"])
def test_a_token_that_http_basic_cannot_carry_is_refused(token):
    # requests encodes Basic auth as latin-1: UnicodeEncodeError at configure, after a
    # green validation; a space is a folded YAML scalar, never part of a registry token.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(username="hubuser", token=token)}})
    assert f"{M}:token" in message
    assert token not in message


def test_a_username_that_http_basic_cannot_carry_is_refused():
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(username="\u043f\u0440\u0438\u0432\u0435\u0442", token=TOKEN)}})
    assert f"{M}:username" in message


# --- (b) values that change meaning in a sink -----------------------------------------


@pytest.mark.parametrize("target", ["cache\nExecStartPre=+id", "my cache$(id)", "c\"ache"])
def test_storage_that_resolves_to_an_unsafe_name_is_refused(tmp_path, target):
    # The pillar path is allow-listed, but what realpath makes of it is what is used.
    (tmp_path / target).mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / target)
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(storage=str(tmp_path / "cache"))}})
    assert f"{M}:storage" in message


@pytest.mark.parametrize(
    "key, value",
    [
        ("listen", '[fe80::1%a"b]:5000'),
        ("listen", "[fe80::1%$(id)]:5000"),
        ("debug_listen", "[::1%`id`]:15000"),
    ],
)
def test_an_ipv6_scope_is_allow_listed_like_any_host(key, value):
    # ipaddress accepts any text after %: it went into the config and, via the mine,
    # into other minions' client files.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(**{key: value})}})
    assert f"{M}:{key}" in message


@pytest.mark.parametrize("url", ['http://mirror"x:5000', "http://mi'rror:5000", "http://a\\b:5000", "http://a%0ab:5000"])
def test_advertise_host_is_allow_listed(url):
    # advertise is published to the mine and written into every client's config.
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(advertise=url)}})
    assert f"{M}:advertise" in message


# --- (c) owning and deleting what is not ours ------------------------------------------


@pytest.mark.parametrize("name", ["prefix", "config_dir", "unit_dir", "init_dir", "run_dir", "log_dir"])
def test_storage_must_not_hold_a_lookup_directory(name):
    # The service user owns the storage root: it could rename a root-owned directory in
    # it and put its own unit file, init script or registry binary in its place.
    raw = {"lookup": {name: "/srv/hubcache/sub"}, "mirrors": {"dockerhub": pillar_mirror(storage="/srv/hubcache")}}
    message = refusal(raw)
    assert f"{M}:storage" in message


def test_storage_must_not_hold_the_package_binary():
    raw = {
        "install": {"method": "package"},
        "lookup": {"package_binary": "/srv/hubcache/bin/registry"},
        "mirrors": {"dockerhub": pillar_mirror(storage="/srv/hubcache")},
    }
    assert f"{M}:storage" in refusal(raw)


@pytest.mark.parametrize("own", [".fingerprints", ".client"])
def test_storage_must_not_be_hub_mirrors_own_records(own):
    message = refusal({"mirrors": {"dockerhub": pillar_mirror(storage=f"/var/lib/hub-mirror/{own}")}})
    assert f"{M}:storage" in message


def test_absent_takes_only_a_mirror_name(tmp_path, monkeypatch):
    # `hub_mirror.remove mirror=../../x` (once `absent`) joined the name into config_dir and deleted
    # ../../x.yml, x.offline.yml, x.credentials.json and x.last-good.json wherever they are.
    lookup = lookup_in(tmp_path)
    os.makedirs(lookup["config_dir"])
    (tmp_path / "victim.yml").write_text("precious: true\n")
    hub_mirror.__pillar__["hub_mirror"] = {"lookup": lookup, "mirrors": {"dockerhub": pillar_mirror()}}
    for kind in (supervisor.Systemd, supervisor.Sysv):
        monkeypatch.setattr(kind, "running", lambda self, name: False)
    monkeypatch.setattr(mirror, "mirror_processes", lambda paths: [])
    monkeypatch.setattr(mirror, "stop_service", lambda conf, spec: True)
    with pytest.raises(SaltInvocationError):
        hub_mirror.remove("../victim")
    assert (tmp_path / "victim.yml").exists()
