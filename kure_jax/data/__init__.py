"""Input pipelines. Importing this package never imports TensorFlow."""

from kure_jax.data.mnist5k import ArraySplit as ArraySplit
from kure_jax.data.mnist5k import load_mnist5k as load_mnist5k

__all__ = ["ArraySplit", "load_mnist5k"]
