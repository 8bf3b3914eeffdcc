"""TensorFlow Datasets input pipelines: ``cifar10``, ``imagenet2012``, ``tfds:<name>``.

Importing this module does not import TensorFlow; building a dataset does (and hides
the GPUs from it: JAX owns them). Each process reads its ``tfds.even_splits`` share of
a split; order, resumption and evaluation padding are those of
:class:`kure_jax.data.tfds_stream.TFDSDataset`.

Preparation. A dataset missing from ``data_dir`` is downloaded and prepared with
``download=True`` (TFDS's default; on a multi-host job run it once beforehand, e.g.
``tfds build mnist --data_dir DIR``). ``imagenet2012`` needs
``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` in ``manual_dir``
(default ``<data_dir>/downloads/manual``). A missing dataset raises one
``FileNotFoundError`` saying what to download and where.

The registry's ``mnist`` reads IDX files (:mod:`kure_jax.data.idx_datasets`); TFDS's MNIST
is ``tfds:mnist`` (with the ``"plain"`` preprocessing of ``TFDS_DATASETS``' defaults).
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import TYPE_CHECKING, Any

from kure_jax.data.tfds_stream import DEFAULT_SHUFFLE_BUFFER, TFDSDataset

if TYPE_CHECKING:
    import tensorflow as tf
    import tensorflow_datasets as tfds

__all__ = ["TFDS_DATASETS", "TFDS_PREFIX", "tfds_dataset"]

TFDS_PREFIX = "tfds:"
TFDS_DATASETS = ("mnist", "cifar10", "imagenet2012")  # with tuned defaults; any other via tfds:
_FULL_SHUFFLE_BYTES = 1 << 30  # splits up to 1 GiB encoded are shuffled exactly
_DEFAULTS = {  # name: (preprocessing, eval split)
    "mnist": ("plain", "test"),
    "cifar10": ("cifar", "test"),
    "imagenet2012": ("imagenet", "validation"),
}
_MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}


@dataclasses.dataclass(frozen=True, eq=False)
class _TfdsSource:
    builder: Any
    image_key: str
    label_key: str
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

        if process_count > 1:
            split = tfds.even_splits(split, process_count, drop_remainder=drop_remainder)[
                process_index
            ]
        shuffle = shuffle_seed is not None
        ds = self.builder.as_dataset(
            split=split,
            shuffle_files=shuffle,
            decoders={self.image_key: tfds.decode.SkipDecoding()},  # decoded in preprocessing
            read_config=tfds.ReadConfig(
                shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False
            ),
        )
        return ds.map(lambda example: (example[self.image_key], example[self.label_key]))


def tfds_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    download: bool = True,
    preprocessing: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    shuffle_buffer: int | None = None,
    num_threads: int | None = None,
) -> TFDSDataset:
    """Builds an image-classification dataset from TensorFlow Datasets.

    Args:
      name: a TFDS name (``"mnist"``, ``"cifar10"``, ``"imagenet2012"``, ...), with or
        without the ``"tfds:"`` prefix; ``"name/config:version"`` works as in ``tfds``.
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).
      manual_dir: directory of manually downloaded files (``imagenet2012``); default
        ``<data_dir>/downloads/manual``.
      download: download and prepare the dataset if ``data_dir`` lacks it.
      preprocessing: one of ``kure_jax.data.preprocess.PREPROCESSINGS``; default
        ``"imagenet"`` for imagenet2012, ``"cifar"`` for cifar10, ``"plain"`` for mnist
        and other datasets of fixed-size images up to 64 pixels, else ``"imagenet"``.
      image_size: output side; default 224, or the native size of fixed-size images.
      channels: 1 or 3; default from the dataset's image feature, else 3.
      train_split: training split name.
      eval_split: evaluation split; default ``"validation"`` for imagenet2012, else
        ``"test"``.
      shuffle_buffer: encoded examples per process in the shuffle buffer; default the
        whole split if it is at most 1 GiB, else ``DEFAULT_SHUFFLE_BUFFER``.
      num_threads: ``tf.data`` threads; default all CPU cores but one.

    Returns:
      A :class:`TFDSDataset`.

    Raises:
      ValueError: for an unknown dataset, split or option value, or a dataset that is
        not image classification (it needs an image and a class-label feature).
      FileNotFoundError: if the dataset is not prepared and cannot be (manual files
        missing, ``download=False`` or the download failed); the message says what to
        download and where.
    """
    from kure_jax.data.preprocess import ImagePreprocessing, hide_gpus_from_tensorflow

    hide_gpus_from_tensorflow()
    import tensorflow_datasets as tfds

    name = name.removeprefix(TFDS_PREFIX)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(
            f"Unknown TFDS dataset {name!r}; see https://www.tensorflow.org/datasets/catalog "
            f"for the names (prefix them with {TFDS_PREFIX!r})."
        ) from err
    _prepare(builder, name=name, manual_dir=manual_dir, download=download)

    info = builder.info
    image_key, label_key = _supervised_keys(info, name)
    image_shape = info.features[image_key].shape  # (H, W, C), None where it varies
    base = name.split("/")[0].split(":")[0]
    fixed = None not in image_shape[:2] and image_shape[0] == image_shape[1]
    default_preprocessing, default_eval = _DEFAULTS.get(
        base, ("plain" if fixed and image_shape[0] <= 64 else "imagenet", "test")
    )
    spec = ImagePreprocessing(
        name=preprocessing or default_preprocessing,
        image_size=image_size or (image_shape[0] if fixed else 224),
        channels=channels or image_shape[2] or 3,
    )
    eval_split = eval_split or default_eval
    known = list(info.splits)  # empty when TFDS has no split metadata (e.g. mock data)
    for split in (train_split, eval_split):
        if known and split not in known:
            raise ValueError(f"{name} has no split {split!r}; its splits are {known}.")
    num_train, num_eval = (_split_size(builder, s, image_key) for s in (train_split, eval_split))
    if shuffle_buffer is None:
        encoded_bytes = info.splits[train_split].num_bytes if known else 0
        small = 0 < encoded_bytes <= _FULL_SHUFFLE_BYTES
        shuffle_buffer = num_train if small else DEFAULT_SHUFFLE_BUFFER
    source = _TfdsSource(builder, image_key, label_key, train_split, eval_split)
    return TFDSDataset(
        name=f"{TFDS_PREFIX}{name}" if base not in TFDS_DATASETS else name,
        num_classes=info.features[label_key].num_classes,
        num_train_examples=num_train,
        num_eval_examples=num_eval,
        source=source,
        preprocessing=spec,
        shuffle_buffer=shuffle_buffer,
        num_threads=num_threads,
    )


def _prepare(
    builder: tfds.core.DatasetBuilder, *, name: str, manual_dir: str | None, download: bool
) -> None:
    """Downloads and prepares ``builder`` if needed; one FileNotFoundError if it cannot."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    if builder.is_prepared():
        return
    root = os.fspath(builder.data_dir_root)
    build = f"tfds build {name} --data_dir {root}"
    if not download:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {root}. Prepare it once with `{build}` "
            f"(on a machine with internet access, then copy {root}), or pass download=True "
            "(config.dataset_options.download)."
        )
    instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    if instructions:
        manual = manual_dir or os.path.join(root, "downloads", "manual")
        needed = _MANUAL_FILES.get(name.split("/")[0], ())
        missing = [f for f in needed if not tf.io.gfile.exists(os.path.join(manual, f))]
        empty = not tf.io.gfile.isdir(manual) or not tf.io.gfile.listdir(manual)
        if missing or empty:
            what = " and ".join(missing) if missing else "the files described below"
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {root} and needs a manual download: "
                f"put {what} into {manual} (or set config.dataset_options.manual_dir), "
                f"then rerun; the first run converts them into {root} (or run `{build} "
                f"--manual_dir {manual}`). TFDS's instructions:\n"
                + textwrap.dedent(instructions).strip()
            )
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as err:  # network, checksum or manual-file errors: one message
        raise FileNotFoundError(
            f"Could not download and prepare TFDS dataset {name!r} into {root}: {err}\n"
            f"Without internet access, run `{build}` on a machine that has it and copy {root} "
            "here."
        ) from err


def _supervised_keys(info: tfds.core.DatasetInfo, name: str) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    keys = info.supervised_keys
    image_key, label_key = keys if isinstance(keys, tuple) and len(keys) == 2 else ("", "")
    features = info.features
    if not (
        image_key in features
        and label_key in features
        and isinstance(features[image_key], tfds.features.Image)
        and isinstance(features[label_key], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"TFDS dataset {name!r} is not image classification: its supervised keys {keys} "
            "must name an Image and a ClassLabel feature."
        )
    return image_key, label_key


def _split_size(builder: tfds.core.DatasetBuilder, split: str, image_key: str) -> int:
    import tensorflow_datasets as tfds

    if split in builder.info.splits:
        return builder.info.splits[split].num_examples
    # No split metadata (mock data): ask the dataset for its cardinality.
    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    size = int(ds.cardinality())
    if size < 0:
        raise ValueError(f"cannot determine the size of split {split!r} of {builder.name}.")
    return size
