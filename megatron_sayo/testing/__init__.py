"""Fixtures for tests, tools and benchmarks: tiny random checkpoints, parity runs, the no-cache decoding reference."""
