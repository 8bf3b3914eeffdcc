"""Shape and value checks shared by the quantizers, the kernels and the checkpoint readers."""

from __future__ import annotations

import jax
import numpy as np

__all__ = [
    "check_broadcastable",
    "check_positive",
    "first_non_finite",
    "leaf_shapes",
    "shape_mismatch",
    "sum_to_shape",
]


def check_broadcastable(name: str, shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    """Raises ValueError unless ``shape`` broadcasts to ``x_shape`` without enlarging it."""
    ok = len(shape) <= len(x_shape) and all(
        d in (1, xd) for d, xd in zip(shape[::-1], x_shape[::-1], strict=False)
    )
    if not ok:
        raise ValueError(
            f"{name} of shape {shape} must broadcast to x's shape {x_shape} (scalar, or size 1 "
            "on every axis except the quantisation channel axes)."
        )


def check_positive(name: str, value: jax.Array) -> None:
    """Raises ValueError if a concrete ``value`` has an entry that is not finite and > 0
    (an infinite step makes every output NaN); tracers pass."""
    if isinstance(value, jax.core.Tracer):
        return  # Under jit/vmap the values are unknown at trace time.
    host = np.asarray(value)
    bad = host[~(np.isfinite(host) & (host > 0))]
    if bad.size:
        raise ValueError(f"{name} must be finite and > 0 everywhere; got {bad.flat[0]!r}.")


def sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums ``t`` over the axes that broadcasting added or expanded to reach ``t.shape``."""
    t = t.sum(axis=tuple(range(t.ndim - len(shape))))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and t.shape[i] != 1)
    return t.sum(axis=axes, keepdims=True) if axes else t


def leaf_shapes(tree: object) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of every leaf of a pytree (keys joined by ``/``)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): tuple(np.shape(leaf))
        for path, leaf in leaves
    }


def shape_mismatch(
    want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]
) -> tuple[str, int] | None:
    """``(first differing path, number of differing paths)`` of two :func:`leaf_shapes`, or None.

    Paths missing on one side come first (sorted), then paths whose shapes differ.
    """
    if want == have:
        return None
    diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
    return diff[0], len(diff)


def first_non_finite(tree: object) -> tuple[str, str] | None:
    """The first leaf (in ``jax.tree`` order) holding a NaN or an infinity, or None.

    Integer and boolean leaves are skipped (they cannot hold either). Reads every floating leaf
    to the host, so call it on parameters, not inside ``jit``.

    Args:
      tree: a pytree of arrays (``jax.Array``, NumPy arrays or Python scalars).

    Returns:
      ``(path, what)``: the leaf's path with keys joined by ``/`` (as :func:`leaf_shapes`) and
      e.g. ``"2 NaN, 1 inf of 288 values"``; ``None`` when every leaf is finite.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        host = np.asarray(leaf)
        if not jax.numpy.issubdtype(host.dtype, jax.numpy.inexact):  # bfloat16 too
            continue
        nan, inf = int(np.isnan(host).sum()), int(np.isinf(host).sum())
        if nan or inf:
            what = ", ".join(f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "inf")) if n)
            return jax.tree_util.keystr(path, simple=True, separator="/"), (
                f"{what} of {host.size} values")
    return None
