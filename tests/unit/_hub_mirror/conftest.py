"""The registry's storage directory, laid out by hand as the registry writes it."""

import hashlib
import json
import os

import pytest


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
