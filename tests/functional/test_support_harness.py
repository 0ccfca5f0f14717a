"""Proof that the test harness itself behaves: the Docker Hub stand-in, image
builder, registry runner and release server, all with real processes on loopback.

Every later test trusts these parts; the key check is the last group, where a
real ``registry`` in proxy mode authenticates to the stand-in with the Hub
credentials, exactly as a deployed mirror talks to Docker Hub.
"""

import hashlib
import json
import pathlib
import subprocess
import tarfile

import pytest
import requests

from tests.support import oci
from tests.support.hub import FakeDockerHub
from tests.support.netutil import free_port, loopback_session, wait_http
from tests.support.registry import RegistryProcess, proxy_config
from tests.support.release import FileServer, fetch_debian_registry_binary, make_release_asset

pytestmark = pytest.mark.functional

USER = "hubuser"
TOKEN = "dckr_pat_TESTTOKEN"
SINGLE = "library/alpine"
MULTI = "library/multi"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A single-platform image and a two-platform index in one OCI layout."""
    layout = tmp_path_factory.mktemp("layout")
    single = oci.build_image(layout, tag="latest", layer_sizes=(2048, 256 * 1024), seed="single")
    multi = oci.build_index(layout, tag="multi", layer_sizes=(4096,), seed="multi")
    return {"layout": layout, "single": single, "multi": multi}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, images):
    """One stand-in for the module, loaded with both images."""
    with FakeDockerHub(tmp_path_factory.mktemp("hub"), username=USER, token=TOKEN) as hub:
        hub.push_image(images["layout"], "latest", SINGLE)
        hub.push_image(images["layout"], "multi", MULTI, dest_tag="latest")
        yield hub


@pytest.fixture
def fresh_hub(hub):
    """The module hub with empty logs, unblocked and undelayed whatever a test did."""
    hub.unblock()
    hub.set_delay(0)
    hub.reset_counts()
    yield hub
    hub.unblock()
    hub.set_delay(0)


# -- netutil -------------------------------------------------------------------


def test_wait_http_times_out_on_a_closed_port():
    with pytest.raises(TimeoutError):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.5)


def test_netutil_refuses_non_loopback_urls():
    with pytest.raises(ValueError):
        wait_http("http://registry-1.docker.io/v2/", timeout=0.1)


# -- oci builder -----------------------------------------------------------------


def test_build_image_is_deterministic_with_a_seed(tmp_path):
    first = oci.build_image(tmp_path / "a", layer_sizes=(1000, 3000), seed=7)
    second = oci.build_image(tmp_path / "b", layer_sizes=(1000, 3000), seed=7)
    other = oci.build_image(tmp_path / "c", layer_sizes=(1000, 3000), seed=8)
    assert first == second
    assert other["manifest_digest"] != first["manifest_digest"]
    assert oci.read_tag(tmp_path / "a", "latest")["digest"] == first["manifest_digest"]


def test_build_image_layers_hold_incompressible_bytes_of_the_asked_size(tmp_path):
    info = oci.build_image(tmp_path, layer_sizes=(64 * 1024,), seed=1)
    blob = tmp_path / "blobs" / "sha256" / info["layer_digests"][0].split(":")[1]
    with tarfile.open(blob) as tar:
        (member,) = tar.getmembers()
        assert member.size == 64 * 1024
    # Random data does not compress: the layer is about as big as its content.
    assert info["layer_sizes"][0] > 64 * 1024


def test_build_index_has_one_manifest_per_platform(tmp_path):
    info = oci.build_index(tmp_path, platforms=(("linux", "amd64"), ("linux", "arm", "v7")), seed=3)
    index = json.loads(oci.read_blob(tmp_path, info["index_digest"]))
    assert index["mediaType"] == oci.MT_INDEX
    platforms = {f'{m["platform"]["os"]}/{m["platform"]["architecture"]}': m["digest"] for m in index["manifests"]}
    assert platforms == {"linux/amd64": info["manifests"]["linux/amd64"], "linux/arm": info["manifests"]["linux/arm/v7"]}
    arm_config = json.loads(oci.read_blob(tmp_path, info["images"]["linux/arm/v7"]["config_digest"]))
    assert (arm_config["architecture"], arm_config["variant"]) == ("arm", "v7")


# -- registry process --------------------------------------------------------------


def test_registry_process_serves_logs_and_stops(tmp_path):
    reg = RegistryProcess(tmp_path)
    with reg:
        assert reg.running
        assert loopback_session().get(reg.url + "/v2/", timeout=5).status_code == 200
        assert reg.wait_for_log(f"listening on 127.0.0.1:{reg.port}")
    assert not reg.running
    with pytest.raises(requests.ConnectionError):
        loopback_session().get(reg.url + "/v2/", timeout=5)


def test_registry_process_kill_is_immediate(tmp_path):
    reg = RegistryProcess(tmp_path).start()
    reg.kill()
    assert not reg.running
    assert reg.proc.returncode == -9


# -- the Docker Hub stand-in, driven by skopeo ----------------------------------------


def test_pull_through_hub_with_credentials(fresh_hub, images, tmp_path):
    digest = oci.pull(fresh_hub.hostport, SINGLE, "latest", tmp_path, creds=(USER, TOKEN))

    assert digest == images["single"]["manifest_digest"]
    counts = fresh_hub.counts()
    assert counts["manifest_get"] == 1
    assert counts["blob_get"] == 1 + len(images["single"]["layer_digests"])  # config + layers
    (tok,) = fresh_hub.token_requests
    assert (tok["username"], tok["password_ok"], tok["accepted"], tok["anonymous"]) == (USER, True, True, False)
    assert tok["password_sha256"] == hashlib.sha256(TOKEN.encode()).hexdigest()
    assert tok["scope"] == f"repository:{SINGLE}:pull"


def test_hub_logs_hold_no_secret(fresh_hub, tmp_path):
    oci.pull(fresh_hub.hostport, SINGLE, "latest", tmp_path, creds=(USER, TOKEN))
    dumped = json.dumps([fresh_hub.requests, fresh_hub.token_requests]) + repr(fresh_hub)
    assert TOKEN not in dumped
    assert "authorization" not in dumped.lower()


def test_pull_index_all_platforms_through_hub(fresh_hub, images, tmp_path):
    digest = oci.pull(fresh_hub.hostport, MULTI, "latest", tmp_path, creds=(USER, TOKEN), all_platforms=True)
    assert digest == images["multi"]["index_digest"]
    # The index plus one manifest per platform.
    assert fresh_hub.counts()["manifest_get"] == 1 + len(images["multi"]["manifests"])


def test_wrong_credentials_are_refused(fresh_hub, tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        oci.pull(fresh_hub.hostport, SINGLE, "latest", tmp_path, creds=(USER, "dckr_pat_WRONG"))
    assert "WRONG" not in " ".join(failure.value.cmd)  # credentials are redacted in errors
    (tok,) = fresh_hub.token_requests
    assert (tok["username"], tok["password_ok"], tok["accepted"]) == (USER, False, False)
    assert fresh_hub.counts()["manifest_get"] == 0


def test_anonymous_pull_is_allowed_and_marked(fresh_hub, images, tmp_path):
    digest = oci.pull(fresh_hub.hostport, SINGLE, "latest", tmp_path)
    assert digest == images["single"]["manifest_digest"]
    assert [t["anonymous"] for t in fresh_hub.token_requests] == [True]
    assert fresh_hub.token_requests[0]["password_sha256"] is None


def test_missing_bearer_gets_a_hub_style_challenge(fresh_hub):
    session = loopback_session()
    base = session.get(fresh_hub.url + "/v2/", timeout=5)
    repo = session.get(f"{fresh_hub.url}/v2/{SINGLE}/manifests/latest", timeout=5)

    assert base.status_code == repo.status_code == 401
    assert base.headers["WWW-Authenticate"] == f'Bearer realm="{fresh_hub.url}/token",service="registry.docker.io"'
    assert repo.headers["WWW-Authenticate"].endswith(f',scope="repository:{SINGLE}:pull"')
    assert repo.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert fresh_hub.counts()["manifest_get"] == 0  # challenges are not pulls


def test_token_endpoint_answers_like_auth_docker_io(fresh_hub):
    resp = loopback_session().get(
        fresh_hub.url + "/token",
        params={"service": "registry.docker.io", "scope": f"repository:{SINGLE}:pull"},
        auth=(USER, TOKEN),
        timeout=5,
    )
    body = resp.json()
    assert resp.status_code == 200
    assert body["token"] == body["access_token"]
    assert body["expires_in"] == 300
    assert body["issued_at"].endswith("Z")


def test_ratelimit_headers_count_gets_not_heads(fresh_hub):
    session = loopback_session()
    session.headers.update(
        Authorization=f"Bearer {fresh_hub.issue_token()}",
        Accept=oci.MT_MANIFEST,
    )
    url = f"{fresh_hub.url}/v2/{SINGLE}/manifests/latest"
    fresh_hub.set_ratelimit(100, 50)
    try:
        head = session.head(url, timeout=5)
        get = session.get(url, timeout=5)
        fresh_hub.set_ratelimit(100, 0)
        refused = session.get(url, timeout=5)
    finally:
        fresh_hub.set_ratelimit(100, 97)

    assert head.status_code == 200
    assert head.headers["ratelimit-limit"] == "100;w=21600"
    assert head.headers["ratelimit-remaining"] == "50;w=21600"
    assert int(head.headers["Content-Length"]) > 0
    assert get.headers["ratelimit-remaining"] == "49;w=21600"
    assert get.headers["Docker-Content-Digest"] == head.headers["Docker-Content-Digest"]
    assert get.headers["docker-ratelimit-source"] == "127.0.0.1"
    assert refused.status_code == 429
    assert refused.json()["errors"][0]["code"] == "TOOMANYREQUESTS"


def test_block_refuses_connections_and_unblock_restores(fresh_hub):
    fresh_hub.block()
    with pytest.raises(requests.ConnectionError):
        loopback_session().get(fresh_hub.url + "/v2/", timeout=5)
    fresh_hub.unblock()
    assert wait_http(fresh_hub.url + "/v2/", timeout=10).status_code == 401


# -- release downloads -------------------------------------------------------------


def test_fileserver_serves_a_release_asset_matching_its_sha256(tmp_path):
    asset = make_release_asset(tmp_path, "2.8.3", "amd64")
    with FileServer(tmp_path) as files:
        session = loopback_session()
        tarball = session.get(f"{files.url}/v2.8.3/registry_2.8.3_linux_amd64.tar.gz", timeout=30)
        published = session.get(f"{files.url}/v2.8.3/registry_2.8.3_linux_amd64.tar.gz.sha256", timeout=5)
        missing = session.get(f"{files.url}/v2.8.3/registry_2.8.3_linux_riscv64.tar.gz", timeout=5)

    assert tarball.status_code == 200
    assert published.text == asset["sha256"] + "\n"
    assert hashlib.sha256(tarball.content).hexdigest() == asset["sha256"]
    assert missing.status_code == 404
    assert files.requests[0] == asset["url_path"]
    with tarfile.open(asset["path"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"registry", "README.md", "LICENSE"}
    assert members["registry"].mode == 0o755


def test_fetch_debian_registry_binary_for_arm64(tmp_path):
    """Uses apt (Debian's registry only); the .deb is cached after the first run."""
    binary = pathlib.Path(fetch_debian_registry_binary("arm64", tmp_path))
    header = binary.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


# -- the key proof: a real registry proxy authenticates to the stand-in --------------


def test_real_registry_proxy_pulls_with_hub_credentials(fresh_hub, images, tmp_path):
    config = proxy_config(tmp_path / "storage", fresh_hub.url, USER, TOKEN)
    with RegistryProcess(tmp_path, config) as mirror:
        first = oci.pull(mirror.hostport, SINGLE, "latest", tmp_path / "pull1")
        after_first = fresh_hub.counts()
        second = oci.pull(mirror.hostport, SINGLE, "latest", tmp_path / "pull2")
        after_second = fresh_hub.counts()
        assert TOKEN not in mirror.log_text()

    assert first == second == images["single"]["manifest_digest"]
    assert fresh_hub.token_requests, "the mirror never asked the token service"
    assert all(t["username"] == USER and t["password_ok"] and not t["anonymous"] for t in fresh_hub.token_requests)
    assert after_first["manifest_get"] == 1
    # A cached tag costs a HEAD upstream, never a counted GET.
    assert after_second["manifest_get"] == 1
    assert after_second["manifest_head"] > after_first["manifest_head"]


def test_real_registry_proxy_with_a_wrong_token_fails_upstream(fresh_hub, tmp_path):
    config = proxy_config(tmp_path / "storage", fresh_hub.url, USER, "dckr_pat_WRONG")
    with RegistryProcess(tmp_path, config) as mirror:
        with pytest.raises(subprocess.CalledProcessError):
            oci.pull(mirror.hostport, SINGLE, "latest", tmp_path / "pull")
    assert fresh_hub.token_requests
    assert not any(t["password_ok"] for t in fresh_hub.token_requests)
    assert fresh_hub.counts()["manifest_get"] == 0


def test_real_registry_proxy_without_credentials_pulls_anonymously(fresh_hub, images, tmp_path):
    config = proxy_config(tmp_path / "storage", fresh_hub.url)
    with RegistryProcess(tmp_path, config) as mirror:
        digest = oci.pull(mirror.hostport, MULTI, "latest", tmp_path / "pull", all_platforms=True)
    assert digest == images["multi"]["index_digest"]
    assert fresh_hub.token_requests and all(t["anonymous"] for t in fresh_hub.token_requests)


def test_registry_proxy_with_credentials_dies_when_hub_is_down(fresh_hub, tmp_path):
    """distribution issue 4038: with credentials, startup pings upstream and panics."""
    fresh_hub.block()
    mirror = RegistryProcess(tmp_path, proxy_config(tmp_path / "storage", fresh_hub.url, USER, TOKEN))
    with pytest.raises(RuntimeError, match="exited"):
        mirror.start()
    assert not mirror.running
    assert TOKEN not in mirror.log_text()
