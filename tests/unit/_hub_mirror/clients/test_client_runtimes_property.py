"""Property-based: whatever mirror URLs pass validation and whatever the user's files
hold, configure then clean gives every file back (bytes, mode, owner, symlinks), a user's
edit made in between survives the clean, and every rendered file parses with the parser
of the runtime that reads it (json, TOML, YAML)."""

import json
import os
import stat
import tempfile

import pytest
import tomllib
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from _hub_mirror.clients import files as client_files
from _hub_mirror.clients import render
from _hub_mirror.clients import validate as client_validate
from tests.unit.host import clean, configure, make_client, snapshot

pytestmark = pytest.mark.usefixtures("offline_runtimes")

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
dns_hosts = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a.compressed}]")
hosts = st.one_of(dns_hosts, ipv4, ipv6)
mirror_urls = st.builds(
    lambda scheme, host, port, slash: f"{scheme}://{host}{':' + str(port) if port else ''}{'/' if slash else ''}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.one_of(st.none(), st.integers(1, 65535)),
    st.booleans(),
)
# What a pillar, the mine or a mirror's advertise could hand over: valid URLs with
# hostile characters spliced in.
hostile_urls = st.builds(
    lambda url, junk, at: url[:at % (len(url) + 1)] + junk + url[at % (len(url) + 1):],
    mirror_urls,
    st.text(min_size=1, max_size=3),
    st.integers(0, 200),
)

comment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\u2028\u2029\x85"), max_size=20
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
daemon_jsons = st.one_of(
    st.none(),
    st.builds(
        lambda members, own, indent: json.dumps(
            {**members, **({"registry-mirrors": own} if own is not None else {})}, indent=indent
        )
        + ("\n" if indent else ""),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "registry-mirrors"), json_values, max_size=4),
        st.one_of(st.none(), st.lists(st.sampled_from(["https://own.example", "http://10.9.9.9:5000"]), max_size=2, unique=True)),
        st.sampled_from([None, 2, 4, "\t"]),
    ),
)
toml_users = st.one_of(
    st.none(),
    st.just(""),
    st.builds(lambda c: f"# {c}\n", comment_text),
    st.builds(lambda c: f"debug = true\n# {c}\n\n[worker.oci]\n  gc = true\n", comment_text),
    st.builds(lambda c: f"debug = false # {c}", comment_text),
)
hosts_tomls = st.one_of(
    st.none(),
    st.builds(
        lambda c: f'# {c}\nserver = "https://registry-1.docker.io"\n\n[host."https://own.example"]\n  capabilities = ["pull"]\n',
        comment_text,
    ),
)
yaml_users = st.one_of(
    st.none(),
    st.builds(
        lambda own, configs: yaml.safe_dump(
            {**({"mirrors": {"docker.io": {"endpoint": own}}} if own else {}), **configs}, sort_keys=False
        ),
        st.lists(st.sampled_from(["https://own.example", "http://10.9.9.9:5000"]), max_size=2, unique=True),
        st.dictionaries(st.sampled_from(["configs", "auths"]), st.dictionaries(labels, labels, max_size=2), max_size=1),
    ),
)


def write(path, text, mode):
    if text is None:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    os.chmod(path, mode)


def rendered_files_parse(client, alive):
    paths = client["paths"]
    daemon = json.loads(open(paths["docker_daemon_json"], encoding="utf-8").read())
    if "docker.io" in alive:
        assert daemon["registry-mirrors"][: len(alive["docker.io"])] == alive["docker.io"]
    for upstream, urls in alive.items():
        # containerd and containers/image get no IPv6 mirror (neither uses one).
        urls = [u for u in urls if "[" not in u]
        hosts_toml = f"{paths['containerd_certs_d']}/{upstream}/hosts.toml"
        if os.path.exists(hosts_toml):
            assert [h for h in tomllib.loads(open(hosts_toml).read()).get("host", {}) if h in urls] == urls
    dropin = f"{paths['registries_conf_d']}/50-hub-mirror.conf"
    if os.path.exists(dropin):
        for registry in tomllib.loads(open(dropin).read())["registry"]:
            locations = [m["location"] for m in registry["mirror"]]
            assert locations == [u.split("//")[1] for u in alive[registry["prefix"]] if "[" not in u]
    buildkit = tomllib.loads(open(paths["buildkitd_toml"]).read())
    for upstream, urls in alive.items():
        assert buildkit["registry"][upstream]["mirrors"] == [u.split("//")[1] for u in urls]
    k3s = yaml.safe_load(open(paths["k3s_registries"]).read())
    for upstream, urls in alive.items():
        assert k3s["mirrors"][upstream]["endpoint"][: len(urls)] == urls


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=st.one_of(mirror_urls, hostile_urls))
def test_a_url_that_passes_validation_round_trips_through_every_runtimes_parser(url):
    problem = client_validate.mirror_url_problem(url)
    if problem is not None:
        # Refused by name, never with a traceback, never echoing a control character raw.
        assert isinstance(problem, str) and "\n" not in problem
        return
    url = url.rstrip("/")
    assert not any(ord(c) < 0x20 or c in '"\\' for c in url)
    mirrors = {"docker.io": [url]}
    assert json.loads(render.render_daemon_json(None, mirrors))["registry-mirrors"] == [url]
    assert list(tomllib.loads(render.render_hosts_toml(None, mirrors))["host"]) == [url]
    buildkit = tomllib.loads(render.render_buildkitd_toml(None, mirrors))
    assert buildkit["registry"]["docker.io"]["mirrors"] == [render._mirror_host(url)]
    conf = tomllib.loads(render.render_registries_conf(None, mirrors))
    assert conf["registry"][0]["mirror"][0]["location"] == render._mirror_host(url)
    assert yaml.safe_load(render.render_registries_yaml(None, mirrors))["mirrors"]["docker.io"]["endpoint"] == [url]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    urls=st.lists(mirror_urls, min_size=1, max_size=3, unique_by=lambda u: u.rstrip("/")),
    ghcr=st.booleans(),
    daemon_json=daemon_jsons,
    daemon_link=st.sampled_from([None, "target", "dangling"]),
    buildkitd=toml_users,
    hosts_toml=hosts_tomls,
    registries_yaml=yaml_users,
    mode=st.sampled_from([0o600, 0o640, 0o644]),
    edit=st.booleans(),
)
def test_configure_then_clean_gives_every_file_back_and_keeps_user_edits(
    urls, ghcr, daemon_json, daemon_link, buildkitd, hosts_toml, registries_yaml, mode, edit
):
    assume(all(client_validate.mirror_url_problem(url) is None for url in urls))
    mirrors = {"docker.io": urls}
    if ghcr:
        mirrors["ghcr.io"] = urls[:1]
    with tempfile.TemporaryDirectory() as root:
        client = make_client(root, mirrors)
        paths = client["paths"]
        os.makedirs(f"{root}/k3s")
        daemon_path = paths["docker_daemon_json"]
        if daemon_link:
            # daemon.json is a symlink into another directory; "dangling": to nothing yet.
            os.makedirs(f"{root}/docker")
            os.makedirs(f"{root}/real")
            os.symlink(f"{root}/real/daemon.json", daemon_path)
            if daemon_link == "target":
                write(f"{root}/real/daemon.json", daemon_json or "{}", mode)
        else:
            write(daemon_path, daemon_json, mode)
        write(paths["buildkitd_toml"], buildkitd if buildkitd is not None else "", mode)
        write(f"{paths['containerd_certs_d']}/docker.io/hosts.toml", hosts_toml, mode)
        write(paths["k3s_registries"], registries_yaml, mode)
        write(paths["registries_conf"], "# v2\n", 0o644)
        files = [
            daemon_path,
            paths["buildkitd_toml"],
            f"{paths['containerd_certs_d']}/docker.io/hosts.toml",
            f"{paths['containerd_certs_d']}/ghcr.io/hosts.toml",
            f"{paths['registries_conf_d']}/50-hub-mirror.conf",
            paths["k3s_registries"],
        ]
        before = {path: snapshot(path) for path in files}
        alive = {upstream: [u.rstrip("/") for u in us] for upstream, us in mirrors.items()}
        client["mirrors"] = alive

        old_umask = os.umask(0o077)
        try:
            changes, lines = configure(client, alive)
        finally:
            os.umask(old_umask)
        assert not any("left as it was" in line or "failed" in line for line in lines), lines
        rendered_files_parse(client, alive)
        for path in files:
            if before[path][0] is None and os.path.exists(path):
                # Created by hub_mirror: 0644 in 0755 directories, whatever the umask.
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
                assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
            elif before[path][0] is not None:
                assert snapshot(path)[1:] == before[path][1:]
        # A second run changes nothing.
        again, _ = configure(client, alive)
        assert again == {}

        edits = {}
        if edit:
            # The user edits every file after the configure.
            text = open(daemon_path).read()
            edits[daemon_path] = render.json_set_member(text, "hm-user-edit", "true")
            edits[paths["buildkitd_toml"]] = "# user edit\n" + open(paths["buildkitd_toml"]).read()
            dropin = f"{paths['registries_conf_d']}/50-hub-mirror.conf"
            if os.path.exists(dropin):
                edits[dropin] = open(dropin).read() + '\n[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'
            for path, text in edits.items():
                with open(path, "w") as handle:
                    handle.write(text)
            # ... and configure runs again before the clean.
            configure(client, alive)

        clean(client)
        for path in files:
            after = snapshot(path)
            if path not in edits:
                assert after == before[path], path
                continue
            text = after[0].decode()
            if path == daemon_path:
                assert json.loads(text)["hm-user-edit"] is True
                assert not set(json.loads(text).get("registry-mirrors", [])) & set(urls)
                original = json.loads(before[path][0] or b"{}")
                assert {k: v for k, v in json.loads(text).items() if k != "hm-user-edit"} == original
            elif path == paths["buildkitd_toml"]:
                assert text == "# user edit\n" + (before[path][0] or b"").decode()
            else:
                assert tomllib.loads(text)["registry"] == [{"prefix": "quay.io", "location": "quay.io"}]
        assert not os.path.exists(f"{paths['containerd_certs_d']}/ghcr.io")
        assert client_files.ClientRecord(client["record_dir"]).files == {}
