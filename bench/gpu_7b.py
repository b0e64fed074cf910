"""Vicuna-7B-shape speed on one accelerator (random weights): the bandwidth floor, our decoding steps, the
transformers peer and the stage-1 train step.

  PYTHONUNBUFFERED=1 python bench/gpu_7b.py --out $OUT     # on the GPU machine (bf16, 512 cached tokens), ~6-9 min
  python bench/gpu_7b.py --sections decode,hf --out $OUT    # a part only (each compile of the 7B costs ~0.5 min)
  python bench/gpu_7b.py --config tiny --dtype float32 --hf-cpu ...   # seconds on CPU: the tests' smoke run

Sections (`--sections`, each runs in its own try/except; a failure is printed and recorded, the rest go on):
  bandwidth  a big on-device elementwise copy (read + write) and a reduction (read), best of 5 each; the
             weight-streaming floor of one batch-1 step = base weight bytes / the best bandwidth measured.
  decode     our real decoding step (`infer.decode.step`, greedy) timed inside a `lax.fori_loop` of `--decode-steps`
             steps, as `generate` runs it in its while_loop: plain decoding (1 node), then trees of `--nodes` nodes
             grown by `medusa_jax.tree.grow_tree` from a typical head-accuracy profile. Batch 1, `--prompt-len`
             tokens cached, cache slots sized as `infer.api` sizes them, attention over the live window
             (`--full-window`: over every slot, as before 7f90798).
  hf         transformers `LlamaForCausalLM` (random init, bf16, CUDA) greedy `generate` of `--hf-tokens` tokens
             after the same prompt length; its per-token time excludes the prefill (difference with a 1-token run).
  train      the stage-1 train step (`train.stage1.build_functions`: frozen base forward, 4 heads with the shared
             projection, AdamW) at sequence length `--seq-len`, batch 1, 2, 4, ... (or `--batches`) until out
             of memory, `--max-batch` or `--train-budget-s`; tokens/s and model FLOPs utilisation (MFU).

MFU (see bench/gpu_train.py) counts matmul FLOPs of the base forward and of the heads forward and backward over
the chip's bf16 dense peak: H100 SXM / H200 989 TFLOP/s (H100 PCIe 756, A100 312), or `--peak-tflops`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the transformers section shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from infer import decode  # noqa: E402
from infer.bench_report import machine_info  # noqa: E402
from bench.gpu_train import bench_train  # noqa: E402
from infer.state import FUSED_HEAD_ROWS, DecodeSpec  # noqa: E402
from medusa_jax import config as C, model, panels  # noqa: E402
from medusa_jax.config import HeadsConfig, LlamaConfig  # noqa: E402
from medusa_jax.tree import build_tree, grow_tree  # noqa: E402

SECTIONS = ("bandwidth", "decode", "hf", "train")
# A typical Medusa-1 head-accuracy profile (top-1 per head, geometric decay over ranks) to grow trees from.
TOP1 = (0.60, 0.42, 0.32, 0.26, 0.22)
RANK_DECAY = 0.35


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls (each blocked until ready), after one warm-up call."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def random_like(shapes: Any, key: jax.Array, dtype: Any, scale: float = 0.02) -> Any:
    """Random parameters for a tree of ShapeDtypeStructs: N(0, scale) in `dtype`, norm scales 1. Leaf by leaf
    on device, so a 7B model never exists in float32."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(flat))

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def normal(k, shape, dt):
        return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dt)

    leaves = []
    for (path, leaf), k in zip(flat, keys):
        if "norm" in jax.tree_util.keystr(path):
            leaves.append(jnp.ones(leaf.shape, dtype))
        else:
            leaves.append(normal(k, tuple(leaf.shape), jnp.dtype(dtype)))
    return jax.tree.unflatten(treedef, leaves)


def random_model(cfg: LlamaConfig, hc: HeadsConfig, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    k_base, k_heads = jax.random.split(jax.random.PRNGKey(seed))
    base_shapes = jax.eval_shape(lambda k: model.init_base(cfg, k, dtype), k_base)
    base = random_like(base_shapes, k_base, dtype)
    head_shapes = jax.eval_shape(lambda b: model.init_heads(hc, cfg, b), base_shapes)
    return base, random_like(head_shapes, k_heads, dtype, scale=0.002)


def nbytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------------ sections


def bench_bandwidth(args, cfg, base, heads, out: dict) -> None:
    n = args.bw_mib * 2 ** 20 // 2  # bf16 elements
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    reduce = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    t_copy = _best_time(lambda: copy(x), 5)
    t_reduce = _best_time(lambda: reduce(x), 5)
    bw = {"copy": 2 * x.nbytes / t_copy, "reduce": x.nbytes / t_reduce}
    best = max(bw.values())
    w = nbytes(base)
    out.update(bandwidth_bytes=x.nbytes, bandwidth_copy_Bps=bw["copy"], bandwidth_reduce_Bps=bw["reduce"],
               bandwidth_Bps=best, weight_bytes=w, floor_ms=1e3 * w / best, floor_tokens_per_s=best / w)


def tree_paths(num_nodes: int, num_heads: int) -> list[tuple[int, ...]]:
    """A grown tree of `num_nodes` nodes (root included) from the `TOP1` profile cut to `num_heads` heads."""
    acc = np.array([[p * RANK_DECAY ** r for r in range(10)] for p in TOP1[:num_heads]])
    return [tuple(p) for p in grow_tree(acc, num_nodes - 1)]


def step_runner(args, cfg, hc, base, heads, paths: list):
    """The real decoding step (`infer.decode.step`, greedy unless `args.temperature`) with tree `paths` (empty:
    plain decoding), batch `args.batch` (default 1), `args.prompt_len` tokens cached, `args.decode_steps` steps in
    one jitted `lax.fori_loop`.

    Returns (run, run_args, info): `run(*run_args)` runs the steps and returns the whole loop state (so no part
    of the step is dead code); info has the tree's nodes, depth and the cache slots.
    """
    tree = build_tree(paths, num_heads=hc.num_heads, topk=max(max(p) for p in paths) + 1) if paths else \
        build_tree([], num_heads=0, topk=1)
    capacity, b = args.capacity, getattr(args, "batch", 1)
    temperature, top_p = getattr(args, "temperature", 0.0), getattr(args, "top_p", 1.0)  # step_profile's options
    cache_len = -(-(args.prompt_len + capacity + tree.num_nodes) // 128) * 128  # as infer.api sizes it
    spec = DecodeSpec(config=cfg, heads_config=hc if tree.max_depth else None, tree=tree,
                      rule="sample" if temperature > 0 else "greedy", use_top_p=top_p < 1, capacity=capacity,
                      cache_len=cache_len, stop_ids=(), live_window=not getattr(args, "full_window", False),
                      fused_head_rows=getattr(args, "fused_head_rows", FUSED_HEAD_ROWS))
    use_heads = heads if tree.max_depth else None
    if not getattr(args, "xla_products", False):  # as infer.api runs it: the CPU kernel's panels where they apply
        base = panels.for_decoding(cfg, base)
    scalars = (jnp.int32(capacity), jnp.float32(temperature), jnp.float32(top_p))
    # The loop carry as the prefill would leave it (shapes from eval_shape, so nothing is compiled for the prefill);
    # cache contents do not change the cost of a step.
    prompt = jax.ShapeDtypeStruct((b, args.prompt_len), jnp.int32)
    cache = jax.eval_shape(lambda: model.init_cache(cfg, b, cache_len, base_dtype(base)))
    shapes = jax.eval_shape(functools.partial(decode.prefill, spec), base, use_heads, prompt,
                            jax.ShapeDtypeStruct((b,), jnp.int32), cache,
                            *scalars, jax.random.PRNGKey(0))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state = state.replace(length=jnp.full((b,), args.prompt_len, jnp.int32), rng=jax.random.PRNGKey(0))
    n = args.decode_steps

    @jax.jit
    def run(base, heads, st):
        return jax.lax.fori_loop(0, n, lambda i, s: decode.step(spec, base, heads, s, *scalars), st)

    info = {"nodes": tree.num_nodes, "depth": tree.max_depth, "cache_len": cache_len,
            "live_window": spec.live_window, "batch": int(state.length.shape[0])}
    return run, (base, use_heads, state), info


def step_time(args, cfg, hc, base, heads, paths: list) -> dict:
    """Seconds per real decoding step with tree `paths` (empty: plain decoding), batch 1, `prompt_len` cached."""
    run, run_args, info = step_runner(args, cfg, hc, base, heads, paths)
    t0 = time.perf_counter()
    jax.block_until_ready(run(*run_args))
    compile_s = time.perf_counter() - t0
    best = _best_time(lambda: run(*run_args), args.repeats)
    return {**info, "step_ms": 1e3 * best / args.decode_steps, "compile_s": round(compile_s, 1),
            "paths": [list(p) for p in paths]}


def base_dtype(base: Any):
    return jax.tree.leaves(base)[0].dtype


def bench_decode(args, cfg, base, heads, out: dict) -> None:
    hc = HeadsConfig(num_heads=heads["res_0_kernel"].shape[0], projection="shared")
    ar = step_time(args, cfg, hc, base, heads, [])
    out["ar"] = ar
    out["ar_tokens_per_s"] = 1e3 / ar["step_ms"]
    if "floor_ms" in out:
        out["ar_vs_floor"] = ar["step_ms"] / out["floor_ms"]
    out["trees"] = []
    for nodes in args.nodes:
        try:
            r = step_time(args, cfg, hc, base, heads, tree_paths(nodes, hc.num_heads))
            r["vs_ar"] = r["step_ms"] / ar["step_ms"]
            out["trees"].append(r)
            print(f"  tree {nodes} nodes: {r['step_ms']:.3f} ms ({r['vs_ar']:.3f}x ar)", flush=True)
        except Exception as e:  # one tree failing (memory) keeps the others
            out["trees"].append({"nodes": nodes, "error": f"{type(e).__name__}: {e}"[:500]})


def bench_hf(args, cfg: LlamaConfig, out: dict) -> None:
    import torch
    import transformers

    if args.hf_cpu:
        device, dtype = "cpu", torch.float32
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        out["skipped"] = "torch has no CUDA device (pass --hf-cpu to run it on the CPU)"
        return
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=max(cfg.max_position_embeddings, args.prompt_len + 256),
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=list(cfg.eos_token_ids))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in bf16 on the device: never a float32 7B copy
    try:
        with torch.device(device):
            net = transformers.LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, eos_token_id=None,
              pad_token_id=0, temperature=None, top_p=None, top_k=None)

    class Stamps:
        """A transformers streamer that records when each put reached the host: the prompt first, then every new
        token (generate moves each to the CPU, which waits for the device)."""

        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    def timed(new: int) -> tuple[float, float, float]:
        """Best of 2 generations of `new` tokens: (whole generate s, until the first new token s, s per later
        token). Per-token times come from timestamps inside one call, not from differences of two calls, which
        noise on a shared CPU can make negative."""
        runs = []
        for _ in range(2):
            stamps = Stamps()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = net.generate(ids, max_new_tokens=new, min_new_tokens=new, streamer=stamps, **kw)
            total = time.perf_counter() - t0
            assert res.shape[1] == ids.shape[1] + new and len(stamps.t) == new + 1
            runs.append((total, stamps.t[1] - t0, (stamps.t[-1] - stamps.t[1]) / (new - 1)))
        return min(runs, key=lambda r: r[2])

    timed(2)  # warm-up
    tn, t1, step = timed(args.hf_tokens)
    out.update(device=device, dtype=str(dtype), attn_implementation=getattr(hf_cfg, "_attn_implementation", None),
               tokens=args.hf_tokens, generate_s=tn, prefill_s=t1, step_ms=1e3 * step, tokens_per_s=1 / step,
               generate_tokens_per_s=args.hf_tokens / tn, torch=torch.__version__,
               transformers=transformers.__version__)
    del net
    if device == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ report


def markdown(res: dict) -> str:
    f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    bw, dec, hf, tr = (res.get(k, {}) for k in SECTIONS)
    m = res["machine"]
    lines = [f"## {res['config']} decoding and training speed: {m['device']} ({res['dtype']}, batch 1, "
             f"{res['prompt_len']} cached tokens)", "", "| measurement | value | target |", "|---|---|---|"]
    if "bandwidth_Bps" in bw:
        lines += [f"| device bandwidth (copy / reduction) | {bw['bandwidth_copy_Bps'] / 1e9:.1f} / "
                  f"{bw['bandwidth_reduce_Bps'] / 1e9:.1f} GB/s | |",
                  f"| weight-streaming floor ({bw['weight_bytes'] / 1e9:.2f} GB) | {bw['floor_ms']:.3f} ms "
                  f"({bw['floor_tokens_per_s']:.0f} tokens/s) | |"]
    if "ar" in dec:
        vs = f", {dec['ar_vs_floor']:.3f}x floor" if "ar_vs_floor" in dec else ""
        lines.append(f"| our autoregressive step | {dec['ar']['step_ms']:.3f} ms ({dec['ar_tokens_per_s']:.0f} "
                     f"tokens/s){vs} | <= 1.05x floor |")
        for t in dec.get("trees", []):
            target = "<= 1.10x ar" if t["nodes"] == 64 else ""
            value = t["error"][:80] if "error" in t else f"{t['step_ms']:.3f} ms ({t['vs_ar']:.3f}x ar)"
            lines.append(f"| our tree step, {t['nodes']} nodes | {value} | {target} |")
    if "tokens_per_s" in hf:
        ratio = dec.get("ar_tokens_per_s", 0) / hf["tokens_per_s"] if hf["tokens_per_s"] else None
        lines.append(f"| transformers generate ({hf['device']}) | {hf['step_ms']:.2f} ms ({hf['tokens_per_s']:.1f} "
                     f"tokens/s); ours {f(ratio, '.1f')}x | ours >= 14x |")
    elif hf.get("skipped"):
        lines.append(f"| transformers generate | skipped: {hf['skipped']} | |")
    for r in tr.get("batches", []):
        if "error" in r:
            lines.append(f"| stage-1 train step, batch {r['batch']} x {tr['seq_len']} | {r['error'][:80]} | |")
        else:
            pct = lambda x: f(None if x is None else 100 * x, ".1f")  # noqa: E731
            mfu = f", MFU {pct(r['mfu'])}% ({pct(r['mfu_with_attention'])}% with attention)"
            lines.append(f"| stage-1 train step, batch {r['batch']} x {tr['seq_len']} | {r['tokens_per_s']:.0f} "
                         f"tokens/s, {r['model_tflops_per_s']:.1f} TFLOP/s{mfu} | MFU >= 40% |")
    for name, err in res["errors"].items():
        lines.append(f"| {name} | error: {err.splitlines()[-1][:100]} | |")
    lines += ["", f"Machine: {m['cpu']} ({m['cpu_count']} cores), {m['device']}; jax {m['versions']['jax']}, "
              f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}; {m['date']}; "
              f"commit {m['git_commit']}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python bench/gpu_7b.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    a = p.add_argument
    a("--config", default="vicuna_7b", choices=sorted(C.PRESETS), help="model shape (default vicuna_7b)")
    a("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights (default bfloat16)")
    a("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    a("--bw-mib", type=int, default=4096, help="array size of the bandwidth probe in MiB (default 4096)")
    a("--prompt-len", type=int, default=512, help="cached tokens (default 512)")
    a("--capacity", type=int, default=256, help="output capacity the cache is sized for (default 256)")
    a("--full-window", action="store_true", help="decoding steps attend over every cache slot, not the live "
      "window (the baseline of that change; on a GPU it also shows what the per-layer lax.switch costs)")
    a("--xla-products", action="store_true", help="on a CPU, XLA's own products instead of the packed-panel kernel "
      "(medusa_jax.panels; the baseline of that change)")
    a("--fused-head-rows", type=int, default=FUSED_HEAD_ROWS, help="DecodeSpec.fused_head_rows: most rows for one "
      f"pass over the output projection for base and head logits (default {FUSED_HEAD_ROWS}; 0: two passes)")
    a("--nodes", default="16,32,64,128", help="tree sizes in nodes, root included (default 16,32,64,128)")
    a("--decode-steps", type=int, default=64, help="steps per timed decoding loop (default 64)")
    a("--repeats", type=int, default=5, help="timed repeats, the best counts (default 5)")
    a("--hf-tokens", type=int, default=64, help="tokens transformers generates (default 64)")
    a("--hf-cpu", action="store_true", help="run the transformers section on the CPU (float32), even where CUDA is available")
    a("--seq-len", type=int, default=2048, help="training sequence length (default 2048)")
    a("--max-batch", type=int, default=64, help="largest training batch tried (default 64)")
    a("--batches", default=None, help="training batch sizes to try in order, e.g. 4,8,16 (default 1, 2, 4, ... "
      "up to --max-batch); stops at the first that does not fit")
    a("--train-steps", type=int, default=5, help="timed train steps per batch size (default 5)")
    a("--train-budget-s", type=float, default=180.0, help="stop trying larger batches after this (default 180)")
    a("--chunk", type=int, default=256, help="sequence chunk of the fused head loss (default 256, as stage 1)")
    a("--peak-tflops", type=float, default=None, help="bf16 peak of the chip for MFU (default: by device name)")
    a("--out", default="runs/gpu_7b", help="folder for gpu_7b.json and gpu_7b.md (default runs/gpu_7b)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        args.nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()] if args.batches else None
    except ValueError:
        raise SystemExit("error: --nodes and --batches take comma-separated integers") from None
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown or not sections:
        raise SystemExit(f"error: unknown section(s) {sorted(unknown)}; use {','.join(SECTIONS)}")
    if args.hf_tokens < 2:
        raise SystemExit("error: --hf-tokens must be at least 2 (the step time is measured between new tokens)")
    cfg = C.preset(args.config)
    dtype = jnp.dtype(args.dtype)
    res: dict = {"config": cfg.name, "dtype": args.dtype, "prompt_len": args.prompt_len, "num_params": cfg.num_params,
                 "machine": machine_info(), "errors": {}, "args": vars(args)}
    print(f"{cfg.name} on {res['machine']['device']}: {cfg.num_params / 1e9:.2f} B parameters", flush=True)
    base = heads = None
    if {"bandwidth", "decode", "train"} & set(sections):
        try:
            t0 = time.perf_counter()
            base, heads = random_model(cfg, HeadsConfig(num_heads=5, projection="shared"), dtype)
            print(f"random weights in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # the transformers section needs none of it
            traceback.print_exc()
            res["errors"]["weights"] = f"{type(e).__name__}: {e}"[:2000]
            sections = [s for s in sections if s == "hf"] or sections
    for name in sections:
        out = res.setdefault(name, {})
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            if name == "bandwidth":
                bench_bandwidth(args, cfg, base, heads, out)
            elif name == "decode":
                out.update({k: res["bandwidth"][k] for k in ("floor_ms",) if k in res.get("bandwidth", {})})
                bench_decode(args, cfg, base, heads, out)
            elif name == "hf":
                bench_hf(args, cfg, out)
            elif name == "train":
                heads = None  # only the frozen base stays on the device
                bench_train(args, cfg, base, out)
        except Exception as e:  # robust: report and go on with the next section
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
        out["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"  {name} done in {out['section_s']} s: " + json.dumps(
            {k: v for k, v in out.items() if isinstance(v, (int, float, str))}, default=str)[:600], flush=True)
        text = _write(res, Path(args.out))  # after every section: a run cut short keeps what it measured
    print(text)
    print(f"wrote {Path(args.out) / 'gpu_7b.json'} and {Path(args.out) / 'gpu_7b.md'}")
    return res


def _write(res: dict, dest: Path) -> str:
    text = markdown(res)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gpu_7b.md").write_text(text + "\n")
    (dest / "gpu_7b.json").write_text(json.dumps(res, indent=1, default=str))
    return text


if __name__ == "__main__":
    main()
