"""Model configurations: frozen dataclasses with presets.

`LlamaConfig` covers every field that real LLaMA-family checkpoints (LLaMA 1/2, Vicuna, SmolLM2, Mistral-style GQA)
use. `HeadsConfig` describes the Medusa heads attached to a base model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from medusa_jax.errors import MedusaError

Projection = Literal["own", "shared"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA-architecture decoder.

    Attributes:
      vocab_size: number of token ids.
      hidden_size: residual stream width H.
      intermediate_size: SwiGLU inner width I.
      num_layers: decoder layers L.
      num_heads: query heads.
      num_kv_heads: key/value heads (GQA when < num_heads).
      head_dim: width of one attention head (usually H / num_heads).
      rope_theta: RoPE base frequency.
      rope_scaling: linear RoPE scaling factor (positions are divided by it), or None.
      rms_norm_eps: epsilon of RMSNorm.
      tie_embeddings: the output projection is the transposed token embedding.
      bos_token_id, eos_token_ids: special ids; several ids may end a turn.
      max_position_embeddings: context length the model was trained for.
    """

    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: float | None = None
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)
    max_position_embeddings: int = 2048

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise MedusaError(
                f"config {self.name}: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                "fix the checkpoint's config.json")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise MedusaError(f"config {self.name}: {field} must be positive, got {getattr(self, field)}")

    @property
    def num_params(self) -> int:
        """Number of base-model parameters."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.num_heads * self.head_dim * 2 + h * self.num_kv_heads * self.head_dim * 2
        layer = attn + 3 * h * i + 2 * h
        return self.num_layers * layer + v * h * (1 if self.tie_embeddings else 2) + h


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Medusa heads: `num_heads` heads of `num_layers` residual blocks and a vocabulary projection.

    Head k (0-based) at position t predicts the token at t + 2 + k. `projection="own"` gives each head its own
    [H, V] projection (the original Medusa-1 file format); `"shared"` reuses the frozen base lm_head.
    """

    num_heads: int = 4
    num_layers: int = 1
    projection: Projection = "shared"

    def __post_init__(self):
        if not 1 <= self.num_heads <= 8:
            raise MedusaError(f"num_heads={self.num_heads} is out of range; use 1 to 8 Medusa heads")
        if not 1 <= self.num_layers <= 8:
            raise MedusaError(f"num_layers={self.num_layers} is out of range; use 1 to 8 residual layers per head")
        if self.projection not in ("own", "shared"):
            raise MedusaError(f"projection={self.projection!r} is unknown; use 'own' or 'shared'")


def vicuna_7b() -> LlamaConfig:
    """Vicuna-7B v1.3 / LLaMA-7B."""
    return LlamaConfig(name="vicuna_7b", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-6,
                       max_position_embeddings=2048)


def vicuna_13b() -> LlamaConfig:
    """Vicuna-13B v1.3 / LLaMA-13B."""
    return LlamaConfig(name="vicuna_13b", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, rms_norm_eps=1e-6,
                       max_position_embeddings=2048)


def smollm2_135m() -> LlamaConfig:
    """SmolLM2-135M-Instruct, the embedded default (GQA 9/3 heads, tied embeddings)."""
    return LlamaConfig(name="smollm2_135m", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                       rms_norm_eps=1e-5, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                       max_position_embeddings=8192)


def tiny() -> LlamaConfig:
    """A random few-layer model for tests: GQA, small vocabulary."""
    return LlamaConfig(name="tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_embeddings=False, bos_token_id=1, eos_token_ids=(2,), max_position_embeddings=512)


PRESETS = {"vicuna_7b": vicuna_7b, "vicuna_13b": vicuna_13b, "smollm2_135m": smollm2_135m, "tiny": tiny}


def preset(name: str) -> LlamaConfig:
    """Returns the preset called `name`, or a clear error listing the known ones."""
    if name not in PRESETS:
        raise MedusaError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
