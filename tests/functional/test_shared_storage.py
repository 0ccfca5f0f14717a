"""Two mirrors share one cache through the registry's S3 driver: an image pulled through
mirror A is served by mirror B with no blob fetched from the upstream again. The S3 API is
a real moto server on loopback; the configs come from the exec module's renderer."""

import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from tests.conftest import HUB_TOKEN, HUB_USER
from tests.support import oci
from tests.support.netutil import free_port, wait_http
from tests.support.registry import RegistryProcess
from tests.support.modules import load

pytestmark = pytest.mark.functional

MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")


@pytest.fixture
def s3_endpoint(tmp_path):
    port = free_port()
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(tmp_path / "moto.log", "wb"),  # pylint: disable=consider-using-with
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/", timeout=30, ok=(200, 403, 404))
        boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1",
            aws_access_key_id="AKIDTEST", aws_secret_access_key="SECRETTEST",
        ).create_bucket(Bucket="hub-cache")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def mirror_config(module, name, hub, s3_endpoint):
    module.__grains__ = {"ip4_interfaces": {}, "ip6_interfaces": {}}
    spec = module._merge(module.MIRROR_DEFAULTS, {
        "upstream": hub.url,
        "listen": f"127.0.0.1:{free_port()}",
        "debug_listen": f"127.0.0.1:{free_port()}",
        "username": HUB_USER,
        "token": HUB_TOKEN,
        "s3": {
            "bucket": "hub-cache",
            "endpoint": s3_endpoint,
            "accesskey": "AKIDTEST",
            "secretkey": "SECRETTEST",
            "rootdirectory": "/pool",
        },
    })
    return module.render_config(module._complete_mirror(name, spec, module.DEFAULTS["lookup"]), "2")


def test_a_pull_through_one_mirror_is_a_cache_hit_on_the_other(clean_hub, s3_endpoint, tmp_path, image_layout):
    module = load("hub_mirror")
    mirrors = [
        RegistryProcess(tmp_path / name, config=mirror_config(module, name, clean_hub, s3_endpoint))
        for name in ("a", "b")
    ]
    for mirror in mirrors:
        mirror.start()
    try:
        expected = image_layout[1]["single"]["manifest_digest"]
        assert oci.pull(mirrors[0].hostport, "library/alpine", "latest", str(tmp_path / "via-a")) == expected
        first = clean_hub.counts()
        assert first["blob_get"] > 0
        time.sleep(1)  # the proxy stores blobs asynchronously after serving them

        clean_hub.reset_counts()
        assert oci.pull(mirrors[1].hostport, "library/alpine", "latest", str(tmp_path / "via-b")) == expected
        second = clean_hub.counts()
        print(f"\nupstream requests: pull via A {first}, pull via B {second}")
        assert second["blob_get"] == 0
        assert second["manifest_get"] == 0
    finally:
        for mirror in mirrors:
            mirror.stop()
