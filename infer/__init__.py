"""On-device Medusa decoding for medusa-jax bundles.

  from infer import load, generate
  params = load()                       # the embedded SmolLM2-135M-Instruct with its shipped heads
  text = generate(params, "Hello!")     # greedy Medusa when heads exist, plain decoding otherwise

`generate_ids` is the token-level entry point (batches, benchmarks, distillation).
"""

from infer.api import Generation, compile_count, generate, generate_ids, warm_up
from infer.plan import DEFAULT_TREE
from medusa_jax import load

__all__ = ["DEFAULT_TREE", "Generation", "compile_count", "generate", "generate_ids", "load", "warm_up"]
