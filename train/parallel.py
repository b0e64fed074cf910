"""Data parallelism for training: one per-device step function, run as `jit` over a device mesh or under `pmap`.

Model code never names devices or mesh axes. Training code names *logical* axes ("batch", "embed", ...), and
rules map them to mesh axes: `LOGICAL_RULES` (stage 1) only shards the batch ("data" axis) and replicates
parameters (heads and the frozen base). `FSDP_RULES` (stage 2, `Sharded`) run on a ("data", "fsdp", "tensor")
mesh: the batch splits over data x fsdp, and every parameter, its gradient and its optimizer state is split along
its "embed" side over fsdp (ZeRO-3 style) and, optionally, along its inner side (attention heads, MLP, vocabulary)
over tensor. `param_logical_axes` names the axes of each parameter from its path in the `model.Llama` /
`model.MedusaHeads` params tree, so the model code stays free of sharding annotations.

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


FSDP_AXIS, TENSOR_AXIS = "fsdp", "tensor"
FSDP_MESH_AXES = (DATA_AXIS, FSDP_AXIS, TENSOR_AXIS)
# Stage 2: parameters are trained, so they, their gradients and Adam moments are split too.
FSDP_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", (DATA_AXIS, FSDP_AXIS)),
    ("seq", None),
    ("embed", FSDP_AXIS),  # the hidden-size side of every weight matrix
    ("qkv", TENSOR_AXIS),  # attention heads x head_dim
    ("kv_groups", TENSOR_AXIS),  # fused Q/K/V kernel's KV-group axis: whole groups per device if tensor | Kv,
    # else replicated (`_fit`; SmolLM2 has Kv = 3, so --tensor 2 replicates it)
    ("mlp", TENSOR_AXIS),  # the SwiGLU inner width
    ("vocab", TENSOR_AXIS),
    ("medusa", None),  # the K heads' stacking axis
    ("norm", None),  # norm scales are tiny
)


def logical_spec(*names: str | None, rules: tuple = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names (unknown names and None: replicated)."""
    table = dict(rules)
    return PartitionSpec(*(table.get(n) if n else None for n in names))


_KERNEL_AXES = {"qkv": ("embed", "kv_groups", None, None), "o": ("qkv", "embed"),  # qkv: [H, Kv, G+2, D]
                "gate_up": ("embed", None, "mlp"), "down": ("mlp", "embed"),  # gate_up: [H, 2, I]
                "lm_head": ("embed", "vocab")}


def param_logical_axes(names: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or of an optimizer-state leaf shaped like one) from the dict keys on
    its path, e.g. (..., "layers_3", "mlp", "down", "kernel") -> ("mlp", "embed"). Unknown leaves: replicated."""
    last = names[-1] if names else ""
    parent = names[-2] if len(names) > 1 else ""
    if last == "embedding":
        axes: tuple = ("vocab", "embed")  # [V, H]
    elif last == "kernel" and parent in _KERNEL_AXES:
        axes = _KERNEL_AXES[parent]  # [in, out]
    elif last == "scale":
        axes = ("norm",)
    elif last.startswith("res_") and last.endswith("_kernel"):
        axes = ("medusa", "embed", None)  # [K, H, H]
    elif last == "proj":
        axes = ("medusa", "embed", "vocab")  # [K, H, V]
    else:
        axes = ()
    return axes if len(axes) == ndim else (None,) * ndim


def tree_shardings(tree: Any, mesh: Mesh, rules: tuple = FSDP_RULES) -> Any:
    """NamedSharding per leaf of a params-like pytree (arrays or ShapeDtypeStructs). A dimension that the mesh
    axes do not divide stays whole (e.g. a tiny test model's norm on 8 devices)."""

    def one(path, leaf):
        names = tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
        shape = np.shape(leaf)
        spec = logical_spec(*param_logical_axes(names, len(shape)), rules=rules)
        return NamedSharding(mesh, PartitionSpec(*(_fit(mesh, dim, axis) for dim, axis in zip(shape, spec))))

    return jax.tree_util.tree_map_with_path(one, tree)


def _fit(mesh: Mesh, dim: int, axis: Any) -> Any:
    if axis is None:
        return None
    size = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))]))
    return axis if dim % size == 0 else None


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ("data",) mesh over the first `num_devices` devices (default: all, all hosts)."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise MedusaError(f"--devices {n} is not available: this run sees {len(devices)} device(s)")
    # Auto axes: classic jit sharding propagation (make_mesh defaults to Explicit sharding-in-types).
    return jax.make_mesh((n,), (DATA_AXIS,), (AxisType.Auto,), devices=devices[:n])


def put_rows(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, Any]:
    """Global host batch (every host holds the same) -> global arrays split by `sharding` along rows; each
    process contributes only its own rows (`local_rows`)."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(sharding, v[local_rows(v.shape[0])], v.shape)
    return out


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
        return put_rows(batch, NamedSharding(self.mesh, logical_spec("batch")))

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


@dataclasses.dataclass
class Sharded:
    """Runs a training step with parameters, gradients and optimizer state sharded over a
    ("data", "fsdp", "tensor") mesh (`FSDP_RULES`); the jitted step's input and output shardings pin that layout
    and XLA inserts the all-gathers and reduce-scatters. Single host, or many hosts as in `DataParallel`.
    """

    mesh: Mesh
    rules: tuple = FSDP_RULES

    @classmethod
    def create(cls, num_devices: int | None = None, fsdp: int | None = None, tensor: int = 1) -> "Sharded":
        """A mesh over the first `num_devices` devices: tensor x fsdp (default: all the rest) x data (the rest)."""
        devices = jax.devices()
        n = len(devices) if num_devices is None else num_devices
        if not 1 <= n <= len(devices):
            raise MedusaError(f"--devices {n} is not available: this run sees {len(devices)} device(s)")
        if tensor < 1 or n % tensor:
            raise MedusaError(f"--tensor {tensor} does not divide the {n} devices; use a divisor of {n}")
        fsdp = n // tensor if fsdp is None else fsdp
        if fsdp < 1 or n % (fsdp * tensor):
            raise MedusaError(f"--fsdp {fsdp} x --tensor {tensor} does not divide the {n} devices; pick sizes "
                              f"whose product divides {n}")
        shape = (n // (fsdp * tensor), fsdp, tensor)
        mesh = jax.make_mesh(shape, FSDP_MESH_AXES, (AxisType.Auto,) * 3, devices=devices[:n])
        return cls(mesh)

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def batch_ways(self) -> int:
        """Devices the batch is split over (data x fsdp)."""
        return self.mesh.shape[DATA_AXIS] * self.mesh.shape[FSDP_AXIS]

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.batch_ways:
            raise MedusaError(f"--batch-size {batch_size} is not a multiple of the {self.batch_ways} data x fsdp "
                              f"devices; use a multiple of {self.batch_ways}")

    def shardings(self, tree: Any) -> Any:
        return tree_shardings(tree, self.mesh, self.rules)

    def constrain(self, tree: Any) -> Any:
        """Pins a params-like tree inside a jitted function to the rules' layout."""
        return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

    def gather(self, tree: Any) -> Any:
        """Pins a params-like tree inside a jitted function to its layout without the fsdp split (the
        all-gather of FSDP; a tensor split stays)."""
        rules = tuple((name, None if axis == FSDP_AXIS else axis) for name, axis in self.rules)
        return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, self.mesh, rules))

    def constrain_stacked(self, tree: Any) -> Any:
        """`constrain` for params stacked on a new leading (layer) axis, which stays whole."""
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)
        return jax.lax.with_sharding_constraint(tree, jax.tree.map(
            lambda s: NamedSharding(self.mesh, PartitionSpec(None, *s.spec)), self.shardings(one)))

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, logical_spec("batch", rules=self.rules))

    def place(self, tree: Any) -> Any:
        """Host (or device) pytree -> arrays laid out by the rules."""
        return jax.device_put(tree, self.shardings(tree))

    def fetch(self, tree: Any) -> Any:
        """Sharded device pytree -> host numpy (gathered from all hosts when needed)."""
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Global host batch (every host holds the same) -> device arrays split over data x fsdp."""
        return put_rows(batch, self.batch_sharding())

    def gather_rows(self, x: Any) -> np.ndarray:
        return np.asarray(self.fetch(x))

    def compile_step(self, fn: Callable, state: Any, frozen: Any, donate: bool = True) -> Callable:
        """jit of fn(state, frozen, batch, axis_name=None) -> (state, metrics) with `state` and `frozen` (pytrees
        of arrays or ShapeDtypeStructs) laid out by the rules, the batch split, metrics replicated."""
        state_sh = self.shardings(state)
        rep = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(functools.partial(fn, axis_name=None),
                       in_shardings=(state_sh, self.shardings(frozen), self.batch_sharding()),
                       out_shardings=(state_sh, rep), donate_argnums=(0,) if donate else ())

    def compile_eval(self, fn: Callable, params: Any, frozen: Any) -> Callable:
        """jit of fn(params, frozen, batch, axis_name=None) -> replicated sums."""
        rep = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(functools.partial(fn, axis_name=None),
                       in_shardings=(self.shardings(params), self.shardings(frozen), self.batch_sharding()),
                       out_shardings=rep)

    def compile_map(self, fn: Callable, frozen: Any) -> Callable:
        """jit of a per-example fn(frozen, batch) -> array with a leading batch axis (kept split)."""
        return jax.jit(fn, in_shardings=(self.shardings(frozen), self.batch_sharding()),
                       out_shardings=self.batch_sharding())


def tree_all_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite (a bool scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
