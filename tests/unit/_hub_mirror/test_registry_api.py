"""Parsing what registries answer: pagination links, the proxy counters of 2.8 and 3.x,
the rate-limit headers and the Bearer challenge."""

import pytest

from _hub_mirror import registry_api


@pytest.mark.parametrize(
    "header,target",
    [
        ('</v2/_catalog?last=b&n=2>; rel="next"', "/v2/_catalog?last=b&n=2"),
        ("</v2/_catalog?last=a%2Fb&n=100>; rel=next", "/v2/_catalog?last=a%2Fb&n=100"),
        ("", None),
        (None, None),
    ],
)
def test_next_link(header, target):
    assert registry_api.next_link(header) == target


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


def counter(requests, hits, misses, hit_ratio, pulled, human):
    """What proxy_counters reports for one kind (blobs or manifests)."""
    return {
        "requests": requests,
        "hits": hits,
        "misses": misses,
        "hit_ratio": hit_ratio,
        "pulled": {"bytes": pulled, "human": human},
    }


def test_counters_of_28_correct_manifest_hits_and_admit_blob_misses_are_unknown():
    counters = registry_api.proxy_counters(EXPVAR_28, "# no proxy metrics in 2.8\n", "2")
    # 2.8 counts every served manifest as a hit: the real hits are requests - misses.
    assert counters["manifests"] == counter(requests=4, hits=1, misses=3, hit_ratio=0.25, pulled=1451, human="1.4 KiB")
    blobs = counters["blobs"]
    assert blobs["hits"] is None and blobs["misses"] is None and blobs["hit_ratio"] is None
    assert "2.8" in blobs["note"]


def test_counters_of_3x_from_prometheus():
    counters = registry_api.proxy_counters(EXPVAR_28, METRICS_3, "3")
    assert counters["blobs"] == counter(requests=10, hits=7, misses=3, hit_ratio=0.7, pulled=1048576, human="1.0 MiB")
    assert counters["manifests"]["hit_ratio"] == 0.75


def test_counters_absent():
    assert registry_api.proxy_counters({}, "", "2") == {"blobs": None, "manifests": None}
    fresh = registry_api.proxy_counters(
        {"registry": {"proxy": {"manifests": {"Requests": 0, "Hits": 0, "Misses": 0, "BytesPulled": 0}}}}, "", "3"
    )
    assert fresh["manifests"]["hit_ratio"] is None


def test_ratelimit_headers():
    headers = {
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "76;w=21600",
        "docker-ratelimit-source": "192.0.2.7",
    }
    assert registry_api.parse_ratelimit(headers) == (100, 76, 21600, "192.0.2.7")
    assert registry_api.parse_ratelimit({}) == (None, None, None, None)
    assert registry_api.parse_ratelimit({"ratelimit-limit": "junk"})[0] is None


def test_bearer_challenge():
    scheme, params = registry_api.parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:a/b:pull",
    }
