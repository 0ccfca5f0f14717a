"""Discovery through the Salt mine: which mirrors a build host takes from the mine's
``hub_mirror.endpoint`` data and in what order, the fallback to ``client:mirrors``, the
``advertise`` URL mirror hosts publish, and validation of the new pillar keys. The mine
itself is a stand-in here (``mine.get`` answering from a dict); tests/integration/
test_fleet.py reads a real one through a salt-master."""

import pytest
from tests.support.modules import lib

client_validate = lib("clients.validate")

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


def configure(hub_mirror, mine, discover, mirrors=None, zone="a", own="build1"):
    hub_mirror.__salt__ = {"mine.get": mine}
    hub_mirror.__opts__ = {"id": own}
    hub_mirror.__grains__ = {**hub_mirror.__grains__, "zone": zone}
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


def test_same_zone_first_then_by_minion_id(hub_mirror):
    mine = fleet_mine()
    mirrors, line = configure(hub_mirror, mine, {"tgt": "G@role:mirror", "tgt_type": "compound", "same_grain": "zone"})
    assert mirrors == {
        HUB: ["http://10.0.1.1:5000", "http://10.0.1.2:5000", "http://10.0.2.1:5000", "http://10.0.3.1:5000"],
        GHCR: ["http://10.0.2.1:5001"],
    }
    assert mine.calls == [
        ("G@role:mirror", "hub_mirror.endpoint", "compound"),
        ("zone:a", "hub_mirror.endpoint", "grain"),
    ]
    assert line.startswith("Mine (hub_mirror.endpoint of 'G@role:mirror'): docker.io -> http://10.0.1.1:5000, ")


def test_prefer_comes_before_the_same_zone(hub_mirror):
    mirrors, _ = configure(
        hub_mirror, fleet_mine(), {"tgt": "*", "same_grain": "zone", "prefer": ["mirror-c1", "mirror-b1"]}
    )
    assert mirrors[HUB] == ["http://10.0.3.1:5000", "http://10.0.2.1:5000", "http://10.0.1.1:5000", "http://10.0.1.2:5000"]


def test_without_preferences_the_order_is_by_minion_id(hub_mirror):
    mine = fleet_mine()
    mirrors, _ = configure(hub_mirror, mine, {"tgt": "*"})
    assert mirrors[HUB] == ["http://10.0.1.1:5000", "http://10.0.1.2:5000", "http://10.0.2.1:5000", "http://10.0.3.1:5000"]
    # No same_grain: one mine lookup.
    assert len(mine.calls) == 1


def test_a_host_without_the_grain_gets_no_zone_preference(hub_mirror):
    mine = fleet_mine()
    hub_mirror.__grains__ = {k: v for k, v in hub_mirror.__grains__.items() if k != "zone"}
    hub_mirror.__salt__ = {"mine.get": mine}
    hub_mirror.__opts__ = {"id": "build1"}
    raw = {"client": {"discover": {"tgt": "*", "same_grain": "zone"}}, "lookup": {"state_dir": "/x"}}
    mirrors, _ = hub_mirror._discover(client_validate.client_conf(raw))
    assert mirrors[HUB][0] == "http://10.0.1.1:5000"
    assert len(mine.calls) == 1


def test_loopback_only_mirrors_of_other_hosts_and_dead_ones_are_skipped(hub_mirror):
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
    mirrors, line = configure(hub_mirror, mine, {"tgt": "*"})
    # This host's own loopback mirror serves this host: kept.
    assert mirrors == {HUB: ["http://127.0.0.1:5000", "http://10.0.1.3:5000"]}
    assert "mirror-a1/dockerhub (listens on loopback only: set advertise on that mirror)" in line
    assert "mirror-a2/dockerhub (not serving at the last mine update)" in line
    assert "old-minion (not a hub_mirror.endpoint entry)" in line
    assert "odd-minion (not a hub_mirror.endpoint entry)" in line


def test_the_same_url_from_two_minions_is_listed_once(hub_mirror):
    mine = FakeMine({"a": [endpoint("http://10.0.0.1:5000")], "b": [endpoint("http://10.0.0.1:5000/")]})
    mirrors, _ = configure(hub_mirror, mine, {"tgt": "*"})
    assert mirrors == {HUB: ["http://10.0.0.1:5000"]}


def test_registries_the_mine_lacks_keep_the_static_mirrors(hub_mirror):
    static = {GHCR: "http://192.168.0.9:5001", HUB: ["http://192.168.0.9:5000"]}
    only_hub = FakeMine({"mirror-a1": [endpoint("http://10.0.1.1:5000")]})
    mirrors, line = configure(hub_mirror, only_hub, {"tgt": "mirror-a*"}, mirrors=static)
    assert mirrors == {GHCR: ["http://192.168.0.9:5001"], HUB: ["http://10.0.1.1:5000"]}
    assert line.endswith("; from hub_mirror:client:mirrors: ghcr.io")


def test_an_empty_mine_falls_back_to_the_static_mirrors(hub_mirror):
    static = {HUB: ["http://192.168.0.9:5000"]}
    mirrors, line = configure(hub_mirror, FakeMine({}), {"tgt": "G@zone:z", "tgt_type": "compound"}, mirrors=static)
    assert mirrors == static
    assert line == "Mine (hub_mirror.endpoint of 'G@zone:z'): no mirror; from hub_mirror:client:mirrors: docker.io"


def test_a_mine_that_cannot_be_read_falls_back_to_the_static_mirrors(hub_mirror):
    def unreachable(tgt, fun, tgt_type="glob"):
        raise KeyError("nodegroup")

    static = {HUB: ["http://192.168.0.9:5000"]}
    mirrors, line = configure(hub_mirror, unreachable, {"tgt": "mirrors", "tgt_type": "nodegroup"}, mirrors=static)
    assert mirrors == static
    assert "not read (KeyError" in line and "using hub_mirror:client:mirrors" in line
