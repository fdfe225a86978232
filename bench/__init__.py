"""Benchmarks: each `bench/bench_*.py` measures llmos against a baseline in the same run (see bench/run.py)."""
