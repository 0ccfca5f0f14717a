"""Finding the mirrors that answer: the probe (bounded in total, a private CA trusted
through ``client:ca_file``), which mine entries count, and the recheck schedule entry."""

import http.server
import threading
import time

import pytest

from _hub_mirror.clients import discovery
from tests.support.clients import TLSFront, make_hub_identity
from tests.support.netutil import TricklingMirror


@pytest.mark.parametrize("seconds", [5, 9, 10, 60, 61, 3600, 86400])
def test_two_runs_are_never_further_apart_than_recheck(seconds):
    job = discovery.recheck_job(seconds)
    assert job["function"] == "hub_mirror.client_configure"
    # Salt waits `seconds`, then a random 1..splay more.
    assert job["seconds"] + job["splay"] == seconds
    assert job["splay"] >= 1 and job["seconds"] >= 1
    assert job["maxrunning"] == 1


def test_a_mine_entry_with_a_newline_is_skipped():
    entry = {"registry": "docker.io", "url": "http://10.0.0.5:5000\n", "serving": True}
    assert discovery.endpoint_problem(entry, own=False) == "not a hub_mirror.endpoint entry"
    assert discovery.endpoint_problem(dict(entry, url="http://10.0.0.5:5000"), own=False) is None


class _Registry(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_the_probe_is_bounded_in_total_by_a_mirror_that_trickles(capsys):
    """A mirror that sends one byte a second: each read returns in time, the total not."""
    mirror = TricklingMirror(repeat=4)
    url, sent = mirror.url, mirror.sent
    start = time.monotonic()
    result = discovery.probe_mirrors([url], 2)
    elapsed = time.monotonic() - start
    assert result == {url: "no answer within 2s"}
    mirror.thread.join(30)
    mirror.close()
    # The server got to send a few bytes, not the 121 it sent to the old probe.
    assert sent and sent[0] <= 5, sent
    with capsys.disabled():
        print(f"\nprobe of a 1 byte/s mirror with probe_timeout 2: {elapsed:.2f} s, {sent[0]} bytes sent")


def test_an_https_mirror_with_a_private_ca_answers_with_ca_file(tmp_path):
    cert, key = make_hub_identity(tmp_path / "tls")
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    front = TLSFront(plain.server_address[1], cert, key, port=0)
    front.start()
    try:
        url = f"https://127.0.0.1:{front._sock.getsockname()[1]}"
        untrusted = discovery.probe_mirrors([url], 5)[url]
        assert "not trusted" in untrusted and "hub_mirror:client:ca_file" in untrusted
        assert discovery.probe_mirrors([url], 5, str(cert)) == {url: None}
        plain_url = f"http://127.0.0.1:{plain.server_address[1]}"
        assert discovery.probe_mirrors([plain_url], 5) == {plain_url: None}
    finally:
        front.stop()
        plain.shutdown()

