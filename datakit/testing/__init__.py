"""Helpers that tests, the demo and the benchmarks share (a real local HTTP server)."""
