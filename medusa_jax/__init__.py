"""medusa-jax: Medusa speculative decoding for LLaMA-family chat models in JAX/Flax.

Public entry points:
  load(source=None, *, heads=None, dtype="float32") -> Bundle
  forward_logits(params, token_ids) -> logits [batch, seq, vocab]
"""

from medusa_jax.bundle import Bundle, forward_logits
from medusa_jax.config import HeadsConfig, LlamaConfig, preset, smollm2_135m, tiny, vicuna_7b, vicuna_13b
from medusa_jax.errors import MedusaError


def load(source=None, *, heads=None, dtype="float32"):
    """Loads a model bundle; see `medusa_jax.loading.load`. Turns on the persistent compilation cache first
    (`medusa_jax.compile_cache`)."""
    from medusa_jax import compile_cache
    from medusa_jax.loading import load as _load

    compile_cache.enable()
    return _load(source, heads=heads, dtype=dtype)


__all__ = ["Bundle", "HeadsConfig", "LlamaConfig", "MedusaError", "forward_logits", "load", "preset",
           "smollm2_135m", "tiny", "vicuna_7b", "vicuna_13b"]
