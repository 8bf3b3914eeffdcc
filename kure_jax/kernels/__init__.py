"""Pallas kernels behind kure_jax's quantisation and KURE ops: backends below the core.

The public ops take an ``impl`` argument and call these backends when the kernel runs:
``kure_jax.fake_quant`` / ``kure_jax.quantize`` (fake quantisation with a given or an absmax
step) and ``kure_jax.penalty`` (KURE moments). This
package imports nothing of the core (only ``kure_jax._arrays``-level helpers); it holds the
kernels and the dispatch configuration:

* ``impl``: ``"pallas"`` (the kernel; an input it cannot handle raises ValueError), ``"jnp"``
  (the library's plain ``jax.numpy`` op), ``"auto"`` (the kernel on the backends in
  ``AUTO_PALLAS_BACKENDS`` where it was measured faster than XLA — the penalty, and fake-quant
  of 16-bit inputs with deterministic rounding, ``auto_takes_fake_quant`` — and jnp
  otherwise or for inputs it cannot handle) or ``None``, which reads the ``KURE_JAX_KERNELS``
  environment variable (same values), default ``"auto"`` (:func:`resolve_impl`). The choice is
  made while tracing, so it is fixed per compiled program.
* ``platform`` / ``interpret``: which kernel variant (``"gpu"`` Triton, ``"tpu"`` Mosaic) and
  whether to run it in the Pallas interpreter (the default off GPU/TPU, and how the tests run
  the kernels on CPU).

CPU users and CI never need Pallas: on CPU ``"auto"`` is the jnp path. See BENCHMARKS.md for
what the kernels gain, and where they do not, per backend.

>>> import jax.numpy as jnp
>>> from kure_jax import kernels
>>> kernels.fake_quant_pallas(jnp.array([0.26, -1.0, 3.0]), 0.5, qmin=-4, qmax=3, interpret=True)
Array([ 0.5, -1. ,  1.5], dtype=float32)
"""

# Besides the public names of __all__, the backend interface that kure_jax's core calls
# (``kernels.fake_quant_problem(...)``, ...) is imported here: internal, neither documented nor
# promised to users.
from kure_jax.kernels._config import AUTO_PALLAS_BACKENDS as AUTO_PALLAS_BACKENDS
from kure_jax.kernels._config import ENV_VAR as ENV_VAR
from kure_jax.kernels._config import IMPLS as IMPLS
from kure_jax.kernels._config import PLATFORMS as PLATFORMS
from kure_jax.kernels._config import auto_takes_fake_quant as auto_takes_fake_quant
from kure_jax.kernels._config import resolve_impl as resolve_impl
from kure_jax.kernels._fake_quant import absmax_pallas as absmax_pallas
from kure_jax.kernels._fake_quant import absmax_problem as absmax_problem
from kure_jax.kernels._fake_quant import fake_quant_pallas as fake_quant_pallas
from kure_jax.kernels._fake_quant import fake_quant_problem as fake_quant_problem
from kure_jax.kernels._fake_quant import hash_uniform as hash_uniform
from kure_jax.kernels._moments import kurtosis_pallas as kurtosis_pallas
from kure_jax.kernels._moments import moments_pallas as moments_pallas
from kure_jax.kernels._moments import moments_problem as moments_problem

__all__ = [
    "ENV_VAR",
    "IMPLS",
    "fake_quant_pallas",
    "moments_pallas",
    "resolve_impl",
]
