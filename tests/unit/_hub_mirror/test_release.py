"""The release: every arch upstream builds has a known digest and an asset URL, and the
expected digest comes from the built-in table, the pillar or a URL."""

import fcntl
import hashlib
import os
import subprocess
import tempfile
import threading
import time

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from salt.exceptions import CommandExecutionError

from _hub_mirror import release, settings, validate
from tests.unit.host import GRAINS, lookup_in, settings_of


@pytest.mark.parametrize("version", ["2.8.3", "3.0.0"])
def test_every_built_arch_has_a_known_digest_and_asset_url(version):
    arches = settings.RELEASE_ARCHES_2 if version.startswith("2") else settings.RELEASE_ARCHES_3
    assert set(release.KNOWN_DIGESTS[version]) == set(arches)
    for arch in arches:
        url = release.asset_url(version, arch)
        assert url == (
            "https://github.com/distribution/distribution/releases/download/"
            f"v{version}/registry_{version}_linux_{arch}.tar.gz"
        )
        assert len(release._expected_digest(version, arch, "")) == 64


def test_riscv64_only_from_3x():
    with pytest.raises(CommandExecutionError, match="no release for CPU arch 'riscv64'"):
        release._check_arch_supported("2.8.3", "riscv64", {})
    release._check_arch_supported("3.0.0", "riscv64", {})


def test_unknown_version_without_source_hash_names_the_key_to_add():
    with pytest.raises(CommandExecutionError) as err:
        release._expected_digest("3.1.1", "amd64", "")
    assert "hub_mirror:install:source_hash" in str(err.value)
    assert "registry_3.1.1_linux_amd64.tar.gz.sha256" in str(err.value)


@pytest.mark.parametrize("given", ["a" * 64, "sha256:" + "A" * 64, "sha256=" + "b" * 64])
def test_source_hash_digest_forms(given):
    assert release._expected_digest("9.9.9", "amd64", given) == given[-64:].lower()


def test_source_hash_url_is_fetched_and_parsed(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "asset.sha256").write_text(digest + "\n")
    assert release._expected_digest("9.9.9", "amd64", f"file://{tmp_path}/asset.sha256") == digest


@pytest.mark.parametrize("source_hash", ["", "http://u:s3cr3t@127.0.0.1:1/sums.sha256?private_token=t0ps3cr3t"])
def test_a_credentialed_source_never_shows_when_the_download_fails(tmp_path, source_hash):
    # install reads the unredacted settings: the real URL, userinfo and query included,
    # must reach the download and no message, return or record.
    source = "http://u:s3cr3t@127.0.0.1:1/v{version}/registry_{version}_linux_{arch}.tar.gz?private_token=t0ps3cr3t"
    install = {"method": "archive", "source": source, "source_hash": source_hash or "0" * 64}
    conf = settings_of({"version": "9.9.9", "install": install, "lookup": lookup_in(tmp_path)})
    with pytest.raises(CommandExecutionError) as failed:
        release.install(conf, GRAINS, None, None)
    assert "127.0.0.1:1" in str(failed.value)
    for secret in ("s3cr3t", "t0ps3cr3t"):
        assert secret not in str(failed.value)
        for path in tmp_path.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_no_package_service_starts_while_a_package_installs(tmp_path, monkeypatch):
    """Debian's maintainer scripts ask policy-rc.d before they start a service (101: do
    not): it is there, and says no to the installed packages' own services only, exactly
    while a package installs."""
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(release, "POLICY_RC_D", str(policy))
    monkeypatch.setattr(release, "INSTALL_LOCK", str(tmp_path / "install.lock"))
    asked = [("nginx", "start"), ("--quiet", "nginx", "start"), ("nginx.service", "start"), ("docker-registry", "restart"), ("ssh.service", "restart"), ()]
    answers = []

    def pkg_install(name, refresh=False):
        answers.append([subprocess.run([str(policy), *args], check=False).returncode for args in asked])
        if name == "broken":
            raise CommandExecutionError("E: unable to locate package broken")
        return {name: {"new": "1"}}

    quiet = release._without_service_starts(pkg_install, ["docker-registry", "nginx"])
    assert quiet("nginx", refresh=True) == {"nginx": {"new": "1"}}
    with pytest.raises(CommandExecutionError):
        quiet("broken")
    assert answers == [[101, 101, 101, 101, 0, 0]] * 2
    assert not policy.exists()

    # One left by a run killed mid-install is replaced and goes.
    policy.write_text(release._policy_text(["old"]))
    policy.chmod(0o755)
    quiet("nginx")
    assert answers[-1][0] == 101 and not policy.exists()

    # A host's own policy decides, and stays as it was.
    policy.write_text("#!/bin/sh\nexit 0\n")
    policy.chmod(0o755)
    quiet("nginx")
    assert answers[-1] == [0] * len(asked) and policy.read_text() == "#!/bin/sh\nexit 0\n"


@given(st.lists(st.from_regex(validate._PACKAGE_RE, fullmatch=True), min_size=1, max_size=3))
@hypothesis_settings(max_examples=50, deadline=None)
def test_the_policy_refuses_exactly_the_services_named(names):
    # Every name validation lets through (lookup:package_service, lookup:front_service).
    with tempfile.TemporaryDirectory() as directory:
        policy = os.path.join(directory, "policy-rc.d")
        with open(policy, "w", encoding="utf-8") as handle:
            handle.write(release._policy_text(names))
        os.chmod(policy, 0o755)
        for name in names:
            assert subprocess.run([policy, name, "start"], check=False).returncode == 101
        assert subprocess.run([policy, "x" + names[0] + "x", "start"], check=False).returncode == 0


def test_a_policy_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    # Found by an adversarial pass: an empty policy-rc.d stayed, taken for the host's own.
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(release, "POLICY_RC_D", str(policy))
    monkeypatch.setattr(release, "INSTALL_LOCK", str(tmp_path / "install.lock"))
    real_write = os.write

    def full(descriptor, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        release._without_service_starts(lambda *args, **kwargs: None, ["nginx"])("nginx")
    monkeypatch.setattr(os, "write", real_write)
    assert not policy.exists()
    policy.mkdir()  # not a file: not ours, and no traceback
    assert release._is_our_policy() is False


def test_a_second_install_waits_for_the_first_and_never_removes_its_policy(tmp_path, monkeypatch):
    # Found by review: a second run took a live run's policy for a leftover and removed it.
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(release, "POLICY_RC_D", str(policy))
    monkeypatch.setattr(release, "INSTALL_LOCK", str(tmp_path / "install.lock"))
    events = []
    first_installing, first_may_finish = threading.Event(), threading.Event()

    def slow_install(name):
        events.append(("first installs", policy.read_text()))
        first_installing.set()
        first_may_finish.wait(10)
        events.append(("first done, policy still there", policy.exists()))

    def quick_install(name):
        events.append(("second installs", policy.read_text()))

    first = threading.Thread(target=release._without_service_starts(slow_install, ["nginx"]), args=("nginx",))
    first.start()
    assert first_installing.wait(10)
    second = threading.Thread(target=release._without_service_starts(quick_install, ["docker-registry"]), args=("x",))
    second.start()
    time.sleep(1.5)  # the second is waiting on the lock meanwhile
    first_may_finish.set()
    first.join(10)
    second.join(10)
    assert [event[0] for event in events] == ["first installs", "first done, policy still there", "second installs"]
    assert events[1][1] is True
    assert "    nginx|" in events[0][1] and "    docker-registry|" in events[2][1]
    assert not policy.exists()


def test_an_install_that_cannot_get_the_lock_says_who_holds_it(tmp_path, monkeypatch):
    lock = tmp_path / "install.lock"
    monkeypatch.setattr(release, "POLICY_RC_D", str(tmp_path / "policy-rc.d"))
    monkeypatch.setattr(release, "INSTALL_LOCK", str(lock))
    monkeypatch.setattr(release, "INSTALL_LOCK_WAIT", 1)
    with open(lock, "w", encoding="utf-8") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CommandExecutionError, match=f"another hub_mirror run .* holds {lock}"):
            release._without_service_starts(lambda name: None, ["nginx"])("nginx")
