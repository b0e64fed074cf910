"""What a forward of M tokens costs in matmuls alone, for M = 1, 2, 4, ...: the bound on tree decoding on a CPU.

    python bench/cpu_matmul.py                       # SmolLM2-135M layer shapes, float32 and bfloat16, JAX and torch
    python bench/cpu_matmul.py --rows 1,2,4 --no-torch
    python bench/cpu_matmul.py --projections separate   # 7 matmuls per layer, as the model had before fusing

Medusa pays off when a forward of the N tree nodes costs little more than a forward of one token: batch-1
decoding streams every weight once per step whatever N is, so the extra rows should be nearly free. Whether they
are depends on the matmul kernels: this script times the decoder's matmuls alone (for each of the model's layers
its fused q/k/v, o, fused gate/up and down projections as `model.Llama` runs them, or with `--projections
separate` the seven unfused ones; distinct weights per layer so nothing stays in cache between layers), as one
jitted function in JAX and as a loop of `torch.nn.functional.linear` calls, for M input rows.
It prints milliseconds per forward and the ratio to the first M (with M = 1 first: the tree step's matmul cost
relative to plain decoding). The "jax panels" row is the packed-panel CPU kernel the decoder runs on a CPU
(`medusa_jax.panels`), float32 only.
"""

from __future__ import annotations

import argparse
import os
import sys
import platform
import time
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python bench/x.py`

from bench import int_list  # noqa: E402
from medusa_jax import config as configs  # noqa: E402
from medusa_jax.errors import cli_errors  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (compiles in JAX)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def layer_shapes(cfg: configs.LlamaConfig, fused: bool = True) -> list[tuple[int, int]]:
    """[in, out] of each weight matmul of one decoder layer: qkv, o, gate_up, down as the model runs them
    (`fused`), or q, k, v, o, gate, up, down."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if fused:
        return [(h, q + 2 * kv), (q, h), (h, 2 * i), (i, h)]
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def jax_times(shapes: list[tuple[int, int]], layers: int, rows: Sequence[int], dtype: str,
              repeats: int, packed: bool = False) -> dict[int, float]:
    """XLA's products, or (`packed`, float32) the packed-panel CPU kernel the decoder uses (`medusa_jax.panels`)."""
    import jax
    import jax.numpy as jnp

    from medusa_jax import panels

    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02, dtype) for s in shapes]
               for _ in range(layers)]
    if packed:
        weights = [[panels.pack(w) for w in layer] for layer in weights]
    product = (lambda x, w: panels.matmul(x, w)) if packed else \
        (lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))

    @jax.jit
    def forward(inputs, weights):  # every product is summed into the output, so none is dead code
        acc = jnp.float32(0)
        for layer in weights:
            for w in layer:
                acc = acc + product(inputs[w.shape[0]], w).sum()
        return acc

    out = {}
    for m in rows:
        inputs = {k: jnp.ones((m, k), dtype) for k in {s[0] for s in shapes}}
        out[m] = _median_ms(lambda: forward(inputs, weights).block_until_ready(), repeats)
    return out


def torch_times(shapes: list[tuple[int, int]], layers: int, rows: Sequence[int], dtype: str,
                repeats: int) -> dict[int, float]:
    import torch

    tdtype = getattr(torch, dtype)
    weights = [[(torch.randn(o, i) * 0.02).to(tdtype) for i, o in shapes] for _ in range(layers)]
    out = {}
    with torch.inference_mode():
        for m in rows:
            inputs = {k: torch.ones(m, k, dtype=tdtype) for k in {s[0] for s in shapes}}

            def forward():
                return sum(float(torch.nn.functional.linear(inputs[w.shape[1]], w).sum()) for layer in weights
                           for w in layer)

            out[m] = _median_ms(forward, repeats)
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python bench/cpu_matmul.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_135m", help="model shape preset (default smollm2_135m)")
    p.add_argument("--rows", default="1,2,4,8,16", help="numbers of input rows M (default 1,2,4,8,16)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes (default float32,bfloat16)")
    p.add_argument("--repeats", type=int, default=15, help="timed runs per point, median reported (default 15)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch rows")
    p.add_argument("--projections", choices=("fused", "separate"), default="fused",
                   help="fused q/k/v and gate/up matmuls as the model runs them (default), or all seven separate")
    args = p.parse_args(argv)
    with cli_errors():
        cfg = configs.preset(args.config)
        return _run(args, cfg, int_list(args.rows, "--rows", 1))


def _run(args, cfg, rows: list[int]) -> list[dict]:
    shapes = layer_shapes(cfg, args.projections == "fused")
    print(f"{cfg.name}: {cfg.num_layers} layers x {len(shapes)} {args.projections} projections "
          f"{', '.join(f'{i}x{o}' for i, o in shapes)}; {platform.machine()}, {platform.processor() or ''}")
    print("| library | dtype | " + " | ".join(f"M={m}" for m in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    results = []
    from medusa_jax import native

    libraries = [("jax", jax_times)]
    if native.available():
        libraries.append(("jax panels", lambda *a: jax_times(*a, packed=True)))
    else:
        print(f"(no panels row: {native.status()})")
    for lib, fn in libraries + ([] if args.no_torch else [("torch", torch_times)]):
        for dtype in args.dtypes.split(","):
            if lib == "jax panels" and dtype != "float32":
                continue
            t = fn(shapes, cfg.num_layers, rows, dtype, args.repeats)
            cells = [f"{t[m]:.1f} ms ({t[m] / t[rows[0]]:.2f}x)" for m in rows]
            print(f"| {lib} | {dtype} | " + " | ".join(cells) + " |", flush=True)
            results.append({"library": lib, "dtype": dtype, "ms": t})
    return results


if __name__ == "__main__":
    main()
