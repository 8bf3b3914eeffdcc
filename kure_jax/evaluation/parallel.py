"""Data-parallel evaluation: the test batch sharded over every device of every process.

:class:`EvalMesh` is a 1-D ``Mesh`` over the evaluation devices with the axis ``"data"``. The
sweep's forward passes, activation calibration and mapped sweeps run as ``jax.jit`` programs
whose images are sharded along ``"data"`` (``NamedSharding``) and whose variables are
replicated; XLA partitions them, so the model code is unchanged.

Every device runs the model on its rows of the batch (``jax.shard_map``; the variables
replicated), returns one row ``[correct, loss, mask]`` per example, and the rows come back to
every process (replicated outputs); the host adds them up in float64 *sequentially in the
global example order*. Padding rows add exact zeros and a sequential sum does not depend on
where batches start, so the totals depend only on the per-example values.

Those values depend on the shape of the call that computed them: XLA's convolutions and matrix
products tile their work by the batch size, so one example's logits can differ in the last
bit between a batch of 304 rows and one of 38 (measured on CPU: 9e-7 absolute). Hence:

* ``micro_batch=None`` (default): each device evaluates its ``B / devices`` rows in one call.
  Accuracy and loss agree with one device's to float32 rounding (an argmax tie broken by a
  last-bit difference could move one example).
* ``micro_batch=m``: each device evaluates its rows in calls of exactly ``m`` rows
  (``lax.map``), and the global batch is a multiple of ``m * devices``: every example is then
  computed in the same ``m``-row call on any device count, and the points equal one device's
  (with the same ``m``) bit for bit (tests/test_eval_parallel.py: 1 vs 8 devices, 1 vs 2
  processes).

With several processes each reads only its share of every global batch
(``Dataset.eval_batches(process_index=..., process_count=...)``), which
``jax.make_array_from_process_local_data`` assembles into the global array.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["DATA_AXIS", "EvalMesh"]

DATA_AXIS = "data"
PyTree = Any


class EvalMesh:
    """Where an evaluation runs: the batch along ``"data"`` of a mesh, the variables replicated.

    Args:
      devices: the devices to evaluate on, of one or more processes; ``None``: all of
        ``jax.devices()`` (every device of every process after ``jax.distributed.initialize``).
      micro_batch: rows per model call on each device (module docstring), or ``None``: all
        of the device's rows in one call.

    Raises:
      ValueError: for an empty device list, processes holding different numbers of devices
        (each process then could not feed an equal share), or ``micro_batch < 1``.
    """

    def __init__(
        self, devices: Sequence[jax.Device] | None = None, *, micro_batch: int | None = None
    ) -> None:
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("EvalMesh needs at least one device.")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 (or None); got {micro_batch}.")
        self.micro_batch = micro_batch
        per_process: dict[int, int] = {}
        for device in devices:
            per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
        if len(set(per_process.values())) > 1:
            raise ValueError(f"every process must give the same number of devices; got "
                             f"{dict(sorted(per_process.items()))} (process: devices).")
        self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.processes = sorted(per_process)
        self.local_device_count = per_process.get(jax.process_index(), 0)

    @property
    def num_devices(self) -> int:
        """Devices over all processes."""
        return self.mesh.size

    @property
    def process_count(self) -> int:
        """Processes that share each global batch."""
        return len(self.processes)

    @property
    def process_index(self) -> int:
        """This process's position among :attr:`process_count` (its share of each batch)."""
        return self.processes.index(jax.process_index())

    @property
    def row_multiple(self) -> int:
        """Global batches are a multiple of this: ``devices * (micro_batch or 1)``."""
        return self.num_devices * (self.micro_batch or 1)

    def global_batch_size(self, requested: int) -> int:
        """``requested`` rounded up to a multiple of :attr:`row_multiple` (padding is masked)."""
        return -(-requested // self.row_multiple) * self.row_multiple

    def jit(self, fn: Callable) -> Callable:
        """``jax.jit(fn)`` with replicated outputs: every process can read every result."""
        return jax.jit(fn, out_shardings=self.replicated)

    def per_device(
        self, fn: Callable, *, replicated: int, batched: int, batch_axis: int = 0
    ) -> Callable:
        """``fn`` run by every device on its rows, its outputs gathered to every process.

        Args:
          fn: ``fn(*replicated_args, *batched_args) -> outputs``, written for one device's
            rows; its outputs hold one entry per row along ``batch_axis``.
          replicated: how many leading arguments are the same on every device (variables,
            mapped values).
          batched: how many following arguments are sharded along their axis 0 (the batch).
          batch_axis: the row axis of every output.

        Returns:
          ``jit(shard_map(fn))`` whose outputs are the rows of all devices, in order,
          replicated.
        """
        row_spec = PartitionSpec(*([None] * batch_axis), DATA_AXIS)
        mapped = jax.shard_map(
            fn, mesh=self.mesh,
            in_specs=(PartitionSpec(),) * replicated + (PartitionSpec(DATA_AXIS),) * batched,
            out_specs=row_spec, check_vma=False)
        return self.jit(mapped)

    def micro_batched(self, fn: Callable[[PyTree, jax.Array], PyTree]) -> Callable:
        """``fn(variables, images)`` evaluated in calls of :attr:`micro_batch` rows.

        Args:
          fn: maps ``images (b, ...)`` to a pytree of ``(b, ...)`` arrays (logits, layer
            inputs), row by row.

        Returns:
          The same function; with ``micro_batch = m`` and ``b > m`` (``b`` a multiple of
          ``m``) it runs ``fn`` on ``b / m`` consecutive slices of ``m`` rows with
          ``lax.map`` and concatenates their outputs.
        """
        m = self.micro_batch
        if m is None:
            return fn

        def apply(variables: PyTree, images: jax.Array) -> PyTree:
            b = images.shape[0]
            if b <= m:
                return fn(variables, images)
            chunks = images.reshape(b // m, m, *images.shape[1:])
            out = jax.lax.map(lambda x: fn(variables, x), chunks)
            return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)

        return apply

    def replicate(self, tree: PyTree) -> PyTree:
        """The same host (or single-device) values on every device of the mesh.

        With several processes ``device_put`` cannot reach other hosts' devices; a jitted
        identity with a replicated output builds the global arrays (every process holds the
        same values: the same checkpoint or the same seeded computation).
        """
        if self.process_count == 1:
            return jax.device_put(tree, self.replicated)
        # Host values: arrays committed to this process's device would not be global ones.
        return jax.jit(lambda t: t, out_shardings=self.replicated)(jax.device_get(tree))

    def place_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch -> arrays sharded along ``"data"``.

        A share whose rows do not divide among this process's devices is padded with copies
        of its first row and ``mask`` 0 (a ``"mask"`` of ones is added if missing).

        Args:
          local: ``{"image": (b, ...), "label": (b,)[, "mask": (b,)]}`` NumPy arrays.

        Returns:
          The same keys (and ``"mask"``) as global arrays of ``b' * process_count`` rows.
        """
        rows = len(local["label"])
        batch = dict(local)
        if "mask" not in batch:
            batch["mask"] = np.ones(rows, np.float32)
        pad = -rows % (self.local_device_count * (self.micro_batch or 1))
        if pad:
            batch = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[:1], pad, axis=0)])
                     for k, v in batch.items()}
            batch["mask"][rows:] = 0.0
        return {k: jax.make_array_from_process_local_data(self.rows, np.asarray(v))
                for k, v in batch.items()}

    def shard_rows(self, array: np.ndarray) -> tuple[jax.Array, int]:
        """A host array that every process holds in full (e.g. calibration images) as a
        global array sharded along ``"data"``.

        Returns:
          ``(array, n)``: the array padded with copies of its first row to a multiple of
          :attr:`row_multiple` rows, and its ``n`` original rows (drop the rest).
        """
        array = np.asarray(array)
        rows = array.shape[0]
        pad = -rows % self.row_multiple
        if pad:
            array = np.concatenate([array, np.repeat(array[:1], pad, axis=0)])
        placed = jax.make_array_from_callback(array.shape, self.rows, lambda index: array[index])
        return placed, rows
