"""A :class:`~kure_jax.data.base.Dataset` whose splits are NumPy arrays in memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from kure_jax.data.base import Batch, process_slice

__all__ = ["InMemoryDataset"]


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
    """A :class:`~kure_jax.data.base.Dataset` whose splits are NumPy arrays held in memory.

    The training order is a fresh permutation per epoch drawn from
    ``np.random.default_rng([seed, 0, epoch])``; each epoch drops its last partial batch,
    so step ``s`` reads rows ``perm[(s % E) * B : (s % E + 1) * B]`` of epoch
    ``s // E`` with ``E = num_train_examples // B`` steps per epoch. With
    ``max_shift > 0`` every training image is translated by a random integer offset in
    ``[-max_shift, max_shift]`` per axis (zero fill), drawn for the whole global batch
    from ``np.random.default_rng([seed, 1, s])``, so it too depends only on
    ``(seed, s)`` and not on the number of processes. With ``flip`` every training image
    is mirrored left-right with probability 1/2, drawn likewise from
    ``np.random.default_rng([seed, 2, s])`` (after the translation).

    Attributes:
      name: registry name.
      train_images, train_labels: float32 ``(N, H, W, C)`` and int32 ``(N,)``.
      eval_images, eval_labels: the evaluation split, same layout.
      num_classes: number of classes.
      max_shift: largest random translation of training images, in pixels (0: none);
        the same as padding ``max_shift`` zero pixels and taking a random ``H x W`` crop.
      flip: mirror training images left-right at random (not for digits).

    Raises:
      ValueError: if a split is empty or not ``(N, H, W, C)`` images with ``(N,)`` labels,
        the two splits' image shapes differ, ``max_shift`` is not an integer in
        ``[0, min(H, W))`` or ``flip`` is not a bool.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    max_shift: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        for split, images, labels in (
            ("train", self.train_images, self.train_labels),
            ("eval", self.eval_images, self.eval_labels),
        ):
            if images.ndim != 4 or labels.shape != images.shape[:1] or not len(labels):
                raise ValueError(
                    f"{self.name} {split} split needs images (N, H, W, C) and labels (N,) with "
                    f"N > 0; got {images.shape} and {labels.shape}."
                )
        if self.train_images.shape[1:] != self.eval_images.shape[1:]:
            raise ValueError(
                f"train and eval images differ in shape: {self.train_images.shape[1:]} vs "
                f"{self.eval_images.shape[1:]}."
            )
        height, width = self.train_images.shape[1:3]
        integer = isinstance(self.max_shift, int | np.integer) and not isinstance(
            self.max_shift, bool
        )
        if not integer or not 0 <= self.max_shift < min(height, width):
            raise ValueError(
                f"max_shift must be an int in [0, {min(height, width)}); got {self.max_shift!r}."
            )
        if not isinstance(self.flip, bool | np.bool_):
            raise ValueError(f"flip must be a bool; got {self.flip!r}.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # type: ignore[return-value]

    @property
    def num_train_examples(self) -> int:
        return len(self.train_labels)

    @property
    def num_eval_examples(self) -> int:
        return len(self.eval_labels)

    def train_batches(
        self,
        *,
        seed: int,
        start_step: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """See :meth:`Dataset.train_batches`.

        Raises:
          ValueError: if the global batch is larger than the training split, does not
            divide among the processes, or ``start_step < 0``.
        """
        rows = process_slice(global_batch_size, process_index, process_count)
        steps_per_epoch = self.num_train_examples // global_batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"global batch size {global_batch_size} exceeds the {self.num_train_examples} "
                f"training examples of {self.name}."
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}.")
        return self._train_iterator(seed, start_step, global_batch_size, steps_per_epoch, rows)

    def _train_iterator(
        self, seed: int, step: int, batch_size: int, steps_per_epoch: int, rows: slice
    ) -> Iterator[Batch]:
        epoch, order = -1, np.empty(0, np.int64)
        while True:
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                rng = np.random.default_rng([seed, 0, epoch])
                order = rng.permutation(self.num_train_examples)
            offset = (step % steps_per_epoch) * batch_size
            index = np.sort(order[offset : offset + batch_size])[rows]  # sorted: faster gather
            images = self.train_images[index]
            if self.max_shift:
                shifts = np.random.default_rng([seed, 1, step]).integers(
                    -self.max_shift, self.max_shift + 1, size=(batch_size, 2)
                )
                images = _translate(images, shifts[rows], self.max_shift)
            if self.flip:
                mirror = np.random.default_rng([seed, 2, step]).random(batch_size) < 0.5
                images = np.where(mirror[rows, None, None, None], images[:, :, ::-1], images)
            yield {"image": images, "label": self.train_labels[index]}
            step += 1

    def eval_batches(
        self, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """See :meth:`Dataset.eval_batches`.

        Raises:
          ValueError: if the global batch does not divide among the processes.
        """
        rows = process_slice(global_batch_size, process_index, process_count)
        total = self.num_eval_examples
        for start in range(0, total, global_batch_size):
            index = np.arange(start, start + global_batch_size)[rows]
            valid = index < total
            index = np.where(valid, index, 0)  # padding rows repeat example 0, masked out
            yield {
                "image": self.eval_images[index],
                "label": self.eval_labels[index],
                "mask": valid.astype(np.float32),
            }


def _translate(images: np.ndarray, shifts: np.ndarray, pad: int) -> np.ndarray:
    """Moves image ``i`` by ``shifts[i] = (dy, dx)`` pixels, filling with zeros."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = (pad - shifts[:, :1]) + np.arange(height)  # (n, H) source rows
    cols = (pad - shifts[:, 1:]) + np.arange(width)  # (n, W) source columns
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
