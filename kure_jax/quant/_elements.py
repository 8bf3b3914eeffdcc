"""Element types of :mod:`kure_jax.quant.formats`: their values and round-to-nearest.

The table and the rounding rules are documented in :mod:`kure_jax.quant.formats`.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike


class Element(NamedTuple):
    """One element type. ``kind`` is ``"float"``, ``"int"`` or ``"table"`` (NF4).

    ``mbits``: stored mantissa bits; ``emin``: exponent of the smallest normal (``1 - bias``);
    ``max``: largest finite magnitude; ``emax``: ``floor(log2 max)``; ``bits``: code width.
    """

    kind: str
    bits: int
    mbits: int
    emin: int
    max: float
    emax: int


# QLoRA's NF4 levels, Dettmers et al. 2023, Appendix E (as published, float32 decimal).
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

ELEMENTS: Mapping[str, Element] = types.MappingProxyType({
    "fp8_e4m3": Element("float", 8, 3, -6, 448.0, 8),
    "fp8_e5m2": Element("float", 8, 2, -14, 57344.0, 15),
    "fp6_e3m2": Element("float", 6, 2, -2, 28.0, 4),
    "fp6_e2m3": Element("float", 6, 3, 0, 7.5, 2),
    "fp4_e2m1": Element("float", 4, 1, 0, 6.0, 2),
    "int4": Element("int", 4, 0, 0, 7.0, 2),
    "int8": Element("int", 8, 0, 0, 127.0, 6),
    "nf4": Element("table", 4, 0, 0, 1.0, 0),
})


def check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Format.{field} must be one of {allowed}; got {value!r}.")


def round_element(x: ArrayLike, element: str) -> jax.Array:
    """Rounds ``x`` (already divided by its scale) to the nearest value of ``element``.

    Float elements: nearest, ties to even, subnormals kept, saturating at ``±max``; integer
    elements: nearest integer (ties to even) in ``[-max, max]``; ``nf4``: the nearest level.
    No straight-through gradient (its derivative is 0 almost everywhere).

    Args:
      x: float array of any shape (bfloat16/float16 are computed in float32).
      element: one of :data:`ELEMENTS`.

    Returns:
      Array of ``x``'s shape and dtype; NaN stays NaN. Float elements keep the sign of zero
      (``-0.0`` is a code); integer elements and NF4 give ``+0.0``.

    Raises:
      ValueError: for an unknown ``element`` or a non-floating ``x``.

    >>> round_element(jnp.array([0.2, 0.25, 0.76, 2.5, 5.1, 100.0]), "fp4_e2m1")
    Array([0., 0., 1., 2., 6., 6.], dtype=float32)
    """
    check_choice("element", element, tuple(ELEMENTS))
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"round_element needs a floating array; got dtype {x.dtype}.")
    return _round_jit(x, element)


@functools.partial(jax.jit, static_argnums=1)
def _round_jit(x: jax.Array, element: str) -> jax.Array:
    return round_to_grid(x.astype(work_dtype(x.dtype)), ELEMENTS[element]).astype(x.dtype)


def work_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def pow2(k: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Exact ``2^k`` for integer ``k`` in the normal range of ``dtype`` (built from its bits)."""
    if dtype == jnp.float64:
        return jax.lax.bitcast_convert_type((k.astype(jnp.int64) + 1023) << 52, jnp.float64)
    return jax.lax.bitcast_convert_type((k.astype(jnp.int32) + 127) << 23, jnp.float32)


def floor_log2(a: jax.Array) -> jax.Array:
    """``floor(log2 a)`` for normal ``a > 0`` from the exponent bits (subnormals read low)."""
    if a.dtype == jnp.float64:
        bits = jax.lax.bitcast_convert_type(a, jnp.int64)
        return ((bits >> 52) & 0x7FF).astype(jnp.int32) - 1023
    return ((jax.lax.bitcast_convert_type(a, jnp.int32) >> 23) & 0xFF) - 127


@functools.cache
def _nf4_thresholds(dtype: jnp.dtype) -> np.ndarray:
    """Per pair of neighbouring NF4 levels, the smallest ``dtype`` value nearer the upper one.

    The levels are the table's float32 values, also for float64 input.

    From the exact midpoints (in float64, exact for float32 levels; ties go to the lower
    level), so the choice is exact where ``(lo + hi) / 2`` computed in ``dtype`` would round.
    """
    dtype = np.dtype(dtype)
    levels = np.asarray(NF4_LEVELS, np.float32).astype(np.float64)
    mids = (levels[1:] + levels[:-1]) / 2
    above = mids.astype(dtype)
    return np.where(above <= mids, np.nextafter(above, np.array(np.inf, dtype)), above)


def round_to_grid(v: jax.Array, el: Element) -> jax.Array:
    """``v`` rounded to the element grid (float32/float64 in and out)."""
    if el.kind == "table":
        levels = jnp.asarray(np.float32(NF4_LEVELS), v.dtype)  # float32 levels in any dtype
        # 15 thresholds: comparing against all of them vectorises (the default scan loops).
        idx = jnp.searchsorted(_nf4_thresholds(v.dtype), v, side="right", method="compare_all")
        return levels[idx]
    a = jnp.minimum(jnp.abs(v), el.max)
    if el.kind == "int":  # An integer code has no -0: a negative value rounding to 0 is +0.
        q = jnp.round(a)
        return jnp.where(jnp.isnan(v), v, jnp.where(q == 0, 0.0, jnp.copysign(q, v)))
    # Spacing 2^(e - mbits) in the binade of a, or the subnormal spacing below 2^emin; scaling
    # by powers of two is exact, so jnp.round's ties-to-even decides the ties.
    e = jnp.maximum(floor_log2(a), el.emin) - el.mbits
    q = jnp.round(a * pow2(-e, a.dtype)) * pow2(e, a.dtype)
    return jnp.where(jnp.isnan(v), v, jnp.copysign(q, v))


def element_levels(element: str) -> np.ndarray:
    """Every value of ``element``, sorted, as float64 (NumPy): its grid before scaling.

    Float elements from their fields (subnormals ``j 2^(emin - mbits)``, normals
    ``(1 + j 2^-mbits) 2^e`` up to ``max``, both signs, one zero); ``int4``/``int8`` the
    integers in ``[-max, max]``; ``nf4`` QLoRA's 16 levels (as float32 values).

    Raises:
      ValueError: for an unknown ``element``.

    >>> element_levels("fp4_e2m1")[7:]
    array([0. , 0.5, 1. , 1.5, 2. , 3. , 4. , 6. ])
    """
    check_choice("element", element, tuple(ELEMENTS))
    el = ELEMENTS[element]
    if el.kind == "table":
        return np.float32(NF4_LEVELS).astype(np.float64)
    if el.kind == "int":
        return np.arange(-el.max, el.max + 1)
    frac = np.arange(2**el.mbits) / 2**el.mbits
    sub = frac * 2.0**el.emin
    normal = [(1 + frac) * 2.0**e for e in range(el.emin, el.emax + 1)]
    pos = np.concatenate([sub, *normal])
    pos = pos[pos <= el.max]
    return np.concatenate([-pos[:0:-1], pos])
