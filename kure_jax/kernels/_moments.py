r"""The KURE penalty with its moments and gradient from Pallas kernels: one read of the weights.

For selected tensors ``W_i`` with ``n_i`` elements, mean ``mu_i``, central moments
``m_k = E[(W_i - mu_i)^k]`` and variance ``var_i = m_2 n_i / (n_i - ddof)``:

.. math::

   K_i = \frac{m_4}{var_i^2}, \qquad
   \frac{\partial K_i}{\partial w} = a_i\big((w - \mu_i)^3 - m_3\big) - b_i (w - \mu_i),
   \quad a_i = \frac{4}{n_i\, var_i^2}, \quad b_i = \frac{4 m_4}{(n_i - ddof)\, var_i^3}

(the ``-m_3`` term is the derivative through the mean). The forward pass reads every tensor once
(one launch for all tensors); the backward pass reads each once more and writes its gradient, so
penalty + gradient move 3 units of the weights' size where XLA's two-pass ``kurtosis``
(mean, then centred sums) and its autodiff move more. As in :func:`kure_jax.kurtosis`, a tensor
whose variance is at rounding level (``var <= (16 eps max|W|)^2``) has kurtosis 0 and gradient 0.

Sums are accumulated in float32 per block and merged exactly in float32 (see
:func:`kure_jax.kernels._moment_kernels.merge`); results agree with ``kure_jax.kurtosis`` to about
``1e-6`` relative, not bit for bit. Powers are taken of values divided by a block's (then the
tensor's) largest centred magnitude, so kurtosis and its gradient are finite and exact at any
scale of the weights (std 1e-30 to 1e30); the raw moments of :func:`tensor_moments` are float32
values and leave float32's range where ``std^k`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kure_jax.kernels import _config
from kure_jax.kernels import _moment_kernels as mk
from kure_jax.kurtosis import (
    REDUCTIONS,
    UNIFORM_KURTOSIS,
    kurtosis,
    reduce_penalty_terms,
    validate_ddof,
)
from kure_jax.kurtosis import penalty as core_penalty
from kure_jax.selection import LeafPredicate, select

__all__ = ["Moments", "kurtosis_many", "penalty", "tensor_moments"]

PyTree = Any


class Moments(NamedTuple):
    """Per-tensor statistics, each a float32 array of shape ``(num_tensors,)``.

    Attributes:
      mean: ``E[x]``.
      m2: ``E[(x - mean)^2]`` (the ``ddof=0`` variance).
      m3: ``E[(x - mean)^3]``.
      m4: ``E[(x - mean)^4]``.
      absmax: ``max |x|``.
    """

    mean: jax.Array
    m2: jax.Array
    m3: jax.Array
    m4: jax.Array
    absmax: jax.Array


class _Spec(NamedTuple):
    seg: mk.Segments
    ddof: int
    launch: _config.Launch


def tensor_moments(
    tensors: Sequence[ArrayLike],
    *,
    impl: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> Moments:
    """Mean, central moments 2-4 and max-abs of each tensor, all tensors in one kernel launch.

    Not differentiable on the kernel path (use :func:`kurtosis_many` or :func:`penalty`).

    Args:
      tensors: non-empty sequence of float arrays of any shapes (float32, bfloat16 or float16 on
        the kernel path; computed in float32).
      impl: ``"pallas"``, ``"jnp"``, ``"auto"`` or ``None`` (see :mod:`kure_jax.kernels`).
      platform: kernel variant, ``"gpu"`` or ``"tpu"`` (``None``: the local backend).
      interpret: run the kernel in the Pallas interpreter (``None``: only off GPU/TPU).
      block_size: elements per kernel block (a power of two on GPU, a multiple of 1024 on TPU);
        ``None`` picks one per platform.

    Returns:
      :class:`Moments`.

    Raises:
      TypeError: if ``tensors`` is not a list or tuple (e.g. a single array).
      ValueError: for an empty sequence, an empty tensor, an invalid ``impl``/``platform``/
        ``block_size``, or (``impl="pallas"``) an unsupported dtype.
    """
    tensors = _as_tensors(tensors)
    impl, strict = _config.resolve_impl(impl)
    if impl == "pallas" and _kernel_applies(tensors, strict):
        spec = _spec(tensors, 0, platform, interpret, block_size)
        stats, shifts = mk.block_stats(spec.seg, tensors, spec.launch)
        mean, m2, m3, m4, absmax, scale = mk.merge(spec.seg, stats, shifts)
        return Moments(mean + shifts, m2 * scale**2, m3 * scale**3, m4 * scale**4, absmax)
    stats = []
    for t in tensors:
        x = t.astype(jnp.promote_types(t.dtype, jnp.float32)).reshape(-1)
        d = x - jnp.mean(x)
        stats.append((jnp.mean(x), jnp.mean(d**2), jnp.mean(d**3), jnp.mean(d**4),
                      jnp.max(jnp.abs(x))))
    return Moments(*(jnp.stack(column) for column in zip(*stats, strict=True)))


def kurtosis_many(
    tensors: Sequence[ArrayLike],
    *,
    ddof: int = 0,
    impl: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Kurtosis of each tensor (``kure_jax.kurtosis(t, ddof=ddof)`` for each ``t``), fused.

    Differentiable: on the kernel path the gradient is one more fused pass (module docstring).

    Args:
      tensors: non-empty sequence of float arrays of any shapes.
      ddof: delta degrees of freedom of the variance (0: moments; 1: the KURE reference).
      impl: as in :func:`tensor_moments`; the jnp path calls ``kure_jax.kurtosis`` per tensor.
      platform: as in :func:`tensor_moments`.
      interpret: as in :func:`tensor_moments`.
      block_size: as in :func:`tensor_moments`.

    Returns:
      float32 array of shape ``(len(tensors),)``.

    Raises:
      TypeError, ValueError: as :func:`tensor_moments`, or (ValueError) for a ``ddof`` that is not
        an int >= 0 or a tensor with no more than ``ddof`` elements.
    """
    tensors = _as_tensors(tensors)
    ddof = validate_ddof(ddof)
    small = [t.shape for t in tensors if t.size <= ddof]
    if small:
        raise ValueError(f"kurtosis needs > ddof={ddof} elements per tensor; got shapes {small}.")
    impl, strict = _config.resolve_impl(impl)
    if impl == "pallas" and _kernel_applies(tensors, strict):
        return _kurtosis_fused(_spec(tensors, ddof, platform, interpret, block_size),
                               tuple(tensors))
    return jnp.stack([kurtosis(t, ddof=ddof).astype(jnp.float32) for t in tensors])


def penalty(
    params: PyTree,
    target: float = UNIFORM_KURTOSIS,
    *,
    where: LeafPredicate | None = None,
    reduction: str = "mean",
    axis: int | Sequence[int] | None = None,
    ddof: int = 0,
    impl: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Drop-in :func:`kure_jax.penalty` whose kurtosis and gradient come from the fused kernels.

    ``reduce_i (Kurt[W_i] - target)^2`` over the selected leaves, with the arguments, selection
    rules, reductions and result of :func:`kure_jax.penalty`. Per-channel kurtosis (``axis`` not
    ``None``) has no kernel and uses ``kure_jax.penalty``.

    Args:
      params: any pytree of arrays.
      target: the kurtosis target ``K_T`` (1.8 = uniform).
      where: leaf selection (``None``: conv/dense kernels; see :mod:`kure_jax.selection`).
      reduction: ``"mean"`` (paper), ``"sum"`` or ``"max"`` over the selected leaves.
      axis: per-channel kurtosis axes, or ``None`` (per tensor, the paper's choice).
      ddof: 0 or 1 (see :func:`kure_jax.kurtosis`).
      impl: as in :func:`tensor_moments`; the jnp path is ``kure_jax.penalty`` itself.
      platform: as in :func:`tensor_moments`.
      interpret: as in :func:`tensor_moments`.
      block_size: as in :func:`tensor_moments`.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: as :func:`kure_jax.penalty` (no leaf selected, unknown reduction, bad axis),
        as :func:`kurtosis_many`, or for ``impl="pallas"`` with ``axis`` set.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    impl, strict = _config.resolve_impl(impl)
    if impl == "pallas" and axis is not None:
        if strict:
            raise ValueError("impl='pallas' computes per-tensor kurtosis only; use axis=None.")
        impl = "jnp"
    leaves = [leaf for _, leaf in select(params, where)] if impl == "pallas" else []
    if impl == "jnp" or not _kernel_applies(_as_tensors(leaves), strict):
        return core_penalty(params, target, where=where, reduction=reduction, axis=axis,
                                    ddof=ddof)
    kurt = kurtosis_many(leaves, ddof=ddof, impl="pallas", platform=platform,
                         interpret=interpret, block_size=block_size)
    terms = (kurt - target) ** 2
    return reduce_penalty_terms(terms, reduction)


def _as_tensors(tensors: Sequence[ArrayLike]) -> list[jax.Array]:
    # A lone array is a sequence of its rows to Python; a dict iterates over its keys.
    if not isinstance(tensors, Sequence) or isinstance(tensors, str):
        raise TypeError(
            f"expected a list or tuple of arrays; got {type(tensors).__name__} (wrap a single "
            "array in a list; for a pytree use kernels.penalty or jax.tree.leaves)."
        )
    tensors = [jnp.asarray(t) for t in tensors]
    if not tensors:
        raise ValueError("expected a non-empty sequence of arrays; got none.")
    empty = [t.shape for t in tensors if t.size == 0]
    if empty:
        raise ValueError(f"tensors must not be empty; got shapes {empty}.")
    return tensors


def _kernel_applies(tensors: Sequence[jax.Array], strict: bool) -> bool:
    bad = sorted({str(t.dtype) for t in tensors
                  if t.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16)})
    if bad and strict:
        raise ValueError(
            f"impl='pallas' takes float32, bfloat16 and float16 tensors; got {bad}. Use "
            "impl='jnp' or 'auto'."
        )
    return not bad


def _spec(tensors, ddof, platform, interpret, block_size) -> _Spec:
    launch = _config.launch(platform, interpret)
    default = mk.GPU_BLOCK if launch.platform == "gpu" else mk.TPU_BLOCK
    block = default if block_size is None else block_size
    pow2 = isinstance(block, int) and block > 0 and not block & (block - 1)
    if isinstance(block, bool) or not (
        pow2 if launch.platform == "gpu" else isinstance(block, int) and block % 1024 == 0
        and block > 0
    ):
        rule = "a power of two" if launch.platform == "gpu" else "a positive multiple of 1024"
        raise ValueError(f"block_size on {launch.platform} must be {rule}; got {block_size!r}.")
    seg = mk.Segments.build([int(np.prod(t.shape)) for t in tensors], block, launch.platform)
    return _Spec(seg, ddof, launch)


def _kurtosis_and_coefs(spec: _Spec, tensors):
    stats, shifts = mk.block_stats(spec.seg, tensors, spec.launch)
    # Moments in units of each tensor's scale A (merge): kurtosis and the gradient's
    # coefficients stay in float32 range at any scale of the weights.
    mean, m2, m3, m4, absmax, scale = mk.merge(spec.seg, stats, shifts)
    inv_scale = 1.0 / jnp.where(scale > 0, scale, 1.0)
    n = jnp.asarray(np.asarray(spec.seg.sizes, np.float32))
    var = m2 * n / (n - spec.ddof)
    # kure_jax.kurtosis's rule: a variance at rounding level means a constant tensor.
    degenerate = var <= (16 * jnp.finfo(jnp.float32).eps * absmax * inv_scale) ** 2
    safe = jnp.where(degenerate, 1.0, var)
    kurt = jnp.where(degenerate, 0.0, m4 / safe**2)
    # dK/dw = (1 / A) (a (u^3 - m3) - b u), u = (w - mu) / A: the 1 / A goes into a and b.
    a = jnp.where(degenerate, 0.0, 4.0 / (n * safe**2)) * inv_scale
    b = jnp.where(degenerate, 0.0, 4.0 * m4 / ((n - spec.ddof) * safe**3)) * inv_scale
    return kurt, (shifts, mean, m3, a, b, inv_scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kurtosis_fused(spec: _Spec, tensors: tuple[jax.Array, ...]) -> jax.Array:
    return _kurtosis_and_coefs(spec, tensors)[0]


def _kurtosis_fused_fwd(spec, tensors):
    kurt, coefs = _kurtosis_and_coefs(spec, tensors)
    return kurt, (tensors, coefs)


def _kurtosis_fused_bwd(spec, residuals, ct):
    tensors, (shifts, mean, m3, a, b, inv_scale) = residuals
    coefs = jnp.stack([shifts, mean, m3, ct * a, ct * b, inv_scale], axis=1)
    return (tuple(mk.gradients(spec.seg, tensors, coefs, spec.launch)),)


_kurtosis_fused.defvjp(_kurtosis_fused_fwd, _kurtosis_fused_bwd)
