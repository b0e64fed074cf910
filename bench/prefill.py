"""What a prefill costs: one prompt through the model up to its first generated token, by prompt length.

    python bench/prefill.py                                   # embedded model; chunks 0 and 128; vs transformers
    python bench/prefill.py --lengths 300,520 --chunks 0,64,128,256 --no-torch
    python bench/prefill.py --model tiny --lengths 20,40 --chunks 0,16 --no-torch   # seconds (a smoke test)

For each prompt length (random token ids) and each `prefill_chunk` (0: one forward over the whole power-of-two
prompt bucket; c: forwards of c tokens, only as many as the prompt needs), times `generate_ids(...,
max_new_tokens=1)` (prefill, first token, transfer) after a compiling call, and reports the best of `--repeats`
runs and the compile time of the first call. With torch installed it also times transformers' forward of the
same ids (`use_cache=True`, logits of the last position only), what `generate` does before its first token.
A chat's second turn carries the first turn and its answer, so prompts of several hundred tokens are common.
"""

from __future__ import annotations

import argparse
import os
import sys
import platform
import time
from typing import Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from bench import int_list  # noqa: E402
from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402


def _torch_ms(net, ids: list[int], repeats: int) -> float:
    import torch

    x = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        net(x, use_cache=True, logits_to_keep=1)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/prefill.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory/file, or 'tiny' (default: the embedded model)")
    p.add_argument("--lengths", default="100,200,300,520,700", help="prompt lengths in tokens")
    p.add_argument("--chunks", default="0,128", help="prefill_chunk values to compare (0 = one forward)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, best reported (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers column")
    args = p.parse_args(argv)
    with cli_errors():
        lengths = int_list(args.lengths, "--lengths", 1)
        chunks = int_list(args.chunks, "--chunks", 0)
        if args.repeats < 1:
            raise MedusaError(f"--repeats must be >= 1, got {args.repeats}")
        return _run(args, lengths, chunks)


def _run(args, lengths: list[int], chunks: list[int]) -> list[dict]:
    import jax

    from infer.api import generate_ids
    from infer.plan import bucket
    from infer.bench_setup import load_model

    bundle = load_model(args.model, None)
    net = None
    if not args.no_torch:
        from infer.bench_hf import load_torch_model

        net, how = load_torch_model(bundle)
        print(f"transformers: {how}")
    rng = np.random.default_rng(0)
    print(f"{bundle.config.name}, {bundle.dtype}; jax {jax.__version__} {jax.default_backend()}; "
          f"{platform.machine()} {platform.processor() or ''}; best of {args.repeats}, after a compiling call")
    head = " | ".join(f"prefill_chunk={c}" for c in chunks)
    print(f"| prompt tokens | bucket | {head} |" + (" transformers forward |" if net is not None else ""))
    print("|---|---|" + "---|" * (len(chunks) + (net is not None)))
    results = []
    for n in lengths:
        ids = rng.integers(100, bundle.config.vocab_size, n).tolist()
        row = {"tokens": n, "bucket": bucket(n), "ms": {}, "compile_s": {}, "first_token": {}}
        for c in chunks:
            first = generate_ids(bundle, ids, max_new_tokens=1, mode="ar", stop_ids=(), prefill_chunk=c,
                                 prefix_cache=False)
            walls = [generate_ids(bundle, ids, max_new_tokens=1, mode="ar", stop_ids=(), prefill_chunk=c,
                                  prefix_cache=False).wall_s for _ in range(args.repeats)]  # whole prompt each time
            row["ms"][c], row["compile_s"][c] = 1e3 * min(walls), first.compile_s
            row["first_token"][c] = first.tokens[0][0]
        cells = [f"{row['ms'][c]:.0f} ms (compile {row['compile_s'][c]:.1f} s)" for c in chunks]
        if net is not None:
            row["torch_ms"] = _torch_ms(net, ids, args.repeats)
            cells.append(f"{row['torch_ms']:.0f} ms")
        print(f"| {n} | {row['bucket']} | " + " | ".join(cells) + " |", flush=True)
        results.append(row)
    same = all(len(set(r["first_token"].values())) == 1 for r in results)
    print("first generated token equal across chunk sizes: " + ("yes" if same else "NO"))
    return results


if __name__ == "__main__":
    main()
