"""What each `infer.bench` row decodes with: the method (mode, temperature, heads), the model, and the tree.

The tree of a Medusa row comes from, in order: `--tree` (one tree for every row, to compare head sets on equal
terms), the tree tuner's record beside the heads (`tree.json`: the best tree for the row's number of heads),
the bundle's tree, or `default_tree(k)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax

from infer import tune_tree
from infer.plan import DEFAULT_TREE, resolve_tree_buffers
from medusa_jax import model
from medusa_jax.bundle import Bundle
from medusa_jax.config import HeadsConfig
from medusa_jax.errors import MedusaError
from medusa_jax.tree import check_lookup, tree_option

ALL_METHODS = ("hf", "ar", "medusa", "medusa-k3", "medusa-k4", "medusa-k5", "typical-t0.7", "sample-t0.7")
MAX_K = 8  # medusa-kK for K in 1..MAX_K


@dataclasses.dataclass(frozen=True)
class Method:
    """How a benchmark row decodes: `mode` of `generate_ids` at `temperature` with the first `k` heads (None: all
    of the bundle's heads; 0: none, the lookup branch alone) and a lookup chain of `lookup` nodes (None: the
    bundle's tuned one, `Bundle.lookup`)."""

    name: str
    mode: str
    temperature: float = 0.0
    k: int | None = None
    lookup: int | None = None


def parse_method(name: str) -> Method:
    """Method from its row name: one of `ALL_METHODS`, medusa-kK (K in 1..8), typical-tT / sample-tT (T > 0),
    lookupL (the lookup branch alone: prompt lookup decoding with L draft tokens, no heads), and any Medusa row
    with a "+lookupL" suffix (that lookup chain instead of the bundle's; +lookup0 for none)."""
    base, plus, suffix = name.partition("+lookup")
    lookup = _lookup_length(name, suffix) if plus else None
    if not plus and name.startswith("lookup"):
        length = _lookup_length(name, name[len("lookup"):])
        if length == 0:
            raise MedusaError(f"method {name!r}: a lookup row needs at least one draft token (lookup4); "
                              "plain decoding is the 'ar' row")
        return Method(name, "greedy", 0.0, 0, length)
    if base == "hf" and not plus:
        return Method("hf", "hf")
    if base == "ar" and not plus:
        return Method("ar", "ar")
    if base == "medusa":  # what `generate` does by default: all heads, the bundle's (tuned) tree
        return Method(name, "greedy", 0.0, None, lookup)
    k = base[len("medusa-k"):]
    if base.startswith("medusa-k") and k.isdigit() and 1 <= int(k) <= MAX_K:
        return Method(name, "greedy", 0.0, int(k), lookup)
    for mode in ("typical", "sample"):
        if base.startswith(f"{mode}-t"):
            try:
                temperature = float(base[len(mode) + 2:])
            except ValueError:
                break
            if temperature > 0:
                return Method(name, mode, temperature, None, lookup)
    raise MedusaError(f"unknown method {name!r}; use any of {', '.join(ALL_METHODS)} (medusa-kK for K in 1..{MAX_K}, "
                      "typical-tT / sample-tT for a temperature T > 0, lookupL, or a Medusa row + 'lookupL')")


def _lookup_length(name: str, digits: str) -> int:
    return check_lookup(int(digits) if digits.isdigit() else digits, f"method {name!r}: the lookup length")


def tiny_bundle(num_heads: int = 5, seed: int = 0, perturb: float = 0.02) -> Bundle:
    """A random `tiny` model sized to the embedded SmolLM2 tokenizer, with `num_heads` random shared-projection heads
    (identity-initialised plus Gaussian noise of std `perturb`; 0 heads: the base alone): runs in seconds,
    meaningless text. `--model tiny` of `infer.bench` and `train.distill`."""
    from medusa_jax.config import tiny
    from medusa_jax.loading import embedded

    tok = embedded.load_tokenizer(embedded.gguf_path())
    cfg = dataclasses.replace(tiny(), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_ids=(tok.eos_token_id,))
    source = "tiny (random, SmolLM2 tokenizer)"
    if num_heads == 0:
        return Bundle(base=_tiny_base(cfg, jax.random.PRNGKey(seed)), config=cfg, tokenizer=tok, source=source)
    hc = HeadsConfig(num_heads=num_heads, projection="shared")
    base, heads = _tiny_params(cfg, hc, jax.random.PRNGKey(seed), perturb)
    return Bundle(base=base, heads=heads, config=cfg, heads_config=hc, tokenizer=tok, source=source)


# One compiled initialisation each (eager flax init compiles every op separately: tens of seconds).
_tiny_base = jax.jit(model.init_base, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tiny_params(cfg, hc: HeadsConfig, key: jax.Array, perturb: float):
    """Random base and heads for `tiny_bundle`."""
    k_base, k_heads = jax.random.split(key)
    base = model.init_base(cfg, k_base)
    heads = model.init_heads(hc, cfg, base)
    leaves, treedef = jax.tree.flatten(heads)
    keys = jax.random.split(k_heads, len(leaves))
    heads = jax.tree.unflatten(treedef, [p + perturb * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return base, heads


def load_model(source: str | None, heads: str | None) -> Bundle:
    import medusa_jax

    if source == "tiny":
        bundle = tiny_bundle()
        return medusa_jax.loading.attach_heads(bundle, heads) if heads else bundle
    bundle = medusa_jax.load(source, heads=heads)
    if bundle.tokenizer is None:
        raise MedusaError(f"{bundle.source} has no tokenizer; MT-Bench prompts need one (pass a model with a "
                          "tokenizer, or --model tiny)")
    return bundle


def default_tree(k: int) -> list[tuple[int, ...]]:
    """The decoder's small CPU tree (`DEFAULT_TREE`) cut to depth k, extended by a rank-0 chain to depth k."""
    paths = [p for p in DEFAULT_TREE if len(p) <= k]
    depth = max(len(p) for p in DEFAULT_TREE)
    return paths + [(0,) * d for d in range(depth + 1, k + 1)]


def tuning_record(heads: str | None, source: str | None) -> dict | None:
    """The tree tuner's record (`tree.json`) beside the heads in use, if there is one."""
    from medusa_jax.loading import DEFAULT_HEADS_DIR

    if heads:
        folder = Path(heads) if Path(heads).is_dir() else Path(heads).parent
    elif source is None:
        folder = Path(DEFAULT_HEADS_DIR)
    else:
        return None
    path = folder / "tree.json"
    return json.loads(path.read_text()) if path.is_file() else None


def method_bundle(bundle: Bundle, method: Method, record: dict | None = None,
                  fixed: list | None = None) -> tuple[Bundle | None, list, str]:
    """(bundle to decode with, tree paths, where the tree came from) for `method`; bundle None = skipped, the
    third item then says why. A row's lookup chain is its method's, else the one kept in the bundle returned: a
    medusa-kK row with the tuner's tree takes the chain that ran fastest with that tree (`tune_tree.best_lookup`),
    the others the bundle's.

    The tree of a Medusa row with k heads is the best tree of at least one draft node that k heads can serve,
    chosen from the tuner's record (its per-rank head accuracy and its step-time curve on the tuning machine);
    without a record, the bundle's tree when k heads serve it, else `default_tree(k)`. `fixed` (from `--tree`)
    overrides all of these; a row whose k heads cannot serve it is skipped.
    """
    if method.mode == "ar":
        return bundle, [], "none (plain decoding)"
    if method.k == 0:  # prompt lookup decoding: the lookup chain alone, no heads
        return bundle.with_heads(None, None), [], f"none: a lookup chain of {method.lookup} alone"
    if bundle.heads is None:
        return None, [], "skipped: the model has no Medusa heads (pass --heads)"
    if method.name.partition("+")[0] == "medusa":  # medusa+lookupL: the same tree, another chain
        paths = [tuple(p) for p in resolve_tree_buffers(bundle, "greedy").choices]
        source = "the heads' tree.json" if bundle.tree is not None else "infer.plan.DEFAULT_TREE"
        return bundle, paths, f"generate's default tree ({source})"
    have = bundle.heads_config.num_heads
    k = have if method.k is None else method.k
    if k > have:
        return None, [], f"skipped: the heads have {have} heads, fewer than {k}"
    tuned = tune_tree.best_tree(record, k) if record and fixed is None else None
    # The chain that ran fastest beside the tuner's drafting tree: the bundle's own may be tuned for no heads.
    chain = tune_tree.best_lookup(record) if tuned else None
    chain = bundle.lookup if chain is None else chain
    if fixed is not None:
        depth = max((len(p) for p in fixed), default=0)
        if depth > k:
            return None, [], f"skipped: the --tree has depth {depth}, more than the row's {k} heads"
        paths, where = [tuple(p) for p in fixed], "--tree"
    elif tuned:
        paths, where = [tuple(p) for p in tuned], f"best tree for {k} heads from tree.json (tuner's accuracy + step-time curve)"
    elif bundle.tree and max(len(p) for p in bundle.tree) <= k:
        paths, where = [tuple(p) for p in bundle.tree], "tree.json (tuned for these heads)"
    else:
        paths, where = default_tree(k), f"default_tree({k})"
    hc = dataclasses.replace(bundle.heads_config, num_heads=k)
    heads = jax.tree.map(lambda p: p[:k], bundle.heads)  # every head leaf is stacked over heads on axis 0
    return bundle.with_heads(heads, hc, None, chain), paths, where


def parse_tree_option(text: str | None, bundle: Bundle) -> list | None:
    """The `--tree` value as paths the bundle's heads can serve (None when not given); bad specs are one-line
    errors."""
    return tree_option(text, bundle.heads_config.num_heads if bundle.heads_config is not None else None)
