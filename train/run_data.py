"""A training run's data: the base model, the train / held-out rows, and held-out prompts (both stages).

Without `--data` the run self-distils a small chat set (`train.distill`: the base answers questions it wrote
itself) into `<out>/distilled.jsonl`; `--model tiny` has no tokenizer and uses `train.synthetic`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from medusa_jax.errors import MedusaError
from train import distill as DI
from train.synthetic import synthetic_dataset


def load_bundle(args):
    """The base model (`medusa_jax.load` without heads; `tiny` is a random model with seed 0, no tokenizer)."""
    import medusa_jax

    return medusa_jax.load(args.model, heads=False, dtype=args.dtype)


def prompt_ids(bundle, ds, conversations, n: int) -> list[list[int]]:
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


def prepare_data(args, bundle, run_dir: str, num_prompts: int):
    """(train TokenDataset, held-out TokenDataset or None, up to `num_prompts` held-out prompt ids, data info).

    Sets `args.data` to the distilled file when it distils, so that a resumed run reads the same file.
    """
    from train import data as D

    if bundle.tokenizer is None:
        if args.data:
            raise MedusaError("--model tiny has no tokenizer, so it cannot read --data; drop --data (tiny trains on "
                              "synthetic data) or give a real --model")
        rows = max(4 * args.batch_size, 64)
        train = synthetic_dataset(bundle.config.vocab_size, rows, args.seq_len, args.seed)
        held = synthetic_dataset(bundle.config.vocab_size, max(args.batch_size, 8), args.seq_len, args.seed + 1)
        return train, held, prompt_ids(bundle, held, None, num_prompts), {"source": "synthetic"}
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
        args.data = path
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
    return train, held, prompt_ids(bundle, None, held_convs, num_prompts) if k else [], info


def data_summary(info: dict, train_ds, held_ds) -> dict:
    """The summary's "data" entry."""
    return {**info, "train_rows": len(train_ds), "train_tokens": train_ds.report.tokens,
            "train_supervised": train_ds.report.supervised_tokens, "held_rows": len(held_ds) if held_ds else 0}
