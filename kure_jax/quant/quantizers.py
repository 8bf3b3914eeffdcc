"""Quantizers of the KURE reference QAT experiments: DoReFa and a learned clip.

* ``dorefa_weight`` / ``dorefa_activation``: DoReFa-Net's weight and activation quantizers with a
  straight-through estimator (STE) on the rounding.
* ``learned_clip_quant``: the quantizer the KURE reference code calls "LSQ". It is *not* Esser et
  al.'s Learned Step Size Quantization (that is ``kure_jax.fake_quant`` with its LSQ scale
  gradient): it learns a clip value ``alpha`` per tensor, in the spirit of PACT, and derives the
  step from it.

Arithmetic runs in float32 (float64 for float64 inputs) and results are cast back to the input
dtype.

References:
  Zhou, Wu, Ni, Zhou, Wen, Zou. "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks
  with Low Bitwidth Gradients", 2016.
  Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan. "PACT: Parameterized Clipping
  Activation for Quantized Neural Networks", 2018.
  Shkolnik et al. "Robust Quantization: One Model to Rule Them All", NeurIPS 2020.
"""

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kure_jax._arrays import check_broadcastable, check_positive, sum_to_shape
from kure_jax.quant.ops import validate_bits


def dorefa_weight(w: ArrayLike, *, bits: int) -> jax.Array:
    r"""DoReFa weight quantizer.

    .. math::

        t = \tanh(w), \quad u = \frac{t}{2 \max|t|} + \frac12 \in [0, 1], \quad
        y = 2\, \frac{\mathrm{round}((2^b - 1)\, u)}{2^b - 1} - 1 \in [-1, 1]

    The output takes at most 2^b values ``2k / (2^b - 1) - 1``, k = 0..2^b - 1 (zero is not one of
    them). ``round`` is half to even and is passed straight through in the backward pass, so the
    gradient is that of ``tanh(w) / max|t|`` (including the term through the maximum). The maximum
    is over the whole tensor; an all-zero ``w`` uses a maximum of 1 instead of dividing by zero.

    The output does not depend on the scale of ``w`` (for small ``w``, ``y ~ w / max|w|``), so a
    layer using it needs a normalisation after it. The gradient through the maximum sums over
    the whole tensor into its largest entry, which then gets far larger updates than the rest.

    Args:
      w: float weight array of any (non-empty) shape.
      bits: bit width in [2, 16].

    Returns:
      Array of ``w``'s shape and dtype with values in [-1, 1].

    Raises:
      ValueError: for invalid ``bits`` or an empty ``w``.

    >>> dorefa_weight(jnp.array([-2.0, 0.1, 2.0]), bits=2)
    Array([-1.        ,  0.33333334,  1.        ], dtype=float32)
    """
    n = 2 ** validate_bits(bits) - 1
    w, out_dtype = _as_compute(w)
    if w.size == 0:
        raise ValueError(f"dorefa_weight needs a non-empty array; got shape {w.shape}.")
    t = jnp.tanh(w)
    m = jnp.max(jnp.abs(t))
    m = jnp.where(m > 0, m, 1.0)
    u = t / (2.0 * m) + 0.5
    # (2k - n) / n, not 2k / n - 1: exact at the ends (k = 0, n), so |y| <= 1 also under jit.
    return ((2.0 * _round_ste(n * u) - n) / n).astype(out_dtype)


def dorefa_activation(x: ArrayLike, *, bits: int) -> jax.Array:
    r"""DoReFa activation quantizer ``y = round((2^b - 1) clip(x, 0, 1)) / (2^b - 1)``.

    Backward: ``dy/dx = 1`` for ``0 <= x <= 1`` (bounds included) and 0 outside (clipped STE).

    Args:
      x: float array of any shape.
      bits: bit width in [2, 16].

    Returns:
      Array of ``x``'s shape and dtype with values in ``{k / (2^b - 1)}``, k = 0..2^b - 1.

    Raises:
      ValueError: for invalid ``bits``.

    >>> dorefa_activation(jnp.array([-0.5, 0.2, 0.5, 1.7]), bits=2)
    Array([0.        , 0.33333334, 0.6666667 , 1.        ], dtype=float32)
    """
    n = 2 ** validate_bits(bits) - 1
    x, out_dtype = _as_compute(x)
    return _dorefa_activation(n, x).astype(out_dtype)


def learned_clip_quant(
    x: ArrayLike, alpha: ArrayLike, *, bits: int, signed: bool = True
) -> jax.Array:
    r"""Quantizer with a learned clip value (the KURE reference's "LSQ"; PACT-like).

    With ``n = 2^b - 1`` levels-minus-one and ``R`` = round half to even:

    * signed (weights): clip to ``[-alpha, alpha]``, step ``s = 2 alpha / n``, grid
      ``-alpha + k s`` for k = 0..n (2^b levels, both ends included, zero not a level):
      ``y = s R((clip(x, -alpha, alpha) + alpha) / s) - alpha``.
    * unsigned (ReLU outputs): clip to ``[0, alpha]``, step ``s = alpha / n``, grid ``k s``:
      ``y = s R(clip(x, 0, alpha) / s)``.

    Gradients, with "inside" meaning ``x`` within the clip range (bounds included) and ``R``
    passed straight through (``R(u) = u + c`` with the residual ``c = R(u) - u`` held fixed):

    * ``dy/dx = 1`` inside, 0 outside.
    * ``dy/dalpha = (y - x) / alpha = c s / alpha`` inside (the rounding residual moves with the
      step), and ``y / alpha`` outside: ``+1`` above the range, ``-1`` below it (signed), 0 below
      it (unsigned). Both cases are ``(y - [inside] x) / alpha``: ``y`` is positively homogeneous
      of degree 1 in ``(x, alpha)``, so by Euler's theorem ``x dy/dx + alpha dy/dalpha = y``.

    ``dL/dalpha`` is summed over the axes ``alpha`` was broadcast along.

    Args:
      x: float array of any shape.
      alpha: clip value(s) > 0; a scalar (per tensor, as in the reference) or an array that
        broadcasts to ``x.shape`` without enlarging it (per channel).
      bits: bit width in [2, 16].
      signed: symmetric range ``[-alpha, alpha]`` (True) or ``[0, alpha]`` (False).

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: for invalid ``bits``, an ``alpha`` shape that does not broadcast to ``x``, or a
        concrete ``alpha`` with an entry <= 0 (not checkable inside ``jit``/``vmap``).

    >>> learned_clip_quant(jnp.array([-3.0, 0.4, 2.0]), 1.5, bits=2, signed=False)
    Array([0. , 0.5, 1.5], dtype=float32)
    """
    n = 2 ** validate_bits(bits) - 1
    x, out_dtype = _as_compute(x)
    alpha = jnp.asarray(alpha, x.dtype)
    check_broadcastable("alpha", alpha.shape, x.shape)
    check_positive("alpha", alpha)
    return _learned_clip(signed, n, x, alpha).astype(out_dtype)


def _as_compute(x: ArrayLike) -> tuple[jax.Array, jnp.dtype]:
    """Casts to float32/float64 for the arithmetic; returns the dtype to cast the result to."""
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(dtype), (x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else dtype)


@jax.custom_jvp
def _round_ste(x: jax.Array) -> jax.Array:
    return jnp.round(x)


@_round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    return jnp.round(primals[0]), tangents[0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dorefa_activation(n: int, x: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(x, 0.0, 1.0) * n) / n


@_dorefa_activation.defjvp
def _dorefa_activation_jvp(n, primals, tangents):
    (x,), (t,) = primals, tangents
    inside = (x >= 0.0) & (x <= 1.0)
    return _dorefa_activation(n, x), jnp.where(inside, t, jnp.zeros_like(t))


def _learned_clip_values(signed: bool, n: int, x: jax.Array, alpha: jax.Array):
    """``(y, inside)``: the quantised values and the mask of ``x`` within the clip range."""
    lo = -alpha if signed else jnp.zeros_like(alpha)
    xc = jnp.clip(x, lo, alpha)
    if signed:
        step = 2.0 * alpha / n
        y = step * jnp.round((xc + alpha) / step) - alpha
    else:
        step = alpha / n
        y = step * jnp.round(xc / step)
    return y, (x >= lo) & (x <= alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _learned_clip(signed: bool, n: int, x: jax.Array, alpha: jax.Array) -> jax.Array:
    return _learned_clip_values(signed, n, x, alpha)[0]


def _learned_clip_fwd(signed, n, x, alpha):
    # Only the inputs are saved; the backward recomputes y and the mask (as quant.fake_quant:
    # saving a mask and a dy/dalpha tensor costs more memory and is slow on XLA:CPU).
    return _learned_clip(signed, n, x, alpha), (x, alpha)


def _learned_clip_bwd(signed, n, residuals, g):
    x, alpha = residuals
    y, inside = _learned_clip_values(signed, n, x, alpha)
    # g * dy/dalpha with dy/dalpha = (y - x) / alpha inside and y / alpha outside, as one select
    # of two products so that XLA forms the reduction's operand in one fusion.
    g_dy_dalpha = jnp.where(inside, g * ((y - x) / alpha), g * (y / alpha))
    return jnp.where(inside, g, 0.0), sum_to_shape(g_dy_dalpha, alpha.shape)


_learned_clip.defvjp(_learned_clip_fwd, _learned_clip_bwd)
