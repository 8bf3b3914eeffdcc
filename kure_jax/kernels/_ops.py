"""Element-wise building blocks shared by the kernels and their jnp references.

Everything here is plain ``jax.numpy`` restricted to primitives that the Pallas Triton and
Mosaic lowerings support (no ``round``/``trunc``; ``uint32`` arithmetic wraps), so one function
serves inside a kernel body and in the jnp path, which is what makes them agree bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kure_jax.kernels._config import Launch

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: Weyl-sequence increment, spreads consecutive indices.
_MIX_A, _MIX_B = 0x7FEB352D, 0x846CA68B  # Wellons' "lowbias32" multipliers (hash-prospector).


def round_half_even(v: jax.Array) -> jax.Array:
    """``jnp.round`` (ties to even) from ``floor`` only; equal to it for every finite float.

    ``v - floor(v)`` is exact except for ``v`` in (-0.5, 0), where it can round up to 0.5; the
    tie rule then rounds ``floor(v) = -1`` (odd) up to 0, which is still the correct result.
    Only the sign of a zero result may differ from ``jnp.round`` (+0 here where it gives -0).
    """
    f = jnp.floor(v)
    d = v - f
    odd = (f - 2.0 * jnp.floor(0.5 * f)) == 1.0
    return f + ((d > 0.5) | ((d == 0.5) & odd)).astype(v.dtype)


def round_values(v: jax.Array, rounding: str, noise: jax.Array | None) -> jax.Array:
    """The rounding rules of ``kure_jax.quant.ops.round_values`` from kernel-safe primitives.

    ``noise`` holds U[0, 1) draws for ``"stochastic"`` and is ignored otherwise.
    """
    if rounding == "nearest":
        return round_half_even(v)
    if rounding == "floor":
        return jnp.floor(v)
    if rounding == "nearest_away":
        t = jnp.where(v < 0, jnp.ceil(v), jnp.floor(v))  # trunc(v)
        return jnp.where(jnp.abs(v - t) >= 0.5, t + jnp.sign(v), t)
    f = jnp.floor(v)
    return f + (noise < (v - f)).astype(v.dtype)


def _lowbias32(x: jax.Array) -> jax.Array:
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX_A)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_MIX_B)
    return x ^ (x >> 16)


def hash_bits(index: jax.Array, k0: jax.Array, k1: jax.Array) -> jax.Array:
    r"""32 random-looking bits per ``uint32`` counter ``index`` under the key ``(k0, k1)``.

    .. math:: h = \mathrm{mix}(\mathrm{mix}(i \cdot \phi + k_0) \oplus k_1)

    with ``mix`` Wellons' ``lowbias32`` integer hash (xor-shift-multiply, a bijection of
    ``uint32``) and ``phi = 0x9E3779B9``. For a fixed key the map ``i -> h`` is a bijection, so
    distinct indices never collide. This is a counter-based generator for rounding noise, not a
    cryptographic or TestU01-validated one; ``tests/test_kernels.py`` checks uniformity,
    bit balance, lag-1 correlation and key sensitivity.
    """
    return _lowbias32(_lowbias32(index * jnp.uint32(_GOLDEN) + k0) ^ k1)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """float32 U[0, 1) on the grid ``k / 2^24`` from the top 24 of 32 random bits."""
    return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def key_words(key: jax.Array) -> jax.Array:
    """The two ``uint32`` hash keys ``(k0, k1)`` drawn from a JAX PRNG key, shape ``(1, 2)``."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(key, (1, 2), jnp.uint32)


def flat_index(rows: jax.Array, cols: jax.Array, num_cols: int) -> jax.Array:
    """Row-major flat ``uint32`` index ``rows * num_cols + cols`` (wraps past 2^32 elements)."""
    return rows.astype(jnp.uint32) * jnp.uint32(num_cols) + cols.astype(jnp.uint32)


def load(ref, mask: jax.Array | None, launch: Launch, other=0):
    """Reads a block; on GPU the out-of-bounds part is masked to ``other`` instead of read."""
    if launch.masked_io and mask is not None:
        from jax.experimental.pallas import triton as pltriton

        return pltriton.load(ref, mask=mask, other=other)
    return ref[...]


def store(ref, value: jax.Array, mask: jax.Array | None, launch: Launch) -> None:
    """Writes a block; out-of-bounds parts are masked on GPU and dropped by Pallas on TPU."""
    if launch.masked_io and mask is not None:
        from jax.experimental.pallas import triton as pltriton

        pltriton.store(ref, value, mask=mask)
    else:
        ref[...] = value


def block_positions(shape: tuple[int, int], axis_blocks: tuple[int, int]) -> tuple[jax.Array, ...]:
    """Global ``(rows, cols)`` int32 coordinates of the current 2-D block of ``shape``.

    ``axis_blocks`` says which grid axis walks the rows and which the columns (``-1``: that
    dimension has a single block).
    """
    out = []
    for dim, grid_axis in enumerate(axis_blocks):
        start = 0 if grid_axis < 0 else pl.program_id(grid_axis) * shape[dim]
        out.append(start + jax.lax.broadcasted_iota(jnp.int32, shape, dim))
    return tuple(out)
