"""Pallas kernels behind kure_jax's quantisation and KURE ops, with a jnp path everywhere else.

Each public function has the signature and semantics of the op it accelerates, plus:

* ``impl``: ``"pallas"`` (the kernel; an input it cannot handle raises ValueError), ``"jnp"``
  (the library's plain ``jax.numpy`` op), ``"auto"`` (the kernel on the backends in
  ``AUTO_PALLAS_BACKENDS`` where it was measured faster than XLA — the penalty, and fake-quant
  of 16-bit inputs with deterministic rounding — and jnp otherwise or for inputs it cannot
  handle) or ``None``, which
  reads the ``KURE_JAX_KERNELS`` environment variable (same values), default ``"auto"``.
  The choice is made while tracing, so it is fixed per compiled program.
* ``platform`` / ``interpret``: which kernel variant (``"gpu"`` Triton, ``"tpu"`` Mosaic) and
  whether to run it in the Pallas interpreter (the default off GPU/TPU, and how the tests run
  the kernels on CPU).

CPU users and CI never need Pallas: on CPU ``"auto"`` is the jnp path. See BENCHMARKS.md for
what the kernels gain, and where they do not, per backend.

>>> import jax.numpy as jnp
>>> from kure_jax import kernels
>>> kernels.fake_quant(jnp.array([0.26, -1.0, 3.0]), 0.5, bits=3, impl="jnp")
Array([ 0.5, -1. ,  1.5], dtype=float32)
"""

from kure_jax.kernels._config import AUTO_PALLAS_BACKENDS as AUTO_PALLAS_BACKENDS
from kure_jax.kernels._config import ENV_VAR as ENV_VAR
from kure_jax.kernels._config import IMPLS as IMPLS
from kure_jax.kernels._config import PLATFORMS as PLATFORMS
from kure_jax.kernels._fake_quant import absmax_fake_quant as absmax_fake_quant
from kure_jax.kernels._fake_quant import fake_quant as fake_quant
from kure_jax.kernels._moments import Moments as Moments
from kure_jax.kernels._moments import kurtosis_many as kurtosis_many
from kure_jax.kernels._moments import penalty as penalty
from kure_jax.kernels._moments import tensor_moments as tensor_moments

__all__ = [
    "AUTO_PALLAS_BACKENDS",
    "ENV_VAR",
    "IMPLS",
    "PLATFORMS",
    "Moments",
    "absmax_fake_quant",
    "fake_quant",
    "kurtosis_many",
    "penalty",
    "tensor_moments",
]
