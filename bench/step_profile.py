"""Where one decoding step's time goes: XLA's own per-operation timings of the real step, grouped by kind.

    python bench/step_profile.py                                  # plain decoding, SmolLM2 shape, 512 cached tokens
    python bench/step_profile.py --nodes 4 --prompt-len 1536      # a 4-node tree step over a longer cache

Runs `infer.decode.step` (greedy, or sampling with `--temperature`/`--top-p`; batch `--batch`; random weights of
the `--config` shape) as `bench/gpu_7b.py` times it, inside a `lax.fori_loop` of `--decode-steps` steps, then
profiles a few more runs with `jax.profiler` and XLA's per-thunk trace events (`--xla_cpu_enable_xprof_traceme`).
Operations are grouped by their HLO name without the numeric suffix (`dot` for the weight matmuls, `ynn_fusion` or
`dot_general` for the attention products on CPU, `copy_dot_fusion` for a one-row output projection, ...). The table
gives milliseconds per step, calls per step and microseconds per call. Profiling adds a little time per operation,
so the table's total exceeds the unprofiled step time printed above it.
"""

from __future__ import annotations

import os
import sys

# A CPU profile (its trace events name HLO instructions; a GPU's name kernels), also on a machine with a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA reads its flags once, at backend start: the per-operation trace events must be on before jax starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from typing import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import gpu_7b  # noqa: E402
from infer.state import FUSED_HEAD_ROWS  # noqa: E402
from medusa_jax import config as C  # noqa: E402
from medusa_jax.config import HeadsConfig  # noqa: E402
from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402


# Control-flow ops (by HLO opcode) whose events enclose the events of the ops they run: counting them would count
# time twice. Their names vary (`while.3`, `cond.13.clone` for a `lax.switch`), so they are found by opcode.
# `(?<![\w-])` keeps `custom-call(` (a real op: oneDNN matmuls, TopK) out of the `call(` match.
_CONTAINER_OP = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = .*?(?<![\w-])(?:while|conditional|call)\(", re.M)


def hlo_ops(hlo_text: str) -> tuple[set[str], set[str]]:
    """(every instruction name, the names of control-flow instructions) in compiled HLO text."""
    names = set(re.findall(r"^\s*(?:ROOT )?%?([\w.-]+) = ", hlo_text, re.M))
    return names, set(_CONTAINER_OP.findall(hlo_text))


def op_kind(name: str) -> str:
    """An HLO instruction's kind: its name less the `.N` / `.clone` suffixes XLA adds to copies (`dot.3.clone.1`)."""
    return re.sub(r"(\.\d+|\.clone)+$", "", name)


def op_times(trace_dir: str, op_names: set[str], containers: set[str] = frozenset()
             ) -> tuple[collections.Counter, collections.Counter]:
    """Total nanoseconds and calls per op kind (HLO name without its `.N` and `.clone` suffixes) over the trace in
    `trace_dir`;
    the instructions in `containers` are left out."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise MedusaError(f"jax.profiler wrote no trace under {trace_dir}; check that the profiler works here")
    data = jax.profiler.ProfileData.from_file(files[-1])
    ns, calls = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in op_names and ev.name not in containers:
                    kind = op_kind(ev.name)
                    ns[kind] += ev.duration_ns
                    calls[kind] += 1
    return ns, calls


def profile(args) -> dict:
    cfg = C.preset(args.config)
    hc = HeadsConfig(num_heads=5, projection="shared")
    base, heads = gpu_7b.random_model(cfg, hc, jnp.dtype(args.dtype))
    paths = gpu_7b.tree_paths(args.nodes, hc.num_heads) if args.nodes > 1 else []
    run, run_args, info = gpu_7b.step_runner(args, cfg, hc, base, heads, paths)
    op_names, containers = hlo_ops(run.lower(*run_args).compile().as_text())
    jax.block_until_ready(run(*run_args))  # compile
    step_ms = 1e3 * gpu_7b._best_time(lambda: run(*run_args), args.repeats) / args.decode_steps
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(args.profile_runs):
            jax.block_until_ready(run(*run_args))
        jax.profiler.stop_trace()
        ns, calls = op_times(trace_dir, op_names, containers)
    steps = args.profile_runs * args.decode_steps
    rows = [{"op": k, "ms_per_step": v / 1e6 / steps, "calls_per_step": calls[k] / steps,
             "us_per_call": v / 1e3 / calls[k]} for k, v in ns.most_common()]
    return {**info, "config": cfg.name, "step_ms": step_ms, "ops": rows,
            "profiled_ms_per_step": sum(r["ms_per_step"] for r in rows)}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/step_profile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2_135m", help="model shape preset (default smollm2_135m)")
    p.add_argument("--dtype", default="float32", help="weight dtype (default float32)")
    p.add_argument("--nodes", type=int, default=1, help="tree nodes; 1 = plain decoding (default 1)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus for sampling (default 1.0: no nucleus)")
    p.add_argument("--prompt-len", type=int, default=512, help="tokens in the cache (default 512)")
    p.add_argument("--capacity", type=int, default=128, help="output capacity the cache is sized for (default 128)")
    p.add_argument("--decode-steps", type=int, default=20, help="steps per timed run (default 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs, best reported (default 5)")
    p.add_argument("--profile-runs", type=int, default=3, help="profiled runs (default 3)")
    p.add_argument("--full-window", action="store_true",
                   help="attend over every cache slot instead of the live window (DecodeSpec.live_window=False)")
    p.add_argument("--xla-products", action="store_true",
                   help="XLA's own products instead of the packed-panel CPU kernel (medusa_jax.panels)")
    p.add_argument("--fused-head-rows", type=int, default=FUSED_HEAD_ROWS,
                   help="most rows for one pass over the output projection for base and head logits "
                        f"(DecodeSpec.fused_head_rows, default {FUSED_HEAD_ROWS}; 0: two passes)")
    p.add_argument("--top", type=int, default=12, help="op kinds listed (default 12)")
    args = p.parse_args(argv)
    with cli_errors():
        if min(args.nodes, args.batch, args.prompt_len, args.decode_steps, args.profile_runs) < 1:
            raise MedusaError("--nodes, --batch, --prompt-len, --decode-steps and --profile-runs must be positive")
        if not (args.temperature >= 0 and 0 < args.top_p <= 1):
            raise MedusaError(f"--temperature {args.temperature} must be >= 0 and --top-p {args.top_p} in (0, 1]")
        res = profile(args)
    sampling = f"T={args.temperature:g} top-p {args.top_p:g}" if args.temperature > 0 else "greedy"
    print(f"{res['config']}, {args.dtype}, batch {args.batch}, {sampling}, {res['nodes']} node(s), {args.prompt_len} tokens cached, "
          f"{res['cache_len']} cache slots ({'live window' if res['live_window'] else 'full window'}): step {res['step_ms']:.2f} ms (best of {args.repeats}, unprofiled); "
          f"{jax.devices()[0].device_kind}")
    print("| op kind | ms per step | calls per step | us per call |")
    print("|---|---|---|---|")
    for r in res["ops"][:args.top]:
        print(f"| {r['op']} | {r['ms_per_step']:.2f} | {r['calls_per_step']:.0f} | {r['us_per_call']:.1f} |")
    rest = res["ops"][args.top:]
    if rest:
        print(f"| (other {len(rest)} kinds) | {sum(r['ms_per_step'] for r in rest):.2f} | "
              f"{sum(r['calls_per_step'] for r in rest):.0f} | |")
    print(f"| total (profiled) | {res['profiled_ms_per_step']:.2f} | "
          f"{sum(r['calls_per_step'] for r in res['ops']):.0f} | |")
    return res


if __name__ == "__main__":
    main()
