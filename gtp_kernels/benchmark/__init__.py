"""Benchmark helpers shared by benchmarks/*.py and the `gtp-bench` command."""
