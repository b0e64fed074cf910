"""Data parallelism: one device, a jit-over-mesh run and a pmap run on 8 simulated CPU devices train the same heads.

XLA_FLAGS must be set before JAX starts, so the comparison runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train.parallel import DataParallel, logical_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from train import stage1

    assert jax.device_count() == 8, jax.devices()
    out = sys.argv[1]
    common = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "4", "--lr", "0.01",
              "--projection", "own", "--num-heads", "2", "--accept-prompts", "0", "--no-progress", "--holdout", "0",
              "--log-every", "1"]
    runs = {"single": ["--devices", "1"], "mesh": ["--parallel", "mesh"], "pmap": ["--parallel", "pmap"],
            "mesh_no_cache": ["--parallel", "mesh", "--cache-gb", "0"]}
    params, held = {}, {}
    for name, extra in runs.items():
        args, meta = stage1.resolve_args(common + extra + ["--out", f"{out}/{name}"])
        s = stage1.train(args, meta)
        params[name] = s["params"]
        records = [json.loads(x) for x in open(f"{out}/{name}/metrics.jsonl")]
        # Held-out top-1 per head, then per step the loss and the global gradient norm (Adam is invariant to a
        # gradient scale, so the norm is what catches a wrongly averaged gradient).
        held[name] = s["held_out"]["top1"] + [r[k] for r in records for k in ("loss", "grad_norm")]
    ref = params["single"]
    diffs = {name: max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                       for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(p))) for name, p in params.items()}
    moved = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(
        {k: v for k, v in ref.items() if k != "proj"}))
    print("RESULT " + json.dumps({"diffs": diffs, "moved": moved, "held": held}))
""")


def test_single_mesh_and_pmap_train_the_same_heads(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["moved"] > 1e-3  # the residual blocks start at zero: training moved them
    # Sums run in another order on 8 devices, so gradients differ by float rounding. Adam divides by
    # sqrt(v) + eps, which magnifies that for gradients near eps (e.g. vocabulary rows of the own projection that
    # no target touches): up to a small fraction of one lr-sized step (lr 0.01 here).
    for name, diff in result["diffs"].items():
        assert diff < 2e-4, result
    for name, metrics in result["held"].items():
        np.testing.assert_allclose(metrics, result["held"]["single"], rtol=1e-5, err_msg=name)


def test_batch_size_must_divide_over_devices():
    dp = DataParallel.create("mesh")
    dp.check_batch_size(dp.num_devices * 3)
    if dp.num_devices > 1:
        with pytest.raises(ValueError, match="multiple"):
            dp.check_batch_size(dp.num_devices + 1)
    with pytest.raises(ValueError, match="--parallel"):
        DataParallel.create("fsdp")
    with pytest.raises(ValueError, match="--devices"):
        DataParallel.create("mesh", num_devices=dp.num_devices + 1)


def test_logical_rules_shard_only_the_batch():
    assert tuple(logical_spec("batch", "seq", "embed")) == ("data", None, None)
    assert tuple(logical_spec("vocab")) == (None,)
