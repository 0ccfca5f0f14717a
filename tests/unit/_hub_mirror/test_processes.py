"""Which processes serve a mirror (issue 10: not one that only looks like ours)."""

from _hub_mirror import processes, settings
from tests.unit.host import pillar_mirror, settings_of


def test_a_process_that_only_looks_like_ours_is_not_ours(monkeypatch):
    # Any local user can run `sleep` with argv "... serve /etc/hub-mirror/dockerhub.yml" and
    # hold the listen port: it passed as the mirror's own listener (a squatter serving its
    # own images behind a green apply) and root killed it as a leftover.
    conf = settings_of({"mirrors": {"dockerhub": pillar_mirror()}}, redact=True)
    paths = settings.mirror_paths(conf, "dockerhub")
    fake = [
        (4001, ["/usr/bin/python3", "-c", "pass", "serve", paths["config"]]),
        (4002, ["/opt/hub-mirror/bin/registry", "serve", paths["config"]]),
    ]
    monkeypatch.setattr(processes, "_processes", lambda: iter(fake))
    monkeypatch.setattr(processes, "_process_uid", lambda pid: {4001: 1000, 4002: 998}[pid])
    monkeypatch.setattr(processes, "_service_uid", lambda user: 998)
    assert processes.mirror_processes(paths) == [4002]
