"""Fashion-MNIST and MNIST from their original IDX files, in memory (no TensorFlow).

Both sets are four files (``.gz`` or not, read by :func:`kure_jax.data.idx.read_idx`)::

    train-images-idx3-ubyte  train-labels-idx1-ubyte    60,000 training images
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte     10,000 test images

Where they are looked for, the first folder holding all four winning:

* ``data_dir`` when given (``--config.dataset_options.data_dir=DIR``), and only there;
* ``fashion_mnist`` otherwise: ``/usr/share/datasets/fashion-mnist`` (Debian's
  ``dataset-fashion-mnist`` package), then Keras' cache ``$KERAS_HOME/datasets/fashion-mnist``
  (``~/.keras`` without ``KERAS_HOME``; ``/tmp/.keras`` where Keras could not write there), where
  ``keras.datasets.fashion_mnist.load_data()`` leaves the files;
* ``mnist`` has no such places (Keras caches MNIST as ``mnist.npz``, not IDX): ``data_dir``
  names the folder with the IDX files.

Images are float32 ``(28, 28, 1)`` in [0, 1] (pixel / 255), labels int32. Batches, shuffling,
per-process sharding and exact resumption are :class:`~kure_jax.data.in_memory.InMemoryDataset`'s.
Fashion-MNIST trains with the usual augmentation of padding 2 pixels, a random 28x28 crop
and a random horizontal flip; MNIST digits are not flipped.

References:
  Xiao, Rasul, Vollgraf. "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
  Learning Algorithms", arXiv:1708.07747, 2017.
"""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np

from kure_jax.data.idx import read_idx
from kure_jax.data.in_memory import InMemoryDataset

__all__ = [
    "IDX_FILES",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "default_dirs",
    "fashion_mnist_dataset",
    "find_idx_files",
    "load_idx_split",
    "mnist_dataset",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
# split: (images file, labels file), without the optional ".gz".
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_HOW_TO_GET = {
    "fashion_mnist": (
        "get them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
        "`python -c 'import keras; keras.datasets.fashion_mnist.load_data()'` (downloads into "
        "Keras' cache), or put them in a folder and set "
        "--config.dataset_options.data_dir=DIR"
    ),
    "mnist": (
        "put them (from http://yann.lecun.com/exdb/mnist/ or a mirror) in a folder and set "
        "--config.dataset_options.data_dir=DIR, or use the dataset 'tfds:mnist' (TensorFlow "
        "Datasets downloads it)"
    ),
}


def default_dirs(name: str) -> tuple[pathlib.Path, ...]:
    """Folders searched for ``name``'s IDX files when no ``data_dir`` is given.

    Args:
      name: ``"fashion_mnist"`` or ``"mnist"``.

    Returns:
      For ``"fashion_mnist"``: Debian's folder, then Keras' cache folders (see the module
      docstring); for ``"mnist"``: none.

    Raises:
      ValueError: for another name.
    """
    if name == "mnist":
        return ()
    if name != "fashion_mnist":
        raise ValueError(f"name must be 'fashion_mnist' or 'mnist'; got {name!r}.")
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    keras = ("datasets", "fashion-mnist")
    return (
        pathlib.Path(_DEBIAN_DIR),
        pathlib.Path(keras_home, *keras),
        pathlib.Path("/tmp", ".keras", *keras),  # Keras' fallback when its home is read-only
    )


def _in_dir(folder: pathlib.Path) -> dict[str, pathlib.Path] | None:
    """The four files in ``folder`` (plain preferred over ``.gz``), or None if one is missing."""
    found = {}
    for stem in (stem for pair in IDX_FILES.values() for stem in pair):
        candidates = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[stem] = path
    return found


def find_idx_files(
    name: str, data_dir: str | os.PathLike[str] | None = None
) -> dict[str, pathlib.Path]:
    """Locates the four IDX files of ``name`` (see the module docstring for where).

    Args:
      name: ``"fashion_mnist"`` or ``"mnist"``.
      data_dir: the folder holding the files; ``None`` searches :func:`default_dirs`.

    Returns:
      File stem (e.g. ``"train-images-idx3-ubyte"``) to its path, ``.gz`` or not.

    Raises:
      FileNotFoundError: a one-line message naming the folders searched and the ways to get
        the files.
      ValueError: for a name other than ``"fashion_mnist"`` or ``"mnist"``.
    """
    folders = default_dirs(name) if data_dir is None else (pathlib.Path(data_dir),)
    for folder in folders:
        found = _in_dir(folder)
        if found is not None:
            return found
    where = " or ".join(str(f) for f in folders) if folders else "no folder (data_dir not set)"
    stems = ", ".join(f"{s}[.gz]" for pair in IDX_FILES.values() for s in pair)
    raise FileNotFoundError(
        f"{name}: the IDX files {stems} are not in {where}; {_HOW_TO_GET[name]}."
    )


@functools.lru_cache(maxsize=4)
def _read_pair(images_path: pathlib.Path, labels_path: pathlib.Path) -> tuple[np.ndarray, ...]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{images_path} and {labels_path} must hold uint8 images (N, H, W) and labels (N,); "
            f"got {images.dtype} {images.shape} and {labels.dtype} {labels.shape}."
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: labels must be < {NUM_CLASSES}; got {labels.max()}.")
    images = (images[..., None] / np.float32(255)).astype(np.float32, copy=False)
    labels = labels.astype(np.int32)
    images.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return images, labels


def load_idx_split(
    name: str, split: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One split of Fashion-MNIST or MNIST, in the files' order.

    Args:
      name: ``"fashion_mnist"`` or ``"mnist"``.
      split: ``"train"`` or ``"test"``.
      data_dir: see :func:`find_idx_files`.

    Returns:
      float32 images ``(N, 28, 28, 1)`` in [0, 1] and int32 labels ``(N,)`` (read-only
      arrays, cached per file).

    Raises:
      FileNotFoundError: if the files are not found (see :func:`find_idx_files`).
      ValueError: for an unknown name or split, a damaged file (see
        :func:`kure_jax.data.idx.read_idx`) or files that are not uint8 images and labels
        of equal count below 10.
    """
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {list(IDX_FILES)}; got {split!r}.")
    files = find_idx_files(name, data_dir)
    images_stem, labels_stem = IDX_FILES[split]
    return _read_pair(files[images_stem], files[labels_stem])


def _dataset(
    name: str, data_dir: str | None, max_shift: int, flip: bool, num_train: int | None
) -> InMemoryDataset:
    train_images, train_labels = load_idx_split(name, "train", data_dir)
    test_images, test_labels = load_idx_split(name, "test", data_dir)
    if num_train is not None:
        if isinstance(num_train, bool) or not 0 < num_train <= len(train_labels):
            raise ValueError(
                f"num_train must be in [1, {len(train_labels)}] or None; got {num_train!r}."
            )
        train_images, train_labels = train_images[:num_train], train_labels[:num_train]
    return InMemoryDataset(
        name=name,
        train_images=train_images,
        train_labels=train_labels,
        eval_images=test_images,
        eval_labels=test_labels,
        num_classes=NUM_CLASSES,
        max_shift=max_shift,
        flip=flip,
    )


def fashion_mnist_dataset(
    *,
    data_dir: str | None = None,
    max_shift: int = 2,
    flip: bool = True,
    num_train: int | None = None,
) -> InMemoryDataset:
    """Fashion-MNIST (60,000 training and 10,000 test images) as the dataset ``"fashion_mnist"``.

    Args:
      data_dir: folder of the four IDX files; ``None`` looks where Debian's package and
        Keras put them (module docstring).
      max_shift: pad this many zero pixels and take a random 28x28 crop (0: no translation).
      flip: random horizontal flips of training images.
      num_train: train on the first ``num_train`` images of the training file only (its
        order is already mixed: about 1/10 per class); ``None``: all 60,000.

    Returns:
      An :class:`InMemoryDataset`; evaluation is the full 10,000-image test split.

    Raises:
      FileNotFoundError: if the files are not found: one line naming the folders searched
        and the three ways to get them.
      ValueError: for a damaged file or an invalid option.
    """
    return _dataset("fashion_mnist", data_dir, max_shift, flip, num_train)


def mnist_dataset(
    *,
    data_dir: str | None = None,
    max_shift: int = 0,
    num_train: int | None = None,
) -> InMemoryDataset:
    """MNIST's 60,000 training and 10,000 test digits from the IDX files a user has.

    Args:
      data_dir: folder of the four IDX files (needed: there is no default place).
      max_shift: largest random translation of training digits, in pixels (0: none).
      num_train: as in :func:`fashion_mnist_dataset`.

    Returns:
      An :class:`InMemoryDataset` named ``"mnist"`` (no flips: digits are not symmetric).

    Raises:
      FileNotFoundError: if ``data_dir`` is not set or lacks a file (one line saying how to
        get them).
      ValueError: for a damaged file or an invalid option.
    """
    return _dataset("mnist", data_dir, max_shift, False, num_train)
