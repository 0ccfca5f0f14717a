"""The Docker Hub token, through a mirror's life under masterless `salt-call --local`: a first
apply, a re-apply, test runs, a token rotation and failed applies. It must appear only in
the mirror's 0600 config (and the operator's own pillar file): in no Salt output of any
format or log level, no log file, no process argument or environment, no world-readable file,
no Salt cache file and no return of the module's functions."""

import grp
import pwd
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.netutil import free_port
from tests.support.processes import cmdline, environ, parent_pid, pids, registry_pids
from tests.support.release import archive_pillar
from tests.support.saltcall import Masterless, unique_name

pytestmark = pytest.mark.integration

ROTATED_TOKEN = "dckr_pat_ROTATED9876543210zyxwvuTSR"
TOKENS = (HUB_TOKEN, ROTATED_TOKEN)
SERVICE_USER = "hub-mirror"
REDACTED = "<redacted>"


def process_snapshot():
    """Every process's arguments as ``ps`` shows them (full width) and as /proc holds them."""
    text = subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True, check=True).stdout
    return text + "".join(" ".join(cmdline(pid)) + "\n" for pid in pids())


def registry_environments(config_path):
    """Environment of the registry serving ``config_path`` and of its supervisor."""
    serving = registry_pids(config_path)
    assert serving, f"no registry serves {config_path}"
    return [environ(serving[0]), environ(parent_pid(serving[0]))]


@pytest.fixture(scope="module")
def journey(hub, release_server):
    """Run the whole life of a mirror once; every test below inspects what it left."""
    minion = Masterless.fresh()
    name, port = unique_name("m"), free_port()
    mirror = hub.mirror_pillar(port)
    first = archive_pillar(release_server, {name: mirror})
    rotated = archive_pillar(release_server, {name: {**mirror, "token": ROTATED_TOKEN}})
    bad_type = archive_pillar(release_server, {name: {**mirror, "token": ROTATED_TOKEN, "listen": 5000}})
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port_in_use = archive_pillar(
        release_server,
        {name: {**mirror, "token": ROTATED_TOKEN, "listen": f"127.0.0.1:{holder.getsockname()[1]}"}},
    )
    config_path = Path(minion.lookup["config_dir"]) / f"{name}.yml"
    calls, snapshots = {}, []
    try:
        # Masterless keeps the pillar file 0600: the operator's secret store, like /srv/pillar.
        minion.set_pillar(first)
        calls["first apply, debug on the console"] = minion.run("-l", "debug", "state.apply", "hub_mirror")
        snapshots.append((process_snapshot(), registry_environments(config_path)))
        calls["re-apply, highstate output"] = minion.run("--out=highstate", "state.apply", "hub_mirror")
        calls["test apply"] = minion.apply(test=True)
        calls["test apply, highstate output, debug"] = minion.run(
            "--out=highstate", "-l", "debug", "state.apply", "hub_mirror", "test=True"
        )
        hub.token = ROTATED_TOKEN  # Docker Hub now takes the new token: it is checked first
        minion.set_pillar(rotated)
        calls["rotation, test"] = minion.apply(test=True)
        calls["rotation, highstate output, debug"] = minion.run("--out=highstate", "-l", "debug", "state.apply", "hub_mirror")
        snapshots.append((process_snapshot(), registry_environments(config_path)))
        calls["rotated re-apply"] = minion.apply()
        minion.set_pillar(bad_type)
        calls["bad type, debug"] = minion.run("-l", "debug", "state.apply", "hub_mirror")
        calls["bad type, highstate output"] = minion.run("--out=highstate", "state.apply", "hub_mirror")
        minion.set_pillar(port_in_use)
        calls["port in use, debug"] = minion.run("-l", "debug", "state.apply", "hub_mirror")
        calls["port in use, highstate output"] = minion.run("--out=highstate", "state.apply", "hub_mirror")
        minion.set_pillar(rotated)
        calls["settings"] = minion.run("hub_mirror.settings")
        calls["config"] = minion.run("hub_mirror.config", f"mirror={name}")
        calls["configure, test"] = minion.run("hub_mirror.configure", f"mirror={name}", "test=True")
        calls["show_sls"] = minion.run("state.show_sls", "hub_mirror")
        calls["show_lowstate"] = minion.run("state.show_lowstate")
        yield {
            "minion": minion,
            "name": name,
            "calls": calls,
            "snapshots": snapshots,
            "config_path": config_path,
            # 2.8 reads the token from its config; 3.x from the credential helper's file.
            "token_path": config_path
            if release_server.version.startswith("2.")
            else config_path.with_name(f"{name}.credentials.json"),
        }
    finally:
        hub.token = HUB_TOKEN
        holder.close()
        minion.set_pillar(rotated)
        minion.discard()


# What each call must have done, so that a clean output means something.
EXPECTED_SUCCESS = {
    "first apply, debug on the console": True,
    "re-apply, highstate output": True,
    "test apply": True,
    "test apply, highstate output, debug": True,
    "rotation, test": True,
    "rotation, highstate output, debug": True,
    "rotated re-apply": True,
    "bad type, debug": False,
    "bad type, highstate output": False,
    "port in use, debug": False,
    "port in use, highstate output": False,
    "settings": True,
    "config": True,
    "configure, test": True,
    "show_sls": True,
    "show_lowstate": True,
}


@pytest.mark.parametrize("label", list(EXPECTED_SUCCESS))
def test_no_salt_output_shows_the_token(journey, label):
    result = journey["calls"][label]
    assert (result.returncode == 0) is EXPECTED_SUCCESS[label], result
    if "debug" in label:
        assert "[DEBUG   ]" in result.stderr, result
    if "highstate output" in label:
        assert result.stdout.startswith("local:") and result.data is None, result
    for token in TOKENS:
        assert token not in result.stdout
        assert token not in result.stderr


def test_failures_name_the_key_without_the_secret(journey):
    name = journey["name"]
    assert f"hub_mirror:mirrors:{name}:listen" in journey["calls"]["bad type, debug"].output
    assert "is already in use" in journey["calls"]["port in use, highstate output"].output


def test_rotation_is_reported_and_predicted_redacted(journey):
    name = journey["name"]
    predicted = journey["calls"]["rotation, test"].changes[f"hub_mirror-config-{name}-configured"]
    live = journey["calls"]["rotation, highstate output, debug"].stdout
    if journey["token_path"] == journey["config_path"]:
        assert predicted == {"config": {"proxy.password": {"old": REDACTED, "new": REDACTED}}}
        assert "proxy.password" in live and REDACTED in live and "restarted" in live
    else:
        assert predicted == {"credentials": {"old": REDACTED, "new": REDACTED}}
        assert "credentials" in live and REDACTED in live and "restarted" not in live
    assert journey["calls"]["rotated re-apply"].changes == {}


def test_the_token_file_is_private_to_the_service_user_and_holds_the_current_token(journey):
    for path in {journey["config_path"], journey["token_path"]}:
        status = path.stat()
        assert status.st_mode & 0o777 == 0o600, path
        assert status.st_uid == pwd.getpwnam(SERVICE_USER).pw_uid
        assert status.st_gid == grp.getgrnam(SERVICE_USER).gr_gid
    text = journey["token_path"].read_text()
    assert ROTATED_TOKEN in text and HUB_TOKEN not in text
    if journey["token_path"] != journey["config_path"]:
        assert ROTATED_TOKEN not in journey["config_path"].read_text()


def test_minion_log_at_debug_level_holds_no_token(journey):
    # Salt prepends root_dir to log_file: find it rather than trust the configured path.
    logs = list(Path(journey["minion"].root).rglob("minion.log"))
    assert len(logs) == 1, logs
    text = logs[0].read_bytes()
    assert b"[DEBUG   ]" in text and b"hub_mirror" in text
    for token in TOKENS:
        assert token.encode() not in text


def test_no_process_argument_or_environment_holds_the_token(journey):
    assert len(journey["snapshots"]) == 2
    for arguments, environments in journey["snapshots"]:
        assert f"serve {journey['config_path']}" in arguments  # the mirror was running
        assert all(environments)
        for token in TOKENS:
            assert token not in arguments
            assert not [env for env in environments if token.encode() in env]


def files_under(*roots):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def test_no_world_readable_file_holds_the_token(journey):
    minion, name = journey["minion"], journey["name"]
    cachedir = Path(minion.root) / "salt-root" / "var" / "cache" / "salt" / "minion"
    assert cachedir.is_dir()
    service_files = [path for path in (Path("/etc/init.d") / f"hub-mirror-{name}",) if path.exists()]
    assert service_files
    checked = 0
    for path in [*files_under(minion.root), *service_files]:
        if path.stat().st_mode & 0o004:
            checked += 1
            data = path.read_bytes()
            for token in TOKENS:
                assert token.encode() not in data, path
    assert checked > 10


def test_only_private_operator_and_mirror_files_hold_the_token(journey):
    """Beyond world-readable: no log, cache or state file holds it, whatever its mode."""
    minion, name = journey["minion"], journey["name"]
    allowed = {
        minion.pillar_dir / "hub_mirror.sls",
        journey["config_path"],
        journey["config_path"].with_name(f"{name}.last-good.json"),
        journey["config_path"].with_name(f"{name}.yml.failed"),
        journey["config_path"].with_name(f"{name}.credentials.json"),
    }
    holders = set()
    for path in files_under(minion.root):
        data = path.read_bytes()
        if any(token.encode() in data for token in TOKENS):
            holders.add(path)
            assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert journey["token_path"] in holders
    assert holders <= allowed, holders - allowed


def test_salt_cache_files_hold_no_token(journey):
    cachedir = Path(journey["minion"].root) / "salt-root" / "var" / "cache" / "salt" / "minion"
    names = {path.name for path in files_under(cachedir)}
    assert {"sls.p", "highstate.cache.p"} <= names, names
    for path in files_under(cachedir):
        data = path.read_bytes()
        for token in TOKENS:
            assert token.encode() not in data, path


def test_settings_and_config_returns_are_redacted(journey):
    name = journey["name"]
    settings = journey["calls"]["settings"].data
    assert settings["mirrors"][name]["token"] == REDACTED
    assert settings["mirrors"][name]["username"] == HUB_USER
    proxy = journey["calls"]["config"].data["proxy"]
    if journey["token_path"] == journey["config_path"]:
        assert proxy["password"] == REDACTED
    else:
        assert "password" not in proxy and proxy["exec"]["command"].endswith("hub-mirror-credential-helper")
    assert journey["calls"]["configure, test"].data["changes"] == {}
