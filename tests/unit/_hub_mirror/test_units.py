"""Sizes, times, image references and platforms, as users write them and as the registry
writes them."""

import pytest

from _hub_mirror import units

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
def test_parse_size(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-5", -5, "5X", "G", True, "1.2.3G"])
def test_parse_size_refuses_non_sizes(text):
    with pytest.raises(ValueError):
        units.parse_size(text)


def test_human_size():
    assert units.human_size(0) == "0 B"
    assert units.human_size(1023) == "1023 B"
    assert units.human_size(1536) == "1.5 KiB"
    assert units.human_size(3 * 1024**3) == "3.0 GiB"
    assert units.human_size(None) is None


def test_go_times_parse_like_go_writes_them():
    assert units.parse_go_time("1970-01-01T00:00:00Z") == 0
    assert units.parse_go_time("2026-12-04T17:36:51.394515937Z") == pytest.approx(1796405811.394516)
    # An offset is the local time's distance from UTC.
    assert units.parse_go_time("2000-03-01T01:00:00+01:00") == 951868800
    assert units.parse_go_time("1999-12-31T19:00:00-05:00") == 946684800
    assert units.parse_go_time("not a time") is None
    assert units.iso(951868800) == "2000-03-01T00:00:00Z"


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
def test_parse_image(image, upstream, expected):
    assert units.parse_image(image, upstream) == expected


@pytest.mark.parametrize("image", ["", "Alpine", "alpine:", "alpine@sha256:short", "a//b", "alpine:-x"])
def test_parse_image_refuses_malformed(image):
    with pytest.raises(ValueError):
        units.parse_image(image, HUB)


def test_platform_names_and_choice():
    assert units.platform_name({"os": "linux", "architecture": "arm", "variant": "v7"}) == "linux/arm/v7"
    assert units.platform_name(None) == "unknown"
    wanted = units.platform_wanted
    # All platforms, but not build attestations.
    assert wanted("linux/amd64", None) and not wanted("unknown/unknown", None)
    assert wanted("linux/arm64/v8", ["linux/arm64"])
    assert not wanted("linux/arm/v7", ["linux/arm64"])
    assert wanted("linux/arm/v7", ["linux/amd64", "linux/arm/v7"])
