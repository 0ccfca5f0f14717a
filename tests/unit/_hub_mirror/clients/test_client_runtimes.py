"""Configuring and cleaning every runtime's files: a failure in one runtime never
poisons the record or another runtime, the user's policy is kept, and what was written
comes out again (issue 15's classes at the level of the files). Real files; dockerd's
reload is left to the integration tests."""

import errno
import json
import os

import pytest
import tomllib

from _hub_mirror import fsutil
from _hub_mirror.clients import docker, runtimes
from _hub_mirror.clients import files as client_files
from tests.unit.host import MIRROR, clean, configure, snapshot

WRITERS = (client_files, docker)


@pytest.mark.parametrize(
    "text,expected",
    [
        (None, None),
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n',
         "/etc/containerd/certs.d"),
        ("version = 2\n[plugins.'io.containerd.grpc.v1.cri']\n  registry.config_path = '/a:/b'\n", "/a:/b"),
        ('version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n  config_path = "/x"\n', "/x"),
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".cni]\n  bin_dir = "/usr/lib/cni"\n', None),
        ('[plugins."other".registry]\n  config_path = "/y"\n', None),
    ],
)
def test_cri_config_path(text, expected):
    assert runtimes._cri_config_paths(text) == expected


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
