"""docs/benchmarks.md from the JSON document ``bench.run`` prints: ``bench.run
--write-docs``, or ``python -m bench.report FILE`` for a document kept with ``--json-out``."""

import json
import sys

from tests.support.saltcall import REPO

DOC = REPO / "docs" / "benchmarks.md"

HEADER = """\
# Benchmarks

`bench/` measures hub_mirror against the limits that matter: how fast `state.apply`
converges compared with the floor Salt itself imposes, how a pull through the mirror
compares with a pull from Docker Hub over a WAN, how fast the mirror serves what it has
compared with nginx, how `hub_mirror.catalog` scales, how a fleet applies through one
master, what a dead mirror costs a client, and what many clients pulling one cold image
at once cost the upstream.

Every figure is a **ratio against a baseline measured in the same run on the same
machine**, the runs interleaved (baseline, subject, baseline, subject, ...) so that load
from anything else hits both alike. A ratio is the median of the per-run ratios, with the
range over the runs; absolute times are there to read the ratios by, not to compare
machines. No figure is asserted anywhere: the benchmarks check correctness only (every
pull's digest, every download's size, every apply's result, every catalog's count).

## Running them

From the repository root, as root (they create network namespaces and run nginx,
containerd, registries and salt daemons, all private and cleaned up, also on failure):

```sh
sudo /var/cache/hub-mirror-ci/venv/bin/python -m bench.run                  # all, JSON on stdout
sudo /var/cache/hub-mirror-ci/venv/bin/python -m bench.run --only wan,serve --runs 5
sudo /var/cache/hub-mirror-ci/venv/bin/python -m bench.run --write-docs     # also rewrite this page
```

`--runs N` (default 3) sets the runs per figure, `--runs-for NAME=N` one benchmark's;
`--quick` shrinks sizes and fleets to check the code in about four minutes (two of
them are the black-holed pulls' timeouts; its figures mean nothing); `--json-out FILE` keeps the JSON. Benchmarks: `converge`, `wan`, `serve`,
`catalog`, `fleet`, `fallback`, `fanin`. Progress goes to stderr. A benchmark that fails reports
its error in the JSON and the others still run.

Needs what `.ci/run` installs (the CI venv has matplotlib, for the plots) plus Debian's `nginx` (started with a private config on
loopback, never the system service), `containerd`, `skopeo`, `podman`, `runc`, `iproute2`
and `curl`; `fallback` also runs containerd 2.x, buildkit and crictl, which it builds with
`.ci/build-go-tools` when they are not built yet.
"""


def _r(ratio):
    """``1.23 (1.10-1.40)`` from a ratio summary."""
    if not ratio or "median" not in ratio:
        return "n/a"
    if ratio["n"] == 1:
        return f"{ratio['median']:.2f} (1 run)"
    return f"{ratio['median']:.2f} ({ratio['min']:.2f}–{ratio['max']:.2f})"


def _s(summary, unit="s", digits=2):
    if not summary or "median" not in summary:
        return "n/a"
    return f"{summary['median']:.{digits}f} {unit}"


def _counts(per_pull):
    """``mGET 1 · mHEAD 0 · bGET 2 · token 1`` (medians over the runs)."""
    labels = (("manifest_get", "manifest GET"), ("manifest_head", "manifest HEAD"), ("blob_get", "blob GET"), ("token", "token"))
    parts = []
    for key, label in labels:
        values = sorted(per_pull.get(key, []))
        if values:
            parts.append(f"{label} {values[len(values) // 2]}")
    return ", ".join(parts)


def _converge(result):
    states = result["states"][0] if result.get("states") else "?"
    changes = result["changes_on_reapply"]
    return [
        ("1 converge", f"re-apply of `hub_mirror` / apply of {states} no-op states", _r(result["reapply_vs_noop"]), _s(result["noop_sls_s"]), _s(result["reapply_s"])),
        ("1 converge", "first apply (archive install) / re-apply", _r(result["first_vs_reapply"]), _s(result["reapply_s"]), _s(result["first_apply_s"])),
        ("1 converge", "changes on re-apply (must be 0)", ", ".join(map(str, changes)), "", ""),
    ]


def _wan(result):
    rows = []
    for profile, data in result["profiles"].items():
        for image, version, figures in ((i, v, f) for i, per in data["images"].items() for v, f in per.items()):
            label = f"2 wan {profile}"
            image = f"{image} on {version}"
            rows.append((label, f"{image}: cold through mirror / direct", _r(figures["cold_vs_direct"]), _s(figures["direct_s"]), _s(figures["cold_s"])))
            rows.append((label, f"{image}: warm through mirror / direct", _r(figures["warm_vs_direct"]), _s(figures["direct_s"]), _s(figures["warm_s"])))
            requests = figures["upstream_requests_per_pull"]
            rows.append(
                (
                    label,
                    f"{image}: upstream requests per pull",
                    f"direct: {_counts(requests['direct'])}<br>cold: {_counts(requests['cold'])}<br>warm: {_counts(requests['warm'])}",
                    "",
                    f"warm GETs: {figures['warm_upstream_gets']}; cache committed "
                    f"≤ {figures['cache_commit_after_cold_pull_s']['max']:.2f} s after the cold pull",
                )
            )
    return rows


def _server_label(name):
    """``hub_mirror_3.0.0`` is the front as hub_mirror runs it; ``mirror_3.0.0`` the registry alone."""
    if name.startswith("hub_mirror_"):
        return f"hub_mirror {name[len('hub_mirror_'):]} (front)"
    if name.startswith("mirror_"):
        return f"registry {name[len('mirror_'):]} alone"
    return "plain registry, same storage" if name == "plain_registry" else name


def _serve(result):
    rows = []
    for clients, figures in result["figures"].items():
        label = f"3 serve {clients.replace('_', ' ')}"
        cpu = figures["server_cpu_s_per_gb"]
        subjects = [name for name in cpu if name != "nginx"]
        for name in subjects:
            what = _server_label(name)
            rows.append((label, f"{what} / nginx (MB/s)", _r(figures[f"{name}_vs_nginx"]), _s(figures["nginx_mb_s"], "MB/s", 0), _s(figures[f"{name}_mb_s"], "MB/s", 0)))
        names = ["nginx", *subjects]
        rows.append((label, f"server CPU s per GB: {' / '.join(_server_label(name) for name in names)}", "", "", " / ".join(_s(cpu[k], "", 2).strip() for k in names)))
    return rows


CATALOG_LABELS = {
    "registry_api": "the registry's paged `/v2/_catalog`",
    "python_api": "`catalog()` in Python, source=api",
    "python_disk": "`catalog()` in Python, source=disk",
    "salt_call_api": "`salt-call hub_mirror.catalog`",
    "salt_call_disk": "`salt-call hub_mirror.catalog source=disk`",
    "salt_call_test_true": "`salt-call test.true` (Salt's start-up)",
}


def _catalog(result):
    seconds = result["seconds"]
    rows = []
    for name, ratio in result["vs_raw_walk"].items():
        rows.append(("4 catalog", f"{CATALOG_LABELS.get(name, name)} / raw walk of {result['repositories']} repos", _r(ratio), _s(seconds["raw_walk"]), _s(seconds[name])))
    rows.append(("4 catalog", "salt-call hub_mirror.catalog (api) / salt-call test.true", _r(result["salt_call_api_vs_test_true"]), _s(seconds["salt_call_test_true"]), _s(seconds["salt_call_api"])))
    return rows


def _fleet(result):
    rows = []
    base = str(result["sizes"][0])
    for size, ratio in result["first_apply_n_vs_1"].items():
        rows.append(("5 fleet", f"first apply, {size} minions / 1", _r(ratio), _s(result["first_apply_s"][base]), _s(result["first_apply_s"][size])))
    for size, ratio in result["reapply_n_vs_1"].items():
        rows.append(("5 fleet", f"re-apply, {size} minions / 1", _r(ratio), _s(result["reapply_s"][base]), _s(result["reapply_s"][size])))
    return rows


def _fallback(result):
    rows = []
    for kind, data in result["kinds"].items():
        for runtime, figures in data.items():
            if not isinstance(figures, dict) or "dead_vs_none" not in figures:
                continue
            rows.append((f"6 fallback {kind}", f"{runtime}: dead mirror configured / no mirror", _r(figures["dead_vs_none"]), _s(figures["no_mirror_s"]), _s(figures["dead_mirror_s"])))
    recheck = result.get("recheck_s")
    for kind, data in result.get("time_to_drop", {}).items():
        rows.append((f"6 fallback {kind}", f"every client dropped the dead mirror (recheck: {recheck}) / the interval", _r(data["dropped_vs_interval"]), f"{recheck} s", _s(data["dropped_s"])))
        rows.append((f"6 fallback {kind}", "every client took it back once it answered again", "", "", _s(data["back_s"])))
    return rows


def _fanin(result):
    rows = []
    for profile, data in result["profiles"].items():
        for key, figures in data["figures"].items():
            label = f"7 fan-in {profile}"
            for subject in ("hub_mirror", "distribution"):
                got = figures[subject]
                what = "hub_mirror (front)" if subject == "hub_mirror" else "distribution alone"
                rows.append(
                    (
                        label,
                        f"{key}, {what}: last client / one direct pull",
                        _r(got["last_vs_direct"]),
                        _s(figures["direct_s"]),
                        f"{_s(got['last_client_s'])}; upstream GETs/blob {got['upstream_gets_per_blob']['median']:.2f}, "
                        f"upstream bytes/image {got['upstream_layer_bytes_per_image']['median']:.2f}, "
                        f"first byte {got['first_byte_s']['median']:.2f}–{got['first_byte_s']['max']:.2f} s",
                    )
                )
    return rows


ROWS = {
    "converge": _converge,
    "wan": _wan,
    "serve": _serve,
    "catalog": _catalog,
    "fleet": _fleet,
    "fallback": _fallback,
    "fanin": _fanin,
}

PLOTS = REPO / "docs" / "img"


def _plot_fanin(result):
    """Last client / direct and upstream GETs per blob over N, per profile: one PNG."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("agg")
    from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

    profiles = result["profiles"]
    figure, axes = pyplot.subplots(2, len(profiles), figsize=(5 * len(profiles), 7), squeeze=False)
    for column, (profile, data) in enumerate(profiles.items()):
        series = {}
        for key, figures in data["figures"].items():
            version = key.split()[0]
            for subject in ("hub_mirror", "distribution"):
                name = f"{'hub_mirror' if subject == 'hub_mirror' else 'distribution alone'} {version}"
                series.setdefault(name, []).append(
                    (figures["clients"], figures[subject]["last_vs_direct"]["median"], figures[subject]["upstream_gets_per_blob"]["median"])
                )
        for name, points in series.items():
            points.sort()
            style = "-o" if name.startswith("hub_mirror") else "--s"
            axes[0][column].plot([p[0] for p in points], [p[1] for p in points], style, label=name)
            axes[1][column].plot([p[0] for p in points], [p[2] for p in points], style, label=name)
        axes[0][column].set_title(f"{profile}: last client / one direct pull")
        axes[1][column].set_title(f"{profile}: upstream GETs per blob")
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].set_yscale("log")
            axes[row][column].set_xticks([p[0] for p in points], [str(p[0]) for p in points])
            axes[row][column].set_xlabel("clients pulling at once")
            axes[row][column].grid(True, which="both", alpha=0.3)
        axes[0][column].axhline(1.2, color="grey", linestyle=":", label="target 1.2")
        axes[0][column].legend(fontsize=7)
    figure.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    figure.savefig(PLOTS / "fanin.png", dpi=90, metadata={"Software": None})
    pyplot.close(figure)
    return "img/fanin.png"


def _plot_serve(result):
    """Throughput over clients, per server: one PNG."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("agg")
    from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

    figure, axis = pyplot.subplots(figsize=(6, 4))
    clients = {key: int(key.split("_")[0]) for key in result["figures"]}
    names = [key[: -len("_mb_s")] for key in next(iter(result["figures"].values())) if key.endswith("_mb_s")]
    for name in names:
        points = sorted((clients[key], figures[f"{name}_mb_s"]["median"]) for key, figures in result["figures"].items())
        axis.plot([p[0] for p in points], [p[1] for p in points], "-o", label=_server_label(name))
    axis.set_xscale("log", base=2)
    axis.set_xticks(sorted(clients.values()), [str(c) for c in sorted(clients.values())])
    axis.set_xlabel("clients downloading at once")
    axis.set_ylabel("MB/s, all clients together")
    axis.set_title("Cache hits: throughput over clients")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    figure.savefig(PLOTS / "serve.png", dpi=90, metadata={"Software": None})
    pyplot.close(figure)
    return "img/serve.png"


PLOTTERS = {"fanin": (_plot_fanin, "N clients pulling one cold image at once"), "serve": (_plot_serve, "Cache hits over clients")}


def render(document, notes=""):
    machine = document["machine"]
    lines = [HEADER, "## Results", ""]
    lines.append(
        f"Measured {machine['date']} on {machine['nproc']} × {machine['cpu']}, kernel {machine['kernel']}, "
        f"{machine['memory_gb']} GB RAM; load average at start {', '.join(f'{v:.2f}' for v in machine['loadavg_at_start'])}. "
        f"Salt {machine['salt']}, {machine['registry']}, {machine['skopeo']}, {machine['containerd']}, {machine['nginx']}. "
        f"Command: `{document['command'].strip()}`; {document['runs']} runs per figure unless the row says otherwise; "
        f"whole run {document['wall_s'] / 60:.1f} min."
    )
    lines += ["", "| Benchmark | Figure | Ratio: median (range) | Baseline (median) | Subject (median) |", "|---|---|---|---|---|"]
    for name, result in document["benchmarks"].items():
        if "error" in result:
            lines.append(f"| {name} | **failed** | {result['error'][:200]} | | |")
            continue
        for row in ROWS[name](result):
            lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    lines.append("")
    for name, (plotter, title) in PLOTTERS.items():
        result = document["benchmarks"].get(name, {})
        if result and "error" not in result:
            lines += [f"![{title}]({plotter(result)})", ""]
    wan = document["benchmarks"].get("wan", {})
    if "emulator" in wan:
        lines.append(f"WAN emulation used: {wan['emulator']}.")
        lines.append("")
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def write_docs(document):
    """Rewrite docs/benchmarks.md, keeping the hand-written findings section if present."""
    notes = ""
    marker = "## Findings"
    if DOC.exists():
        text = DOC.read_text()
        if marker in text:
            notes = text[text.index(marker):]
    DOC.write_text(render(document, notes))


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        write_docs(json.load(fh))
