"""Pure logic behind inspecting and operating the cache: sizes, times, image references,
the proxy counters of 2.8 and 3.x, the rate-limit headers, the prune plan, the on-disk
view of the registry's storage, pillar validation and the fleet runner's aggregation."""

import hashlib
import importlib.util
import json
import os

import pytest
from salt.exceptions import SaltInvocationError

from tests.support.modules import REPO, lib

maintenance = lib("maintenance")
registry_api = lib("registry_api")
storage = lib("storage")
units_lib = lib("units")

HUB = "https://registry-1.docker.io"
GHCR = "https://ghcr.io"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", None),
        (None, None),
        (0, None),
        ("0", None),
        (1234, 1234),
        ("1234", 1234),
        ("10K", 10240),
        ("10KiB", 10240),
        ("10kb", 10240),
        ("500M", 500 * 1024**2),
        ("20G", 20 * 1024**3),
        ("1.5TiB", int(1.5 * 1024**4)),
    ],
)
def test_parse_size(hub_mirror, text, expected):
    assert units_lib.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-5", -5, "5X", "G", True, "1.2.3G"])
def test_parse_size_refuses_non_sizes(hub_mirror, text):
    with pytest.raises(ValueError):
        units_lib.parse_size(text)


def test_human_size(hub_mirror):
    assert units_lib.human_size(0) == "0 B"
    assert units_lib.human_size(1023) == "1023 B"
    assert units_lib.human_size(1536) == "1.5 KiB"
    assert units_lib.human_size(3 * 1024**3) == "3.0 GiB"
    assert units_lib.human_size(None) is None


def test_go_times_parse_like_go_writes_them(hub_mirror):
    assert units_lib.parse_go_time("1970-01-01T00:00:00Z") == 0
    assert units_lib.parse_go_time("2026-12-04T17:36:51.394515937Z") == pytest.approx(1796405811.394516)
    # An offset is the local time's distance from UTC.
    assert units_lib.parse_go_time("2000-03-01T01:00:00+01:00") == 951868800
    assert units_lib.parse_go_time("1999-12-31T19:00:00-05:00") == 946684800
    assert units_lib.parse_go_time("not a time") is None
    assert units_lib.iso(951868800) == "2000-03-01T00:00:00Z"


@pytest.mark.parametrize(
    "image,upstream,expected",
    [
        ("alpine", HUB, ("library/alpine", "latest")),
        ("alpine:3.20", HUB, ("library/alpine", "3.20")),
        ("docker.io/library/alpine:3.20", HUB, ("library/alpine", "3.20")),
        ("docker.io/alpine", HUB, ("library/alpine", "latest")),
        ("bitnami/redis:7.2", HUB, ("bitnami/redis", "7.2")),
        ("alpine", GHCR, ("alpine", "latest")),
        ("ghcr.io/org/app:v1", GHCR, ("org/app", "v1")),
        ("localhost:5000/a/b", GHCR, ("a/b", "latest")),
        ("org/app@sha256:" + "a" * 64, GHCR, ("org/app", "sha256:" + "a" * 64)),
        ("org/app:v1@sha256:" + "b" * 64, GHCR, ("org/app", "sha256:" + "b" * 64)),
    ],
)
def test_parse_image(hub_mirror, image, upstream, expected):
    assert units_lib.parse_image(image, upstream) == expected


@pytest.mark.parametrize("image", ["", "Alpine", "alpine:", "alpine@sha256:short", "a//b", "alpine:-x"])
def test_parse_image_refuses_malformed(hub_mirror, image):
    with pytest.raises(ValueError):
        units_lib.parse_image(image, HUB)


def test_platform_names_and_choice(hub_mirror):
    assert units_lib.platform_name({"os": "linux", "architecture": "arm", "variant": "v7"}) == "linux/arm/v7"
    assert units_lib.platform_name(None) == "unknown"
    wanted = units_lib.platform_wanted
    # All platforms, but not build attestations.
    assert wanted("linux/amd64", None) and not wanted("unknown/unknown", None)
    assert wanted("linux/arm64/v8", ["linux/arm64"])
    assert not wanted("linux/arm/v7", ["linux/arm64"])
    assert wanted("linux/arm/v7", ["linux/amd64", "linux/arm/v7"])


EXPVAR_28 = {
    "registry": {
        "proxy": {
            "blobs": {"Requests": 13, "Hits": 13, "Misses": 0, "BytesPulled": 0, "BytesPushed": 214480},
            "manifests": {"Requests": 4, "Hits": 4, "Misses": 3, "BytesPulled": 1451, "BytesPushed": 2009},
        }
    }
}

METRICS_3 = """\
# HELP registry_proxy_hits_total The number of total proxy request hits
# TYPE registry_proxy_hits_total counter
registry_proxy_hits_total{type="blob"} 7
registry_proxy_hits_total{type="manifest"} 3
registry_proxy_misses_total{type="blob"} 3
registry_proxy_misses_total{type="manifest"} 1
registry_proxy_pulled_bytes_total{type="blob"} 1.048576e+06
registry_proxy_pulled_bytes_total{type="manifest"} 900
registry_proxy_pushed_bytes_total{type="blob"} 5e+06
registry_proxy_requests_total{type="blob"} 10
registry_proxy_requests_total{type="manifest"} 4
"""


def test_counters_of_28_correct_manifest_hits_and_admit_blob_misses_are_unknown(hub_mirror):
    counters = registry_api.proxy_counters(EXPVAR_28, "# no proxy metrics in 2.8\n", "2")
    # 2.8 counts every served manifest as a hit: the real hits are requests - misses.
    assert counters["manifests"] == {
        "requests": 4,
        "hits": 1,
        "misses": 3,
        "hit_ratio": 0.25,
        "pulled": {"bytes": 1451, "human": "1.4 KiB"},
    }
    blobs = counters["blobs"]
    assert blobs["hits"] is None and blobs["misses"] is None and blobs["hit_ratio"] is None
    assert "2.8" in blobs["note"]


def test_counters_of_3x_from_prometheus(hub_mirror):
    counters = registry_api.proxy_counters(EXPVAR_28, METRICS_3, "3")
    assert counters["blobs"] == {
        "requests": 10,
        "hits": 7,
        "misses": 3,
        "hit_ratio": 0.7,
        "pulled": {"bytes": 1048576, "human": "1.0 MiB"},
    }
    assert counters["manifests"]["hit_ratio"] == 0.75


def test_counters_absent(hub_mirror):
    assert registry_api.proxy_counters({}, "", "2") == {"blobs": None, "manifests": None}
    fresh = registry_api.proxy_counters(
        {"registry": {"proxy": {"manifests": {"Requests": 0, "Hits": 0, "Misses": 0, "BytesPulled": 0}}}}, "", "3"
    )
    assert fresh["manifests"]["hit_ratio"] is None


def test_ratelimit_headers(hub_mirror):
    headers = {
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "76;w=21600",
        "docker-ratelimit-source": "192.0.2.7",
    }
    assert registry_api.parse_ratelimit(headers) == (100, 76, 21600, "192.0.2.7")
    assert registry_api.parse_ratelimit({}) == (None, None, None, None)
    assert registry_api.parse_ratelimit({"ratelimit-limit": "junk"})[0] is None


def test_bearer_challenge(hub_mirror):
    scheme, params = registry_api.parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:a/b:pull",
    }


def unit(name, order, **blobs):
    return {"id": name, "order": order, "blobs": blobs}


def test_prune_plan_takes_the_oldest_first_until_under_the_cap(hub_mirror):
    units = [unit("new", 30, n1=100), unit("old", 10, o1=100), unit("mid", 20, m1=100)]
    chosen, freed, after = maintenance._plan_prune(units, used=310, unreferenced=0, cap=200)
    assert chosen == ["old", "mid"]
    assert (freed, after) == (200, 110)


def test_prune_plan_frees_a_shared_layer_only_with_its_last_image(hub_mirror):
    units = [unit("a", 1, shared=1000, a=10), unit("b", 2, shared=1000, b=10)]
    chosen, freed, after = maintenance._plan_prune(units, used=1020, unreferenced=0, cap=1015)
    # Expiring "a" frees only its own 10 bytes: the shared layer stays for "b".
    assert chosen == ["a"]
    assert (freed, after) == (10, 1010)
    chosen, freed, after = maintenance._plan_prune(units, used=1020, unreferenced=0, cap=500)
    assert chosen == ["a", "b"]
    assert (freed, after) == (1020, 0)


def test_prune_plan_counts_garbage_first_and_does_nothing_when_gc_is_enough(hub_mirror):
    units = [unit("a", 1, a=100)]
    assert maintenance._plan_prune(units, used=400, unreferenced=300, cap=150) == ([], 300, 100)
    # The cap cannot be reached: everything goes and the rest is reported.
    assert maintenance._plan_prune(units, used=400, unreferenced=0, cap=10) == (["a"], 100, 300)


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """A registry storage directory written by hand, laid out as the registry does."""

    def __init__(self, root):
        self.root = root
        self.v2 = root / "docker" / "registry" / "v2"
        self.schedule = {}

    def blob(self, data):
        digest = digest_of(data)
        path = self.v2 / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    def link(self, repo, kind, digest):
        parts = ("_manifests", "revisions") if kind == "manifest" else ("_layers",)
        path = self.v2 / "repositories" / repo / os.path.join(*parts) / "sha256" / digest[7:] / "link"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(digest)

    def tag(self, repo, tag, digest):
        path = self.v2 / "repositories" / repo / "_manifests" / "tags" / tag / "current" / "link"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(digest)

    def image(self, repo, seed, arch="amd64", expiry="2999-01-01T00:00:00Z"):
        config = self.blob(json.dumps({"os": "linux", "architecture": arch, "seed": seed}).encode())
        layer = self.blob(f"layer {seed}".encode() * 100)
        manifest = self.blob(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"digest": config, "size": 1},
                    "layers": [{"digest": layer, "size": 1}],
                }
            ).encode()
        )
        for blob in (config, layer):
            self.link(repo, "blob", blob)
            self.schedule[f"{repo}@{blob}"] = {"Key": f"{repo}@{blob}", "ExpiryData": expiry, "EntryType": 0}
        self.link(repo, "manifest", manifest)
        self.schedule[f"{repo}@{manifest}"] = {"Key": f"{repo}@{manifest}", "ExpiryData": expiry, "EntryType": 1}
        return manifest

    def save_schedule(self):
        (self.root / "scheduler-state.json").write_text(json.dumps(self.schedule))


@pytest.fixture
def layout(tmp_path):
    return Layout(tmp_path)


def test_view_finds_nested_repositories_and_skips_internal_directories(hub_mirror, layout):
    for repo in ("library/alpine", "a", "a/b/c", "org/x"):
        layout.tag(repo, "latest", layout.image(repo, repo))
    (layout.v2 / "repositories" / "org" / "x" / "_uploads" / "junk").mkdir(parents=True)
    (layout.v2 / "repositories" / "empty" / "dir").mkdir(parents=True)
    view = storage.CacheView(str(layout.root))
    assert view.repositories() == ["a", "a/b/c", "library/alpine", "org/x"]


def test_view_counts_expired_content_as_not_cached(hub_mirror, layout):
    fresh = layout.image("fresh", "f")
    overdue = layout.image("overdue", "o", expiry="2001-01-01T00:00:00Z")
    gone = layout.image("gone", "g")
    # What the registry leaves after expiring a manifest: the tag, not the revision link.
    os.unlink(layout.v2 / "repositories" / "gone" / "_manifests" / "revisions" / "sha256" / gone[7:] / "link")
    for repo, digest in (("fresh", fresh), ("overdue", overdue), ("gone", gone)):
        layout.tag(repo, "latest", digest)
    layout.save_schedule()
    view = storage.CacheView(str(layout.root))
    assert view.live_revisions("fresh") == [fresh]
    assert view.live_revisions("overdue") == []
    assert view.live_revisions("gone") == []
    assert view.revisions("overdue") == [overdue]
    # gc keeps what is linked, overdue or not: only the registry's expiry unlinks it.
    marked = view.marked()
    assert fresh in marked and overdue in marked and gone not in marked


def test_view_describes_an_index_with_the_platforms_actually_cached(hub_mirror, layout):
    amd = layout.image("multi", "m", arch="amd64")
    arm = layout.image("multi", "m2", arch="arm64")
    index = layout.blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [
                    {"digest": amd, "platform": {"os": "linux", "architecture": "amd64"}},
                    {"digest": arm, "platform": {"os": "linux", "architecture": "arm64"}},
                ],
            }
        ).encode()
    )
    layout.link("multi", "manifest", index)
    layout.tag("multi", "latest", index)
    # arm64's layer link is missing: that platform is not (fully) cached.
    arm_layer = storage.CacheView(str(layout.root)).references(arm)[1][1]
    os.unlink(layout.v2 / "repositories" / "multi" / "_layers" / "sha256" / arm_layer[7:] / "link")
    view = storage.CacheView(str(layout.root))
    info = view.describe("multi", index)
    assert info["platforms"] == ["linux/amd64"]
    assert info["platforms_available"] == ["linux/amd64", "linux/arm64"]
    assert info["media_type"] == "application/vnd.oci.image.index.v1+json"
    single = view.describe("multi", amd)
    assert single["platforms"] == ["linux/amd64"]
    assert single["size"]["bytes"] == sum(view.blob_size(d) for d in view.closure("multi", amd))


def test_prune_units_group_an_index_with_its_platforms(hub_mirror, layout):
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


def test_pillar_accepts_warm_and_max_size(hub_mirror):
    hub_mirror.__pillar__ = {
        "hub_mirror": {"mirrors": {"dockerhub": {"warm": ["alpine:3.20", "bitnami/redis"], "max_size": "20G"}}}
    }
    mirror = hub_mirror.settings()["mirrors"]["dockerhub"]
    assert mirror["warm"] == ["alpine:3.20", "bitnami/redis"]
    assert units_lib.parse_size(mirror["max_size"]) == 20 * 1024**3
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": {"max_size": 10**9}}}}
    assert hub_mirror.settings()["mirrors"]["dockerhub"]["max_size"] == 10**9


@pytest.mark.parametrize(
    "mirror,key",
    [
        ({"warm": "alpine"}, "mirrors:dockerhub:warm"),
        ({"warm": ["alpine", "Not Valid"]}, "mirrors:dockerhub:warm:1"),
        ({"max_size": "lots"}, "mirrors:dockerhub:max_size"),
    ],
)
def test_pillar_refuses_bad_cache_keys_naming_the_key(hub_mirror, mirror, key):
    hub_mirror.__pillar__ = {"hub_mirror": {"mirrors": {"dockerhub": mirror}}}
    with pytest.raises(SaltInvocationError) as error:
        hub_mirror.settings()
    assert f"hub_mirror:{key}:" in str(error.value)


@pytest.fixture
def runner():
    spec = importlib.util.spec_from_file_location("hm_runner", REPO / "_runners" / "hub_mirror.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def status(serving=True, health="ok", used=1000, images=None, blob_ratio=None, manifest_ratio=0.5):
    return {
        "running": serving,
        "serving": serving,
        "mode": "proxy" if serving else None,
        "health": health if serving else None,
        "repositories": len(images or {}),
        "disk": {"used": {"bytes": used, "human": "x"}},
        "over_cap": False,
        "proxy": {"blobs": {"hit_ratio": blob_ratio}, "manifests": {"hit_ratio": manifest_ratio}}
        if serving
        else None,
        "images": images or {},
        "comment": "serving in proxy mode" if serving else "not running",
    }


def test_fleet_aggregates_images_bytes_ratios_and_trouble(runner):
    returns = {
        "b1": {"dockerhub": status(images={"library/alpine": {"3.20": "sha256:a", "latest": "sha256:b"}})},
        "b2": {
            "dockerhub": status(used=500, images={"library/alpine": {"3.20": "sha256:a"}}, blob_ratio=0.9),
            "ghcr": status(serving=False, used=24),
        },
        "b3": {"dockerhub": status(health="unhealthy: storage", used=0)},
        "b4": "'hub_mirror.status' is not available.",
        "b5": "did not answer within 60s",
    }
    fleet = runner._aggregate(returns)
    assert fleet["images"] == {
        "library/alpine:3.20": ["b1/dockerhub", "b2/dockerhub"],
        "library/alpine:latest": ["b1/dockerhub"],
    }
    assert fleet["total"] == {"bytes": 1524, "human": "1.5 KiB"}
    assert fleet["mirrors"]["b2/dockerhub"]["hit_ratio"] == {"blobs": 0.9, "manifests": 0.5}
    assert fleet["mirrors"]["b2/ghcr"]["hit_ratio"] == {"blobs": None, "manifests": None}
    assert fleet["down"] == {"b2/ghcr": "not running", "b3/dockerhub": "unhealthy: storage"}
    assert set(fleet["no_answer"]) == {"b4", "b5"}
