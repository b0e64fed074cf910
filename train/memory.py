"""Compile-only memory proof: does a 7B model's training step fit 80 GB per device?

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.memory     # (the module sets it itself)
    python -m train.memory --layers 4          # a shallower 7B-wide model, to check how figures scale

Nothing is allocated: the parameters are `jax.eval_shape` structures of the vicuna_7b config, the step is
lowered and compiled for the real layout (`jit(...).lower(...).compile()`) on simulated CPU devices, and the
per-device figures come from the compiled executable's `memory_analysis()` (arguments, outputs, temporaries;
aliased = donated state reused for the outputs). Peak = arguments + outputs - aliased + temporaries.

  stage 2: float32 master base + heads and their AdamW moments, sharded over 8 devices (fsdp=8), the frozen
    original base in bfloat16 (the KL teacher, also sharded), bfloat16 compute, the layers as a scan that gathers
    one layer's weights at a time (`train.layerwise`) and rematerialises it, batch 1 row of 2048 tokens per
    device, the teacher forward inside the step.
  stage 1: one device, the frozen base in bfloat16, float32 heads and their AdamW moments, the base forward
    inside the step (no host cache), batch 4 rows of 2048 tokens.
CPU compilation is only a proxy for a GPU's (fusion and scheduling differ), so treat the figures as estimates.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the 8 simulated devices are CPU devices, also beside a GPU

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from medusa_jax import config as C  # noqa: E402
from medusa_jax import model  # noqa: E402
from medusa_jax.bundle import Bundle  # noqa: E402
from medusa_jax.config import HeadsConfig  # noqa: E402
from medusa_jax.errors import MedusaError, cli_errors  # noqa: E402
from train import joint, loop  # noqa: E402
from train.parallel import DataParallel, Sharded  # noqa: E402

GB = 1e9


def abstract_batch(rows: int, seq_len: int) -> dict:
    i32 = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    return {"tokens": i32, "loss_mask": jax.ShapeDtypeStruct((rows, seq_len), jnp.bool_), "segment_ids": i32,
            "positions": i32}


def abstract_models(config, hc: HeadsConfig, dtype) -> tuple[Any, Any]:
    """(base params, head params) as ShapeDtypeStructs in `dtype`."""
    base = jax.eval_shape(lambda: model.init_base(config, jax.random.PRNGKey(0), dtype))
    heads = jax.eval_shape(lambda b: model.init_heads(hc, config, b), base)
    return base, heads


def figures(compiled) -> dict:
    """Per-device bytes from the compiled executable (GB)."""
    m = compiled.memory_analysis()
    args, out, alias, temp = (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                              m.temp_size_in_bytes)
    return {"arguments": args / GB, "outputs": out / GB, "aliased": alias / GB, "temporaries": temp / GB,
            "peak": (args + out - alias + temp) / GB}


def stage2_step(config, hc: HeadsConfig, devices: int, rows_per_device: int, seq_len: int, remat: bool,
                chunk: int, layerwise: bool = True) -> dict:
    sh = Sharded.create(devices, fsdp=devices)
    base, heads = abstract_models(config, hc, jnp.float32)
    teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base)
    optimizer, _ = joint.make_joint_optimizer(loop.OptimConfig(lr=1e-5, total_steps=1000), 4e-5)
    state = jax.eval_shape(lambda p: loop.TrainState.create(p, optimizer, 0), {"base": base, "heads": heads})
    lcfg = joint.JointLossConfig(chunk=chunk, remat=remat)

    def loss_fn(params, frozen, batch, rng, axis_name, step=0):
        return joint.joint_loss(lcfg, config, hc, params, frozen, batch, step, jnp.bfloat16,
                                sharded=sh, layerwise_fsdp=layerwise)

    step = sh.compile_step(loop.make_train_step(loss_fn, optimizer, with_step=True), state, teacher)
    t0 = time.monotonic()
    compiled = step.lower(state, teacher, abstract_batch(rows_per_device * sh.batch_ways, seq_len)).compile()
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return {**figures(compiled), "compile_s": time.monotonic() - t0, "params": params,
            "state_gb_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / GB}


def stage1_step(config, hc: HeadsConfig, rows: int, seq_len: int, chunk: int) -> dict:
    from train import stage1

    dp = DataParallel.create("mesh", 1)
    base, heads = abstract_models(config, hc, jnp.bfloat16)
    heads = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), heads)
    optimizer, _ = loop.make_optimizer(loop.OptimConfig(lr=1e-3, total_steps=1000))
    state = jax.eval_shape(lambda p: loop.TrainState.create(p, optimizer, 0), heads)
    args = argparse.Namespace(**{**stage1.DEFAULTS, "chunk": chunk})  # the CLI defaults (loss weights, targets)
    train_step, _, _ = stage1.build_functions(Bundle(base=base, config=config), hc, args, dp, optimizer)
    t0 = time.monotonic()
    compiled = train_step.lower(state, base, abstract_batch(rows, seq_len)).compile()
    return {**figures(compiled), "compile_s": time.monotonic() - t0,
            "params": sum(x.size for x in jax.tree.leaves(base)) + sum(x.size for x in jax.tree.leaves(heads))}


def table(rows: list[tuple[str, dict]]) -> str:
    head = ("| run | per-device peak GB | arguments | outputs | aliased | temporaries | compile s |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {name} | {f['peak']:.1f} | {f['arguments']:.1f} | {f['outputs']:.1f} | "
                      f"{f['aliased']:.1f} | {f['temporaries']:.1f} | {f['compile_s']:.0f} |" for name, f in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vicuna_7b", help="config preset (default vicuna_7b)")
    p.add_argument("--layers", type=int, help="override the number of decoder layers (scaling checks)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--num-heads", type=int, default=4, help="Medusa heads (default 4)")
    p.add_argument("--projection", choices=("shared", "own"), default="shared", help="heads' vocabulary "
                   "projection (default shared)")
    p.add_argument("--devices", type=int, default=8, help="stage-2 devices, all on the fsdp axis (default 8)")
    p.add_argument("--rows-per-device", type=int, default=1, help="stage-2 rows per device (default 1)")
    p.add_argument("--stage1-rows", type=int, default=4, help="stage-1 rows on its one device (default 4)")
    p.add_argument("--no-remat", dest="remat", action="store_false", help="keep all layer activations")
    p.add_argument("--unrolled", dest="layerwise", action="store_false", help="stage 2 through the unrolled "
                   "model.forward instead of the layer scan of train.layerwise")
    p.add_argument("--chunk", type=int, default=256, help="sequence chunk of the vocabulary losses")
    p.add_argument("--only", choices=("stage1", "stage2"), help="measure one stage only")
    args = p.parse_args(argv)
    if jax.device_count() < args.devices:
        raise MedusaError(f"{jax.device_count()} device(s) visible, {args.devices} needed; run with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={args.devices} set before Python starts")
    config = C.preset(args.model)
    if args.layers:
        config = dataclasses.replace(config, num_layers=args.layers)
    hc = HeadsConfig(num_heads=args.num_heads, projection=args.projection)
    name = f"{config.name} ({config.num_layers} layers), {hc.num_heads} heads {hc.projection}, seq {args.seq_len}"
    rows = []
    if args.only in (None, "stage2"):
        f = stage2_step(config, hc, args.devices, args.rows_per_device, args.seq_len, args.remat, args.chunk,
                        args.layerwise)
        print(f"stage 2: {f['params'] / 1e9:.2f} B trained parameters; state (f32 params + AdamW moments) "
              f"{f['state_gb_total']:.1f} GB in all", file=sys.stderr)
        rows.append((f"stage 2, {args.devices} devices fsdp, {args.rows_per_device} row/device, "
                     f"remat {'on' if args.remat else 'off'}, {'layer scan' if args.layerwise else 'unrolled'}", f))
    if args.only in (None, "stage1"):
        rows.append((f"stage 1, 1 device, bf16 frozen base, {args.stage1_rows} rows",
                     stage1_step(config, hc, args.stage1_rows, args.seq_len, args.chunk)))
    print(f"{name}; {jax.default_backend()} compile, jax {jax.__version__}")
    print(table(rows))
    fits = all(f["peak"] < 80 for _, f in rows)
    print(f"fits 80 GB per device: {'yes' if fits else 'NO'}")
    return 0


if __name__ == "__main__":
    with cli_errors():
        sys.exit(main())
