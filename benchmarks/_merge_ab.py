"""The per-tensor merge of per-block moment statistics, two ways: ``kernel_times.py``'s A/B.

``kure_jax.penalty(impl="pallas")`` reads every tensor once in a Pallas kernel that writes one
row of statistics per block, then merges the rows per tensor in XLA with segment ops (scatters
and a gather, one kernel launch each). Would masked reductions over a ``(tensors, blocks)`` iota
mask, which XLA can fuse, be cheaper? This module answers it on its own terms, with jax and numpy
only: :func:`block_stats` computes such rows with jnp (not the kernel) in the GPU kernel's block
layout, and :func:`merge` merges them with either reduction (``reduce="segment"`` or
``"masked"``); ``kernel_times.py --penalty`` times both on ResNet-18/50 params. The library's
own merge shows up as its kernels inside the ``penalty+grad`` pallas rows' profile.

Block ``b`` of ``n_b`` elements contributes its mean ``mu_b``, its scale ``a_b = max|x - mu_b|``
and ``S_{k,b} = sum(((x - mu_b) / a_b)^k)`` for k = 2, 3, 4; moving them to the tensor's mean
``mu`` in units of the largest block scale ``A`` (``r_b = a_b / A``, ``d_b = (mu_b - mu) / A``):
``M_2 = sum_b r_b^2 S_2 + n_b d_b^2``, ``M_3 = sum_b r_b^3 S_3 + 3 d_b r_b^2 S_2 + n_b d_b^3``,
``M_4 = sum_b r_b^4 S_4 + 4 d_b r_b^3 S_3 + 6 d_b^2 r_b^2 S_2 + n_b d_b^4``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

GPU_BLOCK = 4096  # Elements per block of the GPU kernels (kure_jax.kernels' default).
REDUCES = ("segment", "masked")


class Layout(NamedTuple):
    """Blocks of a list of flattened tensors, each cut into power-of-two blocks (as on GPU)."""

    sizes: tuple[int, ...]  # Elements per tensor.
    blocks: tuple[int, ...]  # Block length per tensor.
    starts: tuple[int, ...]  # First block of each tensor.
    num_blocks: int

    @classmethod
    def build(cls, sizes, block: int = GPU_BLOCK) -> Layout:
        lengths = tuple(min(block, 1 << max(n - 1, 0).bit_length()) for n in sizes)
        counts = [-(-n // b) for n, b in zip(sizes, lengths, strict=True)]
        starts = tuple(int(s) for s in np.cumsum([0, *counts[:-1]]))
        return cls(tuple(int(n) for n in sizes), lengths, starts, int(sum(counts)))

    def tensor_ids(self) -> np.ndarray:
        """int32 ``(num_blocks,)``: the tensor of each block."""
        counts = np.diff([*self.starts, self.num_blocks])
        return np.repeat(np.arange(len(self.sizes), dtype=np.int32), counts)

    def valid(self) -> np.ndarray:
        """float32 ``(num_blocks,)``: elements of each block (the last of a tensor may be short)."""
        valid = []
        for n, b in zip(self.sizes, self.blocks, strict=True):
            k = -(-n // b)
            valid += [b] * (k - 1) + [n - b * (k - 1)]
        return np.asarray(valid, np.float32)


def block_stats(tensors, layout: Layout):
    """float32 ``(num_blocks, 6)``: per block ``mu_b, S_2, S_3, S_4, max|x|, a_b`` (module
    docstring), the columns of the library kernel's rows (which also shift each tensor by its
    first element: not needed at the benchmark's values)."""
    import jax.numpy as jnp

    rows = []
    for t, n, b in zip(tensors, layout.sizes, layout.blocks, strict=True):
        k = -(-n // b)
        x = jnp.pad(jnp.ravel(t).astype(jnp.float32), (0, k * b - n)).reshape(k, b)
        mask = (jnp.arange(k * b) < n).reshape(k, b)
        mean = jnp.sum(x, axis=1, keepdims=True) / jnp.sum(mask, axis=1, keepdims=True)
        d = jnp.where(mask, x - mean, 0.0)
        scale = jnp.max(jnp.abs(d), axis=1, keepdims=True)
        u = d / jnp.where(scale > 0, scale, 1.0)
        sums = [jnp.sum(u**p, axis=1, keepdims=True) for p in (2, 3, 4)]
        absmax = jnp.max(jnp.abs(jnp.where(mask, x, 0.0)), axis=1, keepdims=True)
        rows.append(jnp.concatenate([mean, *sums, absmax, scale], axis=1))
    return jnp.concatenate(rows)


def merge(stats, layout: Layout, *, reduce: str = "segment"):
    """Per tensor: ``mean``, central moments ``m2, m3, m4`` in units of ``A``, ``max|x|``, ``A``.

    ``reduce="segment"``: ``jax.ops.segment_sum`` / ``segment_max`` and a gather, as the library
    merges; ``"masked"``: the same sums and maxima as reductions over a ``(tensors, blocks)``
    iota mask (no scatters, no gathers). Equal up to summation order.

    Raises:
      ValueError: for a ``reduce`` other than ``REDUCES``.
    """
    import jax
    import jax.numpy as jnp

    num = len(layout.sizes)
    if reduce == "segment":
        tid = jnp.asarray(layout.tensor_ids())
        segsum = lambda v: jax.ops.segment_sum(v, tid, num, indices_are_sorted=True)
        segmax = lambda v: jax.ops.segment_max(v, tid, num, indices_are_sorted=True)
        per_block = lambda v: v[tid]
    elif reduce == "masked":
        starts = np.asarray(layout.starts, np.int32)
        ends = np.asarray([*layout.starts[1:], layout.num_blocks], np.int32)
        block = jax.lax.broadcasted_iota(jnp.int32, (num, layout.num_blocks), 1)
        mask = (block >= starts[:, None]) & (block < ends[:, None])
        segsum = lambda v: jnp.sum(jnp.where(mask, v[None, :], 0.0), axis=1)
        segmax = lambda v: jnp.max(jnp.where(mask[:, :, None], v[None], 0.0), axis=1)  # v >= 0
        per_block = lambda v: jnp.sum(jnp.where(mask, v[:, None], 0.0), axis=0)
    else:
        raise ValueError(f"reduce must be one of {REDUCES}; got {reduce!r}.")
    n_b = jnp.asarray(layout.valid())
    n = jnp.asarray(np.asarray(layout.sizes, np.float32))
    mean_b, s2_b, s3_b, s4_b, scale_b = (stats[:, k] for k in (0, 1, 2, 3, 5))
    absmax, scale = segmax(stats[:, 4:6]).T  # One scatter for both maxima, as the library.
    inv = 1.0 / jnp.where(scale > 0, scale, 1.0)
    mean = segsum(n_b * mean_b) / n
    d = (mean_b - per_block(mean)) * per_block(inv)
    r = scale_b * per_block(inv)
    s2, s3, s4 = r * r * s2_b, r * r * r * s3_b, (r * r) * (r * r) * s4_b
    m2 = segsum(s2 + n_b * d * d)
    m3 = segsum(s3 + 3 * d * s2 + n_b * d**3)
    m4 = segsum(s4 + 4 * d * s3 + 6 * d * d * s2 + n_b * d**4)
    return mean, m2 / n, m3 / n, m4 / n, absmax, scale


def merge_ops(params):
    """``(op, impl, fn, stats)`` of both merges over ``params``' leaves (stats computed once)."""
    import functools

    import jax

    leaves = jax.tree.leaves(params)
    layout = Layout.build([leaf.size for leaf in leaves])
    stats = jax.jit(block_stats, static_argnums=1)(leaves, layout)
    for reduce in REDUCES:
        yield f"merge ({reduce})", "xla", functools.partial(merge, layout=layout,
                                                            reduce=reduce), stats
