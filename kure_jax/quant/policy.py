"""``QuantPolicy``: a frozen, validated uniform quantizer, and how its step size is chosen.

A policy holds only static choices (bits, granularity, clip method, rounding, ...), so it is
hashable and ``jax.jit`` specialises on it. Continuous perturbations of the step (``step_ratio``)
are arrays, so one compiled program can ``jax.vmap`` over many of them.

Conventions (all documented choices, tested in ``tests/test_quant_policy.py``):

* **Clip -> step.** Every clip method produces a range ``[lo, hi]`` (per tensor or per channel),
  and the step is chosen so that the integer grid spans it exactly:
  symmetric ``D = hi / q_max`` with ``lo = -hi`` (signed) or ``lo = 0`` (unsigned) and zero point
  0; asymmetric ``D = (hi - lo) / (q_max - q_min)`` and the integer zero point
  ``z = round(q_min - lo / D)``, after widening the range to contain 0 so that 0 is exactly
  representable (zero padding, ReLU zeros and pruned weights stay exact).
* **Narrow range by default.** A symmetric signed quantizer uses the codes
  ``-(2^(b-1) - 1) .. 2^(b-1) - 1`` (2^b - 1 levels): with ``D = clip / q_max`` the grid is then
  exactly ``[-clip, clip]``. With ``narrow_range=False`` the extra code ``-2^(b-1)`` lets negative
  values up to ``clip + D`` through, so positive and negative outliers would be clipped
  differently. ``narrow_range`` is ignored by asymmetric and unsigned policies, which always use
  all 2^b codes (their zero point already places the grid).
* **ACIQ** constants were derived for 2^b bins of width ``2 alpha / 2^b``; here ``alpha`` is
  used as the clip of the grids above (step ``alpha / (2^(b-1) - 1)`` when narrow), so the
  step is larger than ACIQ's model step by ``2^(b-1) / (2^(b-1) - 1)`` (x2 at 2 bits, x1.14 at 4).
  ``clip="mse"`` searches the optimum of the actual grid instead.
* **Perturbations** act on the step after the clip is chosen:
  ``D <- D * step_scale * step_ratio`` (the paper's step-size ratio sweep), then ``pow2_step``
  rounds ``D`` to the nearest power of two *in log2* (``2^round(log2 D)``): this bounds the change
  of the step to a factor sqrt(2) either way, where ``ceil`` could double it and so quadruple the
  rounding noise. It is applied last so that the step actually used is always a power of two.
  The zero point is not changed by the perturbations: the grid stretches about 0.
* **Zero tensors.** The step is floored at the dtype's smallest normal number, so an all-zero
  channel gets a tiny positive step (its values stay exactly 0) and nothing becomes NaN.

References:
  Banner, Nahshan, Soudry. "Post-training 4-bit quantization of convolution networks for
  rapid-deployment" (ACIQ), NeurIPS 2019.
  Shkolnik et al. "Robust Quantization: One Model to Rule Them All", NeurIPS 2020.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kure_jax import kernels
from kure_jax._axes import canonical_axes
from kure_jax.quant import formats
from kure_jax.quant import ops as quant

CLIP_METHODS: tuple[str, ...] = ("max", "mse", "aciq", "aciq_laplace", "percentile")

# ACIQ clip constants alpha / sigma (Gaussian) and alpha / b (Laplace scale b): the minimisers of
#   E[(X - clip(X, -alpha, alpha))^2] + (2 alpha / 2^M)^2 / 12
# (Banner et al. 2019). 2..8 bits are the published values; 9..16 extend the table with the
# minimisers of the same expression (rounded to 0.01), which tests/test_quant_policy.py re-derives.
_ACIQ_GAUSSIAN = (1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92,
                  4.22, 4.49, 4.76, 5.01, 5.26, 5.49, 5.72, 5.94)  # fmt: skip
_ACIQ_LAPLACE = (2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89,
                 11.16, 12.44, 13.73, 15.02, 16.33, 17.64, 18.95, 20.27)  # fmt: skip

# clip="mse" tries the clips r * (max range) for r = 1/N, 2/N, ..., 1 and keeps the best per
# channel; lax.map evaluates _MSE_BATCH candidates at a time to bound memory to that many copies.
_MSE_GRID_SIZE = 100
_MSE_BATCH = 10


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantPolicy:
    """A uniform quantizer: bit width, granularity, clip (step) rule, rounding and perturbations.

    Attributes:
      bits: bit width in [2, 16].
      signed: signed integer codes (weights) or unsigned (non-negative tensors, e.g. post-ReLU;
        negative values then clip to 0).
      symmetric: zero point 0 and a range symmetric about 0 (``[0, clip]`` when unsigned); False
        gives an asymmetric (affine) range from the clip method's ``lo``/``hi`` and an integer
        zero point.
      axis: ``None`` for one step per tensor, or the channel axis/axes that keep their own step,
        e.g. ``-1`` for HWIO conv and ``(in, out)`` dense kernels (per output channel). Stored
        normalised to a tuple of ints (``axis=-1`` reads back as ``(-1,)``).
      clip: how the range is chosen, one of ``CLIP_METHODS``:
        ``"max"``: max |x| (``[min x, max x]`` if asymmetric);
        ``"mse"``: the clip ``r * max`` minimising ``sum((Q(x) - x)^2)`` over the grid
        ``r = 1/100, ..., 1`` (per channel when ``axis`` is set; nearest rounding);
        ``"aciq"``: Gaussian ACIQ, ``alpha = c_b * std(x)`` around ``mean(x)``;
        ``"aciq_laplace"``: Laplace ACIQ, ``alpha = c_b * mean|x - mean(x)|``;
        ``"percentile"``: the ``percentile``-th percentile of |x| (asymmetric: the
        ``100 - p`` and ``p`` percentiles of x).
        ACIQ's symmetric clip is ``|mean| + alpha`` (the smallest symmetric range holding
        ``mean +- alpha``); every ACIQ clip is capped at the data's max, so no range exceeds it.
      rounding: one of ``quant.ROUNDING_MODES``.
      step_scale: factor > 0 applied to the chosen step (static step-size perturbation).
      pow2_step: round the final step to the nearest power of two in log2.
      percentile: the percentile for ``clip="percentile"``, in (0, 100].
      narrow_range: symmetric signed grid ``+-(2^(b-1) - 1)`` (True) or with the extra code
        ``-2^(b-1)`` (False). Ignored by asymmetric and unsigned policies.
      bias_correction: shift each output channel of the quantised tensor so its mean equals the
        float mean. The output channels are ``axis`` if set, else the last axis of tensors of
        rank >= 2; rank 0 and 1 tensors are corrected as a whole.

    Raises:
      ValueError: on construction (or ``dataclasses.replace``) if a field is invalid; the message
        names the field and the allowed values.

    >>> QuantPolicy(bits=4).name
    'w4 per-tensor sym max nearest'
    >>> QuantPolicy(bits=3, axis=-1, clip="mse", symmetric=False).name
    'w3 per-channel(-1) asym mse nearest'
    """

    bits: int = 4
    signed: bool = True
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = None
    clip: str = "max"
    rounding: str = "nearest"
    step_scale: float = 1.0
    pow2_step: bool = False
    percentile: float = 99.99
    narrow_range: bool = True
    bias_correction: bool = False

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("bits", quant.validate_bits(self.bits))
        for name in ("signed", "symmetric", "pow2_step", "narrow_range", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"QuantPolicy.{name} must be True or False; got {getattr(self, name)!r}."
                )
        if not isinstance(self.clip, str) or self.clip not in CLIP_METHODS:
            raise ValueError(f"QuantPolicy.clip must be one of {CLIP_METHODS}; got {self.clip!r}.")
        set_("rounding", quant.validate_rounding(self.rounding))
        if not _is_real(self.step_scale) or not (math.isfinite(self.step_scale)
                                                 and self.step_scale > 0):
            raise ValueError(
                f"QuantPolicy.step_scale must be a finite number > 0; got {self.step_scale!r}."
            )
        set_("step_scale", float(self.step_scale))
        if not _is_real(self.percentile) or not 0 < self.percentile <= 100:
            raise ValueError(
                f"QuantPolicy.percentile must be a number in (0, 100]; got {self.percentile!r}."
            )
        set_("percentile", float(self.percentile))
        set_("axis", _normalise_axis(self.axis))

    def describe(self, prefix: str = "w") -> str:
        """A short label for tables, e.g. ``"w4 per-channel(-1) sym mse nearest pow2"``.

        Args:
          prefix: put before the bit width (``"w"`` for weights, ``"a"`` for activations).
        """
        parts = [f"{prefix}{self.bits}"]
        parts.append("per-tensor" if self.axis is None
                     else f"per-channel({','.join(map(str, self.axis))})")
        parts.append("sym" if self.symmetric else "asym")
        if not self.signed:
            parts.append("unsigned")
        parts.append(f"pct{self.percentile:g}" if self.clip == "percentile" else self.clip)
        parts.append(self.rounding)
        if self.step_scale != 1.0:
            parts.append(f"step-x{self.step_scale:g}")
        if self.pow2_step:
            parts.append("pow2")
        if self.symmetric and self.signed and not self.narrow_range:
            parts.append("full-range")
        if self.bias_correction:
            parts.append("bias-corr")
        return " ".join(parts)

    @property
    def name(self) -> str:
        """``describe()`` with the weight prefix ``"w"``."""
        return self.describe()


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _normalise_axis(axis: object) -> tuple[int, ...] | None:
    if axis is None:
        return None
    items = axis if isinstance(axis, tuple | list) else (axis,)
    try:
        ints = tuple(operator.index(a) for a in items if not isinstance(a, bool))
    except TypeError:
        ints = ()
    if not items or len(ints) != len(items) or len(set(ints)) != len(ints):
        raise ValueError(
            "QuantPolicy.axis must be None (per-tensor), an int or a non-empty tuple of distinct "
            f"ints (the channel axes that keep their own step); got {axis!r}."
        )
    return ints


def check_policy(policy: QuantPolicy) -> None:
    """Raises ValueError unless ``policy`` is a ``QuantPolicy`` (a dict would fail obscurely)."""
    if not isinstance(policy, QuantPolicy):
        raise ValueError(f"policy must be a QuantPolicy; got {type(policy).__name__}: {policy!r}.")


def kept_axes(axis: tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    """Non-negative channel axes of a rank-``ndim`` tensor; ValueError if out of range or
    repeated."""
    if axis is None:
        return ()
    allowed = (f"allowed axes are -{ndim}..{ndim - 1}" if ndim else "a scalar has no axes")
    return canonical_axes(
        axis,
        ndim,
        out_of_range=(
            f"QuantPolicy.axis={axis} is out of range for a tensor of rank {ndim}; {allowed} "
            "(or axis=None for per-tensor)."
        ),
        repeated=f"QuantPolicy.axis={axis} names the same axis twice for rank {ndim}.",
    )


def _narrow(policy: QuantPolicy) -> bool:
    return policy.narrow_range and policy.symmetric and policy.signed


def _code_range(policy: QuantPolicy) -> tuple[int, int]:
    return quant.integer_range(policy.bits, policy.signed, narrow_range=_narrow(policy))


def _range_to_step(lo: jax.Array, hi: jax.Array, policy: QuantPolicy) -> tuple[jax.Array, ...]:
    """Step and zero point whose grid spans ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    qmin, qmax = _code_range(policy)
    tiny = jnp.finfo(hi.dtype).tiny
    if policy.symmetric:
        scale = jnp.maximum(hi / qmax, tiny)
        return scale, jnp.zeros_like(scale)
    scale = jnp.maximum((hi - lo) / (qmax - qmin), tiny)
    zero_point = jnp.clip(jnp.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point


def _mse_ratio(
    x: jax.Array, lo: jax.Array, hi: jax.Array, policy: QuantPolicy, reduce: tuple[int, ...]
) -> jax.Array:
    """Per-channel r in {1/N, ..., 1} minimising the squared error of the range ``r [lo, hi]``."""
    ratios = jnp.arange(1, _MSE_GRID_SIZE + 1, dtype=x.dtype) / _MSE_GRID_SIZE

    def sq_error(r: jax.Array) -> jax.Array:
        scale, zero_point = _range_to_step(r * lo, r * hi, policy)
        q = quant.fake_quant(x, scale, bits=policy.bits, zero_point=zero_point,
                             signed=policy.signed, narrow_range=_narrow(policy))
        return jnp.sum(jnp.square(q - x), axis=reduce, keepdims=True)

    errors = jax.lax.map(sq_error, ratios, batch_size=_MSE_BATCH)  # (N, *channel shape)
    # argmin returns the first minimum: on ties the smaller clip (finer step) wins.
    return ratios[jnp.argmin(errors, axis=0)]


def _clip_range(
    x: jax.Array, policy: QuantPolicy, reduce: tuple[int, ...], amax: jax.Array | None = None
) -> tuple[jax.Array, ...]:
    """The range ``[lo, hi]`` chosen by ``policy.clip``, reduced over ``reduce`` with keepdims.

    ``amax``: ``max|x|`` with keepdims if already computed (by the absmax kernel).
    """
    stat = lambda f, v, **kw: f(v, axis=reduce, keepdims=True, **kw)
    if policy.symmetric:
        amax = stat(jnp.max, jnp.abs(x)) if amax is None else amax
        xmin, xmax = (-amax if policy.signed else jnp.zeros_like(amax)), amax
    else:
        xmin, xmax = stat(jnp.min, x), stat(jnp.max, x)
    if policy.clip in ("max", "mse"):
        lo, hi = xmin, xmax
    elif policy.clip == "percentile":
        if policy.symmetric:
            hi = stat(jnp.percentile, jnp.abs(x), q=policy.percentile)
            lo = -hi if policy.signed else jnp.zeros_like(hi)
        else:
            lo = stat(jnp.percentile, x, q=100.0 - policy.percentile)
            hi = stat(jnp.percentile, x, q=policy.percentile)
    else:  # ACIQ: mean +- c_b * spread, capped at the data's range.
        mean = stat(jnp.mean, x)
        if policy.clip == "aciq":
            alpha = _ACIQ_GAUSSIAN[policy.bits - 2] * stat(jnp.std, x)
        else:
            alpha = _ACIQ_LAPLACE[policy.bits - 2] * stat(jnp.mean, jnp.abs(x - mean))
        if policy.symmetric:
            hi = jnp.minimum(jnp.abs(mean) + alpha, xmax)
            lo = -hi if policy.signed else jnp.zeros_like(hi)
        else:
            lo, hi = jnp.maximum(mean - alpha, xmin), jnp.minimum(mean + alpha, xmax)
    # Widen to contain 0 so that 0 is on the grid (asymmetric only; symmetric already does).
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if policy.clip == "mse":
        r = _mse_ratio(x, lo, hi, policy, reduce)
        lo, hi = r * lo, r * hi
    return lo, hi


def compute_step(
    x: ArrayLike, policy: QuantPolicy, *, step_ratio: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""Step size and zero point that ``policy`` assigns to ``x``.

    .. math::

        D = \mathrm{pow2}\big(D_{clip} \cdot \mathrm{step\_scale} \cdot \mathrm{step\_ratio}\big),
        \qquad D_{clip} = \frac{hi}{q_{max}}\ \text{(symmetric)}\ \text{or}\
        \frac{hi - lo}{q_{max} - q_{min}}\ \text{(asymmetric)}

    with ``[lo, hi]`` from ``policy.clip`` (see ``QuantPolicy``) and ``pow2`` the identity unless
    ``policy.pow2_step``. The zero point is ``round(q_min - lo / D_clip)`` (asymmetric) or 0.

    Args:
      x: floating array of any shape (statistics are computed in float32, or float64 for
        float64 inputs).
      policy: the quantizer.
      step_ratio: optional scalar (array or number) multiplying the step; being an array, it can
        be vmapped over or differentiated. A concrete value must be > 0; inside ``jit``/``vmap``
        it cannot be checked, and a non-positive ratio gives the floor step (all values -> 0).

    Returns:
      ``(scale, zero_point)``, float32 (float64 for float64 ``x``) arrays of shape ``()`` when
      per-tensor, else ``x``'s rank with size 1 on every axis but ``policy.axis`` (keepdims),
      so both broadcast against ``x``. ``scale >= finfo.tiny > 0``; ``zero_point`` holds integers.

    Raises:
      ValueError: if ``policy`` is not a ``QuantPolicy``; ``x`` is not floating, is empty or
        (when concrete) holds NaN/inf; ``policy.axis`` is out of range for ``x.ndim`` (or
        repeats an axis); or ``step_ratio`` is not a scalar or is concretely not finite and > 0.

    >>> compute_step(jnp.array([-1.0, 0.5, 0.7]), QuantPolicy(bits=3))
    (Array(0.33333334, dtype=float32), Array(0., dtype=float32))
    """
    check_policy(policy)
    return _compute_step(jnp.asarray(x), policy, step_ratio, None)


def _check_input(x: jax.Array) -> None:
    """ValueError unless ``x`` is a non-empty floating array with (if concrete) finite values."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"compute_step needs a floating array; got dtype {x.dtype}.")
    if x.size == 0:
        raise ValueError(f"compute_step needs a non-empty array; got shape {x.shape}.")
    if not isinstance(x, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(x))):
        # Otherwise the NaN/inf reaches the step and is reported as a bad scale (or, under
        # jit, silently turns every output into NaN).
        raise ValueError(f"compute_step needs finite values; x has "
                         f"{int(jnp.sum(~jnp.isfinite(x)))} NaN/inf entries.")


def _compute_step(
    x: jax.Array, policy: QuantPolicy, step_ratio: ArrayLike | None, amax_fn
) -> tuple[jax.Array, jax.Array]:
    """:func:`compute_step`; ``amax_fn(x, kept)``, if given, computes ``max|x|`` (the kernel)."""
    _check_input(x)
    kept = kept_axes(policy.axis, x.ndim)
    amax = None if amax_fn is None else amax_fn(x, kept)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    reduce = tuple(i for i in range(x.ndim) if i not in kept)
    lo, hi = _clip_range(x, policy, reduce, amax)
    scale, zero_point = _range_to_step(lo, hi, policy)
    if policy.axis is None:  # Per-tensor: plain scalars rather than shape (1, ..., 1).
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    scale = scale * policy.step_scale
    if step_ratio is not None:
        ratio = jnp.asarray(step_ratio, scale.dtype)
        if ratio.ndim != 0:
            raise ValueError(f"step_ratio must be a scalar; got shape {ratio.shape}.")
        if not isinstance(ratio, jax.core.Tracer) and not bool((ratio > 0) & jnp.isfinite(ratio)):
            # Only concrete ratios can be checked; under jit/vmap the value is unknown.
            raise ValueError(f"step_ratio must be finite and > 0; got {ratio!r}.")
        scale = scale * ratio
    tiny = jnp.finfo(scale.dtype).tiny
    if policy.pow2_step:
        scale = jnp.exp2(jnp.round(jnp.log2(jnp.maximum(scale, tiny))))
    return jnp.maximum(scale, tiny), zero_point


def _bias_correct(x: jax.Array, q: jax.Array, policy: QuantPolicy) -> jax.Array:
    """Shifts each output channel of ``q`` so that its mean equals that of ``x``."""
    if policy.axis is not None:
        kept = kept_axes(policy.axis, x.ndim)
    else:
        kept = (x.ndim - 1,) if x.ndim >= 2 else ()
    reduce = tuple(i for i in range(x.ndim) if i not in kept)
    return q + (jnp.mean(x, axis=reduce, keepdims=True) - jnp.mean(q, axis=reduce, keepdims=True))


def quantize(
    x: ArrayLike,
    policy: QuantPolicy | formats.Format | str,
    *,
    key: jax.Array | None = None,
    step_ratio: ArrayLike | None = None,
    impl: str | None = "jnp",
    noise: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    r"""Fake-quantises ``x`` under ``policy`` (quantise, then dequantise to floats).

    ``y = (clip(round(x / D) + z, q_min, q_max) - z) * D`` with ``(D, z) = compute_step(x, ...)``,
    then, if ``policy.bias_correction``, ``y_c += mean(x_c) - mean(y_c)`` per output channel.

    Gradients: straight-through w.r.t. ``x`` (1 where ``x`` is inside the clip range, else 0;
    see ``quant.fake_quant``); the clip statistics are treated as constants
    (``stop_gradient``), while ``step_ratio`` receives the step-size (LSQ) gradient.

    Args:
      x: floating array of any shape.
      policy: the quantizer: a ``QuantPolicy``, or a data type (a
        :class:`~kure_jax.quant.formats.Format` or preset name such as ``"mxfp4"``, see
        :func:`quantize_format`).
      key: PRNG key, required when ``policy.rounding == "stochastic"``, ignored otherwise.
      step_ratio: optional scalar multiplying the step (see ``compute_step``).
      impl: ``"jnp"`` (default), ``"pallas"``, ``"auto"`` or ``None`` as in
        ``quant.fake_quant``. The kernel path covers symmetric ``clip="max"`` policies without
        ``pow2_step`` or ``bias_correction`` whose channel axes are leading or trailing: a
        reduction kernel computes ``max|x|`` (:func:`kure_jax.kernels.absmax_pallas`), the
        fake-quant kernel does the rest; the same values and gradients as the jnp path.
      noise: the draws of stochastic rounding, as in ``quant.fake_quant``.
      platform: kernel option, as in ``quant.fake_quant``.
      interpret: kernel option, as in ``quant.fake_quant``.
      block_shape: kernel option, as in ``quant.fake_quant``.

    Returns:
      Array of ``x``'s shape and dtype. Without bias correction every entry lies on the grid
      ``(k - z) * D`` with integer ``k`` in ``[q_min, q_max]``.

    Raises:
      ValueError: as ``compute_step``, or for stochastic rounding without ``key``, an invalid
        ``impl``/``noise``/kernel option, or ``impl="pallas"`` with a policy or input the
        kernels cannot take (see ``impl``).

    >>> quantize(jnp.array([-1.0, 0.2, 0.7]), QuantPolicy(bits=3))
    Array([-1.        ,  0.33333334,  0.6666667 ], dtype=float32)
    >>> quantize(jnp.array([-1.0, 0.2, 0.7]), "mxfp4")
    Array([-1.  ,  0.25,  0.75], dtype=float32)
    """
    if isinstance(policy, formats.Format | str):
        return quantize_format(x, policy, step_ratio=step_ratio, impl=impl)
    check_policy(policy)
    x = jnp.asarray(x)
    if policy.rounding == "stochastic" and key is None:
        raise ValueError(
            "QuantPolicy(rounding='stochastic') needs key=jax.random.key(...); the deterministic "
            f"roundings are {tuple(m for m in quant.ROUNDING_MODES if m != 'stochastic')}."
        )
    choice, strict = kernels.resolve_impl(impl)
    if choice == "pallas" and _takes_absmax_kernel(x, policy, strict):
        amax = lambda xs, kept: kernels.absmax_pallas(xs, kept, platform=platform,
                                                      interpret=interpret,
                                                      block_shape=block_shape)
        scale, _ = _compute_step(jax.lax.stop_gradient(x), policy, step_ratio, amax)
        # x in its own dtype (a 16-bit read is the kernels' gain); the zero point is 0.
        return quant.fake_quant(x, scale, bits=policy.bits, signed=policy.signed,
                                rounding=policy.rounding, key=key, narrow_range=_narrow(policy),
                                impl="pallas", noise=noise, platform=platform,
                                interpret=interpret, block_shape=block_shape)
    scale, zero_point = compute_step(jax.lax.stop_gradient(x), policy, step_ratio=step_ratio)
    xf = x.astype(scale.dtype)
    q = quant.fake_quant(xf, scale, bits=policy.bits, zero_point=zero_point,
                         signed=policy.signed, rounding=policy.rounding, key=key,
                         narrow_range=_narrow(policy), noise=noise)
    if policy.bias_correction:
        q = _bias_correct(xf, q, policy)
    return q.astype(x.dtype)


def _takes_absmax_kernel(x: jax.Array, policy: QuantPolicy, strict: bool) -> bool:
    """Whether a call resolved to the kernel runs it: ``impl="pallas"`` (``strict``) whenever
    the kernels can take the policy and ``x`` (a refusal raises), ``impl="auto"`` only where
    they were measured faster too."""
    problem = None
    if policy.clip != "max" or not policy.symmetric or policy.pow2_step or policy.bias_correction:
        problem = ("this policy (the kernels take symmetric clip='max' policies without "
                   "pow2_step or bias_correction)")
    elif not jnp.issubdtype(x.dtype, jnp.floating):
        _check_input(x)  # compute_step's error for a non-float x, also on this path.
    else:
        problem = kernels.absmax_problem(x.dtype, x.shape, kept_axes(policy.axis, x.ndim))
    if problem is not None and strict:
        raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")
    return problem is None and (strict or kernels.auto_takes_fake_quant(x.dtype, policy.rounding))


def quantize_format(
    x: ArrayLike,
    fmt: formats.Format | str,
    *,
    step_ratio: ArrayLike | None = None,
    impl: str | None = "jnp",
) -> jax.Array:
    """Fake-quantises ``x`` in a data type: :func:`kure_jax.quant.formats.fake_quant_format`.

    The format's scales follow its own rule (absmax, OCP MX, NVFP4), so there is no step to
    perturb and no kernel: ``step_ratio`` and ``impl="pallas"`` are refused.

    Raises:
      ValueError: for an unknown format, a ``step_ratio``, ``impl="pallas"``, or an input the
        format refuses (see ``fake_quant_format``).
    """
    fmt = formats.get_format(fmt)
    if step_ratio is not None:
        raise ValueError(f"step_ratio perturbs a QuantPolicy's step; format {fmt.name!r} "
                         "computes its scales by its own rule.")
    if impl == "pallas":
        raise ValueError(f"impl='pallas' has no kernel for format {fmt.name!r}; use 'jnp'.")
    return formats.fake_quant_format(x, fmt)
