"""Fake quantisation with Pallas kernels: given step (LSQ) and absmax step, forward and backward.

The backend of ``kure_jax.quant.fake_quant(..., impl="pallas")`` and of
``kure_jax.quant.quantize(..., impl="pallas")``; the core validates the arguments and chooses
between these kernels and its jnp path. The math is that of ``fake_quant`` with zero point 0::

    v = x / s,   q = clip(round(v), q_min, q_max),   y = q * s
    dL/dx = g * [q_min <= v <= q_max],   dL/ds = G * sum(g * (q - [inside] * v))

Memory traffic per call, in units of one tensor (a copy is 2: one read, one write):

* forward: 2 (read ``x``, write ``y``). XLA's fusion of ``quant.fake_quant`` also reads and
  writes once, but additionally stores its residuals (clip mask and ``dy/ds``) for the backward
  pass; the kernel recomputes them from ``x`` instead.
* backward: 3 (read ``x`` and ``g``, write ``dL/dx``), plus per-tile partial sums of the step
  gradient that a small XLA reduction finishes.
* absmax step: +1, a reduction kernel reading ``x`` before the quantising pass. A global maximum
  cannot be fused into the same pass without holding the whole tensor (or channel) on chip, so
  an absmax fake-quant moves 3 units, at best 2/3 of copy bandwidth on any backend. Only a stale
  step (e.g. the previous training step's absmax) would make it a single pass.

Stochastic rounding draws its noise inside the kernel from a counter-based hash of
``(key, flat element index)`` (:func:`kure_jax.kernels._ops.hash_bits`): no noise tensor in
memory, no dependence on the block shape, and :func:`hash_uniform` gives the same noise to the
jnp path (``fake_quant(..., noise="hash")``) exactly. The stream differs from
``jax.random.uniform``'s (``noise="random"``), so the two give other draws of the same
distribution for the same key.

Triton (GPU) computes ``x / s`` with its own division, which may differ from XLA's IEEE division
in the last bit, so a value within an ulp of a rounding boundary can round the other way there.
Interpret mode matches the jnp path bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kure_jax.kernels import _config, _layout
from kure_jax.kernels import _quant_kernels as qk
from kure_jax.kernels._ops import key_words

__all__ = [
    "absmax_pallas",
    "absmax_problem",
    "fake_quant_pallas",
    "fake_quant_problem",
    "hash_uniform",
]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def fake_quant_problem(
    dtype: jax.typing.DTypeLike, shape: Sequence[int], scale_shape: Sequence[int]
) -> str | None:
    """Why the fake-quant kernel cannot take an ``x`` of ``dtype``/``shape`` with a step of
    ``scale_shape`` (broadcastable to ``shape``), or ``None`` if it can.

    The kernel takes float32, bfloat16 and float16, non-empty tensors, and steps that vary along
    leading or trailing axes only (see :mod:`kure_jax.kernels._layout`).
    """
    return _problem(dtype, shape, _layout.view_for_scale(tuple(shape), tuple(scale_shape)))


def absmax_problem(
    dtype: jax.typing.DTypeLike, shape: Sequence[int], kept: Sequence[int]
) -> str | None:
    """:func:`fake_quant_problem` for a step per channel of the (non-negative) axes ``kept``."""
    return _problem(dtype, shape, _layout.view_for_kept_axes(tuple(shape), tuple(kept)))


def _problem(dtype, shape, view: _layout.View | None) -> str | None:
    if jnp.dtype(dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(dtype)} (kernels take float32, bfloat16 and float16)"
    if view is None:
        return "a step that varies along middle axes (kernels take leading or trailing ones)"
    if math.prod(shape) == 0:
        return "an empty array"
    return None


def _refuse(problem: str | None) -> None:
    if problem is not None:
        raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")


def fake_quant_pallas(
    x: ArrayLike,
    scale: ArrayLike,
    *,
    qmin: int,
    qmax: int,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    grad_factor: float = 1.0,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    r"""``clip(round(x / s), qmin, qmax) * s`` as one fused kernel each way (zero point 0).

    Gradients: the clipped straight-through estimator for ``x`` and the LSQ step gradient for
    ``scale`` times ``grad_factor``, as ``kure_jax.quant.fake_quant`` defines them. The
    arguments are trusted to be valid quantizer settings (``kure_jax.quant.fake_quant`` checks
    them and is the function to call); this checks only what the kernel itself needs.

    Args:
      x: float32, bfloat16 or float16 array of any non-empty shape; computed in float32,
        returned in ``x``'s dtype.
      scale: step ``s > 0`` broadcastable to ``x.shape``: a scalar, or varying along trailing
        (e.g. ``(1, 1, 1, O)``) or leading (``(O, 1, 1, 1)``) axes.
      qmin: smallest integer code.
      qmax: largest integer code.
      rounding: one of ``kure_jax.quant.ops.ROUNDING_MODES``; ``"stochastic"`` draws
        :func:`hash_uniform` noise inside the kernel.
      key: PRNG key, needed for ``"stochastic"``.
      grad_factor: factor of the step gradient (LSQ's ``1 / sqrt(N q_max)``, or 1).
      platform: kernel variant, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic); ``None``: local.
      interpret: run in the Pallas interpreter (``None``: only off GPU/TPU).
      block_shape: ``(rows, cols)`` tile of the kernels' matrix view of ``x``
        (:mod:`kure_jax.kernels._layout`); ``None`` picks one per platform.

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: if :func:`fake_quant_problem` names a problem, ``"stochastic"`` has no key,
        or ``platform``/``interpret``/``block_shape`` is invalid.
    """
    x, scale = jnp.asarray(x), jnp.asarray(scale)
    _refuse(fake_quant_problem(x.dtype, x.shape, scale.shape))
    launch = _config.launch(platform, interpret)
    view = _layout.view_for_scale(x.shape, scale.shape)
    block = (_layout.default_block(view, launch) if block_shape is None
             else _layout.check_block(block_shape, view, launch))
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs key=jax.random.key(...).")
    words = key_words(key) if rounding == "stochastic" else None
    spec = qk.Spec(qmin, qmax, rounding, float(grad_factor), "pallas", view, block, launch)
    s2 = scale.astype(jnp.float32).reshape(view.scale_shape)
    y2 = _fake_quant(spec, x.reshape(view.rows, view.cols), s2, words)
    return y2.reshape(x.shape)


def absmax_pallas(
    x: ArrayLike,
    kept: Sequence[int] = (),
    *,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    """float32 ``max|x|`` per channel of the axes ``kept`` (all reduced for ``()``), one read.

    Not differentiable (the maxima are statistics: callers ``stop_gradient`` ``x``).

    Args:
      x: float32, bfloat16 or float16 array of any non-empty shape.
      kept: non-negative channel axes that keep their own maximum, all leading or all trailing.
      platform: as in :func:`fake_quant_pallas`.
      interpret: as in :func:`fake_quant_pallas`.
      block_shape: as in :func:`fake_quant_pallas`.

    Returns:
      float32 array of ``x``'s rank, size 1 on every axis not in ``kept`` (keepdims).

    Raises:
      ValueError: if :func:`absmax_problem` names a problem, or for an invalid
        ``platform``/``interpret``/``block_shape``.
    """
    x, kept = jnp.asarray(x), tuple(kept)
    _refuse(absmax_problem(x.dtype, x.shape, kept))
    launch = _config.launch(platform, interpret)
    view = _layout.view_for_kept_axes(x.shape, kept)
    block = (_layout.default_block(view, launch) if block_shape is None
             else _layout.check_block(block_shape, view, launch))
    spec = qk.Spec(0, 0, "nearest", 1.0, "pallas", view, block, launch)
    amax = qk.absmax(spec, x.reshape(view.rows, view.cols))
    return amax.reshape(tuple(d if i in kept else 1 for i, d in enumerate(x.shape)))


def hash_uniform(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The kernels' float32 U[0, 1) rounding noise for a whole tensor of ``shape``.

    Element ``i`` (row-major) gets ``hash(i)`` under the two words drawn from ``key``
    (:func:`kure_jax.kernels._ops.hash_bits`), whatever the block shape: the noise that
    :func:`fake_quant_pallas` draws inside the kernel, for a jnp path that must match it.

    Args:
      key: a JAX PRNG key (typed or raw ``uint32[2]``).
      shape: the tensor's shape.

    Returns:
      float32 array of ``shape`` on the grid ``k / 2^24``.
    """
    words = key_words(key)
    index = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(tuple(shape))
    return qk.noise_at((words[0, 0], words[0, 1]), index)


# ----------------------------------------------------------------------------------------------
# The kernels' custom_vjp on the (rows, cols) view. Only x, the step and the key words are saved
# for the backward pass; the clip mask and dy/ds are recomputed there.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(spec: qk.Spec, x: jax.Array, s: jax.Array, words: jax.Array | None):
    return qk.forward(spec, x, s, words)


def _fake_quant_fwd(spec, x, s, words):
    return qk.forward(spec, x, s, words), (x, s, words)


def _fake_quant_bwd(spec, residuals, g):
    x, s, words = residuals
    g_x, partial = qk.backward(spec, x, s, words, g)
    g_s = qk.finish_partials(spec, partial, jnp.sum)
    return g_x, (g_s * spec.grad_factor).astype(s.dtype), None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
