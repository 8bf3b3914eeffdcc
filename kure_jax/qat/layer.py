"""What QAT does to one layer's kernel and input, whatever framework holds the layer.

:func:`quantize_kernel` and :func:`quantize_input` apply a :class:`QATConfig`'s quantizers; the
learned steps and clips they need come from a :class:`QuantizerState`, the adapter that a
framework binding implements (:mod:`kure_jax.qat.linen` over a Linen module's ``"quant"``
variables).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

from kure_jax.qat.config import (
    INPUT_STATE_NAMES,
    KERNEL_STATE_NAMES,
    QUANT_COLLECTION,
    QATConfig,
)
from kure_jax.quant import formats
from kure_jax.quant.nested import nested_fake_quant
from kure_jax.quant.ops import fake_quant, lsq_init_scale
from kure_jax.quant.quantizers import dorefa_activation, dorefa_weight, learned_clip_quant

__all__ = [
    "MIN_STEP",
    "QuantizerState",
    "input_format",
    "input_signedness",
    "input_variable_names",
    "missing_message",
    "quantize_input",
    "quantize_kernel",
]

# Floor of learned steps/clips in the forward pass. float32's smallest normal (~1e-38) is not
# enough: a clip that small gives a subnormal step (flushed to 0 on CPU/GPU), hence 0/0 = NaN.
MIN_STEP = 1e-12


class QuantizerState(Protocol):
    """One layer's learned quantizer parameters (float32 scalars), read or created on demand."""

    def get(self, name: str, init_fn: Callable[[], jax.Array]) -> jax.Array:
        """The value of ``name``, created from ``init_fn()`` if it does not exist yet.

        Raises ValueError (:func:`missing_message`) if it is missing and cannot be created.
        """

    def get_input(
        self, name: str, x: jax.Array, init_fn: Callable[[bool], jax.Array]
    ) -> tuple[bool, jax.Array]:
        """``(signed, value)`` of the input quantizer ``name`` (see :func:`input_variable_names`),
        created from ``init_fn(input_signedness(...))`` if it does not exist yet."""


def quantize_kernel(qat: QATConfig, w: jax.Array, state: QuantizerState) -> jax.Array:
    """``w`` fake-quantised by ``qat.weight_quantizer`` at ``qat.weight_bits`` (same shape)."""
    bits, name = qat.weight_bits, qat.weight_quantizer
    if name in formats.PRESETS:  # Blocks along the kernel's input axis (-2), fresh scales.
        return formats.fake_quant_format(w, name)
    if name == "lsq":
        step = state.get(KERNEL_STATE_NAMES["lsq"], lambda: lsq_init_scale(w, bits=bits))
        return fake_quant(w, _floor(step), bits=bits, lsq_grad_scale=qat.lsq_grad_scale,
                          impl=qat.kernel_impl)
    if name == "learned_clip":
        alpha = state.get(KERNEL_STATE_NAMES["learned_clip"], lambda: _max_abs(w))
        return learned_clip_quant(w, _floor(alpha), bits=bits, signed=True)
    if name == "dorefa":
        return dorefa_weight(w, bits=bits)
    if name == "matryoshka":
        return nested_fake_quant(w, bits=bits, nest_bits=qat.nest_bits, channel_axes=-1)
    # "max": symmetric narrow grid +-(2^(b-1) - 1) steps spanning exactly [-max|w|, max|w|].
    step = _floor(jax.lax.stop_gradient(_max_abs(w)) / (2 ** (bits - 1) - 1))
    return fake_quant(w, step, bits=bits, narrow_range=True, impl=qat.kernel_impl)


def quantize_input(qat: QATConfig, x: jax.Array, state: QuantizerState) -> jax.Array:
    """``x`` fake-quantised by ``qat.act_quantizer`` at ``qat.act_bits`` (same shape, dtype)."""
    bits, name = qat.act_bits, qat.act_quantizer
    if name in formats.PRESETS:
        return formats.fake_quant_format(x, input_format(name))
    if name == "dorefa":
        return dorefa_activation(x, bits=bits)
    if name == "matryoshka":
        return nested_fake_quant(x, bits=bits, nest_bits=qat.nest_bits)
    if name == "max":
        return _dynamic_max_quant(x, bits)
    if name == "lsq":
        init = lambda signed: lsq_init_scale(x, bits=bits, signed=signed)
        signed, step = state.get_input(INPUT_STATE_NAMES["lsq"], x, init)
        return fake_quant(x, _floor(step), bits=bits, signed=signed,
                          lsq_grad_scale=qat.lsq_grad_scale, impl=qat.kernel_impl)
    # "learned_clip": alpha starts at the largest magnitude seen, so nothing clips at first.
    init = lambda signed: _max_abs(x)
    signed, alpha = state.get_input(INPUT_STATE_NAMES["learned_clip"], x, init)
    return learned_clip_quant(x, _floor(alpha), bits=bits, signed=signed)


def _dynamic_max_quant(x: jax.Array, bits: int) -> jax.Array:
    """Max-abs quantizer whose signedness follows the current tensor (no learned state).

    Unsigned codes ``0 .. 2^b - 1`` with step ``max x / (2^b - 1)`` if ``min x >= 0``; otherwise
    signed codes, written as unsigned codes with zero point ``2^(b-1)`` so that the choice can be
    an array (decided inside ``jit``), with step ``max|x| / (2^(b-1) - 1)``.
    """
    xs = jax.lax.stop_gradient(x).astype(jnp.float32)
    nonneg = jnp.min(xs) >= 0
    half = 2 ** (bits - 1)
    levels = jnp.where(nonneg, 2**bits - 1, half - 1).astype(jnp.float32)
    step = _floor(jnp.max(jnp.abs(xs)) / levels)
    zero_point = jnp.where(nonneg, 0.0, float(half))
    return fake_quant(x, step, bits=bits, signed=False, zero_point=zero_point)


def input_format(name: str) -> formats.Format:
    """The data type ``name`` as QAT applies it to layer inputs: blocks along the last
    (features) axis, the reduction axis of Dense and NHWC conv inputs; others unchanged."""
    return formats.activation_format(name)


def input_signedness(name: str, layer: str, x: jax.Array) -> bool:
    """Whether a learned input quantizer created now from ``x`` is signed (``min x < 0``).

    Raises:
      ValueError: if ``x`` is abstract (traced: its sign is unknown) or all zeros (no step).
    """
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"Cannot initialise {name!r} of layer {layer}: its input is abstract "
            "(traced by jax.jit/vmap/grad), but whether it is signed must be read from concrete "
            "values. Run quantized_init / init_quant_from_params outside jax transformations."
        )
    if not bool(jnp.any(x != 0)):
        raise ValueError(
            f"Cannot initialise {name!r} of layer {layer}: its input is all zeros in "
            "the init batch, which gives no step size or sign; initialise with a representative "
            "batch of real data (e.g. a training batch), not a dummy array of zeros."
        )
    return bool(jnp.min(x) < 0)


def input_variable_names(name: str) -> tuple[tuple[str, bool], ...]:
    """``((name, True), (name + "_unsigned", False))``: the state name records the signedness."""
    return (name, True), (f"{name}_unsigned", False)


def missing_message(qat: QATConfig, layer: str, names: tuple[str, ...]) -> str:
    """The error text for a learned quantizer whose state was never created."""
    return (
        f"variables[{QUANT_COLLECTION!r}] has no {' or '.join(map(repr, names))} for layer "
        f"{layer}, which QATConfig {qat.name} quantises with a learned quantizer; "
        "build the collection with quantized_init or init_quant_from_params using the same "
        "QATConfig."
    )


def _max_abs(x: jax.Array) -> jax.Array:
    return _floor(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32))))


@jax.custom_jvp
def _floor(v: jax.Array) -> jax.Array:
    """``max(v, MIN_STEP)`` with an identity gradient.

    Keeps steps/clips valid if an optimizer step pushes one to <= 0, while the value still gets
    gradients and can recover. (``v + stop_gradient(max(v, m) - v)`` would cancel to ~0 in
    floating point.)
    """
    return jnp.maximum(v, MIN_STEP)


@_floor.defjvp
def _floor_jvp(primals, tangents):
    return _floor(primals[0]), tangents[0]
