"""Run checkpoints: orbax `CheckpointManager` under `<run>/ckpt/<step>/`.

Each checkpoint holds two items:
  state/  the training state as a pytree of arrays (trained params, optimizer state, step, PRNG key data), saved
          from host memory (one replicated copy);
  meta/   JSON: data position {epoch, index}, heads config, model source, the training arguments, and anything
          else the stage records (so a run can resume from its folder alone).
Orbax writes a step into a temporary folder and renames it when complete, so `latest_step` never returns a torn
checkpoint; the manager keeps the newest `keep` steps. Saves are synchronous: a checkpoint is on disk when `save`
returns (they are small for heads; the run then exits safely after a signal).

Fault injection (tests only; inert unless set): MEDUSA_FAULT_INJECT=kill_during_save:STEP makes the process
SIGKILL itself while saving STEP, after orbax has written the step's files but before it renames them into place.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from medusa_jax.errors import MedusaError


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "ckpt")


def _fault_injection_path_class() -> Any:
    """A temporary-path class that SIGKILLs at the finalisation of the step named in MEDUSA_FAULT_INJECT."""
    spec = os.environ.get("MEDUSA_FAULT_INJECT", "")
    if not spec.startswith("kill_during_save:"):
        return None
    step = spec.split(":", 1)[1]

    class KillBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):
        async def finalize(self):
            if self.get_final().name == step:
                os.kill(os.getpid(), signal.SIGKILL)
            await super().finalize()

    return KillBeforeCommit


class Checkpoints:
    """The checkpoints of one run folder."""

    def __init__(self, run_dir: str, keep: int = 3, create: bool = True):
        if keep < 1:
            raise MedusaError(f"--keep {keep} must be at least 1 (checkpoints to keep)")
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True,
                                               temporary_path_class=_fault_injection_path_class())
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> bool:
        """Saves host copies of `state` (a pytree) and `meta` (JSON-able) as `step`; False if it already exists."""
        if step in self._manager.all_steps():
            return False
        host = jax.tree.map(np.asarray, jax.device_get(state))
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                         meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
        return True

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of `step` (default: the latest complete checkpoint)."""
        step = self._require(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, OSError) as e:  # a damaged meta item (JSONDecodeError is a ValueError)
            raise MedusaError(f"checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}); delete that "
                              "folder to resume from an earlier checkpoint, or start a new --out") from None
        return step, dict(restored["meta"])

    def restore(self, target: Any, step: int | None = None,
                convert: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None) -> tuple[int, Any, dict]:
        """(step, state shaped like `target`, meta). `target` is a pytree of arrays (or ShapeDtypeStructs) of the
        saved structure; a shape or structure mismatch raises MedusaError. `convert` = (to_old, from_old) reads a
        checkpoint of an older parameter layout: if the checkpoint does not match `target`, it is read as
        `to_old(target)` and returned as `from_old(state)` (train/legacy_layout.py)."""
        step = self._require(step)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                                if not isinstance(x, jax.ShapeDtypeStruct) else x, target)
        try:
            state, meta = self._read(step, abstract)
        except MedusaError as current:
            if convert is None:
                raise
            try:
                state, meta = self._read(step, convert[0](abstract))
            except MedusaError:
                raise current from None  # the error about the current layout, which is what the user should fix
            state = convert[1](state)
        return step, state, meta

    def _read(self, step: int, abstract: Any) -> tuple[Any, dict]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MedusaError(f"checkpoint {self.directory}/{step} cannot be restored into this run ({first[:200]}); "
                              "resume with the run's original shape flags, or delete that folder if it is damaged "
                              "(an earlier checkpoint is then used)") from None
        state = restored["state"]
        # Orbax restores what is on disk whatever the target's shapes, so both structure and shapes are checked here
        # (a checkpoint of another layout must fail here, before `convert` sees it).
        same = (jax.tree.structure(state) == jax.tree.structure(abstract)
                and jax.tree.map(np.shape, state) == jax.tree.map(lambda x: tuple(x.shape), abstract))
        if not same:
            raise MedusaError(f"checkpoint {self.directory}/{step} holds differently shaped parameters than this "
                              "run builds; resume with the run's original shape flags or start a new --out")
        return state, dict(restored["meta"])

    def _require(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise MedusaError(f"no complete checkpoint in {self.directory}; start the run without --resume")
        return step

    def close(self) -> None:
        self._manager.close()
