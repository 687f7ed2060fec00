"""Benchmarks and the demo: scenarios, baselines, reports."""
