"""Pallas kernels of :func:`kure_jax.kernels.fake_quant_pallas` and the element math they share.

Each kernel works on a ``(rows, cols)`` matrix view (:mod:`kure_jax.kernels._layout`) with a 2-D
grid of ``block`` tiles. Reductions (absmax, the step gradient) write one partial result per
tile row or column, which a small XLA reduction finishes: this keeps every program independent
(no atomics), so the grid can run in any order on any number of cores.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kure_jax.kernels import _config, _layout, _ops


class Spec(NamedTuple):
    """Static description of one fake-quant call (hashable: a custom_vjp nondiff argument)."""

    qmin: int
    qmax: int
    rounding: str
    grad_factor: float
    impl: str  # "pallas" or "jnp"
    view: _layout.View | None = None  # Pallas only.
    block: tuple[int, int] = (1, 1)
    launch: _config.Launch | None = None


def quantize_block(spec: Spec, x: jax.Array, s: jax.Array, noise: jax.Array | None):
    """``(v, q)``: ``x / s`` and its rounded, clipped code (computed in ``s``'s dtype)."""
    v = x.astype(s.dtype) / s
    q = jnp.clip(_ops.round_values(v, spec.rounding, noise), spec.qmin, spec.qmax)
    return v, q


def grad_terms(spec: Spec, v: jax.Array, q: jax.Array, g: jax.Array):
    """``(dL/dx, g * dy/ds)`` per element: the clipped STE and the LSQ step-gradient term."""
    inside = (v >= spec.qmin) & (v <= spec.qmax)
    g = g.astype(v.dtype)
    return jnp.where(inside, g, 0.0), g * (q - jnp.where(inside, v, 0.0))


def noise_at(words: tuple[jax.Array, jax.Array] | None, index: jax.Array) -> jax.Array | None:
    """U[0, 1) rounding noise of the elements with flat ``index`` (``None`` without a key)."""
    if words is None:
        return None
    return _ops.uniform_from_bits(_ops.hash_bits(index, words[0], words[1]))


def _grid(spec: Spec) -> tuple[int, int]:
    br, bc = spec.block
    return pl.cdiv(spec.view.rows, br), pl.cdiv(spec.view.cols, bc)


def _scale_spec(spec: Spec) -> pl.BlockSpec:
    br, bc = spec.block
    if spec.view.mode == "tensor":
        return pl.BlockSpec((1, 1), lambda i, j: (0, 0))
    if spec.view.mode == "col":
        return pl.BlockSpec((1, bc), lambda i, j: (0, j))
    return pl.BlockSpec((br, 1), lambda i, j: (i, 0))


def _words_spec(spec: Spec) -> list[pl.BlockSpec]:
    if spec.rounding != "stochastic":
        return []
    if spec.launch.platform == "tpu" and not spec.launch.interpret:
        from jax.experimental.pallas import tpu as pltpu

        return [pl.BlockSpec(memory_space=pltpu.SMEM)]  # Scalars live in SMEM on TPU.
    return [pl.BlockSpec((1, 2), lambda i, j: (0, 0))]


def _positions(spec: Spec):
    rows, cols = _ops.block_positions(spec.block, (0, 1))
    return rows, cols, (rows < spec.view.rows) & (cols < spec.view.cols)


def _step_mask(spec: Spec) -> jax.Array | None:
    """Validity of the step block: ``(1, bc)`` per column, ``(br, 1)`` per row, else None.

    Built from its own iota: Triton has no lowering for slicing a block.
    """
    br, bc = spec.block
    if spec.view.mode == "col":
        return _ops.block_positions((1, bc), (-1, 1))[1] < spec.view.cols
    if spec.view.mode == "row":
        return _ops.block_positions((br, 1), (0, -1))[0] < spec.view.rows
    return None


def _load_block(spec: Spec, x_ref, s_ref, words_ref):
    """``x`` (float32), the step and the noise of the current block, with its positions."""
    rows, cols, mask = _positions(spec)
    x = _ops.load(x_ref, mask, spec.launch).astype(jnp.float32)
    s = _ops.load(s_ref, _step_mask(spec), spec.launch, other=1.0)
    words = None if words_ref is None else (words_ref[0, 0], words_ref[0, 1])
    noise = noise_at(words, _ops.flat_index(rows, cols, spec.view.cols))
    return x, s, noise, mask


def _partials(spec: Spec):
    """Out shape and block of the per-tile partial results of a reduction.

    One scalar per tile (``"tensor"``), one row of ``bc`` per tile (``"col"``) or one column of
    ``br`` (``"row"``); extra unit axes keep the blocks legal under TPU tiling rules.
    """
    (br, bc), (n_r, n_c) = spec.block, _grid(spec)
    if spec.view.mode == "tensor":
        return (jax.ShapeDtypeStruct((n_r, n_c, 1, 1), jnp.float32),
                pl.BlockSpec((pl.squeezed, pl.squeezed, 1, 1), lambda i, j: (i, j, 0, 0)))
    if spec.view.mode == "row":
        return (jax.ShapeDtypeStruct((n_c, spec.view.rows, 1), jnp.float32),
                pl.BlockSpec((pl.squeezed, br, 1), lambda i, j: (j, i, 0)))
    return (jax.ShapeDtypeStruct((n_r, 1, spec.view.cols), jnp.float32),
            pl.BlockSpec((pl.squeezed, 1, bc), lambda i, j: (i, 0, j)))


def _store_partial(spec: Spec, ref, values, mask, op) -> None:
    """Reduces a tile as the step is shared (``op``: jnp.sum or jnp.max) and stores it.

    Masked-out entries become 0 first: on TPU and in interpret mode an edge tile holds padding.
    """
    values = jnp.where(mask, values, 0.0)
    br, bc = spec.block
    if spec.view.mode == "tensor":  # One axis at a time: Triton reduces along a single axis.
        out = op(op(values, axis=0, keepdims=True), axis=1, keepdims=True)
        _ops.store(ref, out, None, spec.launch)
    elif spec.view.mode == "row":
        out_mask = _ops.block_positions((br, 1), (0, -1))[0] < spec.view.rows
        _ops.store(ref, op(values, axis=1, keepdims=True), out_mask, spec.launch)
    else:
        out_mask = _ops.block_positions((1, bc), (-1, 1))[1] < spec.view.cols
        _ops.store(ref, op(values, axis=0, keepdims=True), out_mask, spec.launch)


def finish_partials(spec: Spec, partial: jax.Array, op) -> jax.Array:
    """Reduces ``_partials`` output to the step's view shape ``(1, 1)``, ``(1, C)``, ``(R, 1)``."""
    if spec.view.mode == "tensor":
        return op(partial).reshape(1, 1)
    return op(partial, axis=0)


def _call(spec: Spec, kernel, out_shape, in_specs, out_specs, name: str, *args):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=_grid(spec),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=spec.launch.interpret,
        compiler_params=_config.compiler_params(spec.launch, 2),
        name=name,
    )(*args)


def forward(spec: Spec, x2: jax.Array, s2: jax.Array, words: jax.Array | None) -> jax.Array:
    """``y`` (in ``x2``'s dtype) in one pass: read ``x``, write ``y``."""

    def kernel(x_ref, s_ref, *rest):
        words_ref, y_ref = rest if len(rest) == 2 else (None, *rest)
        x, s, noise, mask = _load_block(spec, x_ref, s_ref, words_ref)
        _, q = quantize_block(spec, x, s, noise)
        _ops.store(y_ref, (q * s).astype(y_ref.dtype), mask, spec.launch)

    block = pl.BlockSpec(spec.block, lambda i, j: (i, j))
    args = (x2, s2) if words is None else (x2, s2, words)
    return _call(spec, kernel, jax.ShapeDtypeStruct(x2.shape, x2.dtype),
                 [block, _scale_spec(spec), *_words_spec(spec)], block,
                 "kure_fake_quant_fwd", *args)


def backward(spec: Spec, x2, s2, words, g) -> tuple[jax.Array, jax.Array]:
    """``(dL/dx, step-gradient partials)`` in one pass: read ``x`` and ``g``, write ``dL/dx``."""

    def kernel(x_ref, s_ref, *rest):
        words_ref, g_ref, gx_ref, part_ref = rest if len(rest) == 4 else (None, *rest)
        x, s, noise, mask = _load_block(spec, x_ref, s_ref, words_ref)
        v, q = quantize_block(spec, x, s, noise)
        g_x, contrib = grad_terms(spec, v, q, _ops.load(g_ref, mask, spec.launch))
        _ops.store(gx_ref, g_x.astype(gx_ref.dtype), mask, spec.launch)
        _store_partial(spec, part_ref, contrib, mask, jnp.sum)

    block = pl.BlockSpec(spec.block, lambda i, j: (i, j))
    part_shape, part_block = _partials(spec)
    args = (x2, s2, g) if words is None else (x2, s2, words, g)
    return _call(spec, kernel, (jax.ShapeDtypeStruct(x2.shape, x2.dtype), part_shape),
                 [block, _scale_spec(spec), *_words_spec(spec), block], (block, part_block),
                 "kure_fake_quant_bwd", *args)


def absmax(spec: Spec, x2: jax.Array) -> jax.Array:
    """float32 ``max|x|`` per step group of the view, in one read of ``x``."""

    def kernel(x_ref, part_ref):
        _, _, mask = _positions(spec)
        x = jnp.abs(_ops.load(x_ref, mask, spec.launch).astype(jnp.float32))
        _store_partial(spec, part_ref, x, mask, jnp.max)

    part_shape, part_block = _partials(spec)
    partial = _call(spec, kernel, part_shape, [pl.BlockSpec(spec.block, lambda i, j: (i, j))],
                    part_block, "kure_absmax", x2)
    return finish_partials(spec, partial, jnp.max)
