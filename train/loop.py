"""Training-loop pieces shared by the stages: state, optimizer, the guarded step, and the host loop.

The host loop (`run`) owns everything around the jitted step: batches and their data position, checkpoints at
intervals and on SIGINT/SIGTERM (a handler only sets a flag; the loop saves at the next step boundary), a tqdm bar,
metrics appended to `<run>/metrics.jsonl`, periodic evaluation, and the non-finite step guard: a step whose loss or
gradient is NaN/inf is not applied (parameters and optimizer state keep their values), it is logged with its data
position, and after `max_bad_steps` of them the run stops without writing another checkpoint, so the last one
saved is the last good state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from medusa_jax.errors import MedusaError
from train.parallel import tree_all_finite

log = logging.getLogger("train")


@struct.dataclass
class TrainState:
    """What changes during training (all replicated over data-parallel devices).

    step: int32 [] steps taken, skipped non-finite steps included (the data position advances for them too).
    params: the trained parameters, float32 master copy.
    opt_state: optax state of `params` only (frozen weights have none).
    rng: uint32 [2] PRNG key data, split once per step (for stochastic losses; stage 1 is deterministic).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: optax.GradientTransformation, seed: int) -> "TrainState":
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   rng=jax.random.key_data(jax.random.PRNGKey(seed)))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to 0, and global-norm gradient clipping (the original's HF
    Trainer recipe: lr 1e-3, warmup_ratio 0.1, cosine, weight decay 0, betas (0.9, 0.999), eps 1e-8; its clipping
    is HF's default max_grad_norm 1.0)."""

    lr: float = 1e-3
    total_steps: int = 1000
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def make_optimizer(cfg: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) for `cfg`."""
    if cfg.lr <= 0 or cfg.total_steps < 1 or not 0 <= cfg.warmup_fraction < 1:
        raise MedusaError(f"bad optimizer settings lr={cfg.lr}, steps={cfg.total_steps}, "
                          f"warmup={cfg.warmup_fraction}; use lr > 0, steps >= 1, 0 <= warmup < 1")
    schedule = lr_schedule(cfg)
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*chain), schedule


def lr_schedule(cfg: OptimConfig, peak: float | None = None) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_fraction` of the steps, then cosine decay to 0; peak defaults to cfg.lr."""
    warmup = int(round(cfg.warmup_fraction * cfg.total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr if peak is None else peak, warmup_steps=warmup,
                                              decay_steps=max(cfg.total_steps, warmup + 1), end_value=0.0)


LossFn = Callable[..., tuple[jax.Array, Any]]


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, with_step: bool = False) -> Callable:
    """The per-device training step, for `DataParallel.compile_step`.

    `loss_fn(params, frozen, batch, rng, axis_name) -> (loss, aux)` where aux is a pytree of *sums* over the
    local batch (combined across devices here by psum). Under pmap (`axis_name` set) the loss must be scaled so
    that the mean of the per-device gradients is the gradient of the global loss (see `losses.medusa_loss`).

    With `with_step`, loss_fn also gets `step=state.step` (int32 [], steps already taken; e.g. for a loss-weight
    warm-up).

    Returns step(state, frozen, batch, *, axis_name) -> (state, metrics) with metrics {loss, finite, grad_norm,
    aux}; a non-finite loss or gradient leaves params and optimizer state unchanged.
    """
    extra = (lambda state: {"step": state.step}) if with_step else (lambda state: {})

    def step(state: TrainState, frozen: Any, batch: dict, *, axis_name: str | None = None):
        rng, sub = jax.random.split(jax.random.wrap_key_data(state.rng))
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, frozen, batch, jax.random.key_data(sub), axis_name,
                                     **extra(state))
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            aux = jax.tree.map(lambda x: jax.lax.psum(x, axis_name), aux)
        finite = jnp.isfinite(loss) & tree_all_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                               opt_state=keep(opt_state, state.opt_state), rng=jax.random.key_data(rng))
        metrics = {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads), "aux": aux}
        return new_state, metrics

    return step


# ------------------------------------------------------------------------------------------------ host side


class StopSignal:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignal":
        with contextlib.suppress(ValueError):  # not the main thread: no handlers, the loop still works
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class MetricsLog:
    """Appends one JSON object per line to `path` (flushed at once, so a crash loses nothing logged)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict) -> None:
        if self.path and jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


@dataclasses.dataclass
class LoopConfig:
    """Host-loop settings. Steps are 1-based counts: step N is done after N optimizer steps."""

    total_steps: int
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and on a signal or `stop_at`)
    eval_every: int = 0  # 0: no evaluation during training
    stop_at: int | None = None  # stop (saving a checkpoint) after this step, as if interrupted
    max_bad_steps: int = 10
    progress: bool = True


@dataclasses.dataclass
class LoopResult:
    state: Any  # device state
    step: int
    reason: str  # "done", "stop_at", or a signal name
    seconds: float
    bad_steps: list[dict]
    last_record: dict


def run(cfg: LoopConfig, state: Any, start_step: int, *, step_fn: Callable, batches: Iterator[dict],
        position: Callable[[], Any], put_batch: Callable[[dict], Any], save: Callable[[Any, int, Any], None],
        describe: Callable[[Any], tuple[dict, dict]], metrics_log: MetricsLog,
        evaluate: Callable[[Any, int], dict] | None = None, schedule: Callable[[int], float] | None = None,
        batch_tokens: Callable[[dict], int] | None = None) -> LoopResult:
    """Runs steps start_step+1 .. total_steps.

    Args:
      step_fn: compiled step(state, device_batch) -> (state, metrics as in `make_train_step`).
      batches: host batches (dicts of numpy); `position()` is the data position of the next one.
      put_batch: host batch -> device batch.
      save(state, step, data_position): writes a checkpoint.
      describe(summed aux) -> (record fields for metrics.jsonl, short tqdm postfix fields).
      evaluate(state, step) -> record fields (e.g. held-out accuracy), every `eval_every` steps.
      schedule: learning rate by step (logged).
      batch_tokens: real tokens in a host batch (for tokens/s).
    """
    import tqdm

    bar = tqdm.tqdm(total=cfg.total_steps, initial=start_step, desc="train", unit="step", disable=not cfg.progress,
                    dynamic_ncols=True)
    start = time.monotonic()
    window_start, window_tokens, window_aux, window_loss, window_n = start, 0, None, 0.0, 0
    bad: list[dict] = []
    record: dict = {}
    step, reason = start_step, "done"
    with StopSignal() as stop:
        while step < cfg.total_steps:
            if stop.received is not None:
                reason = signal.Signals(stop.received).name
                break
            where = position()
            host_batch = next(batches)
            state, m = step_fn(state, put_batch(host_batch))
            step += 1
            window_tokens += batch_tokens(host_batch) if batch_tokens else 0
            m = jax.device_get(m if np.ndim(m["finite"]) == 0 else jax.tree.map(lambda x: x[0], m))
            if not bool(m["finite"]):
                bad.append({"step": step, "data_position": _as_dict(where), "loss": float(m["loss"])})
                log.warning("step %d (data position %s): non-finite loss or gradient (loss %s); step skipped",
                            step, _as_dict(where), float(m["loss"]))
                metrics_log.write({"event": "bad_step", **bad[-1]})
                if len(bad) >= cfg.max_bad_steps:
                    bar.close()
                    raise MedusaError(f"{len(bad)} steps had a non-finite loss or gradient (last at step {step}); "
                                      "the last checkpoint is the last good state: lower --lr or check the data")
            else:
                window_aux = m["aux"] if window_aux is None else jax.tree.map(np.add, window_aux, m["aux"])
                window_loss += float(m["loss"])
                window_n += 1
            last = step == cfg.total_steps or step == cfg.stop_at
            if window_n and (step % cfg.log_every == 0 or last):
                now = time.monotonic()
                fields, postfix = describe(window_aux)
                record = {"step": step, "loss": window_loss / window_n, **fields,
                          "grad_norm": float(m["grad_norm"]),
                          "lr": float(schedule(step - 1)) if schedule else None,
                          "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                          "elapsed_s": now - start}
                metrics_log.write(record)
                bar.set_postfix({"loss": f"{record['loss']:.3f}", **postfix,
                                 "tok/s": f"{record['tokens_per_s']:.0f}"}, refresh=False)
                window_start, window_tokens, window_aux, window_loss, window_n = now, 0, None, 0.0, 0
            bar.update(1)
            if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.total_steps:
                metrics_log.write({"step": step, "event": "eval", **evaluate(state, step)})
            if step == cfg.stop_at:
                reason = "stop_at"
                break
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.total_steps:
                save(state, step, position())
        bar.close()
        if step > start_step or reason != "done":
            save(state, step, position())
    return LoopResult(state=state, step=step, reason=reason, seconds=time.monotonic() - start, bad_steps=bad,
                      last_record=record)


def _as_dict(position: Any) -> Any:
    return position.to_dict() if hasattr(position, "to_dict") else position
