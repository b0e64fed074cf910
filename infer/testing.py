"""Small bundles for decoder tests (random weights; no files).

`oracle_bundle` builds a model whose next token is mostly a fixed permutation f of the current token, and heads
that predict f^(k+2) exactly, so drafts are often right and long chunks get accepted: the acceptance, compaction
and mid-chunk stopping paths are exercised. Attention and MLP still contribute (scaled by `mix`), so the output
depends on the context and a wrong tree mask, position or cache compaction changes the tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import config, model
from medusa_jax.bundle import Bundle


def tiny_config(vocab_size: int = 256, max_position_embeddings: int = 512) -> config.LlamaConfig:
    """The `tiny` preset with another vocabulary size / context."""
    return dataclasses.replace(config.tiny(), vocab_size=vocab_size, max_position_embeddings=max_position_embeddings)


def random_bundle(vocab_size: int = 256, num_heads: int = 4, perturb: float = 0.02, logit_scale: float = 1.0,
                  seed: int = 0, projection: str = "shared") -> Bundle:
    """A random tiny base with identity-initialised heads plus Gaussian noise of std `perturb`.

    `logit_scale` multiplies the output projection, making next-token distributions sharper (> 1).
    """
    cfg = tiny_config(vocab_size)
    k_base, k_heads = jax.random.split(jax.random.PRNGKey(seed))
    base = model.init_base(cfg, k_base)
    base["lm_head"]["kernel"] = base["lm_head"]["kernel"] * logit_scale
    hc = config.HeadsConfig(num_heads=num_heads, projection=projection)
    heads = model.init_heads(hc, cfg, base)
    leaves, treedef = jax.tree.flatten(heads)
    keys = jax.random.split(k_heads, len(leaves))
    heads = jax.tree.unflatten(treedef, [p + perturb * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return Bundle(base=base, heads=heads, config=cfg, heads_config=hc, source="random")


def oracle_bundle(vocab_size: int = 32, num_heads: int = 4, margin: float = 10.0, mix: float = 0.15,
                  seed: int = 2, avoid: tuple[int, ...] = (2,)) -> tuple[Bundle, np.ndarray]:
    """A tiny model that mostly continues x -> f(x) for a random permutation f, with heads predicting f^(k+2).

    Construction: token embeddings are random unit-RMS vectors (rows of E [V, H], V <= H so E has full row rank);
    the output projection is pinv(E) @ (margin * onehot(f)), so a hidden state equal to E[x] gives logit `margin`
    for f(x) and 0 elsewhere. Head k (own projection, identity residual block) uses pinv(E) @ (margin *
    onehot(f^(k+2))). The attention and MLP outputs are scaled by `mix`: small enough that f is usually followed,
    large enough that context sometimes changes the argmax.

    Returns (bundle, f) with f int [V]; f never maps to the ids in `avoid` (EOS), except from themselves.
    """
    cfg = tiny_config(vocab_size)
    if vocab_size > cfg.hidden_size:
        raise ValueError("oracle_bundle needs vocab_size <= hidden_size")
    rng = np.random.default_rng(seed)
    base = model.init_base(cfg, jax.random.PRNGKey(seed))
    embed = rng.standard_normal((vocab_size, cfg.hidden_size))
    embed /= np.sqrt(np.mean(embed ** 2, axis=1, keepdims=True))  # unit RMS: the final norm leaves rows as they are
    movable = np.array([t for t in range(vocab_size) if t not in avoid])
    perm = np.arange(vocab_size)
    perm[movable] = movable[np.roll(rng.permutation(len(movable)), 1)]  # one cycle over the non-avoided ids
    pinv = np.linalg.pinv(embed)  # [H, V]

    def projection(steps: int) -> np.ndarray:
        target = np.arange(vocab_size)
        for _ in range(steps):
            target = perm[target]
        return pinv @ (margin * np.eye(vocab_size)[target])  # [H, V]

    base["embed"]["embedding"] = jnp.asarray(embed, jnp.float32)
    base["lm_head"]["kernel"] = jnp.asarray(projection(1), jnp.float32)
    for i in range(cfg.num_layers):
        layer = base[f"layers_{i}"]
        layer["attn"]["o"]["kernel"] = layer["attn"]["o"]["kernel"] * mix * 20.0
        layer["mlp"]["down"]["kernel"] = layer["mlp"]["down"]["kernel"] * mix
    hc = config.HeadsConfig(num_heads=num_heads, projection="own")
    heads = model.init_heads(hc, cfg, base)
    heads["proj"] = jnp.asarray(np.stack([projection(k + 2) for k in range(num_heads)]), jnp.float32)
    return Bundle(base=base, heads=heads, config=cfg, heads_config=hc, source="oracle"), perm


@functools.lru_cache(maxsize=None)
def shared_bundle(which: str) -> Bundle:
    """The decoding tests' two bundles, built once per process: "oracle" (`oracle_bundle(mix=0.15, seed=2)`, long
    accepted chunks) or "rand" (`random_bundle(seed=0)`, rare acceptances)."""
    if which not in ("oracle", "rand"):
        raise ValueError(f"shared_bundle: which must be 'oracle' or 'rand', got {which!r}")
    return oracle_bundle(mix=0.15, seed=2)[0] if which == "oracle" else random_bundle(seed=0)


@functools.lru_cache(maxsize=None)
def greedy_reference(which: str, prompt: tuple, max_new: int, stop: tuple = ()) -> list[int]:
    """Plain greedy decoding of one prompt with `shared_bundle(which)`: the ground truth every mode must match at
    temperature 0."""
    from infer.api import generate_ids  # infer.api imports the decoder, which tests import alongside this module

    return generate_ids(shared_bundle(which), [list(prompt)], max_new_tokens=max_new, mode="ar",
                        stop_ids=stop).tokens[0]
