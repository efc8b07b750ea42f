"""Benchmarks, also run as `vqret bench ...`."""
