"""Stage-2 joint training on the tiny model: loss, KL teacher, learning-rate groups, resume, sharding, export."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medusa_jax
from medusa_jax import MedusaError, model
from medusa_jax.config import HeadsConfig
from train import joint, loop, losses, stage2
from train.checkpoint import Checkpoints
from train.synthetic import synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 2e-3
TINY = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--accept-prompts", "0", "--guard-prompts", "2",
        "--guard-tokens", "8", "--no-progress", "--base-loss", "kl", "--lr", str(LR), "--log-every", "2"]


def _train(argv):
    args, meta = stage2.resolve_args(argv)
    return stage2.train(args, meta)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2") / "full"
    return _train(TINY + ["--steps", "10", "--out", str(out)])


def _records(run_dir):
    lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def test_loss_decreases_and_the_guard_reports_drift(full_run):
    records = _records(full_run["run_dir"])
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    assert records[-1]["heads"]["loss"][0] < records[0]["heads"]["loss"][0]
    guard = full_run["quality_guard"]
    # Before training the current base is the original: KL 0 and full argmax agreement.
    assert abs(guard["before"]["kl"]) < 1e-6 and guard["before"]["agree"] == 1.0
    assert guard["after"]["kl"] > 1e-4  # the base was trained
    assert guard["before"]["answer_ppl"] > 1.0 and guard["after"]["answer_ppl"] > 1.0
    assert guard["exceeded"] == (guard["after"]["kl"] > guard["max_kl"])
    summary = json.load(open(os.path.join(full_run["run_dir"], "summary.json")))
    assert summary["base_loss"] == "kl" and summary["quality_guard"]["max_kl"] == 0.05


def test_kl_term_is_zero_when_current_equals_original():
    bundle = medusa_jax.load("tiny")
    hc = HeadsConfig(num_heads=2)
    heads = model.init_heads(hc, bundle.config, bundle.base)
    ds = synthetic_dataset(bundle.config.vocab_size, 4, 32, seed=0)
    batch = {k: jnp.asarray(getattr(ds, k)) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    params = {"base": bundle.base, "heads": heads}
    kl_cfg = joint.JointLossConfig(chunk=8, lambda0=0.0)
    ce_cfg = joint.JointLossConfig(chunk=8, lambda0=0.0, base_loss="ce")

    @jax.jit
    def both(p):
        f = lambda cfg, p: joint.joint_loss(cfg, bundle.config, hc, p, bundle.base, batch, 0, jnp.float32)
        return jax.value_and_grad(f, argnums=1, has_aux=True)(kl_cfg, p), jax.grad(
            lambda p: f(ce_cfg, p)[0])(p)

    ((loss, stats), g_kl), g_ce = both(params)
    assert abs(float(loss)) < 1e-6 and abs(float(stats.base.kl)) < 1e-5
    assert float(stats.base.agree) == float(stats.base.count) > 0
    # Its gradient is zero there too, while the CE term's is not.
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_kl)) < 1e-5
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ce["base"])) > 1e-3


def test_teacher_head_targets_come_from_the_original_model():
    """head_targets="teacher": the heads' term is `losses.medusa_loss` against the *original* model's distributions,
    and the base receives no gradient through those targets (they are constants)."""
    bundle = medusa_jax.load("tiny")
    cfg_m = bundle.config
    hc = HeadsConfig(num_heads=2)
    heads = model.init_heads(hc, cfg_m, bundle.base)
    ds = synthetic_dataset(cfg_m.vocab_size, 2, 32, seed=1)
    batch = {k: jnp.asarray(getattr(ds, k)) for k in ("tokens", "loss_mask", "segment_ids", "positions")}
    moved = jax.tree.map(lambda x: x * 1.05, bundle.base)  # the base has drifted from the original
    lcfg = joint.JointLossConfig(chunk=8, lambda0=1.0, head_targets="teacher", teacher_temperature=0.5)
    loss, stats = jax.jit(lambda p: joint.joint_loss(lcfg, cfg_m, hc, p, bundle.base, batch, 0, jnp.float32))(
        {"base": moved, "heads": heads})
    hidden = joint.frozen_hidden(cfg_m, moved, batch)
    t_hidden = joint.frozen_hidden(cfg_m, bundle.base, batch)
    weights = joint.head_loss_weights(2, lcfg.decay)
    expect, _ = losses.medusa_loss(hc, cfg_m, moved, heads, hidden, batch["tokens"], batch["loss_mask"],
                                   batch["segment_ids"], weights=weights, chunk=8, train_base=True,
                                   teacher=losses.Teacher(t_hidden, model.lm_head_kernel(cfg_m, bundle.base), 0.5))
    base_term = float(stats.base.kl / jnp.maximum(stats.base.count, 1.0))
    np.testing.assert_allclose(float(loss) - base_term, float(expect), rtol=1e-5)
    data_cfg = dataclasses.replace(lcfg, head_targets="data")
    data_loss, _ = jax.jit(lambda p: joint.joint_loss(data_cfg, cfg_m, hc, p, bundle.base, batch, 0, jnp.float32))(
        {"base": moved, "heads": heads})
    assert abs(float(data_loss) - float(loss)) > 1e-3


def test_lambda0_warmups():
    for kind, mid in (("constant", 0.2), ("linear", 0.1), ("sine", 0.2 * np.sin(np.pi / 4))):
        cfg = joint.JointLossConfig(lambda0=0.2, warmup=kind, ramp_steps=10)
        assert float(joint.lambda0_at(cfg, 5)) == pytest.approx(mid, rel=1e-5)
        assert float(joint.lambda0_at(cfg, 20)) == pytest.approx(0.2, rel=1e-6)
    assert joint.head_loss_weights(3, 0.8) == pytest.approx((0.8, 0.64, 0.512))


def test_learning_rate_groups_and_weight_decay_mask():
    opt, schedules = joint.make_joint_optimizer(
        loop.OptimConfig(lr=1e-3, total_steps=10, warmup_fraction=0.0, weight_decay=0.5), head_lr=4e-3)
    params = {"base": {"layers_0": {"mlp": {"gate_up": {"kernel": jnp.ones((2, 2, 2))}},
                                    "attn_norm": {"scale": jnp.ones(2)}}},
              "heads": {"res_0_kernel": jnp.ones((1, 2, 2)), "res_0_bias": jnp.ones((1, 2))}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)  # zero gradient: only weight decay moves weights
    assert float(jnp.abs(updates["base"]["layers_0"]["mlp"]["gate_up"]["kernel"]).max()) == pytest.approx(5e-4)
    assert float(jnp.abs(updates["heads"]["res_0_kernel"]).max()) == pytest.approx(2e-3)
    assert float(jnp.abs(updates["base"]["layers_0"]["attn_norm"]["scale"]).max()) == 0.0  # no decay on norms
    assert float(jnp.abs(updates["heads"]["res_0_bias"]).max()) == 0.0  # nor on biases
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(ones, opt.init(params), params)
    base_step = float(jnp.abs(updates["base"]["layers_0"]["attn_norm"]["scale"]).max())
    head_step = float(jnp.abs(updates["heads"]["res_0_bias"]).max())
    assert head_step == pytest.approx(4 * base_step, rel=1e-4)  # Adam's first step is lr-sized
    assert float(schedules["heads"](3)) == pytest.approx(4 * float(schedules["base"](3)))


def test_base_moves_less_than_heads_in_a_run(full_run):
    start_bundle = medusa_jax.load("tiny")
    base_move = np.mean([np.abs(a - np.asarray(b)).mean() for a, b in
                         zip(jax.tree.leaves(full_run["params"]["base"]), jax.tree.leaves(start_bundle.base))])
    head_move = np.mean([np.abs(a).mean() for k, a in full_run["params"]["heads"].items()])  # heads start at 0
    assert 0 < base_move < head_move


def test_resume_gives_the_same_parameters(full_run, tmp_path):
    split = tmp_path / "split"
    half = _train(TINY + ["--steps", "10", "--out", str(split), "--stop-at", "4"])
    assert half["stopped"] == "stop_at" and Checkpoints(str(split), create=False).latest_step() == 4
    resumed = _train(["--resume", str(split), "--no-progress"])
    assert resumed["step"] == 10 and resumed["stopped"] == "done"
    for a, b in zip(jax.tree.leaves(full_run["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_checkpoint_of_the_unfused_layout_resumes(full_run, tmp_path):
    """A run stopped before the fused q/k/v and gate/up kernels resumes (train/legacy_layout.py); one of another
    shape still gets the one-line error."""
    from train import legacy_layout

    config = medusa_jax.load("tiny").config
    run = tmp_path / "old_layout"
    _train(TINY + ["--steps", "10", "--out", str(run), "--stop-at", "4"])
    optimizer, _ = joint.make_joint_optimizer(loop.OptimConfig(lr=LR, total_steps=10), LR)
    target = loop.TrainState.create(jax.tree.map(np.asarray, full_run["params"]), optimizer, 0)  # the run's state
    ckpts = Checkpoints(str(run), create=False)
    step, saved, meta = ckpts.restore(target)
    old = legacy_layout.unfuse(config, saved)  # as the code before 7b8ebde wrote it
    assert {"q", "k", "v"} <= set(old.params["base"]["layers_0"]["attn"])
    assert {"gate", "up"} <= set(old.params["base"]["layers_0"]["mlp"])
    ckpts.close()
    shutil.rmtree(run / "ckpt")
    Checkpoints(str(run)).save(step, old, meta)

    # A run of another shape (a wider MLP) must not mistake it for its own old layout.
    wide = dataclasses.replace(config, intermediate_size=2 * config.intermediate_size)

    def widen(path, x):
        shape = np.shape(x)
        if "gate_up" in jax.tree_util.keystr(path):
            shape = shape[:-1] + (wide.intermediate_size,)
        return jax.ShapeDtypeStruct(shape, np.asarray(x).dtype)

    for wrong, convert in [(jax.tree_util.tree_map_with_path(widen, target), legacy_layout.converters(wide)),
                           (target, None)]:  # no converter: the old layout is not the run's
        with pytest.raises(MedusaError, match="resume with the run's original shape flags") as error:
            Checkpoints(str(run), create=False).restore(wrong, convert=convert)
        assert "\n" not in str(error.value)

    resumed = _train(["--resume", str(run), "--no-progress"])
    assert resumed["step"] == 10 and resumed["stopped"] == "done"
    for a, b in zip(jax.tree.leaves(full_run["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_export_round_trips(full_run):
    loaded = medusa_jax.load(full_run["model_dir"], heads=full_run["heads_dir"])
    for a, b in zip(jax.tree.leaves(full_run["params"]["base"]), jax.tree.leaves(loaded.base)):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-7)
    for k, v in full_run["params"]["heads"].items():
        np.testing.assert_allclose(v, np.asarray(loaded.heads[k]), rtol=0, atol=1e-7)
    assert loaded.heads_config == HeadsConfig(num_heads=4)


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from train import stage2

    assert jax.device_count() == 8, jax.devices()
    out = sys.argv[1]
    common = ["--model", "tiny", "--seq-len", "32", "--batch-size", "8", "--steps", "3", "--lr", "1e-2",
              "--accept-prompts", "0", "--guard-prompts", "0", "--no-progress", "--holdout", "0", "--log-every", "1",
              "--base-loss", "ce"]
    runs = {"single": ["--devices", "1"], "fsdp8": ["--fsdp", "8"],
            "fsdp4_tensor2_layer_scan": ["--fsdp", "4", "--tensor", "2", "--remat"]}
    params, losses = {}, {}
    for name, extra in runs.items():
        args, meta = stage2.resolve_args(common + extra + ["--out", f"{out}/{name}"])
        s = stage2.train(args, meta)
        params[name] = s["params"]
        records = map(json.loads, open(f"{out}/{name}/metrics.jsonl"))
        losses[name] = [r[k] for r in records for k in ("loss", "grad_norm")]
    ref = params["single"]
    gaps = {n: [np.abs(np.asarray(a) - np.asarray(b)) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(p))]
            for n, p in params.items()}
    diffs = {n: max(float(g.max()) for g in gs) for n, gs in gaps.items()}
    means = {n: float(np.concatenate([g.ravel() for g in gs]).mean()) for n, gs in gaps.items()}
    print("RESULT " + json.dumps({"diffs": diffs, "means": means, "losses": losses}))
""")


def test_sharded_runs_match_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name, values in result["losses"].items():
        np.testing.assert_allclose(values, result["losses"]["single"], rtol=1e-4, err_msg=name)
    # Adam's step is lr * m / sqrt(v): where a gradient is near zero its rounding (which differs with the
    # summation order of a sharded reduction) moves the step by a fraction of lr, so single elements may differ by
    # ~4% of lr (measured: the worst element scales with lr, 4.0e-4 at lr 1e-2 and 4.0e-5 at 1e-3) while the mean
    # stays ~1e-5 lr. A sharding bug (a missing gradient reduction, a wrong shard) moves the mean by ~lr.
    lr = 1e-2
    for name in result["diffs"]:
        assert result["diffs"][name] < 0.1 * lr and result["means"][name] < 1e-3 * lr, result


def test_layer_scan_forward_equals_the_model():
    from train import layerwise

    bundle = medusa_jax.load("tiny")
    ds = synthetic_dataset(bundle.config.vocab_size, 2, 32, seed=1)
    tokens, positions = jnp.asarray(ds.tokens), jnp.asarray(ds.positions)
    mask = joint.losses.attention_mask(jnp.asarray(ds.segment_ids))

    def hidden(base, scan):
        if scan:
            return layerwise.forward(bundle.config, base, tokens, positions, mask, remat=True)
        return model.forward(bundle.config, base, tokens, positions, mask)[0]

    @jax.jit
    def value_and_grads(base):
        loss = lambda b, scan: jnp.sum(jnp.sin(hidden(b, scan)))
        return [jax.value_and_grad(loss)(base, scan) for scan in (False, True)]

    (v_ref, g_ref), (v_got, g_got) = value_and_grads(bundle.base)
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_got)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.abs(a).max()) + 1e-6)


def test_parameters_are_sharded_over_fsdp():
    from train.parallel import FSDP_RULES, logical_spec, param_logical_axes

    assert param_logical_axes(("layers_0", "mlp", "down", "kernel"), 2) == ("mlp", "embed")
    assert param_logical_axes(("embed", "embedding"), 2) == ("vocab", "embed")
    # The fused Q/K/V kernel [H, Kv, G + 2, D] splits over tensor by whole KV groups.
    qkv = param_logical_axes(("layers_0", "attn", "qkv", "kernel"), 4)
    assert tuple(logical_spec(*qkv, rules=FSDP_RULES)) == ("fsdp", "tensor", None, None)
    assert param_logical_axes(("res_0_bias",), 2) == (None, None)
    assert tuple(logical_spec("batch", "embed", rules=FSDP_RULES)) == (("data", "fsdp"), "fsdp")


def _cli(*argv):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "train.stage2", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("argv, needle", [
    (["--model", "tiny", "--lambda0-warmup", "cubic"], "--lambda0-warmup"),
    (["--model", "tiny", "--fsdp", "3", "--steps", "1"], "--fsdp 3"),
    (["--from", "/nonexistent/run"], "no such folder"),
    (["--model", "tiny", "--head-lr-mult", "0"], "--head-lr-mult"),
    (["--model", "tiny", "--data", "chats.jsonl", "--steps", "1"], "tiny has no tokenizer"),
])
def test_bad_flags_give_one_line_and_exit_2(argv, needle):
    r = _cli(*argv)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
