"""Every inspect-and-operate function, through ``salt-call``, with the registry stopped,
with an empty storage directory, with no storage directory and with a wrong mirror name:
a clear error or an honest "not running", never a traceback."""

import time

import pytest

from tests.functional.inspect_support import Mirror, applied_mirror
from tests.support import oci
from tests.support.hub import stocked_hub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar
from tests.support.saltcall import unique_name

pytestmark = pytest.mark.functional

FUNCTIONS = [
    ("hub_mirror.catalog",),
    ("hub_mirror.catalog", "source=disk"),
    ("hub_mirror.tags", "library/alpine"),
    ("hub_mirror.status",),
    ("hub_mirror.usage",),
    ("hub_mirror.ratelimit",),
    ("hub_mirror.warm", "library/alpine"),
    ("hub_mirror.gc",),
    ("hub_mirror.gc", "dry_run=False"),
    ("hub_mirror.prune", "max_size=1K", "test=True"),
]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with stocked_hub(tmp_path_factory.mktemp("robust-hub")) as hub:
        yield hub


@pytest.fixture(scope="module")
def mirrors(hub, release_server, tmp_path_factory):
    """``full`` has alpine cached, ``empty`` nothing (both running); after the apply the
    pillar also names ``missing``, whose storage directory does not exist."""
    with applied_mirror(hub, release_server) as full:
        oci.pull(full.hostport, "library/alpine", "latest", str(tmp_path_factory.mktemp("pull") / "p"))
        full.empty = Mirror(full.minion, unique_name("e"), free_port(), hub)
        full.missing = Mirror(full.minion, unique_name("x"), free_port(), hub)
        pillar = {full.name: full.pillar(), full.empty.name: full.empty.pillar()}
        full.minion.set_pillar(archive_pillar(release_server, pillar))
        applied = full.minion.apply()
        assert applied.returncode == 0, applied
        pillar[full.missing.name] = full.missing.pillar(storage=f"{full.minion.root}/no-such-storage")
        full.minion.set_pillar(archive_pillar(release_server, pillar))
        yield full


def no_traceback(result):
    assert "Traceback" not in result.output, result
    assert "Unhandled" not in result.output, result
    return result


@pytest.mark.parametrize("call", FUNCTIONS, ids=lambda call: " ".join(call))
def test_wrong_mirror_name_is_a_clear_error(mirrors, call):
    result = no_traceback(mirrors.minion.run(*call, "mirror=nosuchmirror"))
    assert result.returncode != 0
    assert "has no mirror named 'nosuchmirror'" in result.output
    assert mirrors.name in result.output  # the known mirrors are listed


def test_empty_storage(mirrors):
    empty = mirrors.empty
    assert empty.data("hub_mirror.catalog") == []
    assert empty.data("hub_mirror.catalog", "source=disk", "tags=True") == {}
    missing = no_traceback(empty.call("hub_mirror.tags", "library/alpine"))
    assert missing.returncode != 0
    assert "holds no cached content for library/alpine" in missing.output
    state = empty.data("hub_mirror.status")[empty.name]
    assert state["serving"] is True and state["repositories"] == 0
    usage = empty.data("hub_mirror.usage")
    assert usage["blobs"]["count"] == 0 and usage["repositories"] == 0
    gc = empty.data("hub_mirror.gc", "dry_run=False")
    assert gc["freed"]["bytes"] == 0
    assert empty.data("hub_mirror.prune", "max_size=1G")["changes"] == {}
    predicted = empty.data("hub_mirror.warm", "library/alpine", "test=True")
    assert predicted["changes"] == {"library/alpine": "would be fetched"}


def test_storage_directory_missing(mirrors):
    missing = mirrors.missing
    for call in (("hub_mirror.catalog", "source=disk"), ("hub_mirror.tags", "library/alpine")):
        result = no_traceback(missing.call(*call))
        assert result.returncode != 0
        assert "has no storage directory" in result.output
        assert "apply hub_mirror.config" in result.output
    state = missing.data("hub_mirror.status")[missing.name]
    assert state["running"] is False and state["repositories"] == 0
    assert "not running" in state["comment"]
    assert missing.data("hub_mirror.usage")["used"]["bytes"] == 0
    gc = no_traceback(missing.call("hub_mirror.gc"))
    assert gc.returncode != 0 and "apply hub_mirror.config first" in gc.output


def test_registry_stopped(mirrors, hub):
    assert mirrors.data("hub_mirror.stop") is True
    try:
        api = no_traceback(mirrors.call("hub_mirror.catalog"))
        assert api.returncode != 0
        assert "does not answer" in api.output and "source=disk" in api.output
        assert mirrors.data("hub_mirror.catalog", "source=disk") == ["library/alpine"]
        sized = mirrors.data("hub_mirror.catalog", "source=disk", "sizes=True")
        assert sized["library/alpine"]["size"]["bytes"] == hub.images["single"]["total_size"]
        tags = mirrors.data("hub_mirror.tags", "library/alpine")
        assert tags["latest"]["platforms"] == ["linux/amd64"]

        state = mirrors.data("hub_mirror.status")[mirrors.name]
        assert state["running"] is False and state["serving"] is False
        assert state["mode"] is None and state["proxy"] is None and state["health"] is None
        assert state["repositories"] == 1
        assert state["comment"].startswith("not running")

        warm = no_traceback(mirrors.call("hub_mirror.warm", "library/alpine"))
        assert warm.returncode != 0
        assert "does not answer" in warm.output and "nothing was warmed" in warm.output

        assert mirrors.data("hub_mirror.usage")["repositories"] == 1
        assert mirrors.data("hub_mirror.ratelimit")["limit"] == 100
        gc = mirrors.data("hub_mirror.gc", "dry_run=False")
        assert gc["serving"] is None and gc["stopped"] is None
        # Neither gc nor a dry prune started it.
        mirrors.data("hub_mirror.prune", "max_size=1K", "test=True")
        state = mirrors.data("hub_mirror.status")[mirrors.name]
        assert state["running"] is False
    finally:
        assert mirrors.data("hub_mirror.start") is True
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not mirrors.data("hub_mirror.status")[mirrors.name]["serving"]:
        time.sleep(0.5)
    assert mirrors.data("hub_mirror.catalog") == ["library/alpine"]
