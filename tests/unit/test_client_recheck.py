"""``client:recheck``: its validation, the schedule entry it asks for, and how
``client_recheck`` keeps that entry with Salt's schedule module (a stand-in with the
same calls here; tests/integration/test_recheck.py runs the real scheduler)."""

import pytest
from salt.exceptions import CommandExecutionError

from tests.support.modules import lib

discovery = lib("clients.discovery")

MIRROR = "http://192.168.128.1:5000"


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
def minion(hub_mirror, tmp_path):
    def setup(recheck=None, jobs=None, cli="salt-call", fail=False):
        client = {"mirrors": {"docker.io": MIRROR}}
        if recheck is not None:
            client["recheck"] = recheck
        hub_mirror.__pillar__ = {"hub_mirror": {"client": client, "lookup": {"state_dir": str(tmp_path)}}}
        hub_mirror.__opts__ = {"__cli": cli, "pidfile": str(tmp_path / "no-minion.pid")}
        schedule = FakeSchedule(jobs, fail=fail)
        hub_mirror.__salt__ = schedule.functions()
        return schedule

    return setup


def test_recheck_adds_the_entry_then_changes_nothing(hub_mirror, minion):
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


def test_recheck_inside_the_daemon_goes_through_its_event_bus(hub_mirror, minion):
    schedule = minion(recheck=30, cli="salt-minion")
    hub_mirror.client_recheck()
    assert ("add", False) in schedule.calls and ("list", False) in schedule.calls


def test_a_new_interval_modifies_and_zero_or_clean_removes(hub_mirror, minion):
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


def test_without_recheck_nothing_is_said_or_done(hub_mirror, minion):
    schedule = minion()
    assert hub_mirror.client_recheck() == {"changes": {}, "comment": ""}
    assert [kind for kind, _ in schedule.calls] == ["list"]


def test_a_schedule_that_refuses_is_an_error(hub_mirror, minion):
    minion(recheck=60, fail=True)
    with pytest.raises(CommandExecutionError, match="hub_mirror-client-recheck failed"):
        hub_mirror.client_recheck()
