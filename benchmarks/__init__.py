"""Benchmarks: repertory side by side with the same work done by hand, run by `harness`.

Each `bench_<suite>.py` module defines `suite(env)`; `python -m benchmarks` runs them all.
"""
