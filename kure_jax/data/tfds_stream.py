"""The ``tf.data`` engine behind the TFDS and image-folder datasets: :class:`TFDSDataset`.

Importing this module does not import TensorFlow; iterating a dataset does.

Order and resumption. Each process reads its own ``1 / process_count`` share of the
split (the remainder is dropped for training so every process has the same number of
steps). Epoch ``e`` on process ``i`` reads the files in an order seeded by
``(seed, e, i)``, shuffles the encoded examples in a buffer with the same seed
(``reshuffle_each_iteration=False``), keeps ``E * b`` of them (``b`` the local batch,
``E = (N // P) // b`` steps per epoch) and decodes and augments example ``j`` with the
stateless seed ``(seed(seed, e, i), j)``. The batch of step ``s`` is therefore a pure
function of ``(seed, s)`` and the process count: ``start_step = s`` rebuilds epoch
``s // E`` and skips its first ``(s % E) * b`` examples. Skipped examples are read but
not decoded, so resuming late in an ImageNet epoch costs one pass over the encoded
files of the part of the epoch already done.

Evaluation reads each process's share in file order, without augmentation; every
process yields ``ceil(ceil(N / P) / b)`` batches, the last ones padded with
``mask == 0``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from kure_jax.data.base import Batch, process_slice

if TYPE_CHECKING:
    import tensorflow as tf

    from kure_jax.data.preprocess import ImagePreprocessing

__all__ = ["DEFAULT_SHUFFLE_BUFFER", "ExampleSource", "TFDSDataset"]

DEFAULT_SHUFFLE_BUFFER = 16_384  # encoded examples per process (~1.8 GB of ImageNet JPEGs)


def _default_threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 2) - 1)  # leave a core to the host side of the training loop


class ExampleSource(Protocol):
    """Where a :class:`TFDSDataset` reads encoded examples from (TFDS or an image folder).

    Attributes:
      train_split, eval_split: split names.
    """

    train_split: str
    eval_split: str

    def read(
        self,
        split: str,
        *,
        process_index: int,
        process_count: int,
        drop_remainder: bool,
        shuffle_seed: int | None,
    ) -> tf.data.Dataset:
        """This process's share of ``split`` as ``(encoded image bytes, integer label)``.

        With ``drop_remainder`` every process gets ``N // process_count`` examples;
        without, ``ceil`` or ``floor`` of ``N / process_count``. ``shuffle_seed`` (or
        None for file order) seeds the order in which files are read.
        """
        ...


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TFDSDataset:
    """A :class:`kure_jax.data.base.Dataset` streamed with ``tf.data`` (module docstring).

    Attributes:
      name: registry name, e.g. ``"imagenet2012"`` or ``"folder"``.
      num_classes: number of label classes.
      num_train_examples, num_eval_examples: sizes of the two splits.
      source: reads encoded examples (:class:`ExampleSource`).
      preprocessing: decoding, augmentation and normalisation.
      shuffle_buffer: encoded examples in the shuffle buffer (per process).
      num_threads: size of the ``tf.data`` thread pool; ``None`` (default) resolves to all
        CPU cores but one.
    """

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    source: ExampleSource
    preprocessing: ImagePreprocessing
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_threads is None:
            object.__setattr__(self, "num_threads", _default_threads())
        if min(self.num_train_examples, self.num_eval_examples) < 1:
            raise ValueError(
                f"dataset {self.name!r} needs non-empty splits; got {self.num_train_examples} "
                f"training and {self.num_eval_examples} evaluation examples."
            )
        if self.shuffle_buffer < 1 or self.num_threads < 1:
            raise ValueError(
                f"shuffle_buffer and num_threads must be >= 1; got {self.shuffle_buffer} and "
                f"{self.num_threads}."
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(image_size, image_size, channels)`` of the preprocessed images."""
        return self.preprocessing.image_shape

    def train_batches(
        self,
        *,
        seed: int,
        start_step: int,
        global_batch_size: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """Endless iterator over this process's rows of the batches of ``start_step, ...``.

        Yields:
          ``{"image": float32 (b, H, W, C), "label": int32 (b,)}`` with
          ``b = global_batch_size // process_count``.

        Raises:
          ValueError: if the seed or ``start_step`` is negative, the global batch does not
            divide among the processes or exceeds a process's share of the split.
        """
        rows = process_slice(global_batch_size, process_index, process_count)
        local = rows.stop - rows.start
        steps_per_epoch = (self.num_train_examples // process_count) // local
        if steps_per_epoch < 1:
            raise ValueError(
                f"global batch size {global_batch_size} exceeds the "
                f"{self.num_train_examples // process_count * process_count} training examples "
                f"of {self.name} that divide evenly among {process_count} process(es)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {seed!r}.")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}.")
        return self._train_iterator(
            int(seed), start_step, local, steps_per_epoch, process_index, process_count
        )

    def eval_batches(
        self, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[Batch]:
        """One pass over the evaluation split, in a fixed order.

        Yields:
          ``{"image", "label", "mask"}`` as in training plus float32 ``mask`` ``(b,)``,
          0 on padding rows (zero images, label 0). Every process yields the same number
          of batches.

        Raises:
          ValueError: if the global batch does not divide among the processes.
        """
        rows = process_slice(global_batch_size, process_index, process_count)
        local = rows.stop - rows.start
        num_batches = math.ceil(math.ceil(self.num_eval_examples / process_count) / local)
        return self._eval_iterator(local, num_batches, process_index, process_count)

    def _train_iterator(
        self, seed: int, step: int, local: int, steps_per_epoch: int, index: int, count: int
    ) -> Iterator[Batch]:
        epoch, offset = divmod(step, steps_per_epoch)
        while True:
            yield from self._train_epoch(
                seed, epoch, offset, local, steps_per_epoch, index, count
            ).as_numpy_iterator()
            epoch, offset = epoch + 1, 0

    def _train_epoch(
        self,
        seed: int,
        epoch: int,
        offset: int,
        local: int,
        steps_per_epoch: int,
        process_index: int,
        process_count: int,
    ) -> tf.data.Dataset:
        import tensorflow as tf

        shuffle_seed, augment_seed = (
            int(x) for x in np.random.SeedSequence([seed, epoch, process_index]).generate_state(2)
        )
        ds = self.source.read(
            self.source.train_split,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=True,
            shuffle_seed=shuffle_seed,
        )
        buffer = min(self.shuffle_buffer, self.num_train_examples // process_count)
        ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        # Enumerate before skipping: example j keeps augmentation seed j when resuming.
        ds = ds.take(steps_per_epoch * local).enumerate().skip(offset * local)
        preprocessing = self.preprocessing

        def prepare(position: tf.Tensor, example: tuple[tf.Tensor, tf.Tensor]) -> Batch:
            encoded, label = example
            seed = tf.stack([tf.constant(augment_seed, tf.int64), position])
            return {"image": preprocessing.train(encoded, seed), "label": tf.cast(label, tf.int32)}

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        return ds.with_options(self._options())

    def _eval_iterator(
        self, local: int, num_batches: int, process_index: int, process_count: int
    ) -> Iterator[Batch]:
        import tensorflow as tf

        ds = self.source.read(
            self.source.eval_split,
            process_index=process_index,
            process_count=process_count,
            drop_remainder=False,
            shuffle_seed=None,
        )
        preprocessing = self.preprocessing

        def prepare(encoded: tf.Tensor, label: tf.Tensor) -> Batch:
            return {
                "image": preprocessing.eval(encoded),
                "label": tf.cast(label, tf.int32),
                "mask": tf.constant(1.0, tf.float32),
            }

        padding = tf.data.Dataset.from_tensors(
            {
                "image": tf.zeros(self.image_shape, tf.float32),
                "label": tf.constant(0, tf.int32),
                "mask": tf.constant(0.0, tf.float32),
            }
        ).repeat()
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).concatenate(padding)
        ds = ds.take(num_batches * local).batch(local).prefetch(tf.data.AUTOTUNE)
        yield from ds.with_options(self._options()).as_numpy_iterator()

    def _options(self) -> tf.data.Options:
        import tensorflow as tf

        options = tf.data.Options()
        options.deterministic = True  # parallel map and interleave keep their input order
        options.threading.private_threadpool_size = self.num_threads
        options.threading.max_intra_op_parallelism = 1  # parallel over examples instead
        return options
