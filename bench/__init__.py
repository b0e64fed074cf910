"""Benchmark scripts (GPU measurements in gpu_7b.py and gpu_embedded.py; CPU profiles and timings in the others)."""

from __future__ import annotations

from medusa_jax.errors import int_list

__all__ = ["int_list"]
