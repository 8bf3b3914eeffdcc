"""Nested integer codes (Matryoshka Quantization): the top ``r`` bits of a ``c``-bit code.

One ``c``-bit (e.g. int8) quantisation of a weight tensor holds models of every smaller width:
its ``r`` most significant bits *are* an ``r``-bit model. With asymmetric min-max codes

.. math::

   \\alpha = \\max w - \\min w, \\quad s_c = \\alpha / (2^c - 1), \\quad
   z = \\mathrm{round}(-\\min w / s_c), \\quad
   q_c = \\mathrm{clamp}(\\mathrm{round}(w / s_c) + z,\\ 0,\\ 2^c - 1)

the slice keeps the top ``r`` bits, rounded to nearest (halves up), in units of the ``c``-bit
grid, and is read back with the ``c``-bit scale and zero point:

.. math::

   S(q_c, r) = \\mathrm{clamp}(\\lfloor q_c / 2^{c-r} + 1/2 \\rfloor,\\ 0,\\ 2^r - 1)\\, 2^{c-r},
   \\qquad \\hat w_r = (S(q_c, r) - z)\\, s_c .

So a model trained on the slices (``"matryoshka"`` QAT) runs at ``r`` bits by slicing its int8
codes, without re-quantising the float weights. Gradients are straight-through: the float
weights get the incoming gradient unchanged (min-max codes clip nothing).

References:
  Nair, Datta, Dean, Jain, Kusupati. "Matryoshka Quantization", ICML 2025 (arXiv:2502.06786).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kure_jax._axes import canonical_axes
from kure_jax.quant.ops import validate_bits

__all__ = ["minmax_codes", "nested_fake_quant", "slice_codes"]


def _reduced_axes(ndim: int, channel_axes: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if channel_axes is None:
        return tuple(range(ndim))
    kept = (channel_axes,) if isinstance(channel_axes, int) else tuple(channel_axes)
    kept = canonical_axes(kept, ndim, out_of_range=f"channel_axes {channel_axes!r} is out of "
                          f"range for rank {ndim}.",
                          repeated=f"channel_axes {channel_axes!r} repeats an axis.")
    return tuple(i for i in range(ndim) if i not in kept)


def minmax_codes(
    x: ArrayLike, *, bits: int, channel_axes: int | tuple[int, ...] | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric min-max codes of ``x``: ``(codes, scale, zero_point)``.

    Args:
      x: float array of any shape.
      bits: code width ``c`` in [2, 16].
      channel_axes: axes that keep their own range (e.g. ``-1``, the output channels of an HWIO
        or IO kernel), or ``None`` for one range per tensor.

    Returns:
      ``codes``: float32 array of ``x``'s shape holding integers in ``[0, 2^c - 1]``;
      ``scale`` and ``zero_point``: float32, broadcastable to ``x`` (size 1 on reduced axes).
      A constant channel gets the smallest normal scale, so it stays exact.

    Raises:
      ValueError: for invalid ``bits`` or ``channel_axes``.
    """
    bits = validate_bits(bits)
    x = jnp.asarray(x, jnp.float32)
    axes = _reduced_axes(x.ndim, channel_axes)
    lo = jnp.min(x, axis=axes, keepdims=True)
    hi = jnp.max(x, axis=axes, keepdims=True)
    top = 2.0**bits - 1
    scale = jnp.maximum((hi - lo) / top, jnp.finfo(jnp.float32).tiny)
    zero_point = jnp.round(-lo / scale)
    codes = jnp.clip(jnp.round(x / scale) + zero_point, 0, top)
    return codes, scale, zero_point


def slice_codes(codes: ArrayLike, *, bits: int, nest_bits: int) -> jax.Array:
    """``S(q_c, r)``: the top ``bits`` (``r``) of ``nest_bits``-bit (``c``) codes.

    Args:
      codes: integers in ``[0, 2^c - 1]`` (any numeric dtype).
      bits: ``r``, at most ``nest_bits``.
      nest_bits: ``c``.

    Returns:
      float32 array of ``codes``' shape: multiples of ``2^(c-r)`` in ``[0, (2^r - 1) 2^(c-r)]``
      (for ``r == c``, ``codes`` unchanged).

    Raises:
      ValueError: if a width is invalid or ``bits > nest_bits``.
    """
    r, c = validate_bits(bits), validate_bits(nest_bits)
    if r > c:
        raise ValueError(f"cannot slice {r} bits out of {c}-bit codes (bits <= nest_bits).")
    step = 2.0 ** (c - r)
    top = jnp.clip(jnp.floor(jnp.asarray(codes, jnp.float32) / step + 0.5), 0, 2.0**r - 1)
    return top * step


def nested_fake_quant(
    x: ArrayLike,
    *,
    bits: int,
    nest_bits: int = 8,
    channel_axes: int | tuple[int, ...] | None = None,
) -> jax.Array:
    """``x`` at ``bits`` read as the top bits of its ``nest_bits``-bit min-max codes.

    ``bits == nest_bits`` is plain min-max fake quantisation. The gradient with respect to ``x``
    is the identity (straight-through).

    Args:
      x: float array of any shape.
      bits: the sliced width ``r``.
      nest_bits: the width ``c`` of the stored codes (8 in Matryoshka Quantization).
      channel_axes: as in :func:`minmax_codes`.

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: as :func:`minmax_codes` and :func:`slice_codes`.

    The top codes of a slice clip: 255 of 8 bits is 3.98 two-bit steps of 64, so the largest
    weight comes back at 192 / 255:

    >>> import jax.numpy as jnp
    >>> nested_fake_quant(jnp.array([0.0, 0.3, 1.0]), bits=2, nest_bits=8)
    Array([0.        , 0.2509804 , 0.75294125], dtype=float32)
    """
    x = jnp.asarray(x)
    codes, scale, zero_point = minmax_codes(jax.lax.stop_gradient(x), bits=nest_bits,
                                            channel_axes=channel_axes)
    sliced = slice_codes(codes, bits=bits, nest_bits=nest_bits)
    return _straight_through(x, ((sliced - zero_point) * scale).astype(x.dtype))


@jax.custom_jvp
def _straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """``y``, differentiated as ``x``. (``x + stop_gradient(y - x)`` is not exactly ``y``.)"""
    del x
    return y


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    return primals[1], tangents[0]
