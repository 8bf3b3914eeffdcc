"""Accelerator data types as fake quantizers: FP8/FP6/FP4 elements, MX and NVFP4 blocks, INT4, NF4.

A :class:`Format` is an element type, a granularity (one scale per tensor, per output channel or
per block of ``block_size`` elements along the reduction axis) and a scale rule. Named presets
(:data:`PRESETS`) cover the formats of today's accelerators; :func:`fake_quant_format` quantises
a tensor in one and returns floats on the format's grid, with straight-through gradients.

Element types (:data:`ELEMENTS`), all symmetric about zero except NF4:

=============  ==============================================  ========  ======================
element        values                                          max       ``emax`` (OCP MX)
=============  ==============================================  ========  ======================
``fp8_e4m3``   OCP FP8 E4M3 (bias 7, no inf, S.1111.111 NaN)   448       8
``fp8_e5m2``   OCP FP8 E5M2 (bias 15)                          57344     15
``fp6_e3m2``   OCP FP6 E3M2 (bias 3)                           28        4
``fp6_e2m3``   OCP FP6 E2M3 (bias 1)                           7.5       2
``fp4_e2m1``   OCP FP4 E2M1 (bias 1): 0, 0.5, 1, 1.5, 2, 3, 4, 6  6      2
``int4``       integers -7..7 (narrow range)                   7         2
``int8``       integers -127..127 (narrow range)               127       6
``nf4``        QLoRA's 16 NormalFloat levels in [-1, 1]        1         0
=============  ==============================================  ========  ======================

Float elements round to nearest, ties to even, with subnormals, and saturate at ``max`` (the
OCP "saturation mode" of conversion: no inf or NaN is produced from finite input). Integer
elements round half to even. NF4 rounds to the nearest level; an exact midpoint goes to the
lower level. ``emax`` is the exponent of the element's largest power of two (``floor(log2
max)``). The OCP spec writes MXINT8's elements as 1.6 fixed point (units of 2^-6) with emax 0;
``int8`` here counts in units of 1 with emax 6, which gives the same values, and its shared
exponent is the spec's minus 6.

Scale rules (``s`` multiplies the element values; ``amax`` is ``max|x|`` over the scale's
group, the block, channel or tensor):

* ``"absmax"``: ``s = amax * (1 / max)`` in float32 (float64 for float64 input), so the
  largest magnitude lands on the largest element and nothing saturates. (The reciprocal is
  written out because XLA rewrites a division by a constant into that product anyway; it can
  differ from ``amax / max`` in the last bit.)
* ``"mx"``: OCP Microscaling v1.0: ``s = 2^(floor(log2 amax) - emax)``, stored as E8M0, with the
  exponent clamped to E8M0's [-127, 127] (an all-zero group gets 2^-127, a float32 subnormal
  that XLA:CPU flushes to 0 in :attr:`Encoded.scales`; its elements are 0 either way). Then
  ``amax / s`` lies in ``[2^emax, 2^(emax + 1))``, which can exceed ``max``: the values above
  ``max * s`` saturate (FP4: (6, 8) s; E4M3: (448, 512) s; E3M2: (28, 32) s; E2M3: (7.5, 8) s;
  int8: (127, 128) s; E5M2 never). They get zero gradient.
* ``"nvfp4"``: NVIDIA's two-level rule: one FP32 scale per tensor ``t = amax_tensor * (1 /
  (max * 448))`` and per block an E4M3 scale ``e = round_e4m3(amax_block * (1 / max) / t)``;
  ``s = e * t`` (their float32 product) and elements ``round(x / s)``. Rounding ``e`` down can
  push the block's largest values a little past ``max`` (they saturate); a block whose ``e``
  underflows to 0 dequantises to zeros.

Blocks run along one axis of the tensor, the reduction axis of the matmul: ``axis=None`` picks
-2 for tensors of rank >= 2 (the inputs of a Flax ``(in, out)`` Dense kernel and of an HWIO conv
kernel) and 0 for rank 1; activations (``(..., features)``) want ``axis=-1``. An axis whose size
``block_size`` does not divide is zero-padded to a multiple of it (the padding does not change
any block maximum) and the padding is cut off again; the last block is then shorter.

Arithmetic runs in float32 (float64 for float64 input) and the result is cast back to the input
dtype, so bfloat16 in gives bfloat16 out (the grid values of every element type and power-of-two
scales are exact in bfloat16; a float scale ``s`` is rounded by that cast).

Gradients are straight-through, like :func:`kure_jax.quant.ops.fake_quant`: 1 where
``|x / s| <= max`` (bounds inclusive), 0 where the value saturates; the scales are statistics of
the input and get no gradient. With absmax scales only values beyond a given ``amax`` saturate.

References:
  OCP Microscaling Formats (MX) Specification v1.0, 2023 (and OCP 8-bit Floating Point
  Specification (OFP8) v1.0, 2023).
  NVIDIA, "NVFP4" (Blackwell block-scaled FP4: E2M1 elements, E4M3 scale per 16, FP32 per tensor).
  Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient Finetuning of Quantized LLMs",
  NeurIPS 2023 (NF4, Appendix E).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from kure_jax._axes import canonical_axes
from kure_jax.quant._elements import ELEMENTS as ELEMENTS
from kure_jax.quant._elements import NF4_LEVELS as NF4_LEVELS
from kure_jax.quant._elements import Element as Element
from kure_jax.quant._elements import (
    check_choice,
    floor_log2,
    pow2,
    round_to_grid,
    work_dtype,
)
from kure_jax.quant._elements import element_levels as element_levels
from kure_jax.quant._elements import round_element as round_element

GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "block")
SCALE_RULES: tuple[str, ...] = ("absmax", "mx", "nvfp4")
E8M0_EXPONENTS = (-127, 127)  # E8M0 codes 0..254 are 2^-127..2^127; 255 is NaN.
_E4M3_MAX = 448.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
    """A quantised data type: element type, granularity of the scales and the scale rule.

    Attributes:
      element: one of :data:`ELEMENTS`.
      granularity: ``"tensor"`` (one scale), ``"channel"`` (one per index of the last axis, the
        output channel of Flax kernels) or ``"block"`` (one per ``block_size`` consecutive
        elements along ``axis``).
      block_size: elements per block (``granularity="block"`` only; ``None`` otherwise).
      axis: the block axis (``granularity="block"`` only): ``None`` is -2 for rank >= 2 and 0
        for rank 1 (the reduction axis of Flax kernels); ``-1`` for activations.
      scale: one of :data:`SCALE_RULES` (see the module docstring). ``"nvfp4"`` needs blocks;
        ``"mx"`` and ``"nvfp4"`` need a float or integer element (not ``nf4``).

    Raises:
      ValueError: on construction if a field is invalid; the message names the field.

    >>> PRESETS["mxfp4"]
    Format(element='fp4_e2m1', granularity='block', block_size=32, axis=None, scale='mx')
    >>> get_format("nvfp4").name
    'nvfp4'
    """

    element: str
    granularity: str = "block"
    block_size: int | None = 32
    axis: int | None = None
    scale: str = "absmax"

    def __post_init__(self) -> None:
        check_choice("element", self.element, tuple(ELEMENTS))
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("scale", self.scale, SCALE_RULES)
        blocked = self.granularity == "block"
        size = self.block_size
        if blocked and (isinstance(size, bool) or not isinstance(size, int | np.integer)
                        or size < 1):
            raise ValueError(f"Format.block_size must be an int >= 1 for blocks; got {size!r}.")
        if not blocked and size is not None:
            raise ValueError(f"Format.block_size must be None for granularity="
                             f"{self.granularity!r}; got {size!r}.")
        if self.axis is not None and (not blocked or isinstance(self.axis, bool)
                                      or not isinstance(self.axis, int | np.integer)):
            raise ValueError(f"Format.axis must be None, or an int with granularity='block'; "
                             f"got {self.axis!r} with granularity={self.granularity!r}.")
        if self.scale == "nvfp4" and not blocked:
            raise ValueError("Format.scale='nvfp4' needs granularity='block'.")
        if self.scale != "absmax" and ELEMENTS[self.element].kind == "table":
            raise ValueError(f"Format.scale={self.scale!r} needs a float or int element; "
                             f"{self.element!r} takes scale='absmax'.")
        if blocked:
            object.__setattr__(self, "block_size", int(size))
        if self.axis is not None:
            object.__setattr__(self, "axis", int(self.axis))

    @property
    def name(self) -> str:
        """The preset's name if this format is one (axis aside), else a description."""
        for name, preset in PRESETS.items():
            if dataclasses.replace(self, axis=None) == preset:
                return name if self.axis is None else f"{name} axis={self.axis}"
        parts = [self.element, self.scale]
        parts.append(f"block{self.block_size}" if self.block_size else self.granularity)
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
        return " ".join(parts)

    def describe(self, prefix: str = "w") -> str:
        """A label for tables, e.g. ``"w mxfp4"`` (``prefix`` ``"a"`` for activations)."""
        return f"{prefix} {self.name}"


def _block(element: str, size: int, scale: str) -> Format:
    return Format(element=element, block_size=size, scale=scale)


def _per_tensor(element: str) -> Format:
    return Format(element=element, granularity="tensor", block_size=None)


PRESETS: Mapping[str, Format] = types.MappingProxyType({
    "mxfp4": _block("fp4_e2m1", 32, "mx"),
    "mxfp6_e3m2": _block("fp6_e3m2", 32, "mx"),
    "mxfp6_e2m3": _block("fp6_e2m3", 32, "mx"),
    "mxfp8_e4m3": _block("fp8_e4m3", 32, "mx"),
    "mxfp8_e5m2": _block("fp8_e5m2", 32, "mx"),
    "mxint8": _block("int8", 32, "mx"),
    "nvfp4": _block("fp4_e2m1", 16, "nvfp4"),
    "fp8_e4m3": _per_tensor("fp8_e4m3"),
    "fp8_e5m2": _per_tensor("fp8_e5m2"),
    "int4_block32": _block("int4", 32, "absmax"),
    "int4_block64": _block("int4", 64, "absmax"),
    "int4_block128": _block("int4", 128, "absmax"),
    "int8_block32": _block("int8", 32, "absmax"),
    "nf4": _block("nf4", 64, "absmax"),
})


def get_format(fmt: str | Format) -> Format:
    """The :class:`Format` named by a preset name, or ``fmt`` itself.

    Raises:
      ValueError: for an unknown name or something that is neither a str nor a Format.
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt in PRESETS:
        return PRESETS[fmt]
    raise ValueError(f"format must be a Format or one of {tuple(PRESETS)}; got {fmt!r}.")


class Encoded(NamedTuple):
    """A tensor in a format: ``x ~ elements * scale * tensor_scale`` (scale per group).

    Attributes:
      elements: element values (on the element's grid), ``x``'s shape, float32 (float64 for
        float64 input).
      scales: one per group: shape ``()`` per tensor, ``(C,)`` per channel (``C = x.shape[-1]``),
        and for blocks ``x.shape`` with the block axis of size ``ceil(n / block_size)``. For
        ``"mx"`` a power of two (the E8M0 value), for ``"nvfp4"`` the E4M3 block scale, for
        ``"absmax"`` a float.
      tensor_scale: scalar; the FP32 per-tensor scale of ``"nvfp4"``, 1 for the other rules.
    """

    elements: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array


def encode(x: ArrayLike, fmt: str | Format, *, amax: ArrayLike | None = None) -> Encoded:
    """Splits ``x`` into element values and scales under ``fmt`` (see the module docstring).

    Args:
      x: non-empty float array (rank >= 1 unless ``fmt`` is per tensor).
      fmt: a :class:`Format` or a preset name (:data:`PRESETS`).
      amax: optional scalar used in place of the per-tensor ``max|x|``: a calibrated range for
        per-tensor formats (e.g. FP8 activations), or NVFP4's per-tensor statistic. Values
        beyond it saturate. Refused for the other granularities (block and channel scales are
        always computed from ``x``).

    Returns:
      An :class:`Encoded` whose ``decode`` equals :func:`fake_quant_format`'s values.

    Raises:
      ValueError: for an unknown format, a non-floating or empty ``x``, a block axis out of
        range, a rank-0 ``x`` with channel or block scales, or ``amax`` where it is refused or
        not a scalar.
    """
    fmt, x, amax = _check_call(x, fmt, amax)
    return _encode_jit(x, fmt, amax)


def decode(encoded: Encoded, fmt: str | Format) -> jax.Array:
    """``elements * scale * tensor_scale`` with each group's scale broadcast over its elements.

    Returns:
      Float array of ``encoded.elements``' shape and dtype.

    Raises:
      ValueError: for an unknown format.
    """
    fmt = get_format(fmt)
    q = encoded.elements
    scale = _expand(encoded.scales, fmt, q.shape) * encoded.tensor_scale
    return q * scale


def fake_quant_format(
    x: ArrayLike, fmt: str | Format, *, amax: ArrayLike | None = None
) -> jax.Array:
    """Quantises ``x`` in ``fmt`` and returns the dequantised values (``decode(encode(x))``).

    Straight-through gradient: ``dL/dx = g`` where ``|x / s| <= max`` of the element, 0 where
    the value saturates; the scales get none (they are computed from ``x`` on every call).

    Args:
      x: non-empty float array of any rank (rank >= 1 unless ``fmt`` is per tensor), any float
        dtype; bfloat16/float16 are computed in float32.
      fmt: a :class:`Format` or a preset name (:data:`PRESETS`).
      amax: optional calibrated per-tensor range (see :func:`encode`).

    Returns:
      Array of ``x``'s shape and dtype.

    Raises:
      ValueError: as :func:`encode`.

    >>> fake_quant_format(jnp.array([0.3, -1.0, 2.9, 0.02]), "mxfp4")
    Array([ 0.25, -1.  ,  3.  ,  0.  ], dtype=float32)
    """
    fmt, x, amax = _check_call(x, fmt, amax)
    return _fake_quant_jit(x, fmt, amax)


def activation_format(fmt: str | Format) -> Format:
    """``fmt`` as applied to activations ``(..., features)``: blocks along the last axis (the
    reduction axis of Dense and NHWC conv inputs); per-tensor and per-channel formats as they are.

    For weight + activation points: ``fake_quant_format(x, activation_format("mxfp8_e4m3"))``
    (block scales from ``x`` on the fly, as MX hardware does), or
    ``fake_quant_format(x, "fp8_e4m3", amax=calibrated_amax)`` for a calibrated per-tensor scale.

    Raises:
      ValueError: for an unknown format.

    >>> activation_format("mxfp4").axis
    -1
    """
    fmt = get_format(fmt)
    return dataclasses.replace(fmt, axis=-1) if fmt.granularity == "block" else fmt


def block_axis(fmt: Format, ndim: int) -> int:
    """The non-negative block axis of ``fmt`` for a rank-``ndim`` tensor.

    Raises:
      ValueError: if the axis does not exist (or ``ndim`` is 0).
    """
    axis = fmt.axis if fmt.axis is not None else (-2 if ndim >= 2 else 0)
    message = (f"Format {fmt.name!r}: block axis {axis} does not exist in a tensor of rank "
               f"{ndim}.")
    return canonical_axes((axis,), ndim, out_of_range=message, repeated=message)[0]


def _check_call(x: ArrayLike, fmt: str | Format, amax: ArrayLike | None):
    fmt = get_format(fmt)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"Format {fmt.name!r} needs a floating array; got dtype {x.dtype}.")
    if x.size == 0:
        raise ValueError(f"Format {fmt.name!r} needs a non-empty array; got shape {x.shape}.")
    if fmt.granularity == "block":
        block_axis(fmt, x.ndim)
    elif fmt.granularity == "channel" and x.ndim == 0:
        raise ValueError(f"Format {fmt.name!r} has per-channel scales; x is a scalar.")
    if amax is not None:
        if fmt.granularity != "tensor" and fmt.scale != "nvfp4":
            raise ValueError(f"amax= is a per-tensor range; format {fmt.name!r} computes its "
                             f"{fmt.granularity} scales from x.")
        amax = jnp.asarray(amax, work_dtype(x.dtype))
        if amax.ndim != 0:
            raise ValueError(f"amax must be a scalar; got shape {amax.shape}.")
    return fmt, x, amax


def _view(x: jax.Array, fmt: Format) -> tuple[jax.Array, tuple[int, ...]]:
    """``x`` laid out so that each group is a reduction over the returned axes."""
    if fmt.granularity == "tensor":
        return x, tuple(range(x.ndim))
    if fmt.granularity == "channel":
        return x, tuple(range(x.ndim - 1))
    a, k = block_axis(fmt, x.ndim), fmt.block_size
    pad = -x.shape[a] % k
    if pad:  # Zeros leave every block maximum as it is.
        x = jnp.pad(x, [(0, pad if i == a else 0) for i in range(x.ndim)])
    blocks = x.shape[a] // k
    return x.reshape((*x.shape[:a], blocks, k, *x.shape[a + 1:])), (a + 1,)


def _unview(y: jax.Array, fmt: Format, shape: tuple[int, ...]) -> jax.Array:
    if fmt.granularity != "block":
        return y
    a = block_axis(fmt, len(shape))
    y = y.reshape((*shape[:a], -1, *shape[a + 1:]))
    return jax.lax.slice_in_dim(y, 0, shape[a], axis=a)


def _expand(scales: jax.Array, fmt: Format, shape: tuple[int, ...]) -> jax.Array:
    """Per-group scales (``Encoded.scales``' shape) broadcast to ``shape``."""
    if fmt.granularity != "block":
        return scales
    a = block_axis(fmt, len(shape))
    return jax.lax.slice_in_dim(jnp.repeat(scales, fmt.block_size, axis=a), 0, shape[a], axis=a)


def _quantize(x: jax.Array, fmt: Format, amax: jax.Array | None):
    """``(q, scale, tensor_scale, inside)`` in the block view, with ``x`` in the work dtype."""
    el = ELEMENTS[fmt.element]
    xv, reduce = _view(x, fmt)
    tiny = jnp.finfo(x.dtype).tiny
    group_amax = jnp.max(jnp.abs(xv), axis=reduce, keepdims=True)
    if amax is not None and fmt.granularity == "tensor":
        group_amax = jnp.broadcast_to(amax, group_amax.shape)
    one = jnp.ones((), x.dtype)
    if fmt.scale == "mx":
        # s = 2^e, e = floor(log2 amax) - emax; v = x * 2^-e is exact. 2^e is built in two
        # halves because E8M0's 2^-127 is below float32's normal range.
        e = jnp.where(group_amax > 0, floor_log2(group_amax) - el.emax, E8M0_EXPONENTS[0])
        e = jnp.clip(e, *E8M0_EXPONENTS)
        v = xv * pow2(-e, x.dtype)
        scale, tensor_scale = pow2(e // 2, x.dtype) * pow2(e - e // 2, x.dtype), one
    elif fmt.scale == "nvfp4":
        t_amax = jnp.max(jnp.abs(x)) if amax is None else amax
        tensor_scale = jnp.maximum(t_amax, tiny) * (1.0 / (el.max * _E4M3_MAX))
        scale = round_to_grid(group_amax * (1.0 / el.max) / tensor_scale, ELEMENTS["fp8_e4m3"])
        full = scale * tensor_scale
        v = jnp.where(full > 0, xv / jnp.where(full > 0, full, one), 0.0)
    else:
        scale, tensor_scale = jnp.maximum(group_amax * (1.0 / el.max), tiny), one
        v = xv / scale
    inside = jnp.abs(v) <= el.max
    return round_to_grid(v, el), scale, tensor_scale, inside


@functools.partial(jax.jit, static_argnums=1)
def _encode_jit(x: jax.Array, fmt: Format, amax: jax.Array | None) -> Encoded:
    xw = x.astype(work_dtype(x.dtype))
    q, scale, tensor_scale, _ = _quantize(xw, fmt, amax)
    _, reduce = _view(xw, fmt)
    return Encoded(_unview(q, fmt, x.shape), jnp.squeeze(scale, reduce), tensor_scale)


@functools.partial(jax.jit, static_argnums=1)
def _fake_quant_jit(x: jax.Array, fmt: Format, amax: jax.Array | None) -> jax.Array:
    xw = x.astype(work_dtype(x.dtype))
    q, scale, tensor_scale, inside = _quantize(jax.lax.stop_gradient(xw), fmt, amax)
    y = _unview(q * (scale * tensor_scale), fmt, x.shape)
    return _straight_through(xw, y, _unview(inside, fmt, x.shape)).astype(x.dtype)


@jax.custom_jvp
def _straight_through(x: jax.Array, y: jax.Array, inside: jax.Array) -> jax.Array:
    """``y``, with the derivative of the identity where ``inside`` and 0 elsewhere."""
    del x, inside
    return y


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, y, inside = primals
    return y, jnp.where(inside, tangents[0], jnp.zeros_like(x))
