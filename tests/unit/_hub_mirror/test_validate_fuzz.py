"""Property-based fuzzing of the hub_mirror pillar, as an attacker or a careless operator
would write it: random and hostile strings, types and structures in every key.

Two promises, checked over thousands of generated pillars:

- validation is total: a pillar either validates or is refused with messages that each
  name a ``hub_mirror:`` key; never a traceback;
- every sink reads back exactly what it was given: the init script (parsed by the real
  ``sh``), the systemd unit (parsed by systemd's quoting rules), the registry config
  (YAML) and the supervisor's settings (JSON) hold the validated values and nothing else:
  no extra line, key or unquoted shell character.
"""

import copy
import json
import os
import subprocess

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from salt.exceptions import SaltInvocationError

from _hub_mirror import registry_config, validate
from _hub_mirror import settings as settings_lib
from _hub_mirror import supervisor as supervisor_lib
from tests.unit.host import GRAINS

TOKEN = "dckr_pat_FUZZ0123456789abcdefXYZ"
# Bounded for CI; HYPOTHESIS_EXAMPLES raises it for a longer hunt.
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What attacks and accidents look like: shell, unit-file, YAML and path metacharacters,
# line and format controls, Unicode look-alikes, format placeholders.
HOSTILE = [
    "\n", "\r\n", "\x00", "\t", "\x1b[31m", "\u2028", "\u202e", "\ufeff", " ", ";", "&&", "|",
    "$(touch /tmp/hm-pwned)", "`id`", "${HOME}", "$", "'", '"', "\\", "%n", "%%", "#", "*", "?",
    "..", "/", "//", "/etc", "/etc/passwd", "/..", "/var/lib/hub-mirror/../../..", "~root",
    "User=root", "\nExecStartPre=+/bin/sh -c id", "- ", ": ", "{ver}", "{version.__class__}",
    "{arch!r}", "@", "user:pw@", "?private_token=x", "[::1", "::1:5805", "0.0.0.0", "65536",
    "99999", "127.0.0.1:5000", "http://", "https://registry-1.docker.io", "ftp://x", "ｅｔｃ",
    "５０００", "\u0130", "root", "daemon", "nobody", "hub-mirror", "1e309", ".inf", "-5", "0",
]
strings = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=6), max_size=5).map("".join)
scalars = (
    strings
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3), max_leaves=6)

MIRROR_KEYS = [
    "upstream", "listen", "advertise", "debug_listen", "username", "token", "storage", "ttl",
    "log_level", "warm", "max_size", "s3", "redis",
]
# Every key a pillar can set, as a path under hub_mirror (mirror keys under "m1").
PATHS = (
    [("version",), ("install",), ("mirrors",), ("probe_timeout",), ("clean",), ("lookup",), ("nonsense",)]
    + [("install", key) for key in ("method", "source", "source_hash")]
    + [("clean", "purge_storage")]
    + [("lookup", key) for key in (
        "user", "group", "prefix", "config_dir", "state_dir", "log_dir", "run_dir", "unit_dir",
        "init_dir", "package", "package_binary", "package_service", "supervisor",
    )]
    + [("mirrors", "m1", key) for key in MIRROR_KEYS]
    + [("mirrors", "m1", "s3", key) for key in ("bucket", "region", "endpoint", "accesskey", "secretkey", "rootdirectory", "path_style")]
    + [("mirrors", "m1", "redis", key) for key in ("addr", "password", "db")]
    + [("mirrors", "m2"), ("mirrors", "m2", "storage"), ("mirrors", "m2", "listen")]
)


def base_pillar(tmp):
    return {
        "version": "2.8.3",
        "mirrors": {"m1": {"listen": "127.0.0.1:5000", "username": "hubuser", "token": TOKEN}},
        "lookup": {key: f"{tmp}/{key}" for key in ("prefix", "config_dir", "state_dir", "log_dir", "run_dir", "unit_dir", "init_dir")},
    }


def mutate(pillar, mutations):
    for path, value in mutations:
        node = pillar
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = value
    return pillar


# Values a careful operator writes, so that many generated pillars validate and reach
# the sinks: safe-looking text with the characters the allow-lists still let through.
safe = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-+@", min_size=1, max_size=12)
path = st.lists(safe.filter(lambda s: s not in (".", "..")), min_size=1, max_size=4).map(lambda parts: "/srv/" + "/".join(parts))
port = st.integers(min_value=1025, max_value=65535)
PLAUSIBLE = {
    "storage": path,
    "prefix": path, "config_dir": path, "state_dir": path, "log_dir": path, "run_dir": path,
    "unit_dir": path, "init_dir": path, "package_binary": path,
    "listen": st.builds("127.0.0.{}:{}".format, st.integers(1, 254), port) | st.builds("[::1]:{}".format, port) | st.builds("eth0:{}".format, port),
    "debug_listen": st.builds("127.0.0.1:{}".format, port),
    "upstream": st.builds("https://{}.example:{}".format, safe.map(lambda s: s.strip(".-_+@") or "a"), port) | st.just("https://registry-1.docker.io"),
    "advertise": st.builds("http://{}.example:{}".format, safe.map(lambda s: s.strip(".-_+@") or "a"), port),
    "username": safe, "token": safe.map(lambda s: s + "\n"),
    "user": st.from_regex(r"[a-z][a-z0-9-]{0,8}hm", fullmatch=True),
    "group": st.from_regex(r"[a-z][a-z0-9-]{0,8}hm", fullmatch=True),
    "ttl": st.just("168h"), "log_level": st.sampled_from(["error", "warn", "info", "debug"]),
    "max_size": st.sampled_from(["50G", "500M", 1 << 30, ""]),
    "warm": st.lists(st.sampled_from(["alpine", "library/alpine:3.20", "org/app@sha256:" + "a" * 64]), max_size=2),
    "version": st.sampled_from(["2.8.3", "3.0.0", "2.8.2"]),
    "source": st.builds("https://user:{}@files.example/v{{version}}/r_{{arch}}.tgz?private_token={}".format, safe, safe),
    "source_hash": st.builds("https://files.example/{}.sha256?t={}".format, safe, safe) | st.just("a" * 64),
}


@st.composite
def mutation(draw):
    key_path = draw(st.sampled_from(PATHS))
    plausible = PLAUSIBLE.get(key_path[-1])
    if plausible is not None and draw(st.integers(0, 3)):
        return key_path, draw(plausible)
    return key_path, draw(values | strings)


mutations = st.lists(mutation(), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """The directory the lookup paths of the generated pillars are in."""
    return str(tmp_path_factory.mktemp("fuzz"))


def settings_or_refusal(pillar):
    """(the full settings, None) of a valid hub_mirror pillar, else (None, the refusal)."""
    try:
        return validate.load(pillar, GRAINS, redact=False), None
    except SaltInvocationError as exc:
        return None, str(exc)


@FUZZ
@given(mutations=mutations)
def test_every_pillar_validates_or_is_refused_by_key(tmp, mutations):
    pillar = mutate(base_pillar(tmp), copy.deepcopy(mutations))
    conf, refusal = settings_or_refusal(pillar)
    if refusal is not None:
        head, *lines = refusal.split("\n")
        assert head == "Invalid hub_mirror pillar (nothing was changed):"
        assert lines and all(line.startswith("  - hub_mirror") for line in lines), refusal
        assert TOKEN not in refusal
        return
    assert_sinks_read_back(conf)


@pytest.mark.parametrize("key_path", PATHS, ids=[":".join(path) for path in PATHS])
@settings(max_examples=max(EXAMPLES // 8, 10), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_each_key_alone_validates_or_is_refused_by_key(tmp, key_path, data):
    plausible = PLAUSIBLE.get(key_path[-1], st.nothing())
    value = data.draw(values | strings | plausible)
    pillar = mutate(base_pillar(tmp), [(key_path, value)])
    conf, refusal = settings_or_refusal(pillar)
    if refusal is not None:
        assert all(line.startswith("  - hub_mirror") for line in refusal.split("\n")[1:]), refusal
        assert TOKEN not in refusal
    else:
        assert_sinks_read_back(conf)


@FUZZ
@given(pillar=values)
def test_any_structure_at_all_is_refused_or_validates(pillar):
    _, refusal = settings_or_refusal(pillar)
    assert refusal is None or refusal.startswith("Invalid hub_mirror pillar")


def assert_sinks_read_back(conf):
    for name, spec in conf["mirrors"].items():
        for supervisor in ("systemd", "sysv"):
            conf["lookup"]["supervisor"] = supervisor
            paths = settings_lib.mirror_paths(conf, name)
            texts = registry_config.render_config_files(conf, spec)
            rendered = registry_config.render_config(spec, registry_config.config_dialect(conf), paths["credential_helper"])
            assert texts["config"].startswith(registry_config.config_header(name))
            assert yaml.safe_load(texts["config"]) == rendered
            assert rendered["proxy"]["remoteurl"] == spec["upstream"]
            assert rendered["storage"].get("filesystem", {}).get("rootdirectory", spec["storage"]) == spec["storage"]
            assert json.loads(texts["supervise_settings"]) == supervisor_lib.supervise_settings(conf, spec)
            files = supervisor_lib.render_service_files(conf, spec)
            command = [supervisor_lib.service_python(), paths["supervise"], paths["supervise_settings"]]
            if supervisor == "systemd":
                assert_unit_reads_back(files[paths["unit"]][0], command, spec["storage"], conf["lookup"])
            else:
                assert_init_script_reads_back(files[paths["init"]][0], command, paths, conf["lookup"])


# --- the sinks, fed any text at all (what validation would refuse included) -----------

paths_text = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs")), min_size=1, max_size=30).map(lambda s: "/" + s)


@FUZZ
@given(prefix=paths_text, config_dir=paths_text, run_dir=paths_text, log_dir=paths_text, storage=paths_text)
def test_unit_and_init_script_quote_any_path(prefix, config_dir, run_dir, log_dir, storage):
    conf = settings_lib.merge(settings_lib.DEFAULTS, {})
    conf["lookup"].update(prefix=prefix, config_dir=config_dir, run_dir=run_dir, log_dir=log_dir)
    spec = validate.complete_mirror("m1", {"listen": "127.0.0.1:5000"}, conf["lookup"], GRAINS)
    spec["storage"] = storage
    paths = settings_lib.mirror_paths(conf, "m1")
    command = [supervisor_lib.service_python(), paths["supervise"], paths["supervise_settings"]]
    for supervisor in ("systemd", "sysv"):
        conf["lookup"]["supervisor"] = supervisor
        files = supervisor_lib.render_service_files(conf, spec)
        if supervisor == "systemd":
            assert_unit_reads_back(files[paths["unit"]][0], command, storage, conf["lookup"])
        else:
            assert_init_script_reads_back(files[paths["init"]][0], command, paths, conf["lookup"])


# --- readers: systemd's and sh's own rules ---------------------------------------------

UNIT_KEYS = {
    "Description", "Documentation", "After", "Wants", "StartLimitIntervalSec", "Type", "User",
    "Group", "ExecStart", "Restart", "RestartSec", "UMask", "NoNewPrivileges", "ProtectSystem",
    "ReadWritePaths", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateIPC",
    "ProtectHostname", "ProtectClock", "ProtectKernelTunables", "ProtectKernelModules",
    "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
    "RestrictAddressFamilies", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
    "RemoveIPC", "LockPersonality", "MemoryDenyWriteExecute", "CapabilityBoundingSet",
    "AmbientCapabilities", "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber",
    "DevicePolicy", "WantedBy",
}


def systemd_words(value, exec_line=False):
    """A unit setting's words as systemd reads them: double quotes with C escapes,
    ``%%`` for ``%``, and on Exec lines ``$$`` for ``$`` (systemd.syntax(7), systemd.service(5))."""
    words, word, quoted, index = [], None, False, 0
    while index < len(value):
        char = value[index]
        if char == "\\" and quoted:
            index += 1
            word += value[index]
        elif char == '"':
            quoted = not quoted
            word = word if word is not None else ""
        elif char == " " and not quoted:
            if word is not None:
                words.append(word)
            word = None
        elif char == "%":
            assert value[index + 1] == "%", f"an unescaped specifier in {value!r}"
            index += 1
            word = (word or "") + "%"
        elif char == "$" and exec_line:
            assert value[index + 1] == "$", f"an unescaped variable in {value!r}"
            index += 1
            word = (word or "") + "$"
        else:
            word = (word or "") + char
        index += 1
    assert not quoted, value
    if word is not None:
        words.append(word)
    return words


def assert_unit_reads_back(unit, command, storage, lookup):
    settings_seen = {}
    for line in unit.splitlines():
        if not line or line.startswith("#") or line.startswith("["):
            continue
        key, sep, value = line.partition("=")
        assert sep and key in UNIT_KEYS, f"an unexpected line in the unit: {line!r}"
        settings_seen.setdefault(key, []).append(value)
    assert systemd_words(settings_seen["ExecStart"][0], exec_line=True) == command
    assert systemd_words(settings_seen["ReadWritePaths"][0]) == [storage]
    assert settings_seen["User"] == [lookup["user"]] and settings_seen["Group"] == [lookup["group"]]
    assert len(settings_seen["ExecStart"]) == 1


# Every command start() runs is a function that records its words: NUL after each word,
# \001 after each call (neither can be in a validated value, or in the fuzzed paths).
STUBS = """
calls=$1; shift
record() { for word; do printf '%s\\000' "$word"; done >> "$calls"; printf '\\001' >> "$calls"; }
rm() { record rm "$@"; }
mkdir() { record mkdir "$@"; }
touch() { record touch "$@"; }
chown() { record chown "$@"; }
chmod() { record chmod "$@"; }
env() { record env "$@"; }
"""


def assert_init_script_reads_back(script, command, paths, lookup):
    """Run the script's start() in the real sh, with every command it calls recorded."""
    functions = script.split('case "$1" in')[0]
    calls = f"/tmp/hm-fuzz-calls-{os.getpid()}"
    try:
        open(calls, "w").close()
        proc = subprocess.run(
            ["sh", "-c", STUBS + functions + '\nstart\nrecord PIDFILE "$PIDFILE"\n', "sh", calls],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        with open(calls, "rb") as handle:
            recorded = [
                [word.decode() for word in call.split(b"\0")[:-1]]
                for call in handle.read().split(b"\1")[:-1]
            ]
    finally:
        os.unlink(calls)
    owner = f"{lookup['user']}:{lookup['group']}"
    log = paths["log"]
    assert recorded == [
        ["rm", "-f", paths["pidfile"]],
        ["mkdir", "-p", lookup["run_dir"], lookup["log_dir"]],
        ["touch", log],
        ["chown", owner, lookup["log_dir"], log],
        ["chmod", "0750", lookup["log_dir"]],
        ["chmod", "0640", log],
        ["env", "-i", f"PATH={'/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'}", "LANG=C.UTF-8",
         "start-stop-daemon", "--start", "--quiet", "--background", "--make-pidfile", "--pidfile", paths["pidfile"],
         "--chuid", owner, "--umask", "027", "--startas", command[0], "--", command[1], command[2]],
        ["PIDFILE", paths["pidfile"]],
    ], recorded
