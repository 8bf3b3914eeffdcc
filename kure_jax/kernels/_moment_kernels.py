"""Pallas kernels of :func:`kure_jax.kernels.kurtosis_pallas`: moments of many tensors at once.

All tensors are passed to one ``pallas_call`` without concatenating them (a concatenation would
be a copy). Each tensor is seen flat and cut into 1-D blocks; the grid walks the blocks of tensor
0, then of tensor 1, ... (``Segments``). Program ``p`` works on exactly one tensor, chosen by a
``pl.when`` per tensor; every input's block index is clamped to its own range, so on TPU the
pipeline does not re-fetch an input while other tensors are processed, and on GPU the untaken
branches load nothing. Each program writes one row of per-block statistics (forward) or its
block of the gradient (backward).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kure_jax.kernels import _config, _ops

# Per-block statistics in the forward output row, in this order.
MEAN, M2, M3, M4, ABSMAX, SCALE = range(6)
_STATS_WIDTH = 8  # Row width (power of two for Triton); the last 2 entries are unused.
GPU_BLOCK = 4096
TPU_BLOCK = 32 * 1024


class Segments(NamedTuple):
    """Static block layout of a list of tensors (hashable)."""

    sizes: tuple[int, ...]  # Elements per tensor.
    blocks: tuple[int, ...]  # Block length per tensor.
    starts: tuple[int, ...]  # First program of each tensor.
    num_programs: int

    @classmethod
    def build(cls, sizes: Sequence[int], block: int, platform: str) -> Segments:
        """Cuts each tensor into blocks of ``block`` elements (fewer for small tensors)."""
        if platform == "gpu":  # Triton: power-of-two blocks, no longer than needed.
            lengths = tuple(min(block, 1 << max(n - 1, 0).bit_length()) for n in sizes)
        else:  # Mosaic: the whole tensor, or a multiple of 1024.
            lengths = tuple(n if n <= block else block for n in sizes)
        counts = [-(-n // b) for n, b in zip(sizes, lengths, strict=True)]
        starts = tuple(int(s) for s in np.cumsum([0, *counts[:-1]]))
        return cls(tuple(sizes), lengths, starts, int(sum(counts)))

    def block_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tensor id, valid elements)`` of every program, as NumPy arrays."""
        tid, valid = [], []
        for i, (n, b) in enumerate(zip(self.sizes, self.blocks, strict=True)):
            k = -(-n // b)
            tid += [i] * k
            valid += [b] * (k - 1) + [n - b * (k - 1)]
        return np.asarray(tid, np.int32), np.asarray(valid, np.float32)


def _in_specs(seg: Segments) -> list[pl.BlockSpec]:
    specs = []
    for start, b, n in zip(seg.starts, seg.blocks, seg.sizes, strict=True):
        last = -(-n // b) - 1
        specs.append(pl.BlockSpec((b,), lambda p, s=start, k=last: (jnp.clip(p - s, 0, k),)))
    return specs


def _branches(seg: Segments, body) -> None:
    """Runs ``body(i, mask)`` for the tensor ``i`` that the current program belongs to."""
    p = pl.program_id(0)
    for i, (start, b, n) in enumerate(zip(seg.starts, seg.blocks, seg.sizes, strict=True)):
        count = -(-n // b)

        @pl.when((p >= start) & (p < start + count))
        def _(i=i, start=start, b=b, n=n):
            index = (p - start) * b + jax.lax.broadcasted_iota(jnp.int32, (b,), 0)
            body(i, index < n)


def block_stats(seg: Segments, tensors: Sequence[jax.Array], launch: _config.Launch) -> jax.Array:
    """float32 ``(programs, 8)``: shifted mean, scaled centred power sums, ``max|x|``, scale.

    Every tensor is read once. Each tensor is first shifted by its first element (exact for
    values within a factor 2 of it) so that block means keep their precision when a tensor's
    mean is large relative to its spread; sums are then centred on the block's own shifted
    mean, so no cancellation occurs. Column ``MEAN`` holds the block mean minus the shift.
    The power sums are of ``d / a`` with ``d`` the centred values and ``a = max|d|`` the
    block's scale (column ``SCALE``), so no fourth power under- or overflows float32 at any
    scale of the weights: ``M_k = sum((d / a)^k)``.
    """
    num = len(tensors)
    flat = [t.reshape(-1) for t in tensors]
    shifts = jnp.stack([f[0].astype(jnp.float32) for f in flat]).reshape(num, 1)

    def kernel(shift_ref, *refs):
        in_refs, out_ref = refs[:num], refs[num]

        def body(i, mask):
            x = _ops.load(in_refs[i], mask, launch).astype(jnp.float32)
            w = jnp.where(mask, x - shift_ref[i, 0], 0.0)
            count = jnp.sum(mask.astype(jnp.float32))
            mean = jnp.sum(w) / count
            d = jnp.where(mask, w - mean, 0.0)
            scale = jnp.max(jnp.abs(d))
            d = d * (1.0 / jnp.where(scale > 0, scale, 1.0))
            d2 = d * d
            amax = jnp.max(jnp.where(mask, jnp.abs(x), 0.0))
            stats = (mean, jnp.sum(d2), jnp.sum(d2 * d), jnp.sum(d2 * d2), amax, scale)
            lane = jax.lax.broadcasted_iota(jnp.int32, (1, _STATS_WIDTH), 1)
            row = jnp.zeros((1, _STATS_WIDTH), jnp.float32)
            for k, value in enumerate(stats):
                row = jnp.where(lane == k, value, row)
            _ops.store(out_ref, row, None, launch)

        _branches(seg, body)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((seg.num_programs, 1, _STATS_WIDTH), jnp.float32),
        grid=(seg.num_programs,),
        in_specs=[_scalar_table_spec(shifts, launch), *_in_specs(seg)],
        out_specs=pl.BlockSpec((pl.squeezed, 1, _STATS_WIDTH), lambda p: (p, 0, 0)),
        interpret=launch.interpret,
        compiler_params=_config.compiler_params(launch, 1, num_warps=8),
        name="kure_moments",
    )(shifts, *flat)
    return out[:, 0, :], shifts[:, 0]


def _scalar_table_spec(table: jax.Array, launch: _config.Launch) -> pl.BlockSpec:
    """A small table read with scalar loads: whole in SMEM on TPU, one block elsewhere."""
    if launch.platform == "tpu" and not launch.interpret:
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(table.shape, lambda p: (0, 0))


def merge(seg: Segments, stats: jax.Array, shifts: jax.Array) -> tuple[jax.Array, ...]:
    r"""Per tensor: ``mean - shift``, central moments ``m2, m3, m4`` in units of the tensor's
    scale ``A``, ``max|x|`` and ``A`` itself.

    ``(stats, shifts)`` is what :func:`block_stats` returns; add ``shifts`` to the first entry
    for the mean, multiply ``m_k`` by ``A^k`` for ``E[(x - mu)^k]`` (kurtosis, a ratio, needs
    neither, so it is finite at any scale). ``A`` is the largest block scale ``a_b``. Blocks
    are merged exactly by moving each block's centred sums ``S_{k,b} = sum(((x - mu_b) /
    a_b)^k)`` to the tensor mean, in units of ``A``: with ``r_b = a_b / A`` and ``d_b = (mu_b -
    mu) / A`` (means shifted),

    .. math:: M_2 = \sum_b r_b^2 S_{2,b} + n_b d_b^2, \quad
              M_3 = \sum_b r_b^3 S_{3,b} + 3 d_b r_b^2 S_{2,b} + n_b d_b^3,

    .. math:: M_4 = \sum_b r_b^4 S_{4,b} + 4 d_b r_b^3 S_{3,b} + 6 d_b^2 r_b^2 S_{2,b}
              + n_b d_b^4 .

    Per-block rows become per-tensor sums and maxima through ``jax.ops.segment_sum`` /
    ``segment_max`` (the blocks of a tensor are contiguous and in order).
    """
    tid_np, n_b = seg.block_counts()
    num = len(seg.sizes)
    tid = jnp.asarray(tid_np)
    n = jnp.asarray(np.asarray(seg.sizes, np.float32))
    segsum = lambda v: jax.ops.segment_sum(v, tid, num, indices_are_sorted=True)
    # One scatter for both maxima.
    segmax = lambda v: jax.ops.segment_max(v, tid, num, indices_are_sorted=True)
    per_block = lambda v: v[tid]
    mean_b, m2_b, m3_b, m4_b = (stats[:, k] for k in (MEAN, M2, M3, M4))
    absmax, scale = segmax(stats[:, ABSMAX:SCALE + 1]).T  # both >= 0: 0 is a safe identity
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    mean = segsum(n_b * mean_b) / n
    d = (mean_b - per_block(mean)) * per_block(inv)
    r = stats[:, SCALE] * per_block(inv)
    s2, s3, s4 = r * r * m2_b, r * r * r * m3_b, (r * r) * (r * r) * m4_b
    m2 = segsum(s2 + n_b * d * d)
    m3 = segsum(s3 + 3 * d * s2 + n_b * d**3)
    m4 = segsum(s4 + 4 * d * s3 + 6 * d * d * s2 + n_b * d**4)
    return mean, m2 / n, m3 / n, m4 / n, absmax, scale


def gradients(
    seg: Segments, tensors: Sequence[jax.Array], coefs: jax.Array, launch: _config.Launch
) -> list[jax.Array]:
    r"""Per-element ``g = a_i (u^3 - m3_i) - b_i u`` with ``u = (w - mu_i) / A_i``, every tensor.

    ``coefs`` is float32 ``(num_tensors, 6)`` with rows ``(shift_i, mu_i - shift_i, m3_i, a_i,
    b_i, 1 / A_i)`` (``m3_i`` in units of the scale ``A_i``, see :func:`merge`); ``w - mu_i`` is
    computed as ``(w - shift_i) - (mu_i - shift_i)`` for precision, as in :func:`block_stats`.
    Reads each tensor once and writes its gradient once, in the tensor's dtype and shape.
    """
    num = len(tensors)

    def kernel(*refs):
        coef_ref, in_refs, out_refs = refs[0], refs[1 : 1 + num], refs[1 + num :]

        def body(i, mask):
            shift, mu, m3, a, b, inv_scale = (coef_ref[i, k] for k in range(6))
            x = _ops.load(in_refs[i], mask, launch).astype(jnp.float32)
            d = ((x - shift) - mu) * inv_scale
            g = a * (d * d * d - m3) - b * d
            _ops.store(out_refs[i], g.astype(out_refs[i].dtype), mask, launch)

        _branches(seg, body)

    coef_spec = _scalar_table_spec(coefs, launch)
    flat = [t.reshape(-1) for t in tensors]
    specs = _in_specs(seg)
    grads = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(f.shape, f.dtype) for f in flat],
        grid=(seg.num_programs,),
        in_specs=[coef_spec, *specs],
        out_specs=specs,
        interpret=launch.interpret,
        # Sequential on TPU: an output block that a program leaves untouched is written back
        # with the data of the program before it, which must be the one that computed it.
        compiler_params=_config.compiler_params(launch, 1, num_warps=8, parallel=False),
        name="kure_moments_grad",
    )(coefs, *flat)
    return [g.reshape(t.shape) for g, t in zip(grads, tensors, strict=True)]
