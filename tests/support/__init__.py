"""Helpers shared by the integration tests, the reliability suite and the benchmarks."""
