"""Files from the internet and numerical faults.

- No pickle is unpickled outside `torch.load(weights_only=True)`: a checkpoint whose pickle would run a command is
  refused with one line and the command never runs; the library source has no other unpickling call, no
  `trust_remote_code=True`, no eval/exec.
- No remote code runs: a model folder whose tokenizer asks for custom Python code is refused (without the
  interactive "run the custom code? [y/N]" prompt transformers shows when trust_remote_code is left unset), the
  code never imported. (Archive members that try to escape their folder: tests/test_loading.py::test_embedded_fetch.)
- A run whose steps keep going non-finite stops after `max_bad_steps` with its last good orbax checkpoint intact
  and the bad steps logged with their step and data position.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import medusa_jax
from medusa_jax import MedusaError
from train import loop
from train.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [p for d in ("medusa_jax", "infer", "train") for p in sorted((ROOT / d).rglob("*.py"))]


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_bundle):
    return medusa_jax.loading.save_hf(tiny_bundle, tmp_path_factory.mktemp("hf") / "model")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["raw pickle", "torch zip"])
def test_pickle_payload_in_pytorch_model_bin_never_runs(hf_dir, tmp_path, fmt):
    torch = pytest.importorskip("torch")
    model = _copy(hf_dir, tmp_path / "model")
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    if fmt == "raw pickle":
        (model / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Payload(marker)}))
    else:
        torch.save({"model.norm.weight": Payload(marker)}, model / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(MedusaError, match=r"pytorch_model\.bin: cannot read PyTorch weights") as info:
        medusa_jax.load(model)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_tokenizer_asking_for_remote_code_is_refused(hf_dir, tmp_path):
    """tokenizer_config.json's auto_map points at a Python file in the folder; loading must not import it."""
    model = _copy(hf_dir, tmp_path / "model")
    marker = tmp_path / "pwned"
    (model / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (model / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}}))
    with pytest.raises(MedusaError, match=r"cannot load the tokenizer") as info:
        medusa_jax.load(model)
    assert "\n" not in str(info.value) and "custom Python code" in str(info.value)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_library_source_has_no_unsafe_deserialisation_or_remote_code():
    assert LIBRARY, "no library files found"
    problems, torch_loads = [], 0
    for path in LIBRARY:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # no pickle-family module is imported at all
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{path}: imports {m}" for m in mods
                             if m.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "marshal", "shelve")]
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                torch_loads += 1
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load" and "allow_pickle" in kw:
                problems.append(f"{where}: np.load with allow_pickle")
            value = kw.get("trust_remote_code")
            if (value is not None or name == "from_pretrained") and not (
                    isinstance(value, ast.Constant) and value.value is False):  # explicit: else transformers prompts
                problems.append(f"{where}: {name} without trust_remote_code=False")
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{where}: {node.func.id}()")
    assert not problems, problems
    assert torch_loads == 1  # the one reader in medusa_jax/loading/hf.py


# ------------------------------------------------------------------------------------------------ numerical faults


def test_non_finite_steps_stop_the_run_with_the_last_good_checkpoint_intact(tmp_path):
    optimizer, _ = loop.make_optimizer(loop.OptimConfig(lr=0.1, total_steps=20, warmup_fraction=0.0))

    def loss_fn(params, frozen, batch, rng, axis_name):
        return jnp.sum((params["w"] - batch["x"]) ** 2), {"n": jnp.float32(1)}

    step = jax.jit(loop.make_train_step(loss_fn, optimizer))
    state = loop.TrainState.create({"w": jnp.ones(3)}, optimizer, seed=0)
    # Batch i has x = i, except that batches 5, 7 and 8 hold a NaN (as a corrupt record would).
    bad_batches = {5, 7, 8}
    xs = [np.full(3, np.nan if i in bad_batches else float(i), np.float32) for i in range(20)]
    cursor = {"i": 0}

    def batches():
        while True:
            i = cursor["i"]
            cursor["i"] += 1
            yield {"x": xs[i]}

    ckpts = Checkpoints(str(tmp_path), keep=5)
    saved_states = {}

    def save(s, i, position):
        saved_states[i] = jax.tree.map(np.asarray, s)
        ckpts.save(i, s, {"data_position": position})

    cfg = loop.LoopConfig(total_steps=20, log_every=1, save_every=3, max_bad_steps=3, progress=False)
    with pytest.raises(MedusaError, match=r"3 steps had a non-finite loss or gradient \(last at step 9\); the last "
                                          r"checkpoint is the last good state"):
        loop.run(cfg, state, 0, step_fn=lambda s, b: step(s, None, b), batches=batches(),
                 position=lambda: {"index": cursor["i"]}, put_batch=lambda b: b, save=save,
                 describe=lambda aux: ({}, {}), metrics_log=loop.MetricsLog(str(tmp_path / "metrics.jsonl")))
    # Saves at steps 3 and 6 only: nothing was written once the run went bad, and the last one restores intact.
    assert ckpts.all_steps() == [3, 6]
    restored_step, restored, meta = ckpts.restore(jax.tree.map(np.asarray, state))
    assert restored_step == 6 and meta["data_position"] == {"index": 6}
    jax.tree.map(np.testing.assert_array_equal, restored, saved_states[6])
    assert np.isfinite(restored.params["w"]).all()
    assert not np.allclose(restored.params["w"], 1.0)  # training moved it
    # Each bad step is logged with its step and the data position of its batch.
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    bad = [e for e in events if e.get("event") == "bad_step"]
    assert [(e["step"], e["data_position"]["index"]) for e in bad] == [(6, 5), (8, 7), (9, 8)]
