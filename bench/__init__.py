"""Benchmark harness comparing tabserve with TabPy (see docs/benchmarks.md)."""
