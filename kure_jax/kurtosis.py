"""Kurtosis, the KURE penalty over a params pytree, and its optax transform.

KURE (Shkolnik et al., "Robust Quantization: One Model to Rule Them All",
NeurIPS 2020) pushes every weight tensor towards a uniform distribution, whose
kurtosis is 1.8, because a uniform tensor has a higher quantization SNR and a
flatter MSE around its optimal step than a normal (3) or Laplace (6) one:

.. math::

   \\mathrm{Kurt}[W] = \\frac{E[(W - \\mu)^4]}{\\sigma^4}, \\qquad
   L_{KURE} = \\frac{1}{L} \\sum_{i=1}^{L} (\\mathrm{Kurt}[W_i] - K_T)^2 .
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from kure_jax._axes import canonical_axes
from kure_jax.selection import LeafPredicate, select

PyTree = Any
Axis = int | Sequence[int] | None
Reduction = Literal["mean", "sum", "max"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "max")
UNIFORM_KURTOSIS = 1.8

__all__ = [
    "REDUCTIONS",
    "UNIFORM_KURTOSIS",
    "AddPenaltyState",
    "add_penalty",
    "kurtosis",
    "kurtosis_report",
    "penalty",
]


def _normalise_axis(axis: Axis, ndim: int, what: str = "x") -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else axis
    if isinstance(axes, str) or not isinstance(axes, Sequence) or not axes or any(
            not isinstance(a, numbers.Integral) or isinstance(a, bool) for a in axes):
        raise ValueError(f"axis must be None, an int or a non-empty tuple of ints; got {axis!r}.")
    return canonical_axes(
        tuple(int(a) for a in axes),
        ndim,
        out_of_range=f"axis {axis!r} is out of range for {what} of rank {ndim}.",
        repeated=f"axis {axis!r} repeats an axis of {what}.",
    )


def kurtosis(x: ArrayLike, axis: Axis = None, *, ddof: int = 0) -> jax.Array:
    """Fourth standardised moment (Pearson kurtosis, not excess), ``E[(x-mu)^4] / var^2``.

    Matches ``scipy.stats.kurtosis(x, axis, fisher=False, bias=True)`` for ``ddof=0``.
    The KURE reference divides by the unbiased variance (``ddof=1``); the two differ by
    the factor ``((n-1)/n)^2``, negligible for weight tensors.

    A tensor whose variance is zero up to rounding (a constant tensor) has no
    defined kurtosis; this returns 0 there, with a zero gradient, instead of NaN/Inf.
    Any other finite tensor gives a finite value and gradient at any scale (the moments are
    taken of ``x / max|x|``), e.g. weights with a std of 1e-10 or 1e10.

    Args:
      x: array of any shape, any float dtype (bfloat16/float16 are computed in float32).
      axis: axes to reduce over (NumPy convention). ``None`` reduces the whole tensor;
        e.g. ``axis=(0, 1, 2)`` on an ``(H, W, I, O)`` conv kernel gives per-output-channel
        kurtosis of shape ``(O,)``.
      ddof: delta degrees of freedom of the variance, 0 (moments) or 1 (reference).

    Returns:
      float32 (float64 for float64 input) array of ``x``'s shape with ``axis`` removed.

    Raises:
      ValueError: if ``axis`` is out of range, ``ddof`` is not an int >= 0, or the reduced size
        is not larger than ``ddof``.
    """
    ddof = validate_ddof(ddof)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    axes = _normalise_axis(axis, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a]
    if not isinstance(ddof, jax.Array) and count <= ddof:
        raise ValueError(f"kurtosis needs > ddof={ddof} elements per reduction, got {count}.")

    # Kurtosis is scale-free, so the moments are taken of x / max|x|: with the raw values a
    # std below ~1e-5 underflows var^4 in the float32 gradient (NaN), and extreme scales
    # overflow m4. The scale is a constant for autodiff; its true gradient term is exactly 0.
    magnitude = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=True))
    inv_scale = 1 / jnp.where(magnitude > 0, magnitude, 1)
    centred = (x - jnp.mean(x, axis=axes, keepdims=True)) * inv_scale
    squared = centred * centred
    variance = jnp.sum(squared, axis=axes) / (count - ddof)
    fourth_moment = jnp.mean(squared * squared, axis=axes)
    # A constant tensor leaves residuals of order eps*|x| after centring (at most 1 after
    # scaling); treat any variance at that level as zero. The double `where` keeps the gradient
    # finite on the masked branch.
    degenerate = variance <= (16 * jnp.finfo(dtype).eps) ** 2
    safe_variance = jnp.where(degenerate, jnp.ones_like(variance), variance)
    return jnp.where(degenerate, jnp.zeros_like(variance), fourth_moment / safe_variance**2)


def validate_ddof(ddof: int | jax.Array) -> int | jax.Array:
    """``ddof`` as an int; ValueError unless it is an integer >= 0 (bools are refused).

    An integer scalar array is accepted too (``optax.inject_hyperparams`` turns the ``ddof``
    of :func:`add_penalty` into one): a concrete one is read as an int, a traced one is
    returned as it is (it only divides the variance) and cannot be range-checked.
    """
    if isinstance(ddof, jax.Array | np.ndarray) and not isinstance(ddof, bool):
        if ddof.ndim == 0 and jnp.issubdtype(ddof.dtype, jnp.integer):
            if isinstance(ddof, jax.core.Tracer):
                return ddof
            ddof = int(ddof)
    if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof < 0:
        raise ValueError(f"ddof must be an int >= 0; got {ddof!r}.")
    return int(ddof)


def _leaf_terms(
    params: PyTree, target: float, where: LeafPredicate | None, axis: Axis, ddof: int
) -> list[tuple[str, jax.Array]]:
    terms = []
    for name, leaf in select(params, where):
        _normalise_axis(axis, jnp.ndim(leaf), what=f"leaf {name!r}")
        kurt = kurtosis(leaf, axis, ddof=ddof)
        terms.append((name, jnp.mean((kurt - target) ** 2)))
    return terms


def penalty(
    params: PyTree,
    target: float = UNIFORM_KURTOSIS,
    *,
    where: LeafPredicate | None = None,
    reduction: Reduction = "mean",
    axis: Axis = None,
    ddof: int = 0,
) -> jax.Array:
    """The KURE term ``reduce_i (Kurt[W_i] - target)^2`` over the selected leaves.

    With the default ``reduction="mean"`` this is the paper's ``L_KURE``; add
    ``lam * penalty(params)`` to the task loss (paper: ``target=1.8``, ``lam=1``).

    Args:
      params: any pytree of arrays: a Flax variables dict (with or without the
        top-level ``"params"`` key), nested dicts, lists.
      target: the kurtosis target ``K_T`` (1.8 = uniform).
      where: leaf selection; ``None`` selects conv/dense kernels (see
        :mod:`kure_jax.selection`); :func:`kure_jax.paper_selection` gives the
        paper's "all convs but the first, no final dense".
      reduction: ``"mean"`` (paper), ``"sum"`` or ``"max"`` over the selected leaves.
      axis: ``None`` for per-tensor kurtosis (paper), or the axes to reduce per leaf
        for per-channel kurtosis; each leaf's term is then the mean over its channels.
      ddof: 0 (fourth standardised moment) or 1 (reference's unbiased std).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if the selection matches no leaf (message names what was
        searched), ``reduction`` is unknown, or ``axis`` does not fit a leaf.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    terms = jnp.stack([term for _, term in _leaf_terms(params, target, where, axis, ddof)])
    return reduce_penalty_terms(terms, reduction)


def reduce_penalty_terms(terms: jax.Array, reduction: str) -> jax.Array:
    """``"mean"``, ``"sum"`` or ``"max"`` (one of ``REDUCTIONS``) of the per-leaf terms ``(n,)``.

    Shared by :func:`penalty`, ``kure_jax.kernels.penalty`` and the training step, which
    validate ``reduction`` up front (a ``KeyError`` here means they did not).
    """
    return {"mean": jnp.mean, "sum": jnp.sum, "max": jnp.max}[reduction](terms)


def kurtosis_report(
    params: PyTree, where: LeafPredicate | None = None, *, axis: Axis = None, ddof: int = 0
) -> dict[str, jax.Array]:
    """Kurtosis of every selected leaf, keyed by its ``/``-joined path, for logging.

    Works inside ``jit`` (values are arrays); ``jax.device_get`` gives NumPy values.

    Args:
      params: any pytree of arrays.
      where: leaf selection as in :func:`penalty`.
      axis: as in :func:`kurtosis`; ``None`` gives one scalar per leaf.
      ddof: as in :func:`kurtosis`.

    Returns:
      ``{"params/Conv_0/kernel": kurtosis, ...}`` in tree-flatten order.

    Raises:
      ValueError: if the selection matches no leaf, or ``axis`` does not fit a leaf.
    """
    report = {}
    for name, leaf in select(params, where):
        _normalise_axis(axis, jnp.ndim(leaf), what=f"leaf {name!r}")
        report[name] = kurtosis(leaf, axis, ddof=ddof)
    return report


class AddPenaltyState(NamedTuple):
    """State of :func:`add_penalty` with a scheduled ``coeff``: the number of updates so far."""

    count: jax.Array  # int32 scalar


def add_penalty(
    coeff: float | jax.Array | optax.Schedule = 1.0,
    target: float | jax.Array = UNIFORM_KURTOSIS,
    *,
    where: LeafPredicate | None = None,
    reduction: Reduction = "mean",
    axis: Axis = None,
    ddof: int = 0,
) -> optax.GradientTransformation:
    """An optax transform adding ``coeff * grad(penalty)(params)`` to the updates.

    Put it first in a chain, where updates are still gradients::

        tx = optax.chain(kure_jax.add_penalty(1.0), optax.sgd(0.1, momentum=0.9))

    is the same as training on ``loss + 1.0 * kure_jax.penalty(params)`` with SGD.

    ``coeff`` may be a schedule of the update count, like an optax learning rate, e.g. a
    linear warm-up of lambda: ``add_penalty(optax.linear_schedule(0.0, 1.0, 1000))``.
    ``coeff`` and ``target`` are also injectable: ``optax.inject_hyperparams(add_penalty)(
    coeff=0.5)`` keeps them in ``state.hyperparams``. The other options are static;
    ``inject_hyperparams`` treats every callable as a schedule, so a ``where`` predicate
    goes in its ``static_args=("where",)``, and a per-channel ``axis`` is given as a
    tuple (an int axis would become a traced hyperparameter).

    Args:
      coeff: the KURE weight ``lambda``: a number, a scalar array or ``step -> lambda``.
      target: kurtosis target ``K_T`` (a number or a scalar array).
      where, reduction, axis, ddof: the selection and options of :func:`penalty`.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` requires ``params``. Its state is
      ``optax.EmptyState()`` for a constant ``coeff``, :class:`AddPenaltyState` (the count)
      for a scheduled one.

    Raises:
      ValueError: from ``update`` if ``params`` is not given or the selection matches
        nothing; here if ``reduction`` is unknown, ``ddof`` is not an integer >= 0 or
        ``axis`` is a traced array.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    ddof = validate_ddof(ddof)
    axis = _static_axis(axis)
    scheduled = callable(coeff)

    def penalty_of(params: PyTree) -> jax.Array:
        return penalty(params, target, where=where, reduction=reduction, axis=axis, ddof=ddof)

    def init_fn(params: PyTree) -> AddPenaltyState | optax.EmptyState:
        del params
        return AddPenaltyState(jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

    def update_fn(
        updates: PyTree, state: AddPenaltyState | optax.EmptyState, params: PyTree | None = None
    ) -> tuple[PyTree, AddPenaltyState | optax.EmptyState]:
        if params is None:
            raise ValueError("add_penalty needs params: call tx.update(grads, state, params).")
        if scheduled:
            weight = coeff(state.count)
            state = AddPenaltyState(optax.safe_int32_increment(state.count))
        else:
            weight = coeff
        # params may hold integer leaves (step counters): their gradient is float0, no update.
        penalty_grads = jax.grad(penalty_of, allow_int=True)(params)
        updates = jax.tree.map(
            lambda u, g: u if g.dtype == jax.dtypes.float0 else u + (weight * g).astype(u.dtype),
            updates, penalty_grads)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _static_axis(axis: Axis | jax.Array) -> Axis:
    """``axis`` as Python ints; a concrete integer array (from ``inject_hyperparams``) is read."""
    if isinstance(axis, jax.core.Tracer):
        raise ValueError(
            "axis is a traced array: optax.inject_hyperparams turns an int argument into a "
            "hyperparameter; pass a tuple (axis=(0, 1, 2)) or add 'axis' to static_args.")
    if isinstance(axis, jax.Array | np.ndarray):
        if axis.ndim != 0 or not jnp.issubdtype(axis.dtype, jnp.integer):
            raise ValueError(f"axis must be None, an int or a tuple of ints; got {axis!r}.")
        return int(axis)
    return axis
