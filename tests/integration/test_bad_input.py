"""Bad pillar, applied with masterless `salt-call --local` to a host whose mirror serves:
each apply fails with a message that names the pillar key and the fix, and the mirror keeps
serving what it cached, on its old address, from the same config, binary and processes.
A config that validates but does not serve is rolled back to the last one that served."""

import copy
import dataclasses
import hashlib
import json
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from tests.support import oci
from tests.support.hub import HUB_TOKEN, HUB_USER
from tests.support.netutil import free_port
from tests.support.processes import parent_pid, registry_pids
from tests.support.release import archive_pillar, serve_releases
from tests.support.saltcall import Masterless, unique_name

# Salt's side: the registry version does not reach it (tests/conftest.py).
pytestmark = [pytest.mark.integration, pytest.mark.one_registry]

SERVICE_USER = "hub-mirror"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def other_releases(tmp_path_factory):
    """Assets the digests will not vouch for: Debian's 2.8.2 build named as 2.8.3 (whose
    built-in digest is upstream's) and as 9.9.9 (which no digest is known for)."""
    with serve_releases(tmp_path_factory.mktemp("other-releases"), versions=(), fake=("2.8.3", "9.9.9")) as server:
        yield server


@pytest.fixture(scope="module")
def serving(hub, release_server, tmp_path_factory):
    """A mirror that serves and has cached library/alpine, and what must stay as it is."""
    minion = Masterless.fresh()
    name, port = unique_name("m"), free_port()
    good = archive_pillar(
        release_server,
        {name: hub.mirror_pillar(port)},
    )
    try:
        minion.set_pillar(good)
        applied = minion.apply()
        assert applied.returncode == 0, applied
        digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path_factory.mktemp("pulled")))
        config_dir = Path(minion.lookup["config_dir"])
        binary = Path(minion.lookup["prefix"]) / "bin" / "registry"
        state = {
            "minion": minion,
            "name": name,
            "port": port,
            "good": good,
            "digest": digest,
            "config_path": config_dir / f"{name}.yml",
            "watched": [config_dir / f"{name}.yml", config_dir / f"{name}.offline.yml", binary],
        }
        state["pids"] = registry_pids(state["config_path"])
        assert len(state["pids"]) == 1, state["pids"]
        state["supervisor"] = parent_pid(state["pids"][0])
        state["bytes"] = {path: path.read_bytes() for path in state["watched"]}
        state["binary_sha256"] = sha256(binary)
        yield state
    finally:
        minion.set_pillar(good)
        minion.discard()


def mirror_key(serving, key):
    return f"hub_mirror:mirrors:{serving['name']}:{key}"


def with_mirror(**changes):
    """A case that changes (or, with None, removes) keys of the serving mirror."""

    def make(ctx):
        pillar = copy.deepcopy(ctx.serving["good"])
        mirror = pillar["mirrors"][ctx.serving["name"]]
        for key, value in changes.items():
            if value is None:
                mirror.pop(key, None)
            else:
                mirror[key] = value(ctx) if callable(value) else value
        return pillar

    return make


def with_top(**changes):
    """A case that changes top-level hub_mirror keys."""

    def make(ctx):
        pillar = copy.deepcopy(ctx.serving["good"])
        for key, value in changes.items():
            pillar[key] = value(ctx) if callable(value) else value
        return pillar

    return make


def on_version(version, make):
    """The case ``make`` with pillar asking for registry ``version``."""
    return lambda ctx: {**make(ctx), "version": version}


def port_held_by_another_process(ctx):
    holder = socket.socket()
    ctx.cleanup.append(holder.close)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return f"127.0.0.1:{holder.getsockname()[1]}"


def second_mirror_on_the_same_listen(ctx):
    pillar = copy.deepcopy(ctx.serving["good"])
    first = pillar["mirrors"][ctx.serving["name"]]
    pillar["mirrors"][ctx.serving["name"] + "b"] = {**first, "storage": "/var/lib/hub-mirror/elsewhere"}
    return pillar


def symlink_to(ctx, target):
    link = ctx.serving["minion"].root / f"link-{unique_name('')}"
    link.symlink_to(target)
    ctx.cleanup.append(link.unlink)
    return str(link)


def second_mirror_inside_the_first(ctx):
    pillar = copy.deepcopy(ctx.serving["good"])
    storage = f"{ctx.serving['minion'].lookup['state_dir']}/{ctx.serving['name']}"
    pillar["mirrors"][ctx.serving["name"] + "b"] = {
        "upstream": ctx.hub.url,
        "listen": f"127.0.0.1:{free_port()}",
        "storage": storage + "/nested",
    }
    return pillar


def mirrors_as_a_list(ctx):
    pillar = copy.deepcopy(ctx.serving["good"])
    pillar["mirrors"] = [{"name": ctx.serving["name"], **pillar["mirrors"][ctx.serving["name"]]}]
    return pillar


def release_from(version, source_hash):
    def make(ctx):
        pillar = copy.deepcopy(ctx.serving["good"])
        pillar["version"] = version
        pillar["install"] = {
            "method": "archive",
            "source": ctx.other_releases.template,
            "source_hash": source_hash(ctx) if callable(source_hash) else source_hash,
        }
        return pillar

    return make


def missing_download(ctx):
    pillar = copy.deepcopy(ctx.serving["good"])
    pillar["install"] = {
        "method": "archive",
        "source": ctx.release_server.url + "/gone/registry_{version}_linux_{arch}.tar.gz",
        "source_hash": ctx.release_server.asset["sha256"],
    }
    return pillar


# (id, pillar maker, pillar key the message names (may use {name}), words of the fix)
CASES = [
    ("listen-is-a-number", with_mirror(listen=5000), "{mirror}:listen", "quote the value in YAML"),
    ("token-is-a-list", with_mirror(token=[HUB_TOKEN]), "{mirror}:token", "quote the value in YAML"),
    ("mirrors-is-a-list", mirrors_as_a_list, "hub_mirror:mirrors", "mapping of mirror names"),
    ("version-unquoted-float", with_top(version=3.0), "hub_mirror:version", "quote it in YAML"),
    ("version-without-patch", with_top(version="2.8"), "hub_mirror:version", "give all three parts"),
    ("listen-port-out-of-range", with_mirror(listen="127.0.0.1:99999"), "{mirror}:listen", "write e.g. 127.0.0.1:5000"),
    ("listen-without-port", with_mirror(listen="nohost"), "{mirror}:listen", "write e.g. 127.0.0.1:5000"),
    ("listen-unknown-interface", with_mirror(listen="nosuchif0:5000"), "{mirror}:listen", "one of the interfaces"),
    ("upstream-not-http", with_mirror(upstream="ftp://127.0.0.1:21"), "{mirror}:upstream", "write it like https://"),
    (
        "upstream-with-path",
        with_mirror(upstream=lambda ctx: ctx.hub.url + "/v2/library"),
        "{mirror}:upstream",
        "give only scheme and host",
    ),
    (
        "upstream-with-credentials",
        with_mirror(upstream=lambda ctx: ctx.hub.url.replace("://", f"://{HUB_USER}:{HUB_TOKEN}@")),
        "{mirror}:upstream",
        "put them in username and token",
    ),
    (
        "upstream-with-credentials-and-path",
        with_mirror(upstream=lambda ctx: ctx.hub.url.replace("://", f"://{HUB_USER}:{HUB_TOKEN}@") + "/v2"),
        "{mirror}:upstream",
        "give only scheme and host",
    ),
    (
        "upstream-not-http-with-credentials",
        with_mirror(upstream=f"ftp://{HUB_USER}:{HUB_TOKEN}@127.0.0.1:21"),
        "{mirror}:upstream",
        "write it like https://",
    ),
    ("listen-port-in-use", with_mirror(listen=port_held_by_another_process), "{mirror}:listen", "choose a free address"),
    ("storage-relative", with_mirror(storage="cache/dockerhub"), "{mirror}:storage", "write e.g. /var/lib/hub-mirror/"),
    ("token-without-username", with_mirror(username=None), "{mirror}:token", "{mirror}:username to the account"),
    ("username-without-token", with_mirror(token=None), "{mirror}:username", "{mirror}:token (an access token)"),
    ("unknown-key", with_mirror(listn="127.0.0.1:5001"), "{mirror}:listn", "remove it or use one of"),
    ("unknown-top-key", with_top(mirror={}), "hub_mirror:mirror", "remove it or use one of"),
    ("debug-listen-not-loopback", with_mirror(debug_listen="0.0.0.0:15999"), "{mirror}:debug_listen", "bind it to 127.0.0.1"),
    (
        "debug-listen-is-the-listen-address",
        with_mirror(debug_listen=lambda ctx: f"127.0.0.1:{ctx.serving['port']}"),
        "{mirror}:debug_listen",
        "give the debug listener its own port",
    ),
    ("ttl-on-2.8", on_version("2.8.2", with_mirror(ttl="24h")), "{mirror}:ttl", "remove ttl or use a 3.x version"),
    ("ttl-not-a-duration", with_mirror(ttl="one week"), "{mirror}:ttl", "write e.g. 168h"),
    ("log-level-unknown", with_mirror(log_level="verbose"), "{mirror}:log_level", "use one of error, warn"),
    ("mirror-name-invalid", with_top(mirrors={"Docker Hub": {}}), "hub_mirror:mirrors:Docker Hub", "lowercase letters"),
    ("two-mirrors-one-listen", second_mirror_on_the_same_listen, "{mirror}b:listen", "give each mirror its own port"),
    ("install-method-unknown", with_top(install={"method": "docker"}), "hub_mirror:install:method", "use archive or package"),
    ("source-hash-garbage", with_top(install={"source_hash": "abc"}), "hub_mirror:install:source_hash", "64 hex digits"),
    ("probe-timeout-a-string", with_top(probe_timeout="30s"), "hub_mirror:probe_timeout", "use e.g. 30"),
    (
        "unknown-version-without-digest",
        release_from("9.9.9", ""),
        "hub_mirror:install:source_hash",
        "set install:source_hash to the release's sha256",
    ),
    (
        "source-hash-of-another-file",
        release_from("9.9.9", "0" * 64),
        "hub_mirror:install:source_hash",
        "sha256 mismatch",
    ),
    ("builtin-digest-mismatch", release_from("2.8.3", ""), "hub_mirror:install:source_hash", "sha256 mismatch"),
    (
        "binary-reports-another-version",
        release_from("2.8.3", lambda ctx: ctx.other_releases.template + ".sha256"),
        "hub_mirror:version",
        "reports version '2.8.2",
    ),
    ("download-fails", missing_download, "hub_mirror:install:source: downloading", "404 Client Error"),
    # Values that would reach a root shell, a unit file or rm: refused where they enter.
    ("storage-shell-command", with_mirror(storage="/srv/c;touch /tmp/hm-pwned"), "{mirror}:storage", "no spaces, quotes, $"),
    ("storage-newline-directive", with_mirror(storage="/srv/c\nUser=root"), "{mirror}:storage", "write it on one line"),
    ("storage-with-a-space", with_mirror(storage="/srv/docker cache"), "{mirror}:storage", "no spaces"),
    ("storage-etc", with_mirror(storage="/etc"), "{mirror}:storage", "is a system directory"),
    ("storage-inside-home", with_mirror(storage="/home/cache"), "{mirror}:storage", "inside the system directory /home"),
    ("storage-dotdot", with_mirror(storage="/var/lib/hub-mirror/../../../home"), "{mirror}:storage", "without them"),
    ("storage-symlink-to-etc", with_mirror(storage=lambda ctx: symlink_to(ctx, "/etc")), "{mirror}:storage", "resolves to '/etc'"),
    ("storage-inside-another-mirror", second_mirror_inside_the_first, "{mirror}b:storage", "neither inside the other"),
    ("storage-is-the-state-dir", with_mirror(storage=lambda ctx: ctx.serving["minion"].lookup["state_dir"]), "{mirror}:storage", "overlaps lookup:state_dir"),
    ("upstream-command-in-query", with_mirror(upstream=lambda ctx: ctx.hub.url + "/?x=$(id)"), "{mirror}:upstream", "give only scheme and host"),
    ("upstream-newline-directive", with_mirror(upstream=lambda ctx: ctx.hub.url + "\nUser=root"), "{mirror}:upstream", "write it on one line"),
    ("upstream-port-out-of-range", with_mirror(upstream="http://127.0.0.1:70000"), "{mirror}:upstream", "bad host or port"),
    ("upstream-is-the-mirror-itself", with_mirror(upstream=lambda ctx: f"http://127.0.0.1:{ctx.serving['port']}"), "{mirror}:upstream", "this mirror's own address"),
    ("upstream-bad-ipv6", with_mirror(upstream="http://[::1"), "{mirror}:upstream", "is not a valid URL"),
    ("username-with-colon", with_mirror(username="hub:user"), "{mirror}:username", "give the account name alone"),
    ("token-refused-upstream", with_mirror(token="dckr_pat_WRONG0000000000000000"), "{mirror}:token", "check username and token"),
    ("user-is-root", with_top(lookup={"user": "root"}), "hub_mirror:lookup:user", "use a dedicated account"),
    ("group-is-sudo", with_top(lookup={"group": "sudo"}), "hub_mirror:lookup:group", "use a dedicated account"),
    # Values that used to end in a traceback.
    ("mirror-named-by-a-number", with_top(mirrors=lambda ctx: {5850: {}}), "hub_mirror:mirrors:5850", "quote it in YAML"),
    ("mirror-name-with-newline", with_top(mirrors=lambda ctx: {"m\n": {}}), "hub_mirror:mirrors:m\\n", "lowercase letters"),
    ("version-with-newline", with_top(version="2.8.2\n"), "hub_mirror:version", "give all three parts"),
    ("max-size-infinite", with_mirror(max_size=float("inf")), "{mirror}:max_size", "write e.g. 50G"),
    ("source-unknown-placeholder", with_top(install={"source": "http://127.0.0.1:1/{ver}.tgz"}), "hub_mirror:install:source", "use only {{version}} and {{arch}}"),
    ("config-dir-a-number", with_top(lookup={"config_dir": 5}), "hub_mirror:lookup:config_dir", "quote the value in YAML"),
    ("debug-listen-bare-ipv6", with_mirror(debug_listen="::1:5805"), "{mirror}:debug_listen", "[::1]:5000"),
]


@dataclasses.dataclass
class Context:
    """What a case's pillar is made from; ``cleanup`` gets what must be closed after."""

    serving: dict
    hub: object
    release_server: object
    other_releases: object
    cleanup: list = dataclasses.field(default_factory=list)


def apply_case(ctx, case, test=False):
    """Apply ``case``'s bad pillar to the serving minion (``test=True`` when ``test``),
    then put the good pillar back: (the run's result, the key and the fix it must name)."""
    _, make, key, fix = case
    names = {"mirror": mirror_key(ctx.serving, "")[:-1]}
    minion = ctx.serving["minion"]
    try:
        minion.set_pillar(make(ctx))
        result = minion.apply(test=test)
    finally:
        for close in ctx.cleanup:
            close()
        minion.set_pillar(ctx.serving["good"])
    return result, key.format(**names), fix.format(**names)


def assert_mirror_untouched(serving, tmp_path):
    """Same bytes, same processes, and it still serves the cached image by tag."""
    for path in serving["watched"]:
        assert path.read_bytes() == serving["bytes"][path], f"{path} changed"
    assert sha256(serving["watched"][-1]) == serving["binary_sha256"]
    assert registry_pids(serving["config_path"]) == serving["pids"]
    assert parent_pid(serving["pids"][0]) == serving["supervisor"]
    pulled = oci.pull(f"127.0.0.1:{serving['port']}", "library/alpine", "latest", str(tmp_path / "again"))
    assert pulled == serving["digest"]


def assert_failed_clearly(result, key, fix):
    assert result.returncode != 0, result
    failed = [ret for ret in result.states.values() if ret["result"] is False]
    # A render error has no states; a state error fails one and nothing changes.
    assert failed or isinstance(result.data, list), result
    assert result.changes == {}, result.changes
    assert key in result.output, (key, result)
    assert fix in result.output, (fix, result)
    assert HUB_TOKEN not in result.output


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_pillar_fails_and_the_mirror_keeps_serving(serving, hub, release_server, other_releases, case, tmp_path):
    result, key, fix = apply_case(Context(serving, hub, release_server, other_releases), case)
    assert_failed_clearly(result, key, fix)
    assert_mirror_untouched(serving, tmp_path)


IN_TEST_MODE = ("listen-is-a-number", "listen-port-in-use", "unknown-version-without-digest")


@pytest.mark.parametrize("case", [case for case in CASES if case[0] in IN_TEST_MODE], ids=IN_TEST_MODE)
def test_test_mode_fails_on_the_same_bad_pillar(serving, hub, release_server, other_releases, case, tmp_path):
    result, key, fix = apply_case(Context(serving, hub, release_server, other_releases), case, test=True)
    assert_failed_clearly(result, key, fix)
    assert_mirror_untouched(serving, tmp_path)


def test_a_cpu_arch_without_a_release_is_refused(serving, tmp_path):
    """The same host and pillar seen through grains of a CPU upstream builds nothing for."""
    mips = Masterless.fresh(lookup=serving["minion"].lookup, grains={"osarch": "mips", "cpuarch": "mips"})
    try:
        mips.set_pillar(serving["good"])
        result = mips.apply()
    finally:
        # Its mirror is the serving one: leave it running.
        mips.discard(stop_mirrors=False)
    assert_failed_clearly(result, "hub_mirror:version", "install:method: package")
    assert "'mips/mips'" in result.output
    assert_mirror_untouched(serving, tmp_path)


def test_yaml_typed_pillar_as_users_write_it(serving, tmp_path):
    """Unquoted YAML, as typed: a float version and a numeric listen port."""
    minion, name = serving["minion"], serving["name"]
    lookup = "".join(f"    {key}: {value}\n" for key, value in minion.lookup.items())
    try:
        minion.write_raw_pillar(
            "hub_mirror:\n"
            "  version: 2.8\n"
            "  mirrors:\n"
            f"    {name}:\n"
            f"      upstream: {serving['good']['mirrors'][name]['upstream']}\n"
            "      listen: 5000\n"
            f"      username: {HUB_USER}\n"
            f"      token: {HUB_TOKEN}\n"
            "  lookup:\n" + lookup
        )
        result = minion.apply()
    finally:
        minion.set_pillar(serving["good"])
    assert_failed_clearly(result, "hub_mirror:version", "quote it in YAML")
    assert f"hub_mirror:mirrors:{name}:listen" in result.output
    assert_mirror_untouched(serving, tmp_path)


def low_port():
    """A free port below the first one an unprivileged user may bind."""
    first_unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    for port in range(min(first_unprivileged, 1024) - 1, 599, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free privileged port below {first_unprivileged}")


def test_config_that_does_not_serve_is_rolled_back(masterless, release_server, clean_hub, mirror_name, tmp_path):
    """A privileged listen port validates and is free, but the front (the service user,
    under the init script, without CAP_NET_BIND_SERVICE) cannot bind it: `running` puts back
    the config that served, and the mirror serves its cache again on its old address."""
    port = free_port()
    good = archive_pillar(
        release_server,
        {mirror_name: clean_hub.mirror_pillar(port)},
        probe_timeout=10,
        lookup={"supervisor": "sysv"},
    )
    masterless.set_pillar(good)
    assert masterless.apply().returncode == 0
    digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "first"))
    config = Path(masterless.lookup["config_dir"]) / f"{mirror_name}.yml"
    good_config = config.read_bytes()

    unservable = copy.deepcopy(good)
    low = low_port()
    unservable["mirrors"][mirror_name]["listen"] = f"127.0.0.1:{low}"
    masterless.set_pillar(unservable)
    result = masterless.apply()
    masterless.set_pillar(good)

    assert result.returncode != 0, result
    assert "permission denied" in result.output.lower()  # nginx's bind() on the front
    assert "Restored the last setup that served (it serves again)" in result.output
    # The whole setup comes back, the init script's probe address included.
    assert json.loads((Path(masterless.lookup["config_dir"]) / f"{mirror_name}.supervise.json").read_text())["listen"] == f"127.0.0.1:{port}"
    assert HUB_TOKEN not in result.output
    assert config.read_bytes() == good_config
    status = config.stat()
    assert status.st_mode & 0o777 == 0o600
    assert status.st_uid == pwd.getpwnam(SERVICE_USER).pw_uid
    # The listen address is the front's: its config is the one that failed.
    front = Path(masterless.lookup["config_dir"]) / f"{mirror_name}.front.conf"
    assert f"listen 127.0.0.1:{port};" in front.read_text()
    assert f"listen 127.0.0.1:{low};" in Path(f"{front}.failed").read_text()
    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "after")) == digest

    again = masterless.apply()
    assert again.returncode == 0, again
    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "again")) == digest


def test_an_nginx_that_refuses_the_front_config_restarts_nothing(masterless, release_server, clean_hub, mirror_name, tmp_path):
    """An upgraded nginx that cannot run the front's config (here one that says so on
    ``-t``): the check before the restart refuses it, the same processes keep serving and
    every file of theirs is put back. A rollback after the restart could not have brought
    the old nginx back."""
    port = free_port()
    good = archive_pillar(release_server, {mirror_name: clean_hub.mirror_pillar(port)})
    masterless.set_pillar(good)
    assert masterless.apply().returncode == 0
    digest = oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "first"))
    config_dir = Path(masterless.lookup["config_dir"])
    before = {path: path.read_bytes() for path in config_dir.iterdir() if path.is_file()}
    (registry,) = registry_pids(str(config_dir / f"{mirror_name}.yml"))
    supervisor = parent_pid(registry)

    # Where the service user can run it (pytest's own directories are root's alone).
    home = Path(tempfile.mkdtemp(prefix="hub-mirror-nginx-"))
    try:
        home.chmod(0o755)
        upgraded = home / "nginx"
        upgraded.write_text(
            '#!/bin/sh\nfor arg; do [ "$arg" = -t ] && { echo \'nginx: [emerg] unknown directive "proxy_cache_lock_age"\' >&2; exit 1; }; done\n'
            'exec /usr/sbin/nginx "$@"\n'
        )
        upgraded.chmod(0o755)
        refused = copy.deepcopy(good)
        refused.setdefault("lookup", {})["front_binary"] = str(upgraded)
        masterless.set_pillar(refused)
        result = masterless.apply()
    finally:
        shutil.rmtree(home)
    masterless.set_pillar(good)

    assert result.returncode != 0, result
    assert "refuses the front's config, so nothing was restarted" in result.output
    assert 'unknown directive "proxy_cache_lock_age"' in result.output
    assert registry_pids(str(config_dir / f"{mirror_name}.yml")) == [registry] and parent_pid(registry) == supervisor
    assert {path: path.read_bytes() for path in before} == before
    assert oci.pull(f"127.0.0.1:{port}", "library/alpine", "latest", str(tmp_path / "after")) == digest
    again = masterless.apply()
    assert again.returncode == 0, again
    assert again.changes == {}
