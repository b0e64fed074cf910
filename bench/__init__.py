"""Benchmark scripts run on a lent accelerator machine (see gpu_7b.py)."""
