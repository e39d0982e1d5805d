"""Benchmarks and benchmark helpers."""
