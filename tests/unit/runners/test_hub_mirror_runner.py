"""The fleet runner's sum of the minions' hub_mirror.status returns."""

import pytest

from tests.support.modules import REPO, load


@pytest.fixture
def runner():
    return load("runner", REPO / "_runners" / "hub_mirror.py")


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
