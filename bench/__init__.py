"""hub_mirror benchmarks: ``python -m bench.run`` (see docs/benchmarks.md)."""
