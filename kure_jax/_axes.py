"""Axis normalisation shared by :mod:`kure_jax.kurtosis` and :mod:`kure_jax.quant.policy`."""

from __future__ import annotations

from collections.abc import Sequence


def canonical_axes(
    axes: Sequence[int], ndim: int, *, out_of_range: str, repeated: str
) -> tuple[int, ...]:
    """Sorted non-negative form of ``axes`` (NumPy convention) for an array of rank ``ndim``.

    Args:
      axes: ints in ``[-ndim, ndim)``; their type is the caller's to check.
      ndim: rank of the array the axes index.
      out_of_range: message of the ValueError for an axis outside ``[-ndim, ndim)``.
      repeated: message of the ValueError for two entries naming the same axis
        (e.g. ``0`` and ``-ndim``).

    Returns:
      ``tuple(sorted(a % ndim for a in axes))``.

    Raises:
      ValueError: with ``out_of_range`` or ``repeated``, checked in that order.
    """
    if any(not -ndim <= a < ndim for a in axes):
        raise ValueError(out_of_range)
    normalised = tuple(sorted(a % ndim for a in axes))
    if len(set(normalised)) != len(normalised):
        raise ValueError(repeated)
    return normalised
