"""Image-folder datasets: your own JPEG/PNG images, one subfolder per class, no code.

Set ``config.dataset = "folder"`` and ``config.data_dir`` to a root laid out as::

    root/
      train/                 # the training split
        cat/  001.jpg 002.png ...
        dog/  ...
      validation/            # or val/ or test/: the evaluation split
        cat/  ...
        dog/  ...

Classes are the label folder names over all splits in sorted (string) order: ``cat`` is
0, ``dog`` 1; name folders ``00``, ``01``, ... ``10`` to keep a numeric order. Files
ending in ``.jpg``, ``.jpeg`` or ``.png`` (any case) are read; TFDS's
``tfds.ImageFolder`` builder scans the tree and fixes the order of each split.

Batches, shuffling, resumption and per-process sharding are those of
:class:`kure_jax.data.tfds_stream.TFDSDataset`; the default preprocessing is the
ImageNet one (random-resized crop and flip, resize and centre crop, ImageNet
normalisation) at 224 pixels. With several processes each one reads every file of a
split and keeps its share (``Dataset.shard``): fine for the folder sizes this is meant
for; for very large data on many hosts, prepare a TFDS dataset (TFRecords) instead.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from kure_jax.data.tfds_stream import DEFAULT_SHUFFLE_BUFFER, TFDSDataset

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["EVAL_SPLITS", "FOLDER", "folder_dataset"]

FOLDER = "folder"
EVAL_SPLITS = ("validation", "val", "test")  # searched in this order when not given

_LAYOUT = "root/<split>/<class>/<image>.jpg|.png, e.g. root/train/cat/001.jpg"


@dataclasses.dataclass(frozen=True, eq=False)
class _FolderSource:
    builder: Any
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
        import tensorflow_datasets as tfds

        del shuffle_seed  # the file list has a fixed order; the training buffer shuffles it
        ds = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        if process_count > 1:
            ds = ds.shard(process_count, process_index)
        if drop_remainder:
            ds = ds.take(self.builder.info.splits[split].num_examples // process_count)
        return ds.map(lambda example: (example["image"], example["label"]))


def folder_dataset(
    *,
    data_dir: str,
    preprocessing: str = "imagenet",
    image_size: int = 224,
    channels: int = 3,
    train_split: str = "train",
    eval_split: str | None = None,
    shuffle_buffer: int | None = None,
    num_threads: int | None = None,
) -> TFDSDataset:
    """Builds a dataset from a class-per-subfolder image tree (layout in the module docstring).

    Args:
      data_dir: the root folder (local or any path ``tf.io.gfile`` reads, e.g. ``gs://``).
      preprocessing: one of ``kure_jax.data.preprocess.PREPROCESSINGS``.
      image_size: side of the square images the model sees.
      channels: 1 (images converted to grayscale) or 3 (RGB).
      train_split: name of the training split folder.
      eval_split: name of the evaluation split folder; default the first of
        ``EVAL_SPLITS`` that exists.
      shuffle_buffer: encoded images per process in the shuffle buffer; default
        ``DEFAULT_SHUFFLE_BUFFER`` (all images of smaller folders: an exact shuffle).
      num_threads: ``tf.data`` threads; default all CPU cores but one.

    Returns:
      A :class:`~kure_jax.data.tfds_stream.TFDSDataset` named ``"folder"``.

    Raises:
      FileNotFoundError: if ``data_dir`` is not a directory or holds no split folders.
      ValueError: if a split is missing or empty, or for invalid preprocessing options.
    """
    from kure_jax.data.preprocess import ImagePreprocessing, hide_gpus_from_tensorflow

    hide_gpus_from_tensorflow()
    import tensorflow as tf
    import tensorflow_datasets as tfds

    spec = ImagePreprocessing(name=preprocessing, image_size=image_size, channels=channels)
    if not data_dir or not tf.io.gfile.isdir(data_dir):
        raise FileNotFoundError(
            f"Image folder {data_dir!r} (config.data_dir) is not a directory; it must be laid "
            f"out as {_LAYOUT}."
        )
    builder = tfds.ImageFolder(data_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    if not splits:
        raise FileNotFoundError(
            f"Image folder {data_dir!r} has no split folders with class folders of images; it "
            f"must be laid out as {_LAYOUT}."
        )
    if eval_split is None:
        eval_split = next((s for s in EVAL_SPLITS if s in splits), None)
        if eval_split is None:
            raise ValueError(
                f"Image folder {data_dir!r} has no evaluation split: add one of "
                f"{list(EVAL_SPLITS)} next to {train_split!r}; found {sorted(splits)}."
            )
    for split in (train_split, eval_split):
        if not splits.get(split):
            raise ValueError(
                f"Image folder {data_dir!r} has no images in split {split!r}; found splits "
                f"{sorted(splits)} (layout {_LAYOUT})."
            )
    if shuffle_buffer is None:
        shuffle_buffer = min(splits[train_split], DEFAULT_SHUFFLE_BUFFER)
    return TFDSDataset(
        name=FOLDER,
        num_classes=builder.info.features["label"].num_classes,
        num_train_examples=splits[train_split],
        num_eval_examples=splits[eval_split],
        source=_FolderSource(builder, train_split, eval_split),
        preprocessing=spec,
        shuffle_buffer=shuffle_buffer,
        num_threads=num_threads,
    )
