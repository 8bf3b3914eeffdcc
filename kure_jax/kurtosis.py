"""Kurtosis, the KURE penalty over a params pytree, and its optax transform.

KURE (Shkolnik et al., "Robust Quantization: One Model to Rule Them All",
NeurIPS 2020) pushes every weight tensor towards a uniform distribution, whose
kurtosis is 1.8, because a uniform tensor has a higher quantization SNR and a
flatter MSE around its optimal step than a normal (3) or Laplace (6) one:

.. math::

   \\mathrm{Kurt}[W] = \\frac{E[(W - \\mu)^4]}{\\sigma^4}, \\qquad
   L_{KURE} = \\frac{1}{L} \\sum_{i=1}^{L} (\\mathrm{Kurt}[W_i] - K_T)^2 .

Per-tensor kurtosis of many tensors (:func:`kurtosis_many`, :func:`tensor_moments`,
:func:`penalty`, :func:`penalty_and_kurtosis`) takes ``impl``: ``"jnp"`` (default, one
:func:`kurtosis` per tensor), ``"pallas"`` (the fused kernels of :mod:`kure_jax.kernels`: one
launch reads every tensor once, one more pass gives the gradient; float32/bfloat16/float16
tensors; results within ~1e-6 relative of jnp), ``"auto"`` (the kernel on the backends where it
was measured faster, ``kure_jax.kernels.AUTO_PALLAS_BACKENDS``) or ``None``
(``$KURE_JAX_KERNELS``, else ``"auto"``).
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

from kure_jax import kernels
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
    "Moments",
    "add_penalty",
    "kurtosis",
    "kurtosis_many",
    "kurtosis_report",
    "penalty",
    "penalty_and_kurtosis",
    "tensor_moments",
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


def _as_tensors(tensors: Sequence[ArrayLike]) -> list[jax.Array]:
    # A lone array is a sequence of its rows to Python; a dict iterates over its keys.
    if not isinstance(tensors, Sequence) or isinstance(tensors, str):
        raise TypeError(
            f"expected a list or tuple of arrays; got {type(tensors).__name__} (wrap a single "
            "array in a list; for a pytree use kure_jax.penalty or jax.tree.leaves)."
        )
    tensors = [jnp.asarray(t) for t in tensors]
    if not tensors:
        raise ValueError("expected a non-empty sequence of arrays; got none.")
    empty = [t.shape for t in tensors if t.size == 0]
    if empty:
        raise ValueError(f"tensors must not be empty; got shapes {empty}.")
    return tensors


def _takes_kernel(tensors: Sequence[jax.Array], impl: str | None, *,
                  extra_problem: str | None = None) -> bool:
    """Whether ``impl`` runs the moment kernels on ``tensors``; a refusal of a kernel asked for
    by name (``impl="pallas"``) raises ValueError, ``"auto"`` falls back to jnp."""
    choice, strict = kernels.resolve_impl(impl)
    if choice != "pallas":
        return False
    problem = extra_problem or kernels.moments_problem(tensors)
    if problem is not None and strict:
        raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")
    return problem is None


def tensor_moments(
    tensors: Sequence[ArrayLike],
    *,
    impl: str | None = "jnp",
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> Moments:
    """Mean, central moments 2-4 and max-abs of each tensor (one kernel launch for all on the
    kernel path).

    Not differentiable on the kernel path (use :func:`kurtosis_many` or :func:`penalty`).

    Args:
      tensors: non-empty sequence of float arrays of any shapes (computed in float32, or
        float64 for float64 tensors on the jnp path).
      impl: ``"jnp"``, ``"pallas"``, ``"auto"`` or ``None`` (module docstring).
      platform: kernel option, ``"gpu"`` or ``"tpu"`` variant (``None``: the local backend).
      interpret: kernel option, run in the Pallas interpreter (``None``: only off GPU/TPU).
      block_size: kernel option, elements per block (a power of two on GPU, a multiple of 1024
        on TPU; ``None``: one per platform). Kernel options are checked when the kernel runs.

    Returns:
      :class:`Moments`.

    Raises:
      TypeError: if ``tensors`` is not a list or tuple (e.g. a single array).
      ValueError: for an empty sequence, an empty tensor, an invalid ``impl`` or kernel option,
        or (``impl="pallas"``) an unsupported dtype.
    """
    tensors = _as_tensors(tensors)
    if _takes_kernel(tensors, impl):
        return Moments(*kernels.moments_pallas(tensors, platform=platform, interpret=interpret,
                                               block_size=block_size))
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
    impl: str | None = "jnp",
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """Kurtosis of each tensor, ``kurtosis(t, ddof=ddof)`` for each ``t``.

    Differentiable on both paths; on the kernel path all tensors are read in one launch and the
    gradient is one more fused pass.

    Args:
      tensors: non-empty sequence of float arrays of any shapes.
      ddof: delta degrees of freedom of the variance (0: moments; 1: the KURE reference).
      impl: as in :func:`tensor_moments`; the jnp path calls :func:`kurtosis` per tensor.
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
    if isinstance(ddof, int):  # A traced ddof (inject_hyperparams) cannot be range-checked.
        small = [t.shape for t in tensors if t.size <= ddof]
        if small:
            raise ValueError(
                f"kurtosis needs > ddof={ddof} elements per tensor; got shapes {small}.")
    traced = None if isinstance(ddof, int) else "a traced ddof (the kernels need a static int)"
    if _takes_kernel(tensors, impl, extra_problem=traced):
        return kernels.kurtosis_pallas(tensors, ddof=ddof, platform=platform,
                                       interpret=interpret, block_size=block_size)
    return jnp.stack([kurtosis(t, ddof=ddof).astype(jnp.float32) for t in tensors])


def penalty(
    params: PyTree,
    target: float = UNIFORM_KURTOSIS,
    *,
    where: LeafPredicate | None = None,
    reduction: Reduction = "mean",
    axis: Axis = None,
    ddof: int = 0,
    impl: str | None = "jnp",
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> jax.Array:
    """The KURE term ``reduce_i (Kurt[W_i] - target)^2`` over the selected leaves.

    With the default ``reduction="mean"`` this is the paper's ``L_KURE``; add
    ``lam * penalty(params)`` to the task loss (paper: ``target=1.8``, ``lam=1``).

    Args:
      params: any pytree of arrays: a Flax variables dict (with or without the
        top-level ``"params"`` key), nested dicts, lists.
      target: the kurtosis target ``K_T`` (1.8 = uniform).
      where: leaf selection; ``None`` selects conv/dense kernels (see
        :mod:`kure_jax.selection`), or a :class:`~kure_jax.LayerRule` such as
        :data:`kure_jax.PAPER_LAYERS` (the paper's "all convs but the first, no final dense").
      reduction: ``"mean"`` (paper), ``"sum"`` or ``"max"`` over the selected leaves.
      axis: ``None`` for per-tensor kurtosis (paper), or the axes to reduce per leaf
        for per-channel kurtosis; each leaf's term is then the mean over its channels.
        Per-channel kurtosis has no kernel: ``impl="auto"`` runs it in jnp.
      ddof: 0 (fourth standardised moment) or 1 (reference's unbiased std).
      impl: how the per-tensor kurtosis is computed (module docstring): ``"jnp"`` (default),
        ``"pallas"``, ``"auto"`` or ``None``; the same value and gradient within ~1e-6.
      platform: kernel option, as in :func:`tensor_moments`.
      interpret: kernel option, as in :func:`tensor_moments`.
      block_size: kernel option, as in :func:`tensor_moments`.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if the selection matches no leaf (message names what was
        searched), ``reduction`` is unknown, ``axis`` does not fit a leaf, ``impl`` or a kernel
        option is invalid, or ``impl="pallas"`` is given ``axis`` or an unsupported dtype.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    if axis is None:
        return penalty_and_kurtosis(params, target, where=where, reduction=reduction, ddof=ddof,
                                    impl=impl, platform=platform, interpret=interpret,
                                    block_size=block_size)[0]
    choice, strict = kernels.resolve_impl(impl)
    if choice == "pallas" and strict:
        raise ValueError("impl='pallas' computes per-tensor kurtosis only; use axis=None.")
    terms = []
    for name, leaf in select(params, where):
        _normalise_axis(axis, jnp.ndim(leaf), what=f"leaf {name!r}")
        terms.append(jnp.mean((kurtosis(leaf, axis, ddof=ddof) - target) ** 2))
    return _reduce_terms(jnp.stack(terms), reduction)


def penalty_and_kurtosis(
    params: PyTree,
    target: float = UNIFORM_KURTOSIS,
    *,
    where: LeafPredicate | None = None,
    reduction: Reduction = "mean",
    ddof: int = 0,
    impl: str | None = "jnp",
    platform: str | None = None,
    interpret: bool | None = None,
    block_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """:func:`penalty` (per tensor) and the kurtosis vector it was computed from, in one pass.

    For a training step that adds the penalty to its loss and logs the kurtosis: computing
    them separately would read every selected tensor once more.

    Args:
      params: any pytree of arrays.
      target: the kurtosis target ``K_T``.
      where: leaf selection as in :func:`penalty`.
      reduction: ``"mean"``, ``"sum"`` or ``"max"``.
      ddof: as in :func:`kurtosis`.
      impl: as in :func:`penalty`.
      platform: kernel option, as in :func:`tensor_moments`.
      interpret: kernel option, as in :func:`tensor_moments`.
      block_size: kernel option, as in :func:`tensor_moments`.

    Returns:
      ``(penalty, kurt)``: a float32 scalar and the float32 ``(n,)`` kurtosis of the ``n``
      selected leaves in :func:`kure_jax.select` order; both differentiable.

    Raises:
      ValueError: as :func:`penalty`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}.")
    leaves = [leaf for _, leaf in select(params, where)]
    kurt = kurtosis_many(leaves, ddof=ddof, impl=impl, platform=platform, interpret=interpret,
                         block_size=block_size)
    return _reduce_terms((kurt - target) ** 2, reduction), kurt


def _reduce_terms(terms: jax.Array, reduction: str) -> jax.Array:
    """``"mean"``, ``"sum"`` or ``"max"`` of the per-leaf terms ``(n,)`` (validated upstream)."""
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
