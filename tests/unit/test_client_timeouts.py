"""Per-runtime bounds on what a black-holed mirror costs, where the file format has one."""

import tomllib

from tests.support.modules import lib

render = lib("clients.render")

MIRROR = "http://192.168.128.1:5000"


def test_every_containerd_mirror_host_gets_a_dial_timeout(hub_mirror):
    own = 'server = "https://registry-1.docker.io"\n\n[host."https://own.example"]\n  ca = "/x.pem"\n'
    for base in (None, own):
        hosts = tomllib.loads(render.render_hosts_toml(base, {"docker.io": [MIRROR, "https://10.0.0.2:5443"]}))["host"]
        ours = {url: host for url, host in hosts.items() if url != "https://own.example"}
        assert list(ours) == [MIRROR, "https://10.0.0.2:5443"]
        assert all(host["dial_timeout"] == "2s" for host in ours.values())
        # The user's own host is theirs: no timeout added to it.
        assert "dial_timeout" not in hosts.get("https://own.example", {})
