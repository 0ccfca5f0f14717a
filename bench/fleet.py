"""Benchmark 5: ``salt -L <N minions> state.apply hub_mirror`` through one master.

One salt-master and up to 10 salt-minion daemons (pytest-salt-factories, driven from
this script through its ``FactoriesManager``, the way tests/support/saltmaster.py
configures them), each minion with its own mirror name, port and lookup paths from its
own pillar. Per run and fleet size N (1 first, so the service user exists before
minions race to create it), timed as the ``salt`` CLI's wall time:

- the first apply to N minions (install from the loopback release server, configure,
  start, probe), every state must succeed;
- the re-apply (must change nothing);
- then ``hub_mirror.clean`` (not timed) so the next run's first apply starts afresh.

The figure is the wall time for N over the wall time for 1. On a real fleet each minion
has its own host; here every minion and every mirror share this machine's cores, so the
ratio is an upper bound set mostly by local CPU, not by the master.
"""

import contextlib
import logging
import os

from bench.common import HUB_TOKEN, HUB_USER, log, mirror_addresses, ratio, summary, timed
from tests.support.hub import FakeDockerHub
from tests.support.netutil import free_port
from tests.support.release import archive_pillar, serve_releases
from tests.support.results import changes_of, states_of
from tests.support.saltcall import unique_name
from tests.support.saltmaster import SaltCluster, strip_root_log_handlers

SIZES = (1, 5, 10)
QUICK_SIZES = (1, 2)
SALT_TIMEOUT = 600


@contextlib.contextmanager
def factories(root):
    """A ``FactoriesManager`` outside pytest: its log server and event listener on
    loopback, started and stopped here."""
    # pylint: disable=import-outside-toplevel
    from saltfactories.manager import FactoriesManager
    from saltfactories.plugins.event_listener import EventListener
    from saltfactories.plugins.log_server import LogServer

    log_server = LogServer(log_host="127.0.0.1", log_port=free_port(), log_level=logging.getLevelName(logging.WARNING))
    log_server.start()
    listener = EventListener()
    listener.host = "127.0.0.1"
    listener.address = f"tcp://127.0.0.1:{listener.port}"
    listener.start()
    try:
        yield FactoriesManager(
            root_dir=root,
            log_server_host="127.0.0.1",
            log_server_port=log_server.log_port,
            log_server_level=log_server.log_level,
            event_listener=listener,
            start_timeout=180,
        )
    finally:
        listener.stop()
        log_server.stop()
        strip_root_log_handlers()


def _salt(cluster, minions, *args):
    """``salt -L id,id,... <args>``; {minion id: its return}."""
    result = cluster.salt_cli.run("-L", *args, minion_tgt=",".join(m.id for m in minions), _timeout=SALT_TIMEOUT)
    data = result.data if isinstance(result.data, dict) else {}
    if len(minions) == 1 and minions[0].id not in data:
        # The factory unwraps the return of a target naming exactly one minion.
        data = {minions[0].id: data}
    missing = [m.id for m in minions if m.id not in data]
    if missing:
        raise RuntimeError(f"salt {' '.join(args)}: no return from {missing}: {result.stdout[-2000:]} {result.stderr[-2000:]}")
    return data


def _check_apply(returns, what, unchanged=False):
    for minion_id, data in returns.items():
        states = states_of(data)
        if not states:
            raise RuntimeError(f"{what} on {minion_id} did not render: {data}")
        failed = [sid for sid, ret in states.items() if ret["result"] is not True]
        if failed:
            raise RuntimeError(f"{what} on {minion_id}: failed states {failed}: {data}")
        if unchanged and changes_of(data):
            raise RuntimeError(f"{what} on {minion_id} changed {sorted(changes_of(data))}")


def run(ctx):
    work = ctx.dir("work")
    sizes = QUICK_SIZES if ctx.quick else SIZES
    first = {n: [] for n in sizes}
    again = {n: [] for n in sizes}
    with serve_releases(ctx.dir("releases")) as server, FakeDockerHub(
        work / "hub", username=HUB_USER, token=HUB_TOKEN, ratelimit=None
    ) as hub, factories(ctx.dir("sf")) as manager, contextlib.ExitStack() as daemons:
        cluster_root = ctx.dir("cluster")
        cluster = SaltCluster(manager, cluster_root)
        minions = []
        for _ in range(max(sizes)):
            addresses = mirror_addresses()
            mirror = hub.mirror_pillar(addresses["listen"], debug_listen=addresses["debug_listen"])
            minions.append(cluster.add_minion(archive_pillar(server, {unique_name("f"): mirror})))
        for pillar_file in cluster.pillar_dir.glob("*.sls"):
            # They hold the (stand-in's) token: readable by the master, which runs as root.
            os.chmod(pillar_file, 0o600)
        seconds, _ = timed(daemons.enter_context, cluster.master.started())
        log(f"fleet: master up in {seconds:.1f}s")
        for minion in minions:
            seconds, _ = timed(daemons.enter_context, minion.daemon.started())
            log(f"fleet: minion {minion.id} up in {seconds:.1f}s")
        dirty = False
        try:
            _salt(cluster, minions, "saltutil.sync_all")
            for run_index in range(ctx.runs):
                for size in sizes:
                    targets = minions[:size]
                    dirty = True
                    seconds, returns = timed(_salt, cluster, targets, "state.apply", "hub_mirror")
                    _check_apply(returns, "first apply")
                    first[size].append(seconds)
                    seconds, returns = timed(_salt, cluster, targets, "state.apply", "hub_mirror")
                    _check_apply(returns, "re-apply", unchanged=True)
                    again[size].append(seconds)
                    _check_apply(_salt(cluster, targets, "state.apply", "hub_mirror.clean"), "clean")
                    dirty = False
                    log(f"fleet: run {run_index + 1} N={size}: first {first[size][-1]:.1f}s, re-apply {again[size][-1]:.1f}s")
        finally:
            if dirty:
                with contextlib.suppress(Exception):
                    _salt(cluster, minions, "state.apply", "hub_mirror.clean")
    base = sizes[0]
    # String keys: what JSON makes of them anyway.
    return {
        "sizes": list(sizes),
        "first_apply_s": {str(n): summary(v) for n, v in first.items()},
        "reapply_s": {str(n): summary(v) for n, v in again.items()},
        "first_apply_n_vs_1": {str(n): ratio(first[n], first[base]) for n in sizes[1:]},
        "reapply_n_vs_1": {str(n): ratio(again[n], again[base]) for n in sizes[1:]},
        "note": "all minions and mirrors share this machine's cores; on a fleet each has its own host",
    }
