"""Input pipelines. Importing this package never imports TensorFlow."""

from kure_jax.data.mnist5k import ArraySplit as ArraySplit
from kure_jax.data.mnist5k import load_mnist5k as load_mnist5k
from kure_jax.data.pipeline import DATASET_NAMES as DATASET_NAMES
from kure_jax.data.pipeline import Batch as Batch
from kure_jax.data.pipeline import Dataset as Dataset
from kure_jax.data.pipeline import InMemoryDataset as InMemoryDataset
from kure_jax.data.pipeline import get_dataset as get_dataset
from kure_jax.data.pipeline import process_slice as process_slice

__all__ = [
    "DATASET_NAMES",
    "ArraySplit",
    "Batch",
    "Dataset",
    "InMemoryDataset",
    "get_dataset",
    "load_mnist5k",
    "process_slice",
]
