"""Fake quantisation with Pallas kernels: given step (LSQ) and absmax step, forward and backward.

The math is that of :func:`kure_jax.quant.fake_quant` with zero point 0::

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
memory, no dependence on the block shape, and the jnp path reproduces it exactly. The stream
differs from ``jax.random.uniform``'s, so stochastic results differ from
``kure_jax.quant.fake_quant`` with the same key (same distribution, other draws).

Triton (GPU) computes ``x / s`` with its own division, which may differ from XLA's IEEE division
in the last bit, so a value within an ulp of a rounding boundary can round the other way there.
Interpret mode matches the jnp path bit for bit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kure_jax import quant
from kure_jax._arrays import check_positive, sum_to_shape
from kure_jax.kernels import _config, _layout
from kure_jax.kernels import _quant_kernels as qk
from kure_jax.kernels._ops import key_words
from kure_jax.quant import policy as policy_lib

__all__ = ["absmax_fake_quant", "fake_quant"]


def fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    *,
    bits: int,
    signed: bool = True,
    narrow_range: bool = False,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    lsq_grad_scale: bool = False,
    impl: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    r"""``kure_jax.quant.fake_quant`` with zero point 0, as one fused kernel each way.

    .. math:: y = \mathrm{clip}(\mathrm{round}(x / s),\ q_{min},\ q_{max})\, s

    Gradients: the clipped straight-through estimator for ``x`` and the LSQ step gradient for
    ``scale``, exactly as ``quant.fake_quant`` defines them.

    Args:
      x: float array of any shape; the kernel takes float32, bfloat16 and float16, computes in
        float32 and returns ``x``'s dtype.
      scale: step ``s > 0``: a scalar (per-tensor) or an array broadcastable to ``x.shape`` that
        varies along trailing axes (e.g. ``(1, 1, 1, O)`` for an HWIO kernel) or leading axes
        (e.g. ``(O, 1, 1, 1)``); other groupings use the jnp path.
      bits: bit width in [2, 16].
      signed: signed or unsigned integer codes.
      narrow_range: use 2^b - 1 codes (see ``quant.integer_range``).
      rounding: one of ``quant.ROUNDING_MODES``.
      key: PRNG key for ``"stochastic"`` rounding (ignored otherwise).
      lsq_grad_scale: multiply the step gradient by ``1 / sqrt(N q_max)``, ``N = x.size //
        scale.size`` (Esser et al.).
      impl: ``"pallas"``, ``"jnp"``, ``"auto"`` or ``None`` (``$KURE_JAX_KERNELS``, else
        ``"auto"``); see :mod:`kure_jax.kernels`. With deterministic rounding the jnp path is
        ``quant.fake_quant`` itself.
      platform: kernel variant, ``"gpu"`` or ``"tpu"`` (``None``: the local backend).
      interpret: run the kernel in the Pallas interpreter (``None``: only off GPU/TPU).
      block_shape: ``(rows, cols)`` tile of the kernels' matrix view of ``x``
        (:mod:`kure_jax.kernels._layout`); ``None`` picks one per platform. Checked only when
        the kernel runs.

    Returns:
      Array of ``x``'s shape and dtype (float32 for a non-float ``x``, as ``quant.fake_quant``).

    Raises:
      ValueError: as ``quant.fake_quant`` (bits, rounding, missing key, scale shape, a concrete
        non-positive scale); for an invalid ``impl``/``platform``/``block_shape``; for
        ``impl="pallas"`` with a float64 or empty ``x`` or a step grouped along middle axes.
    """
    qmin, qmax = quant.integer_range(bits, signed, narrow_range=narrow_range)
    rounding = quant.validate_rounding(rounding)
    impl, strict = _config.resolve_impl(impl)
    launch = _config.launch(platform, interpret)
    x, scale = jnp.asarray(x), jnp.asarray(scale)
    if rounding == "stochastic" and key is None:
        raise ValueError(
            "rounding='stochastic' needs key=jax.random.key(...); the deterministic modes are "
            f"{tuple(m for m in quant.ROUNDING_MODES if m != 'stochastic')}."
        )
    _check_scale(scale, x.shape)
    view = _layout.view_for_scale(x.shape, scale.shape)
    if impl == "pallas" and not _takes_kernel(x, view, rounding, strict):
        impl = "jnp"
    if impl == "jnp" and rounding != "stochastic":
        return quant.fake_quant(x, scale, bits=bits, signed=signed, narrow_range=narrow_range,
                                rounding=rounding, lsq_grad_scale=lsq_grad_scale)
    grad_factor = 1.0 / math.sqrt(max(x.size // scale.size, 1) * qmax) if lsq_grad_scale else 1.0
    if rounding == "stochastic":
        quant.check_key(key)
    words = key_words(key) if rounding == "stochastic" else None
    if impl == "jnp":  # Stochastic: the kernel's hash noise, on the original shape.
        spec = qk.Spec(qmin, qmax, rounding, grad_factor, "jnp")
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        x = x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)
        return _fake_quant(spec, x, scale.astype(dtype), words)
    block = (_layout.default_block(view, launch) if block_shape is None
             else _layout.check_block(block_shape, view, launch))
    spec = qk.Spec(qmin, qmax, rounding, grad_factor, "pallas", view, block, launch)
    s2 = scale.astype(jnp.float32).reshape(view.scale_shape)
    y2 = _fake_quant(spec, x.reshape(view.rows, view.cols), s2, words)
    return y2.reshape(x.shape)


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
    r"""Symmetric absmax fake quantisation: ``policy.quantize`` with ``clip="max"``.

    .. math:: s = \max\big(\max|x| / q_{max},\ \mathrm{tiny}\big)\, r, \qquad
              y = \mathrm{clip}(\mathrm{round}(x / s),\ q_{min},\ q_{max})\, s

    with the maximum per tensor (``axis=None``) or per channel (``axis``: the kept axes), ``r``
    the optional ``step_ratio`` and the code range of ``QuantPolicy(bits=bits, signed=signed,
    narrow_range=narrow_range)``. On the kernel path a reduction kernel computes the maxima and
    the fake-quant kernel does the rest (see the module docstring for the traffic).

    Gradients as ``policy.quantize``: straight-through for ``x`` (the maxima are constants) and
    the LSQ step gradient for ``step_ratio``.

    Args:
      x: float array of any shape.
      bits: bit width in [2, 16].
      axis: ``None`` (one step) or the channel axes that keep their own step; leading or
        trailing channel axes run on the kernel, others on the jnp path.
      signed: signed codes (weights) or unsigned (non-negative tensors).
      narrow_range: symmetric signed grid ``+-(2^(b-1) - 1)`` (the policy default).
      rounding: one of ``quant.ROUNDING_MODES``.
      key: PRNG key for ``"stochastic"`` rounding.
      step_ratio: optional scalar multiplying the step (the paper's step-size perturbation);
        differentiable. Inside ``jit`` its sign cannot be checked.
      impl: as in :func:`fake_quant`; with deterministic rounding the jnp path is
        ``policy.quantize`` itself.
      platform: as in :func:`fake_quant`.
      interpret: as in :func:`fake_quant`.
      block_shape: as in :func:`fake_quant`.

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: for invalid ``bits``/``rounding``/``axis`` (from ``QuantPolicy``), a non-float
        ``x``, a missing ``key``, a non-scalar or concretely non-positive ``step_ratio``, or as
        :func:`fake_quant`.
    """
    policy = policy_lib.QuantPolicy(bits=bits, axis=axis, signed=signed, clip="max",
                                    narrow_range=narrow_range, rounding=rounding)
    impl, strict = _config.resolve_impl(impl)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"absmax_fake_quant needs a floating array; got dtype {x.dtype}.")
    kept = policy_lib.kept_axes(policy.axis, x.ndim)
    view = _layout.view_for_kept_axes(x.shape, kept)
    if impl == "pallas" and not _takes_kernel(x, view, rounding, strict):
        impl = "jnp"
    if impl == "jnp" and rounding != "stochastic":
        return policy_lib.quantize(x, policy, key=key, step_ratio=step_ratio)
    narrow = narrow_range and signed  # As QuantPolicy: only signed grids are narrowed.
    _, qmax = quant.integer_range(bits, signed, narrow_range=narrow)
    xs = jax.lax.stop_gradient(x)
    if impl == "jnp":
        reduced = tuple(i for i in range(x.ndim) if i not in kept)
        amax = jnp.max(jnp.abs(xs.astype(jnp.float32)), axis=reduced, keepdims=True)
    else:
        launch = _config.launch(platform, interpret)
        block = (_layout.default_block(view, launch) if block_shape is None
                 else _layout.check_block(block_shape, view, launch))
        spec = qk.Spec(0, 0, "nearest", 1.0, "pallas", view, block, launch)
        amax = qk.absmax(spec, xs.reshape(view.rows, view.cols))
    # policy.compute_step's arithmetic, operation for operation, so the steps agree exactly.
    tiny = jnp.finfo(jnp.float32).tiny
    scale = jnp.maximum(amax / qmax, tiny) * policy.step_scale
    if step_ratio is not None:
        ratio = jnp.asarray(step_ratio, jnp.float32)
        if ratio.ndim != 0:
            raise ValueError(f"step_ratio must be a scalar; got shape {ratio.shape}.")
        check_positive("step_ratio", ratio)
        scale = scale * ratio
    scale = jnp.maximum(scale, tiny)
    scale = scale.reshape(tuple(d if i in kept else 1 for i, d in enumerate(x.shape)))
    return fake_quant(x, scale, bits=bits, signed=signed, narrow_range=narrow, rounding=rounding,
                      key=key, impl=impl, platform=platform, interpret=interpret,
                      block_shape=block_shape)


def _check_scale(scale: jax.Array, shape: tuple[int, ...]) -> None:
    """ValueError unless ``scale`` broadcasts to ``shape`` unchanged and (if concrete) is > 0."""
    ok = scale.ndim <= len(shape) and all(
        d in (1, xd) for d, xd in zip(scale.shape[::-1], shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"scale of shape {scale.shape} must broadcast to x's shape {shape} (scalar, or size "
            "1 on every axis except the channel axes)."
        )
    check_positive("scale", scale)


def _auto_takes_kernel(x: jax.Array, rounding: str) -> bool:
    """Whether ``impl="auto"`` (on a backend in ``AUTO_PALLAS_BACKENDS``) runs the kernel:
    16-bit inputs with deterministic rounding, where the kernels measured faster than XLA's
    fusions; float32 and stochastic rounding stay on the jnp path (BENCHMARKS.md, "Dispatch
    decision")."""
    return x.dtype.itemsize == 2 and rounding != "stochastic"


def _takes_kernel(x: jax.Array, view: _layout.View | None, rounding: str, strict: bool) -> bool:
    """Whether a call resolved to the kernel runs it: ``impl="pallas"`` (``strict``) whenever
    the kernel can take ``x`` (a refusal raises), ``impl="auto"`` only where it was measured
    faster too."""
    return _kernel_applies(x, view, strict) and (strict or _auto_takes_kernel(x, rounding))


def _kernel_applies(x: jax.Array, view: _layout.View | None, strict: bool) -> bool:
    """Whether the kernel can take ``x``; with ``strict`` (impl="pallas") a refusal raises."""
    problem = None
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        problem = f"dtype {x.dtype} (kernels take float32, bfloat16 and float16)"
    elif view is None:
        problem = "a step that varies along middle axes (kernels take leading or trailing ones)"
    elif x.size == 0:
        problem = "an empty array"
    if problem is not None and strict:
        raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")
    return problem is None


# ----------------------------------------------------------------------------------------------
# One custom_vjp for both implementations: Pallas works on the (rows, cols) view, jnp on the
# original shape (any broadcastable step). Only x, the step and the key words are saved for the
# backward pass; the clip mask and dy/ds are recomputed there.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(spec: qk.Spec, x: jax.Array, s: jax.Array, words: jax.Array | None):
    return _forward(spec, x, s, words)


def _fake_quant_fwd(spec, x, s, words):
    return _forward(spec, x, s, words), (x, s, words)


def _fake_quant_bwd(spec, residuals, g):
    x, s, words = residuals
    if spec.impl == "pallas":
        g_x, partial = qk.backward(spec, x, s, words, g)
        g_s = qk.finish_partials(spec, partial, jnp.sum)
    else:
        v, q = qk.quantize(spec, x, s, _noise(x.shape, words))
        g_x, contrib = qk.grad_terms(spec, v, q, g)
        g_x = g_x.astype(x.dtype)
        g_s = sum_to_shape(contrib, s.shape)
    return g_x, (g_s * spec.grad_factor).astype(s.dtype), None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _forward(spec: qk.Spec, x, s, words):
    if spec.impl == "pallas":
        return qk.forward(spec, x, s, words)
    _, q = qk.quantize(spec, x, s, _noise(x.shape, words))
    return (q * s).astype(x.dtype)


def _noise(shape: tuple[int, ...], words: jax.Array | None) -> jax.Array | None:
    """The kernels' noise for a whole tensor: element ``i`` (row-major) gets ``hash(i)``."""
    if words is None:
        return None
    index = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    return qk.noise_at((words[0, 0], words[0, 1]), index)
