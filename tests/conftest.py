"""Shared fixtures: the embedded model and its transformers twin (once per session), the tiny model, torch LLaMAs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download models
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite runs in two xdist workers: on a GPU, each would otherwise preallocate 75% of the device memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# One persistent compilation cache per test run, never the user's: the xdist workers and the CLI subprocesses
# load what another compiled (`medusa_jax.compile_cache`). Set before the workers start, so they inherit it.
if "MEDUSA_JAX_COMPILE_CACHE" not in os.environ:  # the process that makes the folder removes it at exit
    os.environ["MEDUSA_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="medusa-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["MEDUSA_JAX_COMPILE_CACHE"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

import medusa_jax  # noqa: E402
from medusa_jax import compile_cache, model  # noqa: E402

compile_cache.enable()  # before any test compiles: JAX decides at its first compilation whether it uses the cache
from medusa_jax.config import HeadsConfig  # noqa: E402
from medusa_jax.loading import gguf_file  # noqa: E402

# GGUF indexes of the files tests write go to a folder of this process, not the user's cache (where they would
# push out the index of the model the user runs).
_GGUF_INDEX = tempfile.mkdtemp(prefix="medusa-jax-gguf-index-")
atexit.register(shutil.rmtree, _GGUF_INDEX, ignore_errors=True)
gguf_file.index_dir = lambda: Path(_GGUF_INDEX)


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct bundle (float32, shipped heads when present)."""
    return medusa_jax.load()


@pytest.fixture(scope="session")
def embedded_torch(embedded):
    """transformers' own float32 `LlamaForCausalLM` of the embedded GGUF (its GGUF loader), in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = embedded.source
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_bundle():
    """The random `tiny` model (seed 0), no tokenizer, no heads."""
    return medusa_jax.load("tiny")


@pytest.fixture(scope="session")
def tiny_heads_bundle(tiny_bundle):
    """`tiny_bundle` with 3 random (non-identity) shared-projection Medusa heads of 1 layer."""
    heads_config = HeadsConfig(num_heads=3, num_layers=1, projection="shared")
    heads = model.init_heads(heads_config, tiny_bundle.config, tiny_bundle.base)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), len(heads)))
    heads = {k: 0.05 * jax.random.normal(next(keys), v.shape, v.dtype) for k, v in heads.items()}
    return tiny_bundle.with_heads(heads, heads_config)


def make_torch_llama(seed: int = 0, **overrides):
    """A random float32 transformers `LlamaForCausalLM` (tiny GQA by default; `overrides` are LlamaConfig fields).

    Norm scales are randomised too (around 1), so a swapped norm would show in the logits.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    torch.manual_seed(seed)
    net = LlamaForCausalLM(LlamaConfig(**fields)).float().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return net


@pytest.fixture
def torch_llama():
    """Factory: `torch_llama(seed=0, **LlamaConfig fields)` -> random float32 `LlamaForCausalLM` (see above)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return make_torch_llama


# The longest test file (about 6 minutes on a 2-core CPU) starts first: `-n 2 --dist loadfile` hands out files in
# collection order, and started last it ran alone at the end while the other worker sat idle.
_FIRST = ("test_shipped_heads.py",)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in _FIRST)  # stable: every other test keeps its order
