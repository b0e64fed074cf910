"""What the first call of a new shape costs: tracing + lowering and XLA compilation of one generation executable.

    python bench/compile_time.py                                     # embedded model; prompts 60 and 300; ar, greedy
    python bench/compile_time.py --model tiny --lengths 20 --modes ar   # seconds (a smoke test)

For each prompt length and mode, lowers and compiles the executable `generate_ids(..., max_new_tokens=256)` would
run (`infer.plan.make_plan`, `infer.decode.generate_jit`), with the persistent compilation cache off so that
every figure is a real compilation. Each executable is new to the process; the first row also pays JAX's
one-off start-up costs. A chat compiles one executable per prompt bucket and mode it meets.
"""

from __future__ import annotations

import argparse
import os
import sys
import platform
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from bench import int_list  # noqa: E402
from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/compile_time.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory/file, or 'tiny' (default: the embedded model)")
    p.add_argument("--lengths", default="60,300", help="prompt lengths in tokens (default 60,300)")
    p.add_argument("--modes", default="ar,greedy", help="decoding modes (default ar,greedy)")
    p.add_argument("--tree", default=None, help="tree of the Medusa modes (default infer.plan.DEFAULT_TREE, 9 "
                   "nodes; the shipped heads' tuned tree may be the root alone, i.e. the ar executable)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="output budget the executable is sized for")
    args = p.parse_args(argv)
    with cli_errors():
        return _run(args, int_list(args.lengths, "--lengths", 1), [m.strip() for m in args.modes.split(",") if m.strip()])


def _run(args, lengths: list[int], modes: list[str]) -> list[dict]:
    os.environ["MEDUSA_JAX_COMPILE_CACHE"] = "off"  # every figure a real compilation, before anything compiles
    import jax

    from infer import decode
    from infer.bench_setup import load_model
    from infer.plan import DEFAULT_TREE, make_plan
    from medusa_jax import model
    from medusa_jax.tree import tree_option

    bundle = load_model(args.model, None)
    if jax.config.jax_compilation_cache_dir:
        raise MedusaError("a JAX compilation cache is configured (JAX_COMPILATION_CACHE_DIR); unset it so that "
                          "every figure is a real compilation")
    tree = tree_option(args.tree) if args.tree else None
    if tree is None and bundle.heads_config is not None:
        tree = [list(p) for p in DEFAULT_TREE if len(p) <= bundle.heads_config.num_heads]
    print(f"{bundle.config.name}; jax {jax.__version__} {jax.default_backend()}; {platform.machine()}")
    print("| prompt tokens | mode | tree nodes | cache slots | trace + lower (s) | XLA compile (s) |\n"
          "|---|---|---|---|---|---|")
    rows = []
    for n in lengths:
        for mode in modes:
            plan = make_plan(bundle, [[5] * n], args.max_new_tokens, 0.0, 1.0, mode, None if mode == "ar" else tree,
                             None, None, 0.09, 0.3, None)
            cache = model.init_cache(bundle.config, 1, plan.spec.cache_len, bundle.dtype)
            call = plan.args(bundle, cache, plan.max_new, 0, 0.0, 1.0, 0)
            t0 = time.perf_counter()
            lowered = decode.generate_jit.lower(plan.spec, *call)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            row = {"tokens": n, "mode": mode, "nodes": plan.spec.tree.num_nodes, "slots": plan.spec.cache_len,
                   "lower_s": t1 - t0, "compile_s": t2 - t1}
            rows.append(row)
            print(f"| {n} | {mode} | {row['nodes']} | {row['slots']} | {row['lower_s']:.2f} | "
                  f"{row['compile_s']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
