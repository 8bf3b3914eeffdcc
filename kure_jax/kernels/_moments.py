r"""Per-tensor moments and kurtosis of many tensors from Pallas kernels: one read of the weights.

The backend of ``kure_jax.kurtosis.tensor_moments``, ``kurtosis_many`` and ``penalty`` with
``impl="pallas"``; the core validates the arguments and chooses between these kernels and its
jnp path.

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
scale of the weights (std 1e-30 to 1e30); the raw moments of :func:`moments_pallas` are float32
values and leave float32's range where ``std^k`` does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.kernels import _config
from kure_jax.kernels import _moment_kernels as mk

__all__ = ["kurtosis_pallas", "moments_pallas", "moments_problem"]

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class _Spec(NamedTuple):
    seg: mk.Segments
    ddof: int
    launch: _config.Launch


def moments_problem(tensors: Sequence[jax.Array]) -> str | None:
    """Why the moment kernels cannot take ``tensors``, or ``None`` if they can.

    They take float32, bfloat16 and float16 tensors (of any non-empty shapes).
    """
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in _DTYPES})
    if bad:
        return f"tensors of dtype {bad} (kernels take float32, bfloat16 and float16)"
    return None


def _check(tensors: Sequence[jax.Array]) -> list[jax.Array]:
    tensors = [jnp.asarray(t) for t in tensors]
    problem = moments_problem(tensors)
    if not tensors or any(t.size == 0 for t in tensors):
        problem = "an empty sequence or an empty tensor"
    if problem is not None:
        raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")
    return tensors


def moments_pallas(
    tensors: Sequence[jax.Array],
    *,
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(mean, m2, m3, m4, absmax)`` of each tensor, all tensors in one kernel launch.

    ``m_k = E[(x - mean)^k]``; not differentiable (use :func:`kurtosis_pallas`).

    Args:
      tensors: non-empty sequence of non-empty float32/bfloat16/float16 arrays of any shapes
        (computed in float32).
      platform: kernel variant, ``"gpu"`` or ``"tpu"`` (``None``: the local backend).
      interpret: run the kernel in the Pallas interpreter (``None``: only off GPU/TPU).
      block_size: elements per kernel block (a power of two on GPU, a multiple of 1024 on TPU);
        ``None`` picks one per platform.

    Returns:
      Five float32 arrays of shape ``(len(tensors),)``.

    Raises:
      ValueError: for an unsupported dtype, an empty sequence or tensor, or an invalid
        ``platform``/``interpret``/``block_size``.
    """
    tensors = _check(tensors)
    spec = _spec(tensors, 0, platform, interpret, block_size)
    stats, shifts = mk.block_stats(spec.seg, tensors, spec.launch)
    mean, m2, m3, m4, absmax, scale = mk.merge(spec.seg, stats, shifts)
    return mean + shifts, m2 * scale**2, m3 * scale**3, m4 * scale**4, absmax


def kurtosis_pallas(
    tensors: Sequence[jax.Array],
    *,
    ddof: int = 0,
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Kurtosis ``m4 / var^2`` of each tensor, ``var = m2 n / (n - ddof)``, fused and
    differentiable (the gradient is one more fused pass; module docstring).

    A tensor whose variance is at rounding level gets kurtosis 0 and gradient 0, as
    ``kure_jax.kurtosis``.

    Args:
      tensors: as in :func:`moments_pallas`; each must have more than ``ddof`` elements.
      ddof: delta degrees of freedom of the variance, a static int >= 0 (the caller checks it).
      platform: as in :func:`moments_pallas`.
      interpret: as in :func:`moments_pallas`.
      block_size: as in :func:`moments_pallas`.

    Returns:
      float32 array of shape ``(len(tensors),)``.

    Raises:
      ValueError: as :func:`moments_pallas`.
    """
    tensors = _check(tensors)
    return _kurtosis_fused(_spec(tensors, int(ddof), platform, interpret, block_size),
                           tuple(tensors))


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
