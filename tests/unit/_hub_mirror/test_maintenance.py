"""What prune expires to get under the cap: oldest first, a shared layer freed only with
its last image, garbage counted first, an index with its platforms."""

import json

from _hub_mirror import maintenance, storage


def unit(name, order, **blobs):
    return {"id": name, "order": order, "blobs": blobs}


def test_prune_plan_takes_the_oldest_first_until_under_the_cap():
    units = [unit("new", 30, n1=100), unit("old", 10, o1=100), unit("mid", 20, m1=100)]
    chosen, freed, after = maintenance._plan_prune(units, used=310, unreferenced=0, cap=200)
    assert chosen == ["old", "mid"]
    assert (freed, after) == (200, 110)


def test_prune_plan_frees_a_shared_layer_only_with_its_last_image():
    units = [unit("a", 1, shared=1000, a=10), unit("b", 2, shared=1000, b=10)]
    chosen, freed, after = maintenance._plan_prune(units, used=1020, unreferenced=0, cap=1015)
    # Expiring "a" frees only its own 10 bytes: the shared layer stays for "b".
    assert chosen == ["a"]
    assert (freed, after) == (10, 1010)
    chosen, freed, after = maintenance._plan_prune(units, used=1020, unreferenced=0, cap=500)
    assert chosen == ["a", "b"]
    assert (freed, after) == (1020, 0)


def test_prune_plan_counts_garbage_first_and_does_nothing_when_gc_is_enough():
    units = [unit("a", 1, a=100)]
    assert maintenance._plan_prune(units, used=400, unreferenced=300, cap=150) == ([], 300, 100)
    # The cap cannot be reached: everything goes and the rest is reported.
    assert maintenance._plan_prune(units, used=400, unreferenced=0, cap=10) == (["a"], 100, 300)


def test_prune_units_group_an_index_with_its_platforms(layout):
    amd = layout.image("multi", "m", arch="amd64", expiry="2100-01-01T00:00:00Z")
    index = layout.blob(json.dumps({"manifests": [{"digest": amd, "platform": {}}]}).encode())
    layout.link("multi", "manifest", index)
    layout.schedule[f"multi@{index}"] = {"Key": "k", "ExpiryData": "2100-01-01T00:00:00Z", "EntryType": 1}
    solo = layout.image("solo", "s", expiry="2050-01-01T00:00:00Z")
    layout.save_schedule()
    units = {u["id"]: u for u in maintenance._prune_units(storage.CacheView(str(layout.root)))}
    # The amd64 manifest is no unit of its own: it goes with its index.
    assert set(units) == {f"multi@{index}", f"solo@{solo}"}
    assert sorted(units[f"multi@{index}"]["manifests"]) == sorted([index, amd])
    assert len(units[f"multi@{index}"]["blobs"]) == 4
    # Oldest first: solo expires in 2050, the index in 2100.
    assert units[f"solo@{solo}"]["order"] < units[f"multi@{index}"]["order"]
