"""Benchmarks: run from the repo root as `python -m benchmarks.NAME`; each prints a table and writes results/NAME.json."""
