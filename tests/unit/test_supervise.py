"""The supervisor's own logic, without a registry: healing the expiry schedule that a
full disk leaves empty (registry 2.8 panics on it at every start)."""

import json

from tests.support.modules import load


def test_an_empty_schedule_is_moved_aside(tmp_path):
    supervise = load("hub_mirror_supervise")
    (tmp_path / "scheduler-state.json").write_text("")
    aside = supervise.set_aside_broken_schedule(str(tmp_path))
    assert aside and aside.startswith(str(tmp_path / "scheduler-state.json.broken-"))
    assert not (tmp_path / "scheduler-state.json").exists()


def test_a_valid_or_missing_schedule_is_left_alone(tmp_path):
    supervise = load("hub_mirror_supervise")
    assert supervise.set_aside_broken_schedule(str(tmp_path)) is None
    state = {"library/alpine@sha256:ab": {"Key": "k", "Expiry": "2026-12-01T00:00:00Z", "EntryType": 0}}
    (tmp_path / "scheduler-state.json").write_text(json.dumps(state))
    assert supervise.set_aside_broken_schedule(str(tmp_path)) is None
    assert json.loads((tmp_path / "scheduler-state.json").read_text()) == state
    assert supervise.set_aside_broken_schedule("") is None
