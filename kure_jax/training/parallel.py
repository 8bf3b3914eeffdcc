"""Data parallelism: ``jax.jit`` over a device mesh (default) or ``jax.pmap``.

Both split every global batch evenly over the devices and keep one copy of the
state per device; they compute the same thing:

* ``"jit"`` (:class:`MeshParallel`): the batch is a global ``jax.Array`` sharded along
  the mesh axis ``"data"``, the state is replicated. ``train_step`` is written for the
  whole global batch; XLA's SPMD partitioner inserts the all-reduces of the gradient
  and of BatchNorm's batch moments, so BatchNorm normalises with global-batch
  statistics with no ``axis_name``.
* ``"pmap"`` (:class:`PmapParallel`): the state carries a leading device axis and the
  batch is reshaped to ``(devices, per_device, ...)``. The step averages gradients,
  metrics and batch statistics with ``jax.lax.pmean`` over ``"batch"``, and the model
  is built with ``bn_axis_name="batch"``, so BatchNorm averages its moments across
  devices: again global-batch statistics. Per-device means of equal-sized shards
  average to the global mean, so losses, gradients and BatchNorm statistics match the
  ``jit`` path up to float rounding (tests/test_training_parallel.py checks this on 8 devices).

Multi-host: every process loads only its rows of the global batch
(:func:`kure_jax.data.pipeline.process_slice`); ``MeshParallel`` assembles the global
array with ``jax.make_array_from_process_local_data``, ``PmapParallel`` feeds its local
devices. The state is identical on every process (same seed), so placing it needs no
communication.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "PMAP_AXIS", "MeshParallel", "Parallel", "PmapParallel", "make_parallel"]

DATA_AXIS = "data"
PMAP_AXIS = "batch"
PyTree = Any


class MeshParallel:
    """``jax.jit`` with the batch sharded over a 1-D mesh and the state replicated.

    Args:
      devices: the devices of the mesh; all of ``jax.devices()`` by default.
    """

    kind = "jit"
    axis_name: str | None = None  # no named axis inside the step: XLA partitions it

    def __init__(self, devices: Sequence[jax.Device] | None = None) -> None:
        devices = list(jax.devices() if devices is None else devices)
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.data_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def num_devices(self) -> int:
        """Devices over all processes that share a global batch."""
        return self.mesh.size

    def place_state(self, state: PyTree) -> PyTree:
        """Replicates a (host or canonical) state on every device of the mesh.

        With several processes ``device_put`` cannot target the other hosts' devices; a jitted
        identity with a replicated output sharding builds the global arrays instead (every
        process holds the same host value, as after the same seeded init or restore).
        """
        if jax.process_count() == 1:
            return jax.device_put(state, self.replicated)
        return jax.jit(lambda tree: tree, out_shardings=self.replicated)(state)

    def canonical_state(self, state: PyTree) -> PyTree:
        """The state as replicated global arrays (already the case here)."""
        return state

    @property
    def canonical_sharding(self) -> jax.sharding.Sharding:
        """Sharding of :meth:`canonical_state` leaves (restore targets use it)."""
        return self.replicated

    def place_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows -> global arrays sharded along ``"data"``."""
        return {
            key: jax.make_array_from_process_local_data(self.data_sharding, value)
            for key, value in local_batch.items()
        }

    def compile_train_step(self, fn: Callable) -> Callable:
        """``jax.jit`` with the state donated, replicated in and out, the batch sharded."""
        return jax.jit(
            fn,
            in_shardings=(self.replicated, self.data_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def compile_eval_step(self, fn: Callable) -> Callable:
        return jax.jit(
            fn, in_shardings=(self.replicated, self.data_sharding), out_shardings=self.replicated
        )

    def metrics_to_host(self, metrics: PyTree) -> PyTree:
        """Fetches replicated scalars as NumPy values."""
        return jax.device_get(metrics)


class PmapParallel:
    """``jax.pmap`` over this process's devices with ``axis_name="batch"``.

    Args:
      devices: local devices to map over; all of ``jax.local_devices()`` by default.
    """

    kind = "pmap"
    axis_name: str | None = PMAP_AXIS

    def __init__(self, devices: Sequence[jax.Device] | None = None) -> None:
        self.devices = list(jax.local_devices() if devices is None else devices)
        self._stacked = NamedSharding(
            Mesh(np.asarray(self.devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS)
        )
        self._replicated = NamedSharding(
            Mesh(np.asarray(self.devices), (PMAP_AXIS,)), PartitionSpec()
        )

    @property
    def num_devices(self) -> int:
        return len(self.devices) * jax.process_count()

    def place_state(self, state: PyTree) -> PyTree:
        """Copies the state to every local device, stacked along a new leading axis."""
        n = len(self.devices)
        return jax.tree.map(
            lambda x: jax.device_put(jnp.broadcast_to(x, (n, *jnp.shape(x))), self._stacked),
            state,
        )

    def canonical_state(self, state: PyTree) -> PyTree:
        """Drops the device axis (every replica is identical): replicated arrays."""
        return jax.tree.map(lambda x: jax.device_put(x[0], self._replicated), state)

    @property
    def canonical_sharding(self) -> jax.sharding.Sharding:
        return self._replicated

    def place_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Reshapes this process's rows to ``(local_devices, per_device, ...)``."""
        n = len(self.devices)
        placed = {}
        for key, value in local_batch.items():
            if value.shape[0] % n:
                raise ValueError(
                    f"per-process batch of {value.shape[0]} rows does not split over {n} devices."
                )
            value = value.reshape(n, value.shape[0] // n, *value.shape[1:])
            placed[key] = jax.device_put(value, self._stacked)
        return placed

    def compile_train_step(self, fn: Callable) -> Callable:
        return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=0)

    def compile_eval_step(self, fn: Callable) -> Callable:
        return jax.pmap(fn, axis_name=PMAP_AXIS, devices=self.devices)

    def metrics_to_host(self, metrics: PyTree) -> PyTree:
        """Fetches replica 0's (identical, averaged) scalars."""
        return jax.device_get(jax.tree.map(lambda x: x[0], metrics))


Parallel = MeshParallel | PmapParallel


def make_parallel(kind: str, devices: Sequence[jax.Device] | None = None) -> Parallel:
    """The data-parallel strategy of ``config.parallel``.

    Args:
      kind: ``"jit"`` (mesh + ``NamedSharding``) or ``"pmap"``.
      devices: devices to use (default: all; for ``"pmap"``, this process's).

    Returns:
      A :class:`MeshParallel` or :class:`PmapParallel`.

    Raises:
      ValueError: for another ``kind``.
    """
    if kind == "jit":
        return MeshParallel(devices)
    if kind == "pmap":
        return PmapParallel(devices)
    raise ValueError(f"parallel must be one of ['jit', 'pmap']; got {kind!r}.")
