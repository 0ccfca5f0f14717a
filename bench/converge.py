"""Benchmark 1: how fast ``state.apply hub_mirror`` converges (masterless).

Per run, a fresh minion (its own root, lookup paths and mirror name) applies
``hub_mirror``: the first apply installs the release from a loopback release server,
configures and starts the mirror; the re-apply must change nothing. The floor Salt
itself imposes is the apply of an SLS with as many states that succeed without changes
(``test.succeed_without_changes``), from a private file_root, by the same minion,
right after the re-apply. All are wall times of the ``salt-call`` process, start-up
included, as a user sees them.
"""

from bench.common import (
    HUB_TOKEN,
    HUB_USER,
    bench_minion,
    log,
    mirror_addresses,
    noop_sls,
    ratio,
    rmtree,
    summary,
    timed,
)
from tests.support.hub import FakeDockerHub
from tests.support.release import archive_pillar, serve_releases
from tests.support.saltcall import unique_name

APPLY_TIMEOUT = 300


def _check(result, what):
    if result.returncode != 0 or not result.states:
        raise RuntimeError(f"{what} failed: {result!r}")
    failed = [sid for sid, ret in result.states.items() if ret["result"] is not True]
    if failed:
        raise RuntimeError(f"{what}: states failed: {failed}: {result!r}")


def run(ctx):
    work = ctx.dir("work")
    sls_root = ctx.dir("sls")
    first, again, floor, changes, states = [], [], [], [], []
    with serve_releases(ctx.dir("releases")) as server, FakeDockerHub(
        work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None
    ) as hub:
        for run_index in range(ctx.runs):
            root = ctx.dir(f"minion{run_index}")
            minion = bench_minion(root, extra_roots=[sls_root])
            name = unique_name("b")
            try:
                minion.sync()
                addresses = mirror_addresses()
                mirror = hub.mirror_pillar(addresses["listen"], debug_listen=addresses["debug_listen"])
                minion.set_pillar(archive_pillar(server, {name: mirror}))
                seconds, result = timed(minion.apply, timeout=APPLY_TIMEOUT)
                _check(result, "first apply")
                first.append(seconds)

                seconds, result = timed(minion.apply, timeout=APPLY_TIMEOUT)
                _check(result, "re-apply")
                again.append(seconds)
                changes.append({sid: sorted(change) for sid, change in result.changes.items()})
                states.append(len(result.states))

                sls = noop_sls(sls_root, len(result.states))
                seconds, result = timed(minion.apply, sls, timeout=APPLY_TIMEOUT)
                _check(result, "no-op SLS apply")
                if len(result.states) != states[-1]:
                    raise RuntimeError(f"no-op SLS ran {len(result.states)} states, not {states[-1]}")
                floor.append(seconds)
                log(f"converge: run {run_index + 1}: first {first[-1]:.2f}s, re-apply {again[-1]:.2f}s, no-op {floor[-1]:.2f}s")
            finally:
                minion.teardown()
                rmtree(root)
    return {
        "states": states,
        "first_apply_s": summary(first),
        "reapply_s": summary(again),
        "noop_sls_s": summary(floor),
        "reapply_vs_noop": ratio(again, floor),
        "first_vs_reapply": ratio(first, again),
        "changes_on_reapply": [len(c) for c in changes],
        "changed_states_on_reapply": [c for c in changes if c],
    }
