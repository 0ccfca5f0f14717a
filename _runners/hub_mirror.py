"""
Fleet view of hub_mirror pull-through caches: one ``salt-run`` call asks every targeted
minion for ``hub_mirror.status`` (with its cached images) and adds the answers up.

.. code-block:: bash

    salt-run saltutil.sync_runners
    salt-run hub_mirror.fleet
    salt-run hub_mirror.fleet tgt='build*'

Without the runner, the same data comes from ``salt '*' hub_mirror.status images=True``.
"""

import logging

import salt.client
import salt.utils.minions

log = logging.getLogger(__name__)

__virtualname__ = "hub_mirror"


def __virtual__():
    return __virtualname__


def _human(num):
    value = float(num)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return None


def _ratio(counters, kind):
    return ((counters or {}).get(kind) or {}).get("hit_ratio")


def _aggregate(returns):
    """
    Add up ``{minion: hub_mirror.status(images=True) return}``:

    - ``images``: ``{"repo:tag": ["minion/mirror", ...]}``, where each image is cached;
    - ``mirrors``: per ``minion/mirror``: running, mode, health, repositories, bytes
      used, and the hit ratio for blobs and manifests;
    - ``total``: bytes used by every mirror's storage;
    - ``down``: mirrors that do not serve, or whose storage check fails, with why;
    - ``no_answer``: minions that gave no usable answer (with what they said).
    """
    images, mirrors, down, no_answer = {}, {}, {}, {}
    total = 0
    for minion in sorted(returns):
        answer = returns[minion]
        if not isinstance(answer, dict) or not all(isinstance(v, dict) for v in answer.values()):
            no_answer[minion] = answer if isinstance(answer, str) else "no hub_mirror.status answer"
            continue
        for name, state in sorted(answer.items()):
            where = f"{minion}/{name}"
            used = ((state.get("disk") or {}).get("used") or {}).get("bytes") or 0
            total += used
            mirrors[where] = {
                "running": state.get("running"),
                "serving": state.get("serving"),
                "mode": state.get("mode"),
                "health": state.get("health"),
                "repositories": state.get("repositories"),
                "used": {"bytes": used, "human": _human(used)},
                "over_cap": state.get("over_cap"),
                "hit_ratio": {
                    "blobs": _ratio(state.get("proxy"), "blobs"),
                    "manifests": _ratio(state.get("proxy"), "manifests"),
                },
            }
            if not state.get("serving"):
                down[where] = state.get("comment") or "not serving"
            elif state.get("health") not in (None, "ok"):
                down[where] = state.get("health")
            for repo, tags in (state.get("images") or {}).items():
                for tag in tags or {}:
                    images.setdefault(f"{repo}:{tag}", []).append(where)
    return {
        "images": {image: sorted(where) for image, where in sorted(images.items())},
        "mirrors": mirrors,
        "total": {"bytes": total, "human": _human(total)},
        "down": down,
        "no_answer": no_answer,
    }


def fleet(tgt="*", tgt_type="glob", timeout=60):
    """
    Ask every targeted minion for its mirrors' status and cached images, and aggregate:
    which images are cached where, total bytes, hit ratio per mirror, and the mirrors
    that are down or unhealthy. Minions without hub_mirror or that do not answer within
    ``timeout`` are listed under ``no_answer``.

    CLI Example:

    .. code-block:: bash

        salt-run hub_mirror.fleet
        salt-run hub_mirror.fleet tgt='G@role:build' tgt_type=compound
    """
    client = salt.client.get_local_client(__opts__["conf_file"])
    returns = client.cmd(
        tgt,
        "hub_mirror.status",
        kwarg={"images": True},
        tgt_type=tgt_type,
        timeout=timeout,
    )
    expected = salt.utils.minions.CkMinions(__opts__).check_minions(tgt, tgt_type)["minions"]
    for minion in expected:
        returns.setdefault(minion, f"did not answer within {timeout}s")
    return _aggregate(returns)
