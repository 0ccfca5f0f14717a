"""Issue 15's classes at the level of the files: a failure in one runtime never poisons
the record or another runtime, the user's policy is kept, hostile values are refused by
key, and the probe is bounded in total. Real files, real sockets on loopback; only
dockerd's reload is left to the integration tests."""

import errno
import http.server
import json
import os
import threading
import time
import tomllib

import pytest
import yaml
from salt.exceptions import SaltInvocationError

from tests.support.clients import TLSFront, make_hub_identity
from tests.support.modules import lib
from tests.support.netutil import TricklingMirror
from tests.unit.test_client_property import make_client, snapshot

discovery = lib("clients.discovery")
client_files = lib("clients.files")
WRITERS = (client_files, lib("clients.docker"))
render = lib("clients.render")
runtimes = lib("clients.runtimes")
fsutil = lib("fsutil")
validate = lib("validate")

MIRROR = "http://192.168.128.1:5000"


def configure(client, alive=None, test=False):
    alive = client["mirrors"] if alive is None else alive
    record = client_files.ClientRecord(client["record_dir"])
    return runtimes._sync_all(client, record, alive, test=test)


def clean(client):
    return runtimes._sync_all(client, client_files.ClientRecord(client["record_dir"]), {}, test=False, cleaning=True)


@pytest.fixture
def host(tmp_path):
    client = make_client(str(tmp_path), {"docker.io": [MIRROR]})
    os.makedirs(f"{tmp_path}/k3s")
    os.makedirs(f"{tmp_path}/containers/registries.conf.d")
    with open(client["paths"]["registries_conf"], "w") as handle:
        handle.write("# v2\n")
    os.makedirs(f"{tmp_path}/docker")
    with open(client["paths"]["docker_daemon_json"], "w") as handle:
        handle.write('{\n  "debug": true\n}\n')
    return client


def files_of(client):
    paths = client["paths"]
    return [
        paths["docker_daemon_json"],
        f"{paths['containerd_certs_d']}/docker.io/hosts.toml",
        f"{paths['registries_conf_d']}/50-hub-mirror.conf",
        paths["buildkitd_toml"],
        paths["k3s_registries"],
    ]


def test_a_failed_write_is_not_recorded_and_poisons_no_later_run(host, monkeypatch):
    before = {path: snapshot(path) for path in files_of(host)}
    real_write = fsutil.write_exact
    daemon_json = host["paths"]["docker_daemon_json"]

    def disk_full(path, text, new_mode=0o644):
        if path == daemon_json:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, text, new_mode)

    # Each writer of client files imported it: patch it where it is looked up.
    for module in WRITERS:
        monkeypatch.setattr(module, "write_exact", disk_full)
    changes, lines = configure(host)
    assert "docker" not in changes
    assert any(line.startswith("docker: left alone") and "No space left on device" in line for line in lines), lines
    record = client_files.ClientRecord(host["record_dir"])
    assert daemon_json not in record.files
    assert {entry["runtime"] for entry in record.files.values()} == {"containerd", "podman", "k3s"}
    assert snapshot(daemon_json) == before[daemon_json]

    # The disk has room again: the next run configures docker, and clean undoes all.
    for module in WRITERS:
        monkeypatch.setattr(module, "write_exact", real_write)
    changes, lines = configure(host)
    assert set(changes) == {"docker"}, lines
    assert json.loads(open(daemon_json).read())["registry-mirrors"] == [MIRROR]
    changes, lines = clean(host)
    assert set(changes) == {"docker", "containerd", "podman", "k3s"}, lines
    assert {path: snapshot(path) for path in files_of(host)} == before


def test_a_record_left_by_the_old_code_or_corrupted_is_repaired(host):
    configure(host)
    index = os.path.join(host["record_dir"], "index.json")
    data = json.load(open(index))
    # What the old code left after a failed write: an entry without "written".
    for entry in data["files"].values():
        del entry["written"]
    data["files"]["/not/ours"] = {"runtime": "lxc"}
    json.dump(data, open(index, "w"))
    changes, lines = configure(host)
    assert any(line.startswith("Record: repaired the record of") for line in lines), lines
    assert any("dropped the unusable record of /not/ours" in line for line in lines)
    assert changes == {}
    assert clean(host)[0]

    configure(host)
    with open(index, "w") as handle:
        handle.write('{"files": {"/etc/x": ')
    changes, lines = configure(host)
    assert any("index.json was unreadable" in line for line in lines), lines
    assert os.path.exists(index + ".corrupt")
    assert json.load(open(index))["files"]
    # Marked blocks are found by their markers: clean still takes them out.
    clean(host)
    assert not os.path.exists(f"{host['paths']['registries_conf_d']}/50-hub-mirror.conf")


@pytest.mark.parametrize("way_out", ["configure", "clean"])
def test_a_lost_record_does_not_keep_a_dead_mirror_in_marked_files(host, way_out):
    """The record is gone (deleted, or corrupt and set aside) and then the mirror dies:
    the blocks of ours are still found by their markers and taken out, by the next
    configure (or recheck) as by clean; the user's lines around them stay."""
    conf_d = host["paths"]["registries_conf_d"]
    user_drop_in = f"{conf_d}/10-user.conf"
    with open(user_drop_in, "w") as handle:
        handle.write('unqualified-search-registries = ["docker.io"]\n')
    configure(host)
    hosts_toml = f"{host['paths']['containerd_certs_d']}/docker.io/hosts.toml"
    ours = f"{conf_d}/50-hub-mirror.conf"
    host_port = MIRROR.split("://")[1]
    assert host_port in open(hosts_toml).read() and host_port in open(ours).read()
    os.unlink(os.path.join(host["record_dir"], "index.json"))

    changes, lines = configure(host, alive={}) if way_out == "configure" else clean(host)
    assert {"containerd", "podman"} <= set(changes), lines
    for path in (hosts_toml, ours):
        assert not os.path.exists(path) or host_port not in open(path).read(), path
    assert open(user_drop_in).read() == 'unqualified-search-registries = ["docker.io"]\n'
    assert configure(host, alive={})[0] == {}


@pytest.mark.parametrize(
    "breakage,runtime",
    [
        ("k3s_list", "k3s"),
        ("containerd_config_not_utf8", "containerd"),
        ("containerd_config_is_a_directory", "containerd"),
        ("daemon_json_is_a_directory", "docker"),
        ("buildkitd_not_utf8", "buildkit"),
    ],
)
def test_one_broken_runtime_file_costs_that_runtime_only(host, breakage, runtime):
    paths = host["paths"]
    if breakage == "k3s_list":
        open(paths["k3s_registries"], "w").write("mirrors:\n  docker.io:\n  - http://x\n")
    elif breakage == "containerd_config_not_utf8":
        open(paths["containerd_config"], "wb").write(b"version = 2\n# \xff\xfe\n")
    elif breakage == "containerd_config_is_a_directory":
        os.makedirs(paths["containerd_config"])
    elif breakage == "daemon_json_is_a_directory":
        os.unlink(paths["docker_daemon_json"])
        os.makedirs(paths["docker_daemon_json"])
    elif breakage == "buildkitd_not_utf8":
        os.makedirs(os.path.dirname(paths["buildkitd_toml"]))
        open(paths["buildkitd_toml"], "wb").write(b"debug = true # \xff\n")
    changes, lines = configure(host)
    line = next(line for line in lines if line.startswith(f"{runtime}:"))
    others = {"docker", "containerd", "podman", "k3s"} - {runtime}
    assert others <= set(changes), lines
    record = client_files.ClientRecord(host["record_dir"])
    assert others <= {entry["runtime"] for entry in record.files.values()}
    if breakage.startswith("containerd_config"):
        # The file hub_mirror writes is fine; only the note about the CRI plugin fails.
        assert "could not check how containerd picks this up" in line, line
    else:
        assert "left as it was" in line, line
    cleaned, lines = clean(host)
    assert others <= set(cleaned), lines


def test_the_users_blocked_or_own_docker_io_in_registries_conf_is_kept(host):
    paths = host["paths"]
    open(paths["registries_conf"], "w").write('[[registry]]\nlocation = "docker.io"\nblocked = true\n')
    host["runtimes"] = ["podman"]
    changes, lines = configure(host)
    assert changes == {}
    assert "docker.io is blocked in" in lines[-1] and "kept it blocked" in lines[-1], lines
    open(f"{paths['registries_conf_d']}/10-own.conf", "w").write(
        '[[registry]]\nprefix = "docker.io"\nlocation = "docker.io"\n[[registry.mirror]]\nlocation = "own:5000"\n'
    )
    open(paths["registries_conf"], "w").write("# v2\n")
    changes, lines = configure(host)
    assert changes == {} and "has a [[registry]] of its own for docker.io: kept it" in lines[-1], lines
    # Another upstream the user did not configure still gets its mirror.
    host["mirrors"]["ghcr.io"] = [MIRROR]
    changes, lines = configure(host)
    dropin = tomllib.loads(open(f"{paths['registries_conf_d']}/50-hub-mirror.conf").read())
    assert [r["prefix"] for r in dropin["registry"]] == ["ghcr.io"]


@pytest.mark.parametrize(
    "unit,dropin,blocked",
    [
        ("ExecStart=/usr/bin/dockerd -H fd:// --registry-mirror=http://m:1\n", None, True),
        ("ExecStart=/usr/bin/dockerd -H fd://\n", "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd \\\n  --registry-mirror http://m:1\n", True),
        ("ExecStart=/usr/bin/dockerd --registry-mirror=http://m:1\n", "[Service]\nExecStart=\nExecStart=/usr/bin/dockerd\n", False),
        ("ExecStart=/usr/bin/dockerd --config-file=/srv/other.json\n", None, True),
    ],
)
def test_dockerd_flags_in_its_unit_keep_daemon_json_alone_while_it_is_stopped(host, unit, dropin, blocked):
    units = host["paths"]["systemd_units"]
    os.makedirs(f"{units}/docker.service.d")
    open(f"{units}/docker.service", "w").write("[Service]\n" + unit)
    if dropin:
        open(f"{units}/docker.service.d/override.conf", "w").write(dropin)
    host["runtimes"] = ["docker"]
    before = snapshot(host["paths"]["docker_daemon_json"])
    changes, lines = configure(host)
    if blocked:
        assert changes == {} and snapshot(host["paths"]["docker_daemon_json"]) == before
        assert lines[-1].startswith("docker: left alone (dockerd is started (")
    else:
        assert "docker" in changes, lines


def test_docker_opts_in_etc_default_docker_count_too(host):
    open(host["paths"]["docker_default"], "w").write('DOCKER_OPTS="--registry-mirror=http://m:1"\n')
    host["runtimes"] = ["docker"]
    changes, lines = configure(host)
    assert changes == {} and "--registry-mirror" in lines[-1]


def test_a_docker_style_ca_in_certs_d_is_named_by_the_new_hosts_toml(host):
    directory = f"{host['paths']['containerd_certs_d']}/docker.io"
    os.makedirs(directory)
    for name in ("ca.crt", "client.cert", "client.key"):
        open(f"{directory}/{name}", "w").write("PEM\n")
    host["runtimes"] = ["containerd"]
    changes, lines = configure(host)
    parsed = tomllib.loads(open(f"{directory}/hosts.toml").read())
    assert parsed["ca"] == [f"{directory}/ca.crt"]
    assert parsed["client"] == [[f"{directory}/client.cert", f"{directory}/client.key"]]
    assert f"kept containerd using ca.crt, client.cert in {directory}" in lines[-1], lines
    clean(host)
    assert sorted(os.listdir(directory)) == ["ca.crt", "client.cert", "client.key"]


def _validate(client):
    validate._validate({"client": client}, {})


@pytest.mark.parametrize(
    "pillar_yaml,words",
    [
        # A YAML block scalar keeps its final newline.
        ("mirrors:\n  docker.io: |\n    http://192.168.128.1:5000\n", "'\\n'"),
        ("mirrors:\n  docker.io: \"http://192.168.128.1:5000\\r\"\n", "'\\r'"),
        ("mirrors:\n  docker.io: 'http://a\"b:5000'\n", "'\"'"),
        ("mirrors:\n  docker.io: 'http://bücher.example:5000'\n", "xn--bcher-kva.example"),
        ("mirrors:\n  docker.io: 'http://[::1'\n", "not a URL"),
        ("mirrors:\n  docker.io: 'http://[fe80::1%25eth0]:5000'\n", "bracketed IPv6"),
        ("mirrors:\n  \"docker.io\\n\": http://m:5000\n", "registry host"),
        ("ca_file: relative/ca.pem\n", "absolute"),
        ("ca_file: /nonexistent/ca.pem\n", "does not exist"),
        ("paths:\n  docker_daemon_json: \"/etc/docker/daemon.json\\n\"\n", "absolute path"),
    ],
)
def test_hostile_client_pillar_is_refused_by_key(pillar_yaml, words):
    with pytest.raises(SaltInvocationError) as info:
        _validate(yaml.safe_load(pillar_yaml))
    message = str(info.value)
    assert "hub_mirror:client:" in message and words in message, message


def test_ipv6_mirrors_pass_and_a_ca_file_that_exists_passes(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("PEM\n")
    _validate({"mirrors": {"docker.io": ["http://[::1]:5000", "https://[2001:db8::1]"]}, "ca_file": str(ca)})


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
        url = "https://127.0.0.1:%d" % front._sock.getsockname()[1]
        untrusted = discovery.probe_mirrors([url], 5)[url]
        assert "not trusted" in untrusted and "hub_mirror:client:ca_file" in untrusted
        assert discovery.probe_mirrors([url], 5, str(cert)) == {url: None}
        assert discovery.probe_mirrors(["http://127.0.0.1:%d" % plain.server_address[1]], 5) == {
            "http://127.0.0.1:%d" % plain.server_address[1]: None
        }
    finally:
        front.stop()
        plain.shutdown()


def test_a_record_that_cannot_be_saved_is_said_not_raised_and_nothing_is_written(host, tmp_path):
    """Without a place to keep the user's original, no client file may change."""
    (tmp_path / "state").write_text("a file where the state directory should be\n")
    before = {path: snapshot(path) for path in files_of(host)}
    changes, lines = configure(host)
    assert changes == {}, lines
    assert any("index.json could not be saved" in line for line in lines), lines
    for runtime in ("docker", "containerd", "podman", "k3s"):
        line = next(line for line in lines if line.startswith(f"{runtime}:"))
        assert "could not be written (its original could not be kept in" in line, line
        assert "Not a directory" in line
    assert {path: snapshot(path) for path in files_of(host)} == before


def test_a_mirror_host_that_is_also_an_upstream_gets_one_buildkit_table():
    mirrors = {"docker.io": ["http://m.example:5000"], "m.example:5000": ["http://x.example:5000"]}
    text = render.render_buildkitd_toml(None, mirrors)
    registry = tomllib.loads(text)["registry"]
    assert registry["m.example:5000"] == {"mirrors": ["x.example:5000"], "http": True}
    assert registry["docker.io"] == {"mirrors": ["m.example:5000"]}


def test_docker_style_cert_names_reach_hosts_toml_escaped(tmp_path):
    certs = tmp_path / "docker.io"
    certs.mkdir()
    for name in ('odd"name.crt', "c\x7fa.crt", "plain.crt"):
        (certs / name).write_text("x")
    (certs / b"bad\xff.crt".decode("utf-8", "surrogateescape")).write_text("x")
    found = runtimes._docker_style_certs(str(certs))
    text = render.render_hosts_toml(None, {"docker.io": [MIRROR]}, server_certs=found)
    assert tomllib.loads(text)["ca"] == [str(certs / 'odd"name.crt'), str(certs / "plain.crt")]
