"""The old ``kure_jax.kernels`` entry points, with their old defaults, for its deprecation shim.

``kure_jax.kernels.<name>`` resolves to the function of the same name here (with a
``DeprecationWarning``, see ``kure_jax/kernels/__init__.py``). Each is the core function that
replaced it with the old signature and defaults: ``impl=None`` (``$KURE_JAX_KERNELS``, else
``"auto"``) and, for fake quantisation, the kernels' hash noise on both paths. Nothing in the
package uses these.
"""

from __future__ import annotations

import functools

import jax
from jax.typing import ArrayLike

from kure_jax.kurtosis import Moments as Moments
from kure_jax.kurtosis import kurtosis_many as _kurtosis_many
from kure_jax.kurtosis import penalty as _penalty
from kure_jax.kurtosis import tensor_moments as _tensor_moments
from kure_jax.quant.ops import fake_quant as _fake_quant
from kure_jax.quant.policy import QuantPolicy, quantize

__all__ = ["Moments", "absmax_fake_quant", "fake_quant", "kurtosis_many", "penalty",
           "tensor_moments"]

fake_quant = functools.partial(_fake_quant, impl=None, noise="hash")
penalty = functools.partial(_penalty, impl=None)
kurtosis_many = functools.partial(_kurtosis_many, impl=None)
tensor_moments = functools.partial(_tensor_moments, impl=None)


def absmax_fake_quant(
    x: ArrayLike,
    *,
    bits: int,
    axis: int | tuple[int, ...] | None = None,
    signed: bool = True,
    narrow_range: bool = True,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    step_ratio: ArrayLike | None = None,
    impl: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    """``quantize(x, QuantPolicy(bits, axis, signed, clip="max", narrow_range, rounding))``.

    Args:
      x: float array of any shape.
      bits: bit width in [2, 16].
      axis: ``None`` or the channel axes that keep their own step.
      signed: signed codes or unsigned.
      narrow_range: symmetric signed grid ``+-(2^(b-1) - 1)``.
      rounding: one of ``kure_jax.ROUNDING_MODES`` (stochastic: the kernels' hash noise).
      key: PRNG key for ``"stochastic"`` rounding.
      step_ratio: optional scalar multiplying the step.
      impl: as in ``kure_jax.quantize`` (``None``: ``$KURE_JAX_KERNELS``, else ``"auto"``).
      platform: kernel option.
      interpret: kernel option.
      block_shape: kernel option.

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: as ``kure_jax.quantize``.
    """
    policy = QuantPolicy(bits=bits, axis=axis, signed=signed, clip="max",
                         narrow_range=narrow_range, rounding=rounding)
    return quantize(x, policy, key=key, step_ratio=step_ratio, impl=impl, noise="hash",
                    platform=platform, interpret=interpret, block_shape=block_shape)
