"""Run the hub_mirror benchmarks and print one JSON document.

From the repository root, as root::

    sudo /var/cache/hub-mirror-ci/venv/bin/python -m bench.run [--only wan,serve] [--runs 3]
        [--runs-for fleet=2] [--quick] [--write-docs] [--json-out FILE]

Each benchmark cleans up after itself (namespaces, processes, files), also when it fails
or the run is interrupted; a benchmark that fails reports its error in the JSON and the
others still run. docs/benchmarks.md explains every figure.
"""

import argparse
import json
import signal
import sys
import time
import traceback
import uuid

from bench import catalog, converge, fallback, fanin, fleet, report, serve, wan
from bench.common import Context, log, machine, rmtree

BENCHMARKS = {
    "converge": converge.run,
    "wan": wan.run,
    "serve": serve.run,
    "catalog": catalog.run,
    "fleet": fleet.run,
    "fallback": fallback.run,
    "fanin": fanin.run,
}
DEFAULT_RUNS = 3


def _interrupt(signum, frame):  # pylint: disable=unused-argument
    # Unwind through every benchmark's cleanup, as Ctrl-C does.
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated benchmarks to run: " + ",".join(BENCHMARKS))
    parser.add_argument("--skip", help="comma-separated benchmarks to leave out")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per measurement (default 3)")
    parser.add_argument(
        "--runs-for", action="append", default=[], metavar="NAME=N", help="runs for one benchmark, e.g. fleet=2"
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and counts: checks the code, not the figures")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--json-out", help="also write the JSON document to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (for debugging)")
    args = parser.parse_args(argv)
    selected = list(BENCHMARKS)
    if args.only:
        selected = [name.strip() for name in args.only.split(",") if name.strip()]
    if args.skip:
        skipped = {name.strip() for name in args.skip.split(",")}
        selected = [name for name in selected if name not in skipped]
    unknown = [name for name in selected if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    runs_for = {}
    for item in args.runs_for:
        name, _, count = item.partition("=")
        if name not in BENCHMARKS or not count.isdigit() or int(count) < 1:
            parser.error(f"--runs-for {item!r}: use NAME=N with a known benchmark and N >= 1")
        runs_for[name] = int(count)
    return args, selected, runs_for


def main(argv=None):
    args, selected, runs_for = parse_args(sys.argv[1:] if argv is None else argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    root = f"/tmp/hmb-{uuid.uuid4().hex[:8]}"
    document = {
        "machine": machine(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": args.runs,
        "quick": args.quick,
        "benchmarks": {},
    }
    started = time.monotonic()
    interrupted = False
    try:
        for name in selected:
            ctx = Context(f"{root}/{name}", runs_for.get(name, args.runs), quick=args.quick)
            log(f"{name}: start ({ctx.runs} runs)")
            begun = time.monotonic()
            try:
                result = BENCHMARKS[name](ctx)
            except KeyboardInterrupt:
                document["benchmarks"][name] = {"error": "interrupted"}
                interrupted = True
                raise
            except Exception as exc:  # pylint: disable=broad-except
                log(f"{name}: FAILED: {exc!r}")
                result = {"error": repr(exc), "traceback": traceback.format_exc()}
            finally:
                ctx.close()
            result["runs"] = ctx.runs
            result["wall_s"] = round(time.monotonic() - begun, 1)
            document["benchmarks"][name] = result
            log(f"{name}: done in {result['wall_s']}s")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if not args.keep:
            rmtree(root)
    document["wall_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(document, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if args.write_docs and not interrupted:
        report.write_docs(document)
        log("wrote docs/benchmarks.md")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
