"""Interrupted training: real `python -m train.stage1 --model tiny` processes killed and resumed.

A run killed with SIGKILL (in the middle of training, or in the middle of writing a checkpoint) and restarted with
`--resume` continues from the last complete checkpoint and ends with exactly the parameters of an uninterrupted
run; SIGINT saves a checkpoint before exiting. The save is interrupted deterministically through the fault
injection point of `train.checkpoint` (MEDUSA_FAULT_INJECT=kill_during_save:STEP).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from train.checkpoint import Checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 200  # long enough that the test sees the run mid-training even on a busy machine
RUN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--num-heads", "2", "--lr", "0.01",
       "--steps", str(STEPS), "--save-every", "20", "--log-every", "1", "--accept-prompts", "0", "--no-progress"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MEDUSA_FAULT_INJECT"}
    return dict(env, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def _run(*argv, **env):
    return subprocess.run([sys.executable, "-m", "train.stage1", *argv], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def _start(*argv):
    """The run in the background (stderr kept for the failure message)."""
    return subprocess.Popen([sys.executable, "-m", "train.stage1", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_step(run_dir) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line).get("step", 0) for line in open(path).read().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(proc, run_dir, step: int) -> None:
    deadline = time.monotonic() + 240
    while _logged_step(run_dir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def _heads(run_dir) -> dict[str, np.ndarray]:
    return load_file(os.path.join(run_dir, "heads", "medusa_lm_head.safetensors"))


def _assert_same_heads(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Heads exported by the uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    r = _run(*RUN, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return _heads(out)


def _resume(run_dir):
    r = _run("--resume", str(run_dir), "--no-progress")
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_sigkill_during_training_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(*RUN, "--out", str(out))
    _wait_for_step(proc, out, 30)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    last = Checkpoints(str(out), create=False).latest_step()
    assert last is not None and 20 <= last < STEPS and last % 20 == 0  # killed mid-training, after a save
    assert not (out / "heads").exists()
    err = _resume(out)
    assert f"resuming {out} at step {last} of {STEPS}" in err
    _assert_same_heads(_heads(out), reference)


def test_sigkill_during_a_checkpoint_save_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    r = _run(*RUN, "--out", str(out), MEDUSA_FAULT_INJECT="kill_during_save:40")
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpt = out / "ckpt"
    # Step 40 was written but never committed: its temporary folder is there, and it is not a checkpoint.
    assert any(name.startswith("40.") for name in os.listdir(ckpt)), os.listdir(ckpt)
    assert Checkpoints(str(out), create=False).latest_step() == 20
    err = _resume(out)
    assert f"resuming {out} at step 20 of {STEPS}" in err
    assert not any(name.startswith("40.") for name in os.listdir(ckpt))  # the torn save was cleaned up
    _assert_same_heads(_heads(out), reference)


def test_sigint_saves_a_checkpoint_before_exiting(tmp_path):
    out = tmp_path / "run"
    proc = _start(*RUN, "--save-every", "0", "--out", str(out))  # the only checkpoint is the signal's
    _wait_for_step(proc, out, 15)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and f"Continue with: python -m train.stage1 --resume {out}" in err
    step, meta = Checkpoints(str(out), create=False).read_meta()
    assert 15 <= step < STEPS and meta["step"] == step
    assert not (out / "heads").exists()  # nothing exported from an unfinished run
