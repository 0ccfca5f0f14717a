"""Build OCI image layouts in pure Python and move them with skopeo.

Tests need images whose size and content they control (random, incompressible
layers so byte counts are honest) without a container runtime or the internet.
An OCI image layout directory is what ``skopeo copy oci:DIR:TAG`` reads.
"""

import atexit
import gzip
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import subprocess
import tarfile
import tempfile

from .netutil import assert_loopback_hostport, clean_env

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

SKOPEO_TIMEOUT = 180
# A fixed timestamp keeps seeded images byte-for-byte reproducible.
EPOCH = "1970-01-01T00:00:00Z"


# -- layout plumbing --------------------------------------------------------


def _blob_dir(layout):
    path = pathlib.Path(layout) / "blobs" / "sha256"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_blob(layout, data):
    """Store bytes as a content-addressed blob; return (digest, size)."""
    hexdigest = hashlib.sha256(data).hexdigest()
    path = _blob_dir(layout) / hexdigest
    if not path.exists():
        path.write_bytes(data)
    return f"sha256:{hexdigest}", len(data)


def _json_bytes(obj):
    # Compact and key-ordered as written, so the digest is stable for a seed.
    return json.dumps(obj, separators=(",", ":")).encode()


def _init_layout(layout):
    """Create ``oci-layout`` and an empty ``index.json`` if missing."""
    layout = pathlib.Path(layout)
    layout.mkdir(parents=True, exist_ok=True)
    _blob_dir(layout)
    marker = layout / "oci-layout"
    if not marker.exists():
        marker.write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = layout / "index.json"
    if not index.exists():
        index.write_text(json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}))


def _tag_in_layout(layout, tag, descriptor):
    """Point ``tag`` in the layout's index.json at ``descriptor`` (replacing any old entry)."""
    index_path = pathlib.Path(layout) / "index.json"
    index = json.loads(index_path.read_text())
    kept = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != tag]
    kept.append({**descriptor, "annotations": {REF_NAME: tag}})
    index["manifests"] = kept
    index_path.write_text(json.dumps(index, indent=2))


def read_tag(layout, tag):
    """The descriptor a tag points at in a layout's index.json (KeyError if absent)."""
    index = json.loads((pathlib.Path(layout) / "index.json").read_text())
    for entry in index.get("manifests", []):
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            return entry
    raise KeyError(f"tag {tag!r} not in {layout}/index.json")


def read_blob(layout, digest):
    algo, hexdigest = digest.split(":", 1)
    return (pathlib.Path(layout) / "blobs" / algo / hexdigest).read_bytes()


def image_blobs(layout, tag="latest"):
    """The config and layer digests of the single-platform image ``tag`` in ``layout``."""
    manifest = json.loads(read_blob(layout, read_tag(layout, tag)["digest"]))
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


# -- layers -------------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """File-like sink that hashes and counts what passes through to ``target``."""

    def __init__(self, target):
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)


class _RandomReader:
    """Yields ``size`` random bytes on demand (stable for a seeded rng and read pattern)."""

    def __init__(self, rng, size):
        self.rng = rng
        self.left = size

    def read(self, n=-1):
        if self.left <= 0:
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n) if self.rng else os.urandom(n)


def _write_layer(layout, size, rng, name):
    """Write one gzip'd tar layer holding ``name`` with ``size`` random bytes.

    Streams to disk so large layers do not need to fit in memory. Returns
    (digest, compressed size, diff_id).
    """
    blob_dir = _blob_dir(layout)
    fd, tmp = tempfile.mkstemp(dir=blob_dir, prefix=".layer-")
    with os.fdopen(fd, "wb") as raw:
        compressed = _HashingWriter(raw)
        # mtime=0 and no file name keep the gzip header reproducible.
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=1) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo(name)
                info.size = size
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, _RandomReader(rng, size))
    digest = f"sha256:{compressed.sha.hexdigest()}"
    final = blob_dir / compressed.sha.hexdigest()
    if final.exists():
        os.unlink(tmp)
    else:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; blobs are public data
        os.replace(tmp, final)
    return digest, compressed.size, f"sha256:{uncompressed.sha.hexdigest()}"


def _rng(seed, *parts):
    """A deterministic rng for (seed, parts), or None for true randomness."""
    if seed is None:
        return None
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def _write_image_blobs(layout, layer_sizes, arch, os_, variant, seed):
    """Write layers, config and manifest blobs; return a summary dict (no tagging)."""
    layers = []
    diff_ids = []
    for i, size in enumerate(layer_sizes):
        rng = _rng(seed, os_, arch, variant or "", i)
        digest, csize, diff_id = _write_layer(layout, int(size), rng, f"layer{i}.bin")
        layers.append({"mediaType": MT_LAYER_GZIP, "digest": digest, "size": csize})
        diff_ids.append(diff_id)

    config = {"created": EPOCH, "architecture": arch, "os": os_}
    if variant:
        config["variant"] = variant
    config["config"] = {"Cmd": ["/layer0.bin"]} if layer_sizes else {}
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config["history"] = [{"created": EPOCH, "created_by": "hub_mirror tests/support/oci.py"}]
    config_digest, config_size = _write_blob(layout, _json_bytes(config))

    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    manifest_digest, manifest_size = _write_blob(layout, _json_bytes(manifest))
    return {
        "manifest_digest": manifest_digest,
        "config_digest": config_digest,
        "layer_digests": [layer["digest"] for layer in layers],
        "layer_sizes": [layer["size"] for layer in layers],
        "size": manifest_size,
        "total_size": manifest_size + config_size + sum(layer["size"] for layer in layers),
    }


# -- public builders ----------------------------------------------------------


def build_image(layout_dir, tag="latest", layer_sizes=(1024,), arch="amd64", os_="linux", seed=None, variant=None):
    """Write a single-platform image into an OCI layout and tag it.

    Each layer is a gzip'd tar with one file of ``size`` random bytes. With a
    ``seed`` the result is byte-identical across runs. Returns
    {"manifest_digest", "config_digest", "layer_digests", "size" (manifest
    bytes), "layer_sizes" (compressed), "total_size" (manifest+config+layers)}.
    """
    _init_layout(layout_dir)
    info = _write_image_blobs(layout_dir, layer_sizes, arch, os_, variant, seed)
    _tag_in_layout(layout_dir, tag, {"mediaType": MT_MANIFEST, "digest": info["manifest_digest"], "size": info["size"]})
    return info


def _platform_key(platform):
    return "/".join(p for p in platform if p)


def build_index(layout_dir, tag="latest", platforms=(("linux", "amd64"), ("linux", "arm64")), layer_sizes=(1024,), seed=None):
    """Write a multi-arch OCI image index; each platform gets its own manifest.

    ``platforms`` holds (os, arch) or (os, arch, variant) tuples. Returns
    {"index_digest", "size", "manifests": {"linux/amd64": digest, ...},
    "images": {"linux/amd64": build_image-style dict, ...}}.
    """
    _init_layout(layout_dir)
    entries, manifests, images = [], {}, {}
    for platform in platforms:
        os_, arch, variant = (tuple(platform) + (None,))[:3]
        info = _write_image_blobs(layout_dir, layer_sizes, arch, os_, variant, seed)
        plat = {"architecture": arch, "os": os_}
        if variant:
            plat["variant"] = variant
        entries.append({"mediaType": MT_MANIFEST, "digest": info["manifest_digest"], "size": info["size"], "platform": plat})
        key = _platform_key((os_, arch, variant))
        manifests[key] = info["manifest_digest"]
        images[key] = info
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}
    index_digest, index_size = _write_blob(layout_dir, _json_bytes(index))
    _tag_in_layout(layout_dir, tag, {"mediaType": MT_INDEX, "digest": index_digest, "size": index_size})
    return {"index_digest": index_digest, "size": index_size, "manifests": manifests, "images": images}


# -- skopeo -------------------------------------------------------------------

_SKOPEO_HOME = None


def _skopeo_home():
    """A private dir with empty registries.conf, auth file, registries.d and an accept-all policy.

    Keeps skopeo from reading host config that could send it (or short names,
    or signature lookups) to the internet, and from picking up host creds.
    """
    global _SKOPEO_HOME
    if _SKOPEO_HOME is None:
        home = pathlib.Path(tempfile.mkdtemp(prefix="hub-mirror-skopeo-"))
        (home / "registries.conf").write_text("# intentionally empty: no registries, no mirrors\n")
        (home / "registries.d").mkdir()
        (home / "auth.json").write_text("{}\n")
        (home / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        atexit.register(shutil.rmtree, str(home), True)
        _SKOPEO_HOME = home
    return _SKOPEO_HOME


def skopeo_env():
    home = _skopeo_home()
    return clean_env(
        {
            "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
            # A nonexistent dir for the per-user auth/config lookups.
            "XDG_RUNTIME_DIR": str(home),
            "XDG_CONFIG_HOME": str(home),
            "DOCKER_CONFIG": str(home),
        }
    )


def run_skopeo(args, timeout=SKOPEO_TIMEOUT):
    """Run ``skopeo <global opts> args`` hermetically; CalledProcessError carries stderr."""
    home = _skopeo_home()
    cmd = ["skopeo", "--policy", str(home / "policy.json"), "--registries.d", str(home / "registries.d"), *args]
    result = subprocess.run(
        cmd, env=skopeo_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, _redact(cmd), result.stdout, result.stderr)
    return result


def _redact(cmd):
    """Command line with credentials hidden, for error messages."""
    out, hide_next = [], False
    for arg in cmd:
        out.append("***" if hide_next else arg)
        hide_next = arg in ("--src-creds", "--dest-creds", "--creds")
    return out


def _creds_args(prefix, creds):
    """``--src-creds user:pw`` or, without creds, ``--src-no-creds`` (never host auth files)."""
    if creds is None:
        return [f"--{prefix}-no-creds"]
    if isinstance(creds, (tuple, list)):
        creds = f"{creds[0]}:{creds[1]}"
    return [f"--{prefix}-creds", creds]


def _is_index(layout_dir, tag):
    return read_tag(layout_dir, tag).get("mediaType") == MT_INDEX


def push(layout_dir, tag, registry_hostport, repo, dest_tag=None, all_platforms=True, creds=None):
    """``skopeo copy oci:DIR:TAG docker://HOSTPORT/REPO:DEST_TAG`` over plain http.

    Digests are preserved (``--preserve-digests``) so what the test built is
    exactly what the registry serves.
    """
    assert_loopback_hostport(registry_hostport)
    args = ["copy", "--retry-times", "0", "--dest-tls-verify=false", "--preserve-digests", "--quiet"]
    args += _creds_args("dest", creds)
    if all_platforms and _is_index(layout_dir, tag):
        args.append("--all")
    args += [f"oci:{layout_dir}:{tag}", f"docker://{registry_hostport}/{repo}:{dest_tag or tag}"]
    return run_skopeo(args)


def pull(registry_hostport, repo, tag, dest_dir, creds=None, all_platforms=False, arch="amd64", os_="linux"):
    """``skopeo copy docker://HOSTPORT/REPO:TAG oci:DEST:TAG``; return the copied manifest digest.

    ``tag`` may also be a digest (``sha256:...``); the layout is then tagged
    ``pulled``. For an index without ``all_platforms``, skopeo picks the
    ``os_``/``arch`` manifest and that manifest's digest is returned.
    """
    assert_loopback_hostport(registry_hostport)
    local_tag = "pulled" if tag.startswith("sha256:") else tag
    sep = "@" if tag.startswith("sha256:") else ":"
    args = ["--override-arch", arch, "--override-os", os_]
    args += ["copy", "--retry-times", "0", "--src-tls-verify=false", "--preserve-digests", "--quiet"]
    args += _creds_args("src", creds)
    if all_platforms:
        args.append("--all")
    pathlib.Path(dest_dir).mkdir(parents=True, exist_ok=True)
    args += [f"docker://{registry_hostport}/{repo}{sep}{tag}", f"oci:{dest_dir}:{local_tag}"]
    run_skopeo(args)
    return read_tag(dest_dir, local_tag)["digest"]


def inspect_raw(registry_hostport, repo, ref, creds=None):
    """The raw manifest bytes as served (``skopeo inspect --raw``)."""
    assert_loopback_hostport(registry_hostport)
    sep = "@" if ref.startswith("sha256:") else ":"
    args = ["inspect", "--raw", "--retry-times", "0", "--tls-verify=false", *_inspect_creds(creds)]
    args.append(f"docker://{registry_hostport}/{repo}{sep}{ref}")
    return run_skopeo(args).stdout


def _inspect_creds(creds):
    if creds is None:
        return ["--no-creds"]
    if isinstance(creds, (tuple, list)):
        creds = f"{creds[0]}:{creds[1]}"
    return ["--creds", creds]
