"""The interface between datasets and the training loop: :class:`Dataset`, ``Batch``.

Training needs two things from a dataset:

* ``train_batches(seed=..., start_step=..., ...)``: the batches of steps ``start_step``,
  ``start_step + 1``, ..., where **the batch of step ``s`` is a pure function of
  ``(seed, s)``** (and, for streamed datasets, the process count). Resuming from a
  checkpoint at step ``s`` therefore needs no iterator state: the loop asks for
  ``start_step=s`` and sees exactly the batches an uninterrupted run would have seen.
* ``eval_batches(...)``: every evaluation example exactly once, in a fixed order, the
  last batch padded to full size with ``mask == 0`` on the padding.

Both yield only this process's share of each global batch (multi-host data
parallelism): ``b = B / P`` rows of a global batch of ``B`` rows with ``P =
process_count`` processes, and every process yields the same number of batches.
Batches are dicts of NumPy arrays: ``"image"`` float32 ``(b, H, W, C)``, ``"label"``
int32 ``(b,)`` and, for evaluation, ``"mask"`` float32 ``(b,)``.

This module imports no implementation; they import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Batch", "Dataset", "process_slice"]

Batch = dict[str, np.ndarray]


@runtime_checkable
class Dataset(Protocol):
    """What the training loop needs from a dataset (see the module docstring).

    Attributes:
      name: the registry name, e.g. ``"mnist5k"``.
      num_classes: number of label classes.
      image_shape: ``(height, width, channels)`` of one image.
      num_train_examples: size of the training split.
      num_eval_examples: size of the evaluation split.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train_examples: int
    num_eval_examples: int

    def train_batches(
        self,
        *,
        seed: int,
        start_step: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Endless iterator: this process's rows of the batches of ``start_step, ...``.

        Yields:
          ``{"image": float32 (b, H, W, C), "label": int32 (b,)}`` with
          ``b = global_batch_size // process_count``; the batch of step ``s`` is a
          pure function of ``(seed, s)`` (module docstring).

        Raises:
          ValueError: if ``start_step < 0`` or the global batch does not divide among
            the processes or does not fit in the training split.
        """
        ...

    def eval_batches(
        self, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """One pass over the evaluation split in a fixed order.

        Yields:
          ``{"image", "label"}`` as in training plus float32 ``"mask"`` ``(b,)``, 0 on
          the padding rows of the last batch(es).

        Raises:
          ValueError: if the global batch does not divide among the processes.
        """
        ...


def process_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that belong to one process.

    Args:
      global_batch_size: rows in the global batch; must be divisible by ``process_count``.
      process_index: this process, in ``[0, process_count)`` (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).

    Returns:
      ``slice(i * b, (i + 1) * b)`` with ``b = global_batch_size // process_count``.

    Raises:
      ValueError: if the sizes do not divide or the index is out of range.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count); got {process_index} of {process_count}."
        )
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number "
            f"of processes ({process_count})."
        )
    local = global_batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)
