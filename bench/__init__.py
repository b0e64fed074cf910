"""Benchmark scripts (GPU measurements in gpu_7b.py; CPU profiles and timings in the others)."""

from __future__ import annotations

from medusa_jax.errors import MedusaError


def int_list(text: str, flag: str, minimum: int) -> list[int]:
    """A comma-separated command-line value as integers >= `minimum`; a one-line `MedusaError` otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise MedusaError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if min(values) < minimum:
        raise MedusaError(f"{flag} values must be >= {minimum}, got {text!r}")
    return values
