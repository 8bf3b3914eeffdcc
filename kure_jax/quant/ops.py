"""Uniform fake quantisation with straight-through and LSQ gradients.

``fake_quant`` rounds a float tensor onto the integer grid of a ``bits``-bit quantizer and maps it
back to floats ("quantise-dequantise"), so a model can be trained or evaluated as if its tensors
were integers. Its backward pass is the clipped straight-through estimator (STE) for the input and
the Learned Step Size Quantization (LSQ) gradient for the step size.

Conventions used throughout:

* ``scale`` is the step size D > 0; it broadcasts against ``x`` without changing ``x``'s shape:
  a scalar is per-tensor, a shape of ones except on the channel axis (e.g. ``(1, 1, 1, C)`` for an
  HWIO kernel) is per-channel.
* Arithmetic runs in float32, or float64 for float64 inputs; the result is cast back to the input
  dtype, so bfloat16/float16 inputs give outputs of the same dtype.
* Checks on values (``scale > 0``) run only when the value is concrete; inside ``jax.jit`` or
  ``jax.vmap`` the scale is a tracer and cannot be checked.
* ``impl`` picks the implementation: ``"jnp"`` (default; XLA fuses it with the ops around it),
  ``"pallas"`` (the fused kernels of :mod:`kure_jax.kernels`) or ``"auto"`` (the kernel only
  where it was measured faster); ``None`` reads ``$KURE_JAX_KERNELS``. Both give the same values
  and gradients.

References:
  Esser, McKinstry, Bablani, Appuswamy, Modha. "Learned Step Size Quantization", ICLR 2020.
  Bengio, Léonard, Courville. "Estimating or Propagating Gradients Through Stochastic Neurons",
  2013 (straight-through estimator).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kure_jax import kernels
from kure_jax._arrays import check_broadcastable, check_positive, sum_to_shape
from kure_jax._axes import canonical_axes

ROUNDING_MODES: tuple[str, ...] = ("nearest", "nearest_away", "stochastic", "floor")
NOISE_SOURCES: tuple[str, ...] = ("random", "hash")
MIN_BITS = 2
MAX_BITS = 16


def validate_bits(bits: int) -> int:
    """Returns ``bits`` as an ``int`` after checking that it is an integer in [2, 16].

    Raises:
      ValueError: if ``bits`` is not an integer (``bool`` included) or lies outside
        [``MIN_BITS``, ``MAX_BITS``].
    """
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int | np.integer)
        or not MIN_BITS <= bits <= MAX_BITS
    ):
        raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}]; got {bits!r}.")
    return int(bits)


def validate_flag(name: str, value: bool) -> bool:
    """Returns ``value`` as a ``bool`` after checking that it is one (NumPy bools included).

    Raises:
      ValueError: if ``value`` is not a bool (e.g. ``0``, ``2`` or ``"no"``).
    """
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def check_key(key: jax.Array) -> None:
    """Raises ValueError unless ``key`` is a JAX PRNG key (typed, or a raw ``uint32[2]``)."""
    typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    raw = isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape[-1:] == (2,)
    if not (typed or raw):
        raise ValueError(f"key must be a PRNG key, e.g. jax.random.key(0); got {key!r}.")


def validate_rounding(rounding: str) -> str:
    """Returns ``rounding`` after checking that it is one of ``ROUNDING_MODES``.

    Raises:
      ValueError: if ``rounding`` is not one of ``ROUNDING_MODES``.
    """
    if not isinstance(rounding, str) or rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}; got {rounding!r}.")
    return rounding


def integer_range(bits: int, signed: bool = True, *, narrow_range: bool = False) -> tuple[int, int]:
    """Returns the inclusive integer code range ``(qmin, qmax)`` of a ``bits``-bit quantizer.

    ====================  ============================  ==========================
    ``signed``            ``narrow_range=False``        ``narrow_range=True``
    ====================  ============================  ==========================
    True                  (-2^(b-1), 2^(b-1) - 1)       (-(2^(b-1) - 1), 2^(b-1) - 1)
    False                 (0, 2^b - 1)                  (0, 2^b - 2)
    ====================  ============================  ==========================

    A narrow range always has 2^b - 1 codes. Signed, it drops the most negative code so the grid
    is symmetric about zero; unsigned, it drops the top code so that zero stays representable.

    >>> integer_range(4), integer_range(4, narrow_range=True), integer_range(4, signed=False)
    ((-8, 7), (-7, 7), (0, 15))

    Raises:
      ValueError: if ``bits`` is invalid (see ``validate_bits``) or a flag is not a bool.
    """
    bits = validate_bits(bits)
    signed = validate_flag("signed", signed)
    narrow_range = validate_flag("narrow_range", narrow_range)
    if signed:
        half = 2 ** (bits - 1)
        return (-half + 1 if narrow_range else -half), half - 1
    return 0, 2**bits - 1 - int(narrow_range)


def round_values(
    x: ArrayLike, rounding: str = "nearest", *, key: jax.Array | None = None
) -> jax.Array:
    """Rounds ``x`` to integers with the given rule (no straight-through gradient).

    * ``"nearest"``: round half to even (``jnp.round``), e.g. 0.5 -> 0, 1.5 -> 2.
    * ``"nearest_away"``: round half away from zero, e.g. 0.5 -> 1, -2.5 -> -3.
    * ``"floor"``: round toward -inf (for negative values this is *not* truncation toward zero).
    * ``"stochastic"``: ``floor(x) + 1`` with probability ``x - floor(x)``, else ``floor(x)``;
      equivalent to ``floor(x + u)`` with ``u ~ U[0, 1)`` but computed without the addition, which
      could round up an integer ``x`` in floating point. Unbiased: ``E[round(x)] = x``.

    Args:
      x: array of any shape; non-floating inputs are promoted to float32.
      rounding: one of ``ROUNDING_MODES``.
      key: PRNG key, required for ``"stochastic"`` and ignored otherwise.

    Returns:
      Array of ``x``'s shape and (floating) dtype holding integer values. Its gradient is zero
      almost everywhere; ``fake_quant`` supplies the straight-through gradient.

    Raises:
      ValueError: for an unknown ``rounding`` or ``"stochastic"`` without ``key``.
    """
    rounding = validate_rounding(rounding)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    noise = _uniform_noise(key, x.shape, x.dtype, rounding)
    return _round(x, rounding, noise)


class _Spec(NamedTuple):
    """Static (hashable) configuration of one fake-quant call."""

    qmin: int
    qmax: int
    rounding: str
    grad_factor: float


def fake_quant(
    x: ArrayLike,
    scale: ArrayLike,
    *,
    bits: int,
    zero_point: ArrayLike = 0.0,
    signed: bool = True,
    rounding: str = "nearest",
    key: jax.Array | None = None,
    narrow_range: bool = False,
    lsq_grad_scale: bool = False,
    impl: str | None = "jnp",
    noise: str | None = None,
    platform: str | None = None,
    interpret: bool | None = None,
    block_shape: tuple[int, int] | None = None,
) -> jax.Array:
    r"""Quantises ``x`` onto a uniform grid and returns the dequantised values.

    .. math::

        q = \mathrm{clip}(\mathrm{round}(x / s) + z,\ q_{min},\ q_{max}), \qquad y = (q - z)\, s

    with ``(q_min, q_max) = integer_range(bits, signed, narrow_range=narrow_range)``. With an
    integer-valued zero point ``z`` every output lies on the grid ``(k - z) s``, k integer.

    Gradients (``jax.custom_vjp``), with ``v = x / s`` and the clip test on the *unrounded* code,
    "inside" meaning ``q_min <= v + z <= q_max`` (bounds inclusive):

    * ``dL/dx = g`` inside, ``0`` outside (clipped straight-through estimator).
    * ``dL/ds = G * sum(g * dy/ds)`` summed down to ``scale``'s shape (Esser et al. 2020), where
      ``dy/ds = round(v) - v`` inside and ``q - z`` (= ``q_min - z`` or ``q_max - z``) outside;
      ``G = 1 / sqrt(N * q_max)`` if ``lsq_grad_scale`` else 1, ``N = x.size // scale.size``.
    * ``dL/dz = sum(g * dy/dz)`` with ``dy/dz = 0`` inside and ``-s`` outside: the STE gradient.
      The zero point is meant to be calibrated, not learned; the gradient is exact but rarely used.
    * The rounding noise of ``"stochastic"`` gets no gradient.

    Args:
      x: float array of any shape; bfloat16/float16 are computed in float32.
      scale: step size ``s > 0``, broadcastable to ``x.shape`` (scalar: per-tensor; ones except
        the channel axis: per-channel).
      bits: bit width in [2, 16].
      zero_point: ``z``, broadcastable to ``x.shape`` like ``scale``; usually integer-valued.
      signed: signed or unsigned integer codes.
      rounding: one of ``ROUNDING_MODES`` (see ``round_values``).
      key: PRNG key for ``"stochastic"`` rounding; ignored by the other modes.
      narrow_range: use 2^b - 1 codes (see ``integer_range``).
      lsq_grad_scale: multiply the scale gradient by ``1 / sqrt(N * q_max)`` as LSQ recommends.
      impl: ``"jnp"`` (default), ``"pallas"`` (the fused kernel,
        :func:`kure_jax.kernels.fake_quant_pallas`: float32/bfloat16/float16 ``x``, zero point 0,
        a step varying along leading or trailing axes; anything else raises), ``"auto"`` (the
        kernel where :mod:`kure_jax.kernels` measured it faster, else jnp) or ``None``
        (``$KURE_JAX_KERNELS``, else ``"auto"``). The same values either way (up to the last
        bit of ``x / s`` on GPU, see :mod:`kure_jax.kernels._fake_quant`).
      noise: the uniform draws of ``"stochastic"`` rounding: ``"random"``
        (``jax.random.uniform(key, x.shape)``; jnp only) or ``"hash"`` (the kernels'
        counter-based hash, :func:`kure_jax.kernels.hash_uniform`, identical on both paths).
        ``None``: ``"hash"`` when the kernel is asked for by name, else ``"random"``.
      platform: kernel option, ``"gpu"`` or ``"tpu"`` variant (``None``: the local backend).
      interpret: kernel option, run in the Pallas interpreter (``None``: only off GPU/TPU).
      block_shape: kernel option, the ``(rows, cols)`` tile (``None``: one per platform).
        The kernel options are checked and used only when the kernel runs.

    Returns:
      Array of ``x``'s shape and dtype (float32 if ``x`` is not floating).

    Raises:
      ValueError: for invalid ``bits`` or ``rounding``, ``"stochastic"`` without ``key``,
        ``scale``/``zero_point`` shapes that do not broadcast to ``x.shape``, a concrete
        ``scale`` with an entry that is not finite and > 0, or a concrete non-finite
        ``zero_point``. Inside ``jit``/``vmap`` the values are not checked. Also for an
        invalid ``impl``/``noise`` or kernel option, and for ``impl="pallas"`` with an input
        the kernel cannot take (see ``impl``) or ``noise="random"`` with stochastic rounding.

    >>> fake_quant(jnp.array([0.26, -1.0, 3.0]), 0.5, bits=3)
    Array([ 0.5, -1. ,  1.5], dtype=float32)
    """
    qmin, qmax = integer_range(bits, signed, narrow_range=narrow_range)
    rounding = validate_rounding(rounding)
    choice, strict = kernels.resolve_impl(impl)
    noise = _noise_source(noise, strict)
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    in_dtype = x.dtype  # The kernel's dtype rule applies to x as given, before any cast.
    no_zero_point = _is_zero(zero_point)  # Before asarray, which traces a constant under jit.
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(dtype)
    scale = jnp.asarray(scale, dtype)
    zero_point = jnp.asarray(zero_point, dtype)
    check_broadcastable("scale", scale.shape, x.shape)
    check_broadcastable("zero_point", zero_point.shape, x.shape)
    check_positive("scale", scale)
    if not isinstance(zero_point, jax.core.Tracer) and not np.all(np.isfinite(zero_point)):
        raise ValueError(f"zero_point must be finite; got {zero_point!r}.")
    if rounding == "stochastic" and key is None:
        raise ValueError(_MISSING_KEY)
    grad_factor = 1.0
    if lsq_grad_scale:
        grad_factor = 1.0 / math.sqrt(max(x.size // scale.size, 1) * qmax)
    if choice == "pallas":
        problem = kernels.fake_quant_problem(in_dtype, x.shape, scale.shape)
        if problem is None and not no_zero_point:
            problem = "a zero point other than a concrete 0"
        if problem is None and rounding == "stochastic" and noise == "random":
            problem = "noise='random' (the kernel draws noise='hash')"
        if problem is not None and strict:
            raise ValueError(f"impl='pallas' cannot handle {problem}; use impl='jnp' or 'auto'.")
        if problem is None and (strict or kernels.auto_takes_fake_quant(in_dtype, rounding)):
            if rounding == "stochastic":
                check_key(key)
            return kernels.fake_quant_pallas(
                x, scale, qmin=qmin, qmax=qmax, rounding=rounding, key=key,
                grad_factor=grad_factor, platform=platform, interpret=interpret,
                block_shape=block_shape)
    draws = _uniform_noise(key, x.shape, dtype, rounding, noise)
    spec = _Spec(qmin, qmax, rounding, grad_factor)
    return _fake_quant(spec, x, scale, zero_point, draws)


def lsq_init_scale(
    x: ArrayLike, *, bits: int, signed: bool = True, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    r"""LSQ step-size initialisation ``s = 2 mean|x| / sqrt(q_max)`` (Esser et al. 2020).

    Args:
      x: array to be quantised with ``fake_quant``.
      bits: bit width in [2, 16].
      signed: whether the quantizer is signed (sets ``q_max``, see ``integer_range``).
      axis: axes to average over. ``None`` gives a per-tensor scalar; otherwise the reduced axes
        are kept with size 1 so that the result broadcasts against ``x`` (e.g. ``axis=(0, 1, 2)``
        on an HWIO kernel gives a per-output-channel scale of shape ``(1, 1, 1, O)``).

    Returns:
      Float32 (float64 for float64 ``x``) scale, floored at the dtype's smallest normal number so
      an all-zero ``x`` still yields a valid (positive) step.

    Raises:
      ValueError: for invalid ``bits``, an empty ``x`` or an ``axis`` out of range.
    """
    _, qmax = integer_range(bits, signed)
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError(f"lsq_init_scale needs a non-empty array; got shape {x.shape}.")
    if axis is not None:
        canonical_axes((axis,) if isinstance(axis, int | np.integer) else tuple(axis), x.ndim,
                       out_of_range=f"axis={axis!r} is out of range for an array of rank {x.ndim}.",
                       repeated=f"axis={axis!r} repeats an axis.")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    mean_abs = jnp.mean(jnp.abs(x.astype(dtype)), axis=axis, keepdims=axis is not None)
    return jnp.maximum(2.0 * mean_abs / math.sqrt(qmax), jnp.finfo(dtype).tiny)


_MISSING_KEY = (
    "rounding='stochastic' needs a PRNG key (key=jax.random.key(...)); the deterministic "
    f"modes are {tuple(m for m in ROUNDING_MODES if m != 'stochastic')}."
)


def _noise_source(noise: str | None, strict: bool) -> str:
    """``noise`` validated; ``None`` is ``"hash"`` when the kernel is asked for by name."""
    if noise is None:
        return "hash" if strict else "random"
    if not isinstance(noise, str) or noise not in NOISE_SOURCES:
        raise ValueError(f"noise must be None or one of {NOISE_SOURCES}; got {noise!r}.")
    return noise


def _is_zero(zero_point: ArrayLike) -> bool:
    """Whether ``zero_point`` is a concrete scalar 0 (the kernels have no zero point)."""
    return (not isinstance(zero_point, jax.core.Tracer) and np.ndim(zero_point) == 0
            and float(zero_point) == 0.0)


def _uniform_noise(
    key: jax.Array | None, shape: tuple[int, ...], dtype: jnp.dtype, rounding: str,
    source: str = "random",
) -> jax.Array | None:
    """U[0, 1) draws for stochastic rounding (None for the deterministic modes)."""
    if rounding != "stochastic":
        return None
    if key is None:
        raise ValueError(_MISSING_KEY)
    check_key(key)
    if source == "hash":  # The kernels' stream, so that this path reproduces them exactly.
        return kernels.hash_uniform(key, shape)
    # At least float32 so that bfloat16 inputs still get fine-grained probabilities.
    return jax.random.uniform(key, shape, jnp.promote_types(dtype, jnp.float32))


def _round(v: jax.Array, rounding: str, noise: jax.Array | None) -> jax.Array:
    if rounding == "nearest":
        return jnp.round(v)
    if rounding == "floor":
        return jnp.floor(v)
    if rounding == "nearest_away":
        # floor(|v| + 0.5) is wrong in floating point (0.49999997 + 0.5 rounds to 1.0), so decide
        # on the exact fractional part instead.
        t = jnp.trunc(v)
        return jnp.where(jnp.abs(v - t) >= 0.5, t + jnp.sign(v), t)
    f = jnp.floor(v)
    return f + (noise < (v - f)).astype(v.dtype)


def _quantize(spec: _Spec, x, scale, zero_point, noise):
    """``(v, q, inside)`` of ``fake_quant``'s docstring, in the dtype of ``scale``."""
    v = x.astype(scale.dtype) / scale
    q = jnp.clip(_round(v, spec.rounding, noise) + zero_point, spec.qmin, spec.qmax)
    inside = (v + zero_point >= spec.qmin) & (v + zero_point <= spec.qmax)
    return v, q, inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(
    spec: _Spec, x: jax.Array, scale: jax.Array, zero_point: jax.Array, noise: jax.Array | None
) -> jax.Array:
    _, q, _ = _quantize(spec, x, scale, zero_point, noise)
    return ((q - zero_point) * scale).astype(x.dtype)


def _fake_quant_fwd(spec, x, scale, zero_point, noise):
    # The residuals are the inputs (x in its own dtype, e.g. bfloat16); the backward recomputes
    # the clip mask and dy/ds from x.
    # Saving them instead (a bool and a float tensor) costs more memory than x and, on XLA:CPU,
    # made the backward 10-20x slower than the forward (BENCHMARKS.md, note 5).
    return _fake_quant(spec, x, scale, zero_point, noise), (x, scale, zero_point, noise)


def _fake_quant_bwd(spec, residuals, g):
    x, scale, zero_point, noise = residuals
    v, q, inside = _quantize(spec, x, scale, zero_point, noise)
    g_x = jnp.where(inside, g, 0.0)  # In x's dtype: selecting entries of g is exact.
    g = g.astype(scale.dtype)
    # g * dy/ds with dy/ds = (q - z) - v inside and q - z outside. Written as one select of two
    # products (not g * ((q - z) - where(inside, v, 0))) so that XLA computes the operand of the
    # reduction in a single fusion from x and g; the values are the same.
    g_dy_ds = jnp.where(inside, g * ((q - zero_point) - v), g * (q - zero_point))
    g_scale = sum_to_shape(g_dy_ds, scale.shape) * spec.grad_factor
    g_zero_point = sum_to_shape(jnp.where(inside, 0.0, -g * scale), zero_point.shape)
    g_noise = None if noise is None else jnp.zeros_like(noise)
    return g_x, g_scale.astype(scale.dtype), g_zero_point.astype(zero_point.dtype), g_noise


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)
