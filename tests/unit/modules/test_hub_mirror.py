"""The facade as Salt's loader runs it (salt-factories' loader mock gives it grains,
pillar, opts and the other modules): what its commands return, what they ask Salt's
mine and schedule modules, and secrets redacted in what they return."""

import pytest
from salt.exceptions import CommandExecutionError, SaltInvocationError

from _hub_mirror import registry_config
from _hub_mirror.clients import discovery
from _hub_mirror.clients import validate as client_validate
from tests.support.modules import load
from tests.unit.host import GRAINS, MIRROR

hub_mirror = load("hub_mirror")


@pytest.fixture
def configure_loader_modules():
    """A test changes what the facade sees by changing these dicts."""
    return {hub_mirror: {"__grains__": dict(GRAINS), "__pillar__": {}, "__salt__": {}, "__opts__": {}}}


# --- settings: validated, secrets redacted ------------------------------------------------

TOKEN = "dckr_pat_UNIT0123456789abcdefXYZ"


def test_settings_redacts_and_validates():
    hub_mirror.__pillar__["hub_mirror"] = {"mirrors": {"dockerhub": {"username": "u", "token": "t0k3n"}}}
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["token"] == "<redacted>"
    assert hub_mirror._settings(redact=False)["mirrors"]["dockerhub"]["token"] == "t0k3n"
    hub_mirror.__pillar__["hub_mirror"] = {"mirrors": {"dockerhub": {"listen": 5000}}}
    with pytest.raises(SaltInvocationError, match="hub_mirror:mirrors:dockerhub:listen"):
        hub_mirror.settings()


def test_redis_needs_a_ttl_free_3x_mirror():
    redis = {"addr": "127.0.0.1:6379"}
    hub_mirror.__pillar__["hub_mirror"] = {"mirrors": {"m": {"redis": redis}}}
    with pytest.raises(SaltInvocationError, match="hub_mirror:mirrors:m:redis: the blob descriptor cache"):
        hub_mirror.settings()
    hub_mirror.__pillar__["hub_mirror"] = {"mirrors": {"m": {"redis": dict(redis, password="pw"), "ttl": "0"}}}
    spec = hub_mirror.settings()["mirrors"]["m"]
    assert spec["redis"]["password"] == "<redacted>"
    config = registry_config.render_config(spec, "3")
    assert config["storage"]["cache"] == {"blobdescriptor": "redis"}
    # 3.x reads a list (go-redis UniversalOptions); 2.8 one address.
    assert config["redis"]["addrs"] == ["127.0.0.1:6379"] and "addr" not in config["redis"]
    assert registry_config.render_config(spec, "2")["redis"]["addr"] == "127.0.0.1:6379"


def test_settings_redact_the_token_unless_asked():
    hub_mirror.__pillar__["hub_mirror"] = {"mirrors": {"dockerhub": {"username": "hubuser", "token": TOKEN}}}
    assert TOKEN not in repr(hub_mirror.settings())
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["token"] == "<redacted>"
    assert hub_mirror._settings(redact=False)["mirrors"]["dockerhub"]["token"] == TOKEN


# --- client_recheck: the schedule entry, kept with Salt's schedule module -----------------
#
# A stand-in with the same calls here; tests/integration/test_recheck.py runs the real
# scheduler.


class FakeSchedule:
    """Salt's schedule.list/add/modify/delete as they answer for one minion."""

    def __init__(self, jobs=None, fail=False):
        self.jobs = dict(jobs or {})
        self.calls = []
        self.fail = fail

    def functions(self):
        def list_(show_all=False, return_yaml=True, offline=False):
            self.calls.append(("list", offline))
            return {name: dict(job, enabled=True, name=name) for name, job in self.jobs.items()}

        def change(kind):
            def call(name, offline=False, **job):
                self.calls.append((kind, offline))
                if self.fail:
                    return {"result": False, "comment": "Event module not available."}
                if kind == "delete":
                    del self.jobs[name]
                else:
                    self.jobs[name] = job
                return {"result": True, "comment": "ok"}

            return call

        return {
            "schedule.list": list_,
            "schedule.add": change("add"),
            "schedule.modify": change("modify"),
            "schedule.delete": change("delete"),
        }


@pytest.fixture
def minion(tmp_path):
    def setup(recheck=None, jobs=None, cli="salt-call", fail=False):
        client = {"mirrors": {"docker.io": MIRROR}}
        if recheck is not None:
            client["recheck"] = recheck
        hub_mirror.__pillar__["hub_mirror"] = {"client": client, "lookup": {"state_dir": str(tmp_path)}}
        hub_mirror.__opts__.update({"__cli": cli, "pidfile": str(tmp_path / "no-minion.pid")})
        schedule = FakeSchedule(jobs, fail=fail)
        hub_mirror.__salt__.update(schedule.functions())
        return schedule

    return setup


def test_recheck_adds_the_entry_then_changes_nothing(minion):
    schedule = minion(recheck=60)
    predicted = hub_mirror.client_recheck(test=True)
    assert schedule.jobs == {}
    done = hub_mirror.client_recheck()
    assert predicted["changes"] == done["changes"] == {
        "recheck": {"old": None, "new": discovery.recheck_job(60)}
    }
    assert schedule.jobs == {discovery.RECHECK_JOB: discovery.recheck_job(60)}
    # No salt-minion runs beside this salt-call: the entry goes to its file only.
    assert ("add", True) in schedule.calls
    assert "no salt-minion runs now" in done["comment"]

    again = hub_mirror.client_recheck()
    assert again["changes"] == {}
    assert "every 60 s at most" in again["comment"]
    assert [kind for kind, _ in schedule.calls].count("add") == 1


def test_recheck_inside_the_daemon_goes_through_its_event_bus(minion):
    schedule = minion(recheck=30, cli="salt-minion")
    hub_mirror.client_recheck()
    assert ("add", False) in schedule.calls and ("list", False) in schedule.calls


def test_a_new_interval_modifies_and_zero_or_clean_removes(minion):
    job = discovery.RECHECK_JOB
    schedule = minion(recheck=120, jobs={job: discovery.recheck_job(60)})
    changed = hub_mirror.client_recheck()
    assert changed["changes"]["recheck"]["new"]["seconds"] + changed["changes"]["recheck"]["new"]["splay"] == 120
    assert ("modify", True) in schedule.calls

    schedule = minion(recheck=0, jobs={job: discovery.recheck_job(60)})
    removed = hub_mirror.client_recheck()
    assert removed["changes"]["recheck"]["new"] is None and schedule.jobs == {}

    schedule = minion(recheck=60, jobs={job: discovery.recheck_job(60)})
    cleaned = hub_mirror.client_recheck(remove=True)
    assert cleaned["changes"]["recheck"]["old"] == discovery.recheck_job(60) and schedule.jobs == {}


def test_without_recheck_nothing_is_said_or_done(minion):
    schedule = minion()
    assert hub_mirror.client_recheck() == {"changes": {}, "comment": ""}
    assert [kind for kind, _ in schedule.calls] == ["list"]


def test_a_schedule_that_refuses_is_an_error(minion):
    minion(recheck=60, fail=True)
    with pytest.raises(CommandExecutionError, match="hub_mirror-client-recheck failed"):
        hub_mirror.client_recheck()


# --- client discovery through the Salt mine -----------------------------------------------
#
# Which mirrors a build host takes from the mine's hub_mirror.endpoint data and in what
# order, and the fallback to client:mirrors. The mine is a stand-in here (mine.get
# answering from a dict); tests/integration/test_fleet.py reads a real one through a
# salt-master.

HUB = "docker.io"
GHCR = "ghcr.io"


def endpoint(url, registry=HUB, mirror="dockerhub", loopback_only=False, serving=True):
    return {"mirror": mirror, "registry": registry, "url": url, "loopback_only": loopback_only, "serving": serving}


class FakeMine:
    """``mine.get``: the full answer for the discover target; for a grain target only the
    minions whose grain matches (what the master's grain cache would say)."""

    def __init__(self, data, grains=None):
        self.data = data
        self.grains = grains or {}
        self.calls = []

    def __call__(self, tgt, fun, tgt_type="glob"):
        self.calls.append((tgt, fun, tgt_type))
        if tgt_type == "grain":
            grain, _, value = tgt.partition(":")
            return {m: d for m, d in self.data.items() if str(self.grains.get(m, {}).get(grain)) == value}
        return dict(self.data)


def discovered(mine, discover, mirrors=None, zone="a", own="build1"):
    """What the facade's _discover makes of ``mine`` on the host ``own`` in ``zone`` (no
    zone grain when None), for the pillar client:discover and client:mirrors given."""
    hub_mirror.__salt__["mine.get"] = mine
    hub_mirror.__opts__["id"] = own
    if zone is not None:
        hub_mirror.__grains__["zone"] = zone
    raw = {"client": {"discover": discover, "mirrors": mirrors or {}}, "lookup": {"state_dir": "/var/lib/x"}}
    return hub_mirror._discover(client_validate.client_conf(raw))


ZONES = {"mirror-b1": {"zone": "b"}, "mirror-a2": {"zone": "a"}, "mirror-a1": {"zone": "a"}, "mirror-c1": {"zone": "c"}}


def fleet_mine():
    return FakeMine(
        {
            "mirror-b1": [endpoint("http://10.0.2.1:5000"), endpoint("http://10.0.2.1:5001", GHCR, "ghcr")],
            "mirror-a2": [endpoint("http://10.0.1.2:5000/")],
            "mirror-a1": [endpoint("http://10.0.1.1:5000")],
            "mirror-c1": [endpoint("http://10.0.3.1:5000")],
        },
        ZONES,
    )


def test_same_zone_first_then_by_minion_id():
    mine = fleet_mine()
    mirrors, line = discovered(mine, {"tgt": "G@role:mirror", "tgt_type": "compound", "same_grain": "zone"})
    assert mirrors == {
        HUB: ["http://10.0.1.1:5000", "http://10.0.1.2:5000", "http://10.0.2.1:5000", "http://10.0.3.1:5000"],
        GHCR: ["http://10.0.2.1:5001"],
    }
    assert mine.calls == [
        ("G@role:mirror", "hub_mirror.endpoint", "compound"),
        ("zone:a", "hub_mirror.endpoint", "grain"),
    ]
    assert line.startswith("Mine (hub_mirror.endpoint of 'G@role:mirror'): docker.io -> http://10.0.1.1:5000, ")


def test_prefer_comes_before_the_same_zone():
    mirrors, _ = discovered(fleet_mine(), {"tgt": "*", "same_grain": "zone", "prefer": ["mirror-c1", "mirror-b1"]})
    assert mirrors[HUB] == ["http://10.0.3.1:5000", "http://10.0.2.1:5000", "http://10.0.1.1:5000", "http://10.0.1.2:5000"]


def test_without_preferences_the_order_is_by_minion_id():
    mine = fleet_mine()
    mirrors, _ = discovered(mine, {"tgt": "*"})
    assert mirrors[HUB] == ["http://10.0.1.1:5000", "http://10.0.1.2:5000", "http://10.0.2.1:5000", "http://10.0.3.1:5000"]
    # No same_grain: one mine lookup.
    assert len(mine.calls) == 1


def test_a_host_without_the_grain_gets_no_zone_preference():
    mine = fleet_mine()
    assert "zone" not in hub_mirror.__grains__
    mirrors, _ = discovered(mine, {"tgt": "*", "same_grain": "zone"}, zone=None)
    assert mirrors[HUB][0] == "http://10.0.1.1:5000"
    assert len(mine.calls) == 1


def test_loopback_only_mirrors_of_other_hosts_and_dead_ones_are_skipped():
    mine = FakeMine(
        {
            "build1": [endpoint("http://127.0.0.1:5000", loopback_only=True)],
            "mirror-a1": [endpoint("http://127.0.0.1:5000", loopback_only=True)],
            "mirror-a2": [endpoint("http://10.0.1.2:5000", serving=False)],
            "mirror-a3": [endpoint("http://10.0.1.3:5000")],
            "old-minion": "'hub_mirror.endpoint' is not available.",
            "odd-minion": [{"registry": HUB, "url": "10.0.1.9:5000"}],
        }
    )
    mirrors, line = discovered(mine, {"tgt": "*"})
    # This host's own loopback mirror serves this host: kept.
    assert mirrors == {HUB: ["http://127.0.0.1:5000", "http://10.0.1.3:5000"]}
    assert "mirror-a1/dockerhub (listens on loopback only: set advertise on that mirror)" in line
    assert "mirror-a2/dockerhub (not serving at the last mine update)" in line
    assert "old-minion (not a hub_mirror.endpoint entry)" in line
    assert "odd-minion (not a hub_mirror.endpoint entry)" in line


def test_the_same_url_from_two_minions_is_listed_once():
    mine = FakeMine({"a": [endpoint("http://10.0.0.1:5000")], "b": [endpoint("http://10.0.0.1:5000/")]})
    mirrors, _ = discovered(mine, {"tgt": "*"})
    assert mirrors == {HUB: ["http://10.0.0.1:5000"]}


def test_registries_the_mine_lacks_keep_the_static_mirrors():
    static = {GHCR: "http://192.168.0.9:5001", HUB: ["http://192.168.0.9:5000"]}
    only_hub = FakeMine({"mirror-a1": [endpoint("http://10.0.1.1:5000")]})
    mirrors, line = discovered(only_hub, {"tgt": "mirror-a*"}, mirrors=static)
    assert mirrors == {GHCR: ["http://192.168.0.9:5001"], HUB: ["http://10.0.1.1:5000"]}
    assert line.endswith("; from hub_mirror:client:mirrors: ghcr.io")


def test_an_empty_mine_falls_back_to_the_static_mirrors():
    static = {HUB: ["http://192.168.0.9:5000"]}
    mirrors, line = discovered(FakeMine({}), {"tgt": "G@zone:z", "tgt_type": "compound"}, mirrors=static)
    assert mirrors == static
    assert line == "Mine (hub_mirror.endpoint of 'G@zone:z'): no mirror; from hub_mirror:client:mirrors: docker.io"


def test_a_mine_that_cannot_be_read_falls_back_to_the_static_mirrors():
    def unreachable(tgt, fun, tgt_type="glob"):
        raise KeyError("nodegroup")

    static = {HUB: ["http://192.168.0.9:5000"]}
    mirrors, line = discovered(unreachable, {"tgt": "mirrors", "tgt_type": "nodegroup"}, mirrors=static)
    assert mirrors == static
    assert "not read (KeyError" in line and "using hub_mirror:client:mirrors" in line


# --- the library as the loader finds it ----------------------------------------------------


@pytest.fixture
def library_copy(tmp_path):
    """A copy of _modules to break and mend; sys.modules as it was afterwards."""
    import shutil
    import sys

    from tests.support.modules import REPO

    def load_copy():
        return load("copy", tmp_path / "_modules" / "hub_mirror.py")

    kept = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "_hub_mirror"}
    shutil.copytree(REPO / "_modules", tmp_path / "_modules", ignore=shutil.ignore_patterns("__pycache__"))
    yield tmp_path / "_modules", load_copy
    for name in [name for name in sys.modules if name.split(".")[0] == "_hub_mirror"]:
        del sys.modules[name]
    sys.modules.update(kept)


def test_a_library_broken_midway_through_a_sync_loads_once_mended(library_copy):
    modules, load_copy = library_copy
    assert load_copy().mirrors.__file__ == str(modules / "_hub_mirror" / "mirror.py")
    settings_py = modules / "_hub_mirror" / "settings.py"
    good = settings_py.read_text()
    settings_py.write_text(good.replace("def mirror_paths(", "def mirror_paths_gone("))
    with pytest.raises(ImportError):
        load_copy()
    settings_py.write_text(good)
    assert load_copy().hm_settings.mirror_paths
