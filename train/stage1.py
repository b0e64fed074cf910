"""Stage 1 (Medusa-1): train Medusa heads on a frozen base model.

    python -m train.stage1                      # embedded SmolLM2: distil data, train, evaluate (~15 min, 2 CPUs)
    python -m train.stage1 --model tiny --steps 60 --seq-len 64 --lr 1e-2   # seconds: random model, synthetic data
    python -m train.stage1 --data chats.jsonl --epochs 2 --out checkpoints/mine
    python -m train.stage1 --resume --out checkpoints/mine       # continue from the latest checkpoint

Only the heads are trained: the base runs outside the gradient and has no optimizer state. Its post-norm hidden
states depend on nothing that training changes, so they are computed once per row and kept in host memory
(float32 [rows, seq, hidden]) when they fit in `--cache-gb`; otherwise each step recomputes them.

Without `--data` the run first self-distils a small chat set (`train.distill`; the base answers questions it
wrote itself) into `<out>/distilled.jsonl`. `--model tiny` has no tokenizer: it trains on a synthetic dataset
(`synthetic_dataset`: packed "conversations" whose assistant part walks a fixed cycle of 32 token ids, so token
t + 2 + k is a function of token t and a head can learn it; top-1 accuracy rises from chance within
tens of steps at --lr 1e-2).

Many devices: the step is jit-compiled over a ("data",) device mesh (`--parallel pmap` for pmap); many hosts: run
the same command on every host with `--distributed` (calls `jax.distributed.initialize()`); see `train.parallel`.

Loss, optimizer and their defaults: `train.losses` (lambda_k = 0.8**k; `--lambda-decay 1` is the original code's
plain sum) and `train.loop.OptimConfig` (AdamW lr 1e-3, no weight decay, 10% linear warmup then cosine, gradient
clipping at global norm 1.0). Outputs in the run folder: `ckpt/` (orbax, the last `--keep`), `metrics.jsonl`,
`heads/` (medusa_lm_head.safetensors + heads_config.json, the original Medusa format), `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import signal
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from medusa_jax import model
from medusa_jax.config import HeadsConfig
from medusa_jax.errors import MedusaError, cli_errors
from train import distill as DI
from train import loop, losses
from train.checkpoint import Checkpoints
from train.parallel import DataParallel

DEFAULTS = dict(model=None, heads_init=None, data=None, num_heads=4, num_layers=1, projection="shared", steps=None,
                epochs=None, batch_size=4, seq_len=512, lr=1e-3, lambda_decay=0.8, warmup=0.1, clip=1.0,
                dtype="float32", out=None, parallel="mesh", devices=None, seed=0, keep=3, save_every=50,
                eval_every=0, log_every=10, holdout=0.1, cache_gb=4.0, chunk=256, max_bad_steps=10, stop_at=None,
                distill_prompts=112, distill_tokens=DI.DEFAULT_MAX_NEW_TOKENS, accept_prompts=4, accept_tokens=96,
                progress=True, distributed=False)
DEFAULT_EPOCHS = 8  # with neither --steps nor --epochs
# Flags a resumed run must keep: they change parameter shapes, the data, or its order.
FIXED_ON_RESUME = ("model", "heads_init", "data", "num_heads", "num_layers", "projection", "batch_size", "seq_len",
                   "dtype", "seed", "holdout", "distill_prompts", "distill_tokens")


# ------------------------------------------------------------------------------------------------ data


def synthetic_dataset(vocab_size: int, rows: int, seq_len: int, seed: int):
    """The `tiny` model's training set: a TokenDataset of packed synthetic conversations.

    Each conversation is a "user" part of 3-8 random ids (no loss) then an "assistant" part (loss) that walks a
    fixed random cycle of 32 ids from a random start: the next assistant token is always cycle-successor of the
    current one, so the token at t + 2 + k is determined by the token at t. Conversations are 12-40 tokens,
    packed whole into rows; ids 0-2 (pad, bos, eos) are never used.
    """
    from train.data import DataReport, TokenDataset

    rng = np.random.default_rng(seed)
    cycle = np.random.default_rng(1234).choice(np.arange(3, vocab_size), size=min(32, vocab_size - 3), replace=False)
    shape = (rows, seq_len)
    tokens, mask = np.zeros(shape, np.int32), np.zeros(shape, bool)
    seg, pos = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    convs = 0
    for r in range(rows):
        start, s = 0, 1
        while True:
            user, answer = int(rng.integers(3, 9)), int(rng.integers(9, 33))
            n = min(user + answer, seq_len - start)
            if n < user + 3:
                break
            first = int(rng.integers(len(cycle)))
            walk = cycle[(first + np.arange(n - user)) % len(cycle)]
            conv = np.concatenate([rng.integers(3, vocab_size, user), walk])
            tokens[r, start:start + n], seg[r, start:start + n] = conv, s
            mask[r, start + user:start + n] = True
            pos[r, start:start + n] = np.arange(n)
            start, s, convs = start + n, s + 1, convs + 1
    attn = (seg > 0).sum(1).astype(np.int32)
    report = DataReport(path="<synthetic>", records=convs, used=convs, skipped={}, examples=rows,
                        tokens=int(attn.sum()), supervised_tokens=int(mask.sum()))
    return TokenDataset(tokens, mask, attn, seg, pos, report)


def _prompt_ids(bundle, ds, conversations, n: int) -> list[list[int]]:
    """Up to n held-out prompts as token ids: the first user turn of held-out conversations (real data), or the
    tokens before the first supervised token of held-out rows (synthetic)."""
    if conversations is not None:
        from medusa_jax import chat

        firsts = [[m for m in c[: next(i for i, m in enumerate(c) if m["role"] == "assistant")]] for c in conversations]
        return [chat.render_prompt(bundle.tokenizer, msgs) for msgs in firsts[:n] if msgs]
    out = []
    for r in range(min(n, len(ds))):
        first = int(np.argmax(ds.loss_mask[r]))
        out.append(ds.tokens[r, : first + 2].tolist())  # user part and two assistant tokens
    return out


def prepare_data(args, bundle, run_dir: str):
    """(train TokenDataset, held-out TokenDataset or None, held-out prompt ids, data description dict)."""
    from train import data as D

    if bundle.tokenizer is None:
        if args.data:
            raise MedusaError("--model tiny has no tokenizer, so it cannot read --data; drop --data (tiny trains on "
                              "synthetic data) or give a real --model")
        rows = max(4 * args.batch_size, 64)
        train = synthetic_dataset(bundle.config.vocab_size, rows, args.seq_len, args.seed)
        held = synthetic_dataset(bundle.config.vocab_size, max(args.batch_size, 8), args.seq_len, args.seed + 1)
        return train, held, _prompt_ids(bundle, held, None, args.accept_prompts), {"source": "synthetic"}
    info: dict[str, Any] = {}
    if not args.data:
        path = os.path.join(run_dir, "distilled.jsonl")
        t0 = time.monotonic()
        done = list(DI.answered_in(path).values())
        prompts = [[m for m in c if m["role"] != "assistant"] for c in done][: args.distill_prompts]
        if len(prompts) < args.distill_prompts:
            firsts = [next(m["content"] for m in c if m["role"] == "user") for c in done]
            prompts += DI.self_prompts(bundle, args.distill_prompts - len(prompts), seed=args.seed, exclude=firsts,
                                       progress=args.progress)
        _, stats = DI.distill_with_stats(bundle, prompts, max_new_tokens=args.distill_tokens, seed=args.seed,
                                         out=path, progress=args.progress)
        info = {"distilled": dataclasses.asdict(stats), "distill_s": time.monotonic() - t0}
        args.data = path  # a resumed run reads the same file instead of distilling again
    convs, report = D.load_conversations(args.data)
    order = np.random.default_rng(args.seed).permutation(len(convs))
    k = 0 if args.holdout <= 0 else max(1, int(round(args.holdout * len(convs))))
    if k >= len(convs):
        raise MedusaError(f"{len(convs)} conversation(s) in {args.data} are too few to hold out {k}; "
                          "give more data or --holdout 0")
    held_convs = [convs[i] for i in sorted(order[:k])]
    train = D.tokenize_dataset([convs[i] for i in sorted(order[k:])], bundle.tokenizer, seq_len=args.seq_len,
                               source=args.data)
    held = D.tokenize_dataset(held_convs, bundle.tokenizer, seq_len=args.seq_len, source=args.data) if k else None
    info.update(source=args.data, conversations=len(convs), held_out_conversations=k)
    return train, held, _prompt_ids(bundle, None, held_convs, args.accept_prompts) if k else [], info


class HiddenCache:
    """Post-final-norm hidden states of dataset rows, float32 [rows, seq, H] in host memory.

    Rows are found by content (a hash of tokens and segment ids), so any batch iterator can be served, and
    identical rows (e.g. padding rows) share one entry.
    """

    def __init__(self):
        self._index: dict[bytes, int] = {}
        self._rows: list[np.ndarray] = []
        self.array: np.ndarray | None = None

    @staticmethod
    def _key(tokens: np.ndarray, segments: np.ndarray) -> bytes:
        return hashlib.blake2b(tokens.tobytes() + segments.tobytes(), digest_size=16).digest()

    def build(self, datasets: Sequence[Any], compute, batch_size: int, hidden_size: int, progress: bool) -> None:
        """Fills the cache for every row of `datasets`; compute(host batch) -> float32 [B, S, H] numpy."""
        import tqdm

        from train.data import BATCH_KEYS

        todo = []
        for ds in datasets:
            for r in range(len(ds)):
                key = self._key(ds.tokens[r], ds.segment_ids[r])
                if key not in self._index:
                    self._index[key] = len(todo)
                    todo.append((ds, r))
        first = todo[0][0]
        self.array = np.empty((len(todo), first.seq_len, hidden_size), np.float32)
        for b in tqdm.trange(0, len(todo), batch_size, desc="hidden states", unit="batch", disable=not progress):
            chunk = todo[b: b + batch_size]
            batch = {k: np.stack([getattr(ds, k)[r] for ds, r in chunk]) for k in BATCH_KEYS}
            pad = batch_size - len(chunk)
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            self.array[b: b + len(chunk)] = compute(batch)[: len(chunk)]

    def lookup(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        idx = [self._index.get(self._key(t, s)) for t, s in zip(batch["tokens"], batch["segment_ids"])]
        if any(i is None for i in idx):  # padding rows of a last batch, never seen by build
            missing = [j for j, i in enumerate(idx) if i is None]
            if not all((batch["segment_ids"][j] == 0).all() for j in missing):
                raise RuntimeError("hidden-state cache miss for a data row")
            return np.stack([self.array[i] if i is not None else np.zeros_like(self.array[0]) for i in idx])
        return self.array[np.asarray(idx)]


def _cache_bytes(rows: int, seq_len: int, hidden: int) -> int:
    return rows * seq_len * hidden * 4


# ------------------------------------------------------------------------------------------------ model


def load_bundle(args):
    """The frozen base model (`medusa_jax.load`; `tiny` is a random model with seed 0 and no tokenizer)."""
    import medusa_jax

    return medusa_jax.load(args.model, heads=False, dtype=args.dtype)


def initial_heads(args, bundle, hc: HeadsConfig):
    """Fresh heads (residual blocks zero, i.e. identity; `own` projections copy the lm_head) or `--heads-init`."""
    if not args.heads_init:
        return model.init_heads(hc, bundle.config, bundle.base, jax.random.PRNGKey(args.seed))
    from medusa_jax.loading import heads_io

    heads, loaded_hc, _ = heads_io.read_heads(args.heads_init, bundle.config)
    if loaded_hc != hc:
        raise MedusaError(f"--heads-init {args.heads_init} holds {loaded_hc.num_heads} heads x "
                          f"{loaded_hc.num_layers} layers ({loaded_hc.projection} projection), but this run builds "
                          f"{hc.num_heads} x {hc.num_layers} ({hc.projection}); pass matching --num-heads, "
                          "--num-layers and --projection")
    return heads


def build_functions(bundle, hc: HeadsConfig, args, dp: DataParallel, optimizer):
    """(train step, eval step, hidden-state map), compiled for `dp`."""
    config = bundle.config
    weights = losses.head_weights(hc.num_heads, args.lambda_decay)

    def hidden_of(base, batch):
        mask = losses.attention_mask(batch["segment_ids"])  # [B, S, S] causal within each packed conversation
        hidden, _ = model.forward(config, base, batch["tokens"], batch["positions"], mask)
        return hidden.astype(jnp.float32)  # [B, S, H]

    def loss_fn(params, base, batch, rng, axis_name):
        del rng  # stage 1 is deterministic
        hidden = batch["hidden"] if "hidden" in batch else jax.lax.stop_gradient(hidden_of(base, batch))
        return losses.medusa_loss(hc, config, base, params, hidden, batch["tokens"], batch["loss_mask"],
                                  batch["segment_ids"], weights=weights, compute_dtype=bundle.dtype,
                                  chunk=args.chunk or None, axis_name=axis_name)

    def eval_fn(params, base, batch, *, axis_name=None):
        _, stats = loss_fn(params, base, batch, None, axis_name)
        return stats if axis_name is None else jax.tree.map(lambda x: jax.lax.psum(x, axis_name), stats)

    train_step = dp.compile_step(loop.make_train_step(loss_fn, optimizer), num_replicated=2)
    eval_step = dp.compile_step(eval_fn, num_replicated=2, donate_first=False)
    return train_step, eval_step, dp.compile_map(hidden_of, num_replicated=1)


def evaluate(dp: DataParallel, eval_step, params, base, ds, batch_size: int, cache: HiddenCache | None):
    """Held-out HeadStats (host numpy) over every row of `ds`."""
    from train.data import BatchIterator

    it = BatchIterator(ds, batch_size, seed=0, drop_last=False)
    total = None
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        if cache is not None:
            batch["hidden"] = cache.lookup(batch)
        stats = dp.fetch(eval_step(params, base, dp.put_batch(batch)))
        total = stats if total is None else jax.tree.map(np.add, total, stats)
    return total


def measure_acceptance(bundle, hc: HeadsConfig, params, prompts: list[list[int]], max_new: int) -> dict | None:
    """Greedy Medusa decoding of `prompts` with the trained heads: `infer.api` Generation stats, or None."""
    try:
        from infer import api
    except ImportError:
        return None
    if not prompts or not hasattr(api, "generate_ids"):
        return None
    heads = jax.tree.map(lambda p: jnp.asarray(p, bundle.dtype), params)
    gen = api.generate_ids(bundle.with_heads(heads, hc), prompts, max_new_tokens=max_new, temperature=0.0,
                           mode="greedy")
    return {**gen.stats(), "prompts": len(prompts)}


def export_heads(run_dir: str, bundle, hc: HeadsConfig, params) -> str:
    """Writes `<run>/heads/` (medusa_lm_head.safetensors + heads_config.json) in the original Medusa format."""
    from medusa_jax.loading import heads_io

    path = os.path.join(run_dir, "heads")
    heads_io.save_heads(jax.tree.map(np.asarray, params), hc, path, base_config=bundle.config)
    return path


# ------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.stage1", description=__doc__.split("\n\n")[0],
                                argument_default=None)
    a = p.add_argument
    a("--model", help="base checkpoint (HF folder, .safetensors, .gguf) or 'tiny' (random test model, synthetic "
      "data); default: the embedded SmolLM2-135M-Instruct")
    a("--heads-init", help="Medusa heads to start from (a heads folder or medusa_lm_head file)")
    a("--data", help="chat data (ShareGPT JSON, chat JSON/JSONL); default: self-distil into <out>/distilled.jsonl")
    a("--num-heads", type=int, help="Medusa heads K (default 4)")
    a("--num-layers", type=int, help="residual layers per head (default 1)")
    a("--projection", choices=("own", "shared"), help="own [H, V] projection per head, or the frozen base lm_head "
      "(default shared)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps")
    g.add_argument("--epochs", type=float, help=f"passes over the training rows (default {DEFAULT_EPOCHS})")
    a("--batch-size", type=int, help="rows per step, all devices together (default 4)")
    a("--seq-len", type=int, help="tokens per row; conversations are packed (default 512)")
    a("--lr", type=float, help="peak learning rate, AdamW without weight decay (default 1e-3)")
    a("--lambda-decay", type=float, help="head k's loss weight is decay**k; 0.8 = paper, 1 = original code "
      "(default 0.8)")
    a("--warmup", type=float, help="linear warmup fraction before the cosine decay (default 0.1)")
    a("--clip", type=float, help="gradient clipping at this global norm, 0 = off (default 1.0)")
    a("--dtype", choices=("float32", "bfloat16", "float16"), help="base weights and vocabulary-matmul dtype; head "
      "parameters and optimizer state stay float32 (default float32)")
    a("--out", help="run folder (default checkpoints/<run-name>/)")
    a("--resume", nargs="?", const="", metavar="RUN_DIR", help="continue the run in RUN_DIR (or --out) from its "
      "latest checkpoint, with its saved settings")
    a("--parallel", choices=("mesh", "pmap"), help="data parallelism: jit over a device mesh (default) or pmap")
    a("--devices", type=int, help="use the first N devices (default all)")
    a("--distributed", action="store_const", const=True, help="call jax.distributed.initialize() first "
      "(multi-host; pass it again with --resume)")
    a("--seed", type=int, help="seed of data order, split and initialisation (default 0)")
    a("--keep", type=int, help="checkpoints to keep (default 3)")
    a("--save-every", type=int, help="checkpoint every N steps, 0 = only at the end (default 50)")
    a("--eval-every", type=int, help="held-out evaluation every N steps, 0 = only at the end (default 0)")
    a("--log-every", type=int, help="metrics.jsonl / progress interval in steps (default 10)")
    a("--holdout", type=float, help="fraction of conversations held out for evaluation (default 0.1)")
    a("--cache-gb", type=float, help="host memory for cached base hidden states, 0 = recompute (default 4)")
    a("--chunk", type=int, help="sequence chunk of the fused head loss, 0 = whole rows (default 256)")
    a("--max-bad-steps", type=int, help="stop after this many non-finite steps (default 10)")
    a("--stop-at", type=int, help="stop after this step with a checkpoint, as if interrupted")
    a("--distill-prompts", type=int, help="self-distillation conversations without --data (default 112: about "
      "5-6 min on 2 CPU cores)")
    a("--distill-tokens", type=int, help=f"max new tokens per distilled answer (default {DI.DEFAULT_MAX_NEW_TOKENS})")
    a("--accept-prompts", type=int, help="held-out prompts decoded with the heads at the end, 0 = skip "
      "(default 4)")
    a("--accept-tokens", type=int, help="new tokens per acceptance prompt (default 96)")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    return p


def resolve_args(argv: Sequence[str] | None):
    """(args namespace with defaults filled, resume checkpoint meta or None)."""
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    resume = given.pop("resume", None)
    meta = None
    if resume is not None:
        run_dir = resume or given.get("out")
        if not run_dir:
            parser.error("--resume needs the run folder: --resume RUN_DIR or --resume --out RUN_DIR")
        if not os.path.isdir(run_dir):
            raise MedusaError(f"--resume {run_dir}: no such run folder; give the --out of an earlier run")
        _, meta = Checkpoints(run_dir, create=False).read_meta()
        saved = meta["args"]
        for k in FIXED_ON_RESUME:
            if k in given and given[k] != saved.get(k):
                raise MedusaError(f"--{k.replace('_', '-')} {given[k]} differs from the resumed run's "
                                  f"{saved.get(k)}; drop the flag or start a new --out")
        if ("steps" in given or "epochs" in given) and (given.get("steps"), given.get("epochs")) != (
                saved.get("steps"), saved.get("epochs")):
            print("note: the training length differs from the run's, which changes its learning-rate schedule",
                  file=sys.stderr)
            saved = {**saved, "steps": None, "epochs": None}
        given = {**saved, **given, "out": run_dir}
    args = argparse.Namespace(**{**DEFAULTS, **given})
    if args.model == "tiny" and args.data:
        raise MedusaError("--model tiny has no tokenizer, so it cannot read --data; drop --data (tiny trains on "
                          "synthetic data) or give a real --model")
    for name in ("num_heads", "num_layers", "batch_size", "seq_len", "keep", "log_every", "max_bad_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("steps", "epochs", "lr", "stop_at"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("holdout", "warmup"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)} is out of range; use 0 <= {name} < 1")
    if args.steps and args.stop_at and args.stop_at > args.steps:
        parser.error(f"--stop-at {args.stop_at} is after the last step (--steps {args.steps}); lower --stop-at")
    return args, meta


def train(args, meta: dict | None = None) -> dict:
    """Runs stage 1 with resolved `args`; returns the summary dict (also written to <out>/summary.json)."""
    from train.data import BatchIterator, DataPosition

    t_start = time.monotonic()
    times: dict[str, float] = {}
    bundle = load_bundle(args)
    hc = HeadsConfig(num_heads=args.num_heads, num_layers=args.num_layers, projection=args.projection)
    dp = DataParallel.create(args.parallel, args.devices)
    dp.check_batch_size(args.batch_size)
    if args.seq_len > bundle.config.max_position_embeddings:
        raise MedusaError(f"--seq-len {args.seq_len} is longer than the model's context of "
                          f"{bundle.config.max_position_embeddings} tokens; lower --seq-len")
    heads0 = initial_heads(args, bundle, hc)  # before the run folder exists: a mismatch leaves nothing behind
    run_dir = args.out or os.path.join("checkpoints", f"stage1-{bundle.config.name}-{hc.num_heads}h-"
                                       f"{hc.projection}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = run_dir
    os.makedirs(run_dir, exist_ok=True)
    times["load_s"] = time.monotonic() - t_start

    t0 = time.monotonic()
    train_ds, held_ds, prompts, data_info = prepare_data(args, bundle, run_dir)
    times["data_s"] = time.monotonic() - t0
    print(train_ds.report.summary(), file=sys.stderr)
    it = BatchIterator(train_ds, args.batch_size, args.seed)
    total_steps = args.steps or max(1, int(round((args.epochs or DEFAULT_EPOCHS) * it.steps_per_epoch)))
    optimizer, schedule = loop.make_optimizer(loop.OptimConfig(lr=args.lr, total_steps=total_steps,
                                                               warmup_fraction=args.warmup, clip_norm=args.clip))
    state = loop.TrainState.create(heads0, optimizer, args.seed)
    ckpts = Checkpoints(run_dir, keep=args.keep)
    start_step = 0
    if meta is not None:
        start_step, state, meta = ckpts.restore(state)
        it = BatchIterator(train_ds, args.batch_size, args.seed, DataPosition.from_dict(meta["data_position"]))
        print(f"resuming {run_dir} at step {start_step} of {total_steps}", file=sys.stderr)

    t0 = time.monotonic()
    train_step, eval_step, hidden_map = build_functions(bundle, hc, args, dp, optimizer)
    base = dp.replicate(bundle.base)
    cache = None
    datasets = [d for d in (train_ds, held_ds) if d is not None]
    need = _cache_bytes(sum(len(d) for d in datasets), args.seq_len, bundle.config.hidden_size)
    if 0 < need <= args.cache_gb * 1e9 and jax.process_count() == 1:
        cache = HiddenCache()
        cache.build(datasets, lambda b: dp.gather_rows(hidden_map(base, dp.put_batch(b))), args.batch_size,
                    bundle.config.hidden_size, args.progress)
    elif args.cache_gb > 0:
        print(f"note: hidden states need {need / 1e9:.1f} GB (> --cache-gb {args.cache_gb}); recomputing the base "
              "forward every step", file=sys.stderr)
    times["cache_s"] = time.monotonic() - t0

    static_meta = {"heads_config": dataclasses.asdict(hc), "model_source": bundle.source,
                   "model_config": dataclasses.asdict(bundle.config), "args": vars(args), "total_steps": total_steps}

    def save(dev_state, step, position):
        ckpts.save(step, dp.fetch(dev_state), {**static_meta, "data_position": position.to_dict(), "step": step})

    def describe(aux):
        m = aux.means()
        return {"heads": m}, {"top1": "/".join(f"{x:.2f}" for x in m["top1"])}

    def batches():
        for batch in it:
            if cache is not None:
                batch["hidden"] = cache.lookup(batch)
            yield batch

    def eval_record(dev_state, step):
        if held_ds is None:
            return {}
        return {"held_out": evaluate(dp, eval_step, dev_state.params, base, held_ds, args.batch_size, cache).means()}

    cfg = loop.LoopConfig(total_steps=total_steps, log_every=args.log_every, save_every=args.save_every,
                          eval_every=args.eval_every, stop_at=args.stop_at, max_bad_steps=args.max_bad_steps,
                          progress=args.progress)
    t0 = time.monotonic()
    result = loop.run(cfg, dp.replicate(state), start_step, step_fn=lambda s, b: train_step(s, base, b),
                      batches=batches(),
                      position=lambda: it.position, put_batch=dp.put_batch, save=save, describe=describe,
                      metrics_log=loop.MetricsLog(os.path.join(run_dir, "metrics.jsonl")), evaluate=eval_record,
                      schedule=schedule, batch_tokens=lambda b: int((b["segment_ids"] > 0).sum()))
    times["train_s"] = time.monotonic() - t0
    params = dp.fetch(result.state.params)
    summary: dict[str, Any] = {"run_dir": run_dir, "stopped": result.reason, "step": result.step,
                               "total_steps": total_steps, "bad_steps": result.bad_steps, "params": params}
    if result.reason != "done":
        return summary

    t0 = time.monotonic()
    held = evaluate(dp, eval_step, result.state.params, base, held_ds, args.batch_size, cache) if held_ds else None
    times["eval_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    accept = measure_acceptance(bundle, hc, params, prompts, args.accept_tokens) if args.accept_prompts else None
    times["accept_s"] = time.monotonic() - t0
    heads_dir = export_heads(run_dir, bundle, hc, params)
    times["total_s"] = time.monotonic() - t_start
    summary.update({
        "heads_dir": heads_dir, "heads_config": dataclasses.asdict(hc), "model_source": bundle.source,
        "train_last": result.last_record.get("heads"), "held_out": held.means() if held is not None else None,
        "acceptance": accept, "data": {**data_info, "train_rows": len(train_ds), "train_tokens":
                                       train_ds.report.tokens, "train_supervised": train_ds.report.supervised_tokens,
                                       "held_rows": len(held_ds) if held_ds else 0},
        "hidden_cache": cache is not None, "times": times,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "devices": dp.num_devices, "parallel": args.parallel},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)})
    if jax.process_index() == 0:
        with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in summary.items() if k != "params"}, f, indent=1)
    return summary


def format_summary(s: dict) -> str:
    """The readable end-of-run table."""
    hc = s["heads_config"]
    t = s["times"]
    lines = [f"stage 1: {hc['num_heads']} heads x {hc['num_layers']} layer(s), {hc['projection']} projection, "
             f"{s['step']} steps on {s['model_source']}",
             f"time: total {t['total_s']:.0f} s = load {t['load_s']:.0f} + data {t['data_s']:.0f} + hidden-state "
             f"cache {t['cache_s']:.0f} + train {t['train_s']:.0f} + eval {t['eval_s']:.0f} + decode "
             f"{t['accept_s']:.0f}"]
    table = s["held_out"] or s["train_last"]
    if table:
        where = "held-out" if s["held_out"] else "last training window"
        lines.append(f"{where} accuracy ({table['count'][0]} targets for head 0):")
        lines.append("  head  predicts   top-1   top-5    loss")
        for k in range(hc["num_heads"]):
            lines.append(f"  {k:>4}  t+{k + 2:<7}  {table['top1'][k]:6.3f}  {table['top5'][k]:6.3f}  "
                         f"{table['loss'][k]:6.3f}")
    if s["acceptance"]:
        a = s["acceptance"]
        lines.append(f"greedy Medusa decoding of {a['prompts']} held-out prompts: {a['mean_accepted']:.2f} tokens per "
                     f"step ({a['new_tokens']} tokens, {a['tokens_per_s']:.1f} tokens/s)")
    lines.append(f"heads: {s['heads_dir']}   summary: {os.path.join(s['run_dir'], 'summary.json')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    if "--distributed" in (sys.argv[1:] if argv is None else argv):
        jax.distributed.initialize()  # before anything else touches JAX (resume reads checkpoints)
    args, meta = resolve_args(argv)
    summary = train(args, meta)
    if summary["stopped"] != "done":
        print(f"stopped at step {summary['step']} of {summary['total_steps']} ({summary['stopped']}); checkpoint in "
              f"{summary['run_dir']}/ckpt. Continue with: python -m train.stage1 --resume {summary['run_dir']}",
              file=sys.stderr)
        return 0 if summary["stopped"] == "stop_at" else 128 + int(signal.Signals[summary["stopped"]])
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    with cli_errors():
        sys.exit(main())
