"""Data parallelism for training: one per-device step function, run as `jit` over a device mesh or under `pmap`.

Model code never names devices or mesh axes. Training code names *logical* axes ("batch", "embed", ...), and
`LOGICAL_RULES` maps them to mesh axes; stage 1 only shards the batch ("data" axis) and replicates parameters
(heads and the frozen base). Stage 2 adds an "fsdp" mesh axis and rules for parameter axes here.

Modes (`--parallel`):
  mesh: `jax.jit` with `NamedSharding`s over `jax.make_mesh((n,), ("data",))`: the batch is split along its
    first axis, parameters are replicated, and XLA inserts the gradient all-reduce. This is current JAX practice.
  pmap: the same step under `jax.pmap(axis_name="data")`; the step averages gradients with `lax.pmean` itself.
Both give the same parameters as one device (up to float summation order; tests/test_parallel.py).

Many hosts (e.g. 4 machines x 8 GPUs): start the same command on every host, after calling

    jax.distributed.initialize()  # or (coordinator_address="host0:1234", num_processes=4, process_id=i)

before any other JAX call (on Cloud TPU / SLURM the arguments are found automatically; `train.stage1` does it when
`--distributed` is given). `jax.devices()` then lists all hosts' devices and the mesh spans them. Every host
iterates the same global batches (same seed) and feeds only its own rows (`local_rows`); `put_batch` assembles the
global array with `jax.make_array_from_process_local_data`. Orbax checkpoints are written cooperatively (the
primary host writes replicated arrays). `--parallel pmap` also works multi-host (each host maps its local devices).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from medusa_jax.errors import MedusaError

DATA_AXIS = "data"
Mode = Literal["mesh", "pmap"]
MODES = ("mesh", "pmap")

# Logical axis name -> mesh axis (None: replicated). Stage 2 adds e.g. ("embed", "fsdp").
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA_AXIS),
    ("seq", None),
    ("embed", None),
    ("vocab", None),
    ("heads", None),
)


def logical_spec(*names: str | None) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names (unknown names and None: replicated)."""
    rules = dict(LOGICAL_RULES)
    return PartitionSpec(*(rules.get(n) if n else None for n in names))


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ("data",) mesh over the first `num_devices` devices (default: all, all hosts)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise MedusaError(f"--devices {n} is not available: this run sees {len(devices)} device(s)")
    # Auto axes: classic jit sharding propagation (make_mesh defaults to Explicit sharding-in-types).
    return jax.make_mesh((n,), (DATA_AXIS,), (AxisType.Auto,), devices=devices[:n])


def local_rows(batch_size: int) -> slice:
    """This host's rows of a global batch (all rows on a single host)."""
    p, n = jax.process_index(), jax.process_count()
    return slice(p * batch_size // n, (p + 1) * batch_size // n)


@dataclasses.dataclass
class DataParallel:
    """Runs per-device functions data-parallel in one of the `MODES`.

    A per-device function takes (replicated..., batch) where `batch` is a dict of arrays with a leading batch axis,
    plus the keyword `axis_name` (None under mesh-jit, where the global batch is one logical array; "data" under
    pmap, where it must combine results across devices itself).
    """

    mode: Mode
    mesh: Mesh

    @classmethod
    def create(cls, mode: str = "mesh", num_devices: int | None = None) -> "DataParallel":
        if mode not in MODES:
            raise MedusaError(f"--parallel {mode!r} is unknown; use one of {', '.join(MODES)}")
        return cls(mode, make_mesh(num_devices))

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def _local_devices(self) -> list:
        return [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.num_devices:
            raise MedusaError(f"--batch-size {batch_size} is not a multiple of the {self.num_devices} devices; "
                              f"use a multiple of {self.num_devices} (or --devices)")

    # -- placement -------------------------------------------------------------------------------------------

    def replicate(self, tree: Any) -> Any:
        """Host pytree -> one copy per device (stacked on a leading device axis under pmap)."""
        if self.mode == "pmap":
            n = len(self._local_devices)
            return jax.tree.map(lambda x: self._put_stacked(np.broadcast_to(x, (n,) + np.shape(x))), tree)
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def _put_stacked(self, x: np.ndarray) -> jax.Array:
        """[local devices, ...] host array -> one slice per local device (the layout pmap takes and returns)."""
        mesh = Mesh(np.asarray(self._local_devices), (DATA_AXIS,))
        return jax.device_put(np.ascontiguousarray(x), NamedSharding(mesh, PartitionSpec(DATA_AXIS)))

    def fetch(self, tree: Any) -> Any:
        """Replicated device pytree -> host numpy (device 0's copy)."""
        if self.mode == "pmap":
            tree = jax.tree.map(lambda x: x[0], tree)
        return jax.device_get(tree)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Global host batch (every host holds the same) -> device arrays split over the devices."""
        if self.mode == "pmap":
            n = len(self._local_devices)
            rows = local_rows(next(iter(batch.values())).shape[0])
            return {k: self._put_stacked(np.asarray(v[rows]).reshape((n, -1) + v.shape[1:]))
                    for k, v in batch.items()}
        sharding = NamedSharding(self.mesh, logical_spec("batch"))
        out = {}
        for k, v in batch.items():
            v = np.asarray(v)
            out[k] = jax.make_array_from_process_local_data(sharding, v[local_rows(v.shape[0])], v.shape)
        return out

    def gather_rows(self, x: Any) -> np.ndarray:
        """A batch-sharded result -> host numpy with the global batch axis first (single host)."""
        x = np.asarray(jax.device_get(x))
        return x.reshape((-1,) + x.shape[2:]) if self.mode == "pmap" else x

    # -- compilation -----------------------------------------------------------------------------------------

    def compile_step(self, fn: Callable, num_replicated: int, donate_first: bool = True) -> Callable:
        """Compiles fn(*replicated, batch, axis_name=...) -> (replicated-like output, metrics).

        Outputs are replicated (params, optimizer state, summed metrics); under pmap they keep the device axis.
        """
        donate = (0,) if donate_first else ()
        if self.mode == "pmap":
            return jax.pmap(functools.partial(fn, axis_name=DATA_AXIS), axis_name=DATA_AXIS,
                            devices=self._local_devices, donate_argnums=donate)
        rep = NamedSharding(self.mesh, PartitionSpec())
        data = NamedSharding(self.mesh, logical_spec("batch"))
        return jax.jit(functools.partial(fn, axis_name=None), in_shardings=(rep,) * num_replicated + (data,),
                       out_shardings=rep, donate_argnums=donate)

    def compile_map(self, fn: Callable, num_replicated: int) -> Callable:
        """Compiles a per-example fn(*replicated, batch) -> array with a leading batch axis (kept sharded)."""
        if self.mode == "pmap":
            return jax.pmap(fn, axis_name=DATA_AXIS, devices=self._local_devices)
        rep = NamedSharding(self.mesh, PartitionSpec())
        data = NamedSharding(self.mesh, logical_spec("batch"))
        return jax.jit(fn, in_shardings=(rep,) * num_replicated + (data,), out_shardings=data)


def tree_all_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite (a bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
