"""The registry's storage directory as the registry lays it out, read-only: repositories,
revisions the expiry schedule still keeps, and what an index has of each platform."""

import errno
import json
import os

import pytest
from salt.exceptions import CommandExecutionError

from _hub_mirror import storage


def test_view_finds_nested_repositories_and_skips_internal_directories(layout):
    for repo in ("library/alpine", "a", "a/b/c", "org/x"):
        layout.tag(repo, "latest", layout.image(repo, repo))
    (layout.v2 / "repositories" / "org" / "x" / "_uploads" / "junk").mkdir(parents=True)
    (layout.v2 / "repositories" / "empty" / "dir").mkdir(parents=True)
    view = storage.CacheView(str(layout.root))
    assert view.repositories() == ["a", "a/b/c", "library/alpine", "org/x"]


def test_view_counts_expired_content_as_not_cached(layout):
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


def test_view_describes_an_index_with_the_platforms_actually_cached(layout):
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


def test_a_repository_without_layers_gets_an_empty_layer_dir_and_no_symlink_is_followed(tmp_path):
    # 3.x's garbage-collect stops at a repository with manifests and no _layers.
    repos = tmp_path / "docker/registry/v2/repositories"
    (repos / "library/inspected/_manifests/tags").mkdir(parents=True)
    (repos / "library/pulled/_manifests").mkdir(parents=True)
    (repos / "library/pulled/_layers").mkdir()
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    (outside / "_manifests").mkdir(parents=True)
    (repos / "library/linked").symlink_to(outside)

    assert storage.add_missing_layer_dirs(str(tmp_path)) == ["library/inspected"]
    layers = repos / "library/inspected/_layers"
    assert layers.is_dir() and not any(layers.iterdir())
    assert layers.stat().st_uid == (repos / "library/inspected/_manifests").stat().st_uid
    assert not (outside / "_layers").exists()
    assert storage.add_missing_layer_dirs(str(tmp_path)) == []


def test_no_repositories_no_layer_dirs(tmp_path):
    assert storage.add_missing_layer_dirs(str(tmp_path)) == []


def test_a_full_disk_is_a_clear_error_naming_the_repository(tmp_path, monkeypatch):
    (tmp_path / "docker/registry/v2/repositories/library/inspected/_manifests").mkdir(parents=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "mkdir", full)
    with pytest.raises(CommandExecutionError, match="library/inspected .No space left on device.*free some space"):
        storage.add_missing_layer_dirs(str(tmp_path), "hub_mirror:mirrors:m:storage")
