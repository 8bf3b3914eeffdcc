"""Per-layer machinery of :mod:`kure_jax.qat`: which layers, in what order, quantised how.

Private: the public API is in ``kure_jax.qat``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax import kernels, qat_ops, quant

if TYPE_CHECKING:
    from kure_jax.qat import QATConfig

QUANT_COLLECTION = "quant"

# Layers whose ``__call__`` reads ``kernel`` and then calls ``self.promote_dtype(inputs, kernel,
# bias, dtype=...)``; subclasses are included.
QUANTIZABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv, nn.Dense, nn.ConvTranspose)

_T = TypeVar("_T")
# Floor of learned steps/clips in the forward pass. float32's smallest normal (~1e-38) is not
# enough: a clip that small gives a subnormal step (flushed to 0 on CPU/GPU), hence 0/0 = NaN.
MIN_STEP = 1e-12


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a conv/dense layer that ``kure_jax.qat`` fake-quantises."""
    return isinstance(module, QUANTIZABLE_LAYERS)


def call_order(thunk: Callable[[], Any]) -> list[tuple[tuple[str, ...], type[nn.Module]]]:
    """``(path, type)`` of every quantisable layer call made by ``thunk``, in call order.

    ``thunk`` (a ``model.init``/``model.apply`` call) is only traced for shapes
    (``jax.eval_shape``): nothing is computed and no variable changes. Works inside ``jit``.
    """
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and is_quantizable(context.module):
            calls.append((tuple(context.module.path), type(context.module)))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        # Return nothing: the model's outputs need not be arrays.
        jax.eval_shape(lambda: (thunk(), None)[1])
    return calls


def quantized_call(module: nn.Module, qat: QATConfig, call: Callable[[], _T]) -> _T:
    """Runs ``call()`` (the layer's ``__call__``) with its inputs and kernel fake-quantised.

    For the duration of the call the layer's ``promote_dtype`` field is swapped for a function
    that quantises ``(inputs, kernel)`` and then runs the original ``promote_dtype``; the layer's
    own code does the rest, so every conv/dense option keeps its float meaning.

    Raises:
      ValueError: if the layer never called ``promote_dtype`` (a subclass with its own
        ``__call__``), so nothing could be quantised.
    """
    original = module.promote_dtype
    used = []

    def promote(inputs, kernel, *rest, **kwargs):
        used.append(True)
        if qat.act_bits is not None:
            inputs = _quantize_input(module, qat, jnp.asarray(inputs))
        if qat.weight_bits is not None:
            kernel = _quantize_kernel(module, qat, jnp.asarray(kernel))
        return original(inputs, kernel, *rest, **kwargs)

    # Module fields are frozen; flax itself sets attributes this way. Restored in all cases.
    object.__setattr__(module, "promote_dtype", promote)
    try:
        out = call()
    finally:
        object.__setattr__(module, "promote_dtype", original)
    if not used:
        raise ValueError(
            f"Layer {_layer_name(module)} ({type(module).__name__}) did not pass its kernel "
            "through `self.promote_dtype`, so it cannot be fake-quantised; use a flax.linen "
            f"layer among {[c.__name__ for c in QUANTIZABLE_LAYERS]} or a subclass that keeps "
            "their __call__."
        )
    return out


def _quantize_kernel(module: nn.Module, qat: QATConfig, w: jax.Array) -> jax.Array:
    bits, name = qat.weight_bits, qat.weight_quantizer
    if name == "lsq":
        step = _variable(module, qat, "kernel_step", lambda: quant.lsq_init_scale(w, bits=bits))
        return kernels.fake_quant(w, _floor(step), bits=bits, lsq_grad_scale=qat.lsq_grad_scale,
                                  impl=qat.kernel_impl)
    if name == "learned_clip":
        alpha = _variable(module, qat, "kernel_clip", lambda: _max_abs(w))
        return qat_ops.learned_clip_quant(w, _floor(alpha), bits=bits, signed=True)
    if name == "dorefa":
        return qat_ops.dorefa_weight(w, bits=bits)
    # "max": symmetric narrow grid +-(2^(b-1) - 1) steps spanning exactly [-max|w|, max|w|].
    step = _floor(jax.lax.stop_gradient(_max_abs(w)) / (2 ** (bits - 1) - 1))
    return kernels.fake_quant(w, step, bits=bits, narrow_range=True, impl=qat.kernel_impl)


def _quantize_input(module: nn.Module, qat: QATConfig, x: jax.Array) -> jax.Array:
    bits, name = qat.act_bits, qat.act_quantizer
    if name == "dorefa":
        return qat_ops.dorefa_activation(x, bits=bits)
    if name == "max":
        return _dynamic_max_quant(x, bits)
    if name == "lsq":
        init = lambda signed: quant.lsq_init_scale(x, bits=bits, signed=signed)
        signed, step = _input_variable(module, qat, "input_step", x, init)
        return kernels.fake_quant(x, _floor(step), bits=bits, signed=signed,
                                  lsq_grad_scale=qat.lsq_grad_scale, impl=qat.kernel_impl)
    # "learned_clip": alpha starts at the largest magnitude seen, so nothing clips at first.
    init = lambda signed: _max_abs(x)
    signed, alpha = _input_variable(module, qat, "input_clip", x, init)
    return qat_ops.learned_clip_quant(x, _floor(alpha), bits=bits, signed=signed)


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
    return quant.fake_quant(x, step, bits=bits, signed=False, zero_point=zero_point)


def _variable(
    module: nn.Module, qat: QATConfig, name: str, init_fn: Callable[[], jax.Array]
) -> jax.Array:
    """Reads (or, when the collection is mutable, creates) the layer's quantizer variable."""
    if not (module.has_variable(QUANT_COLLECTION, name)
            or module.is_mutable_collection(QUANT_COLLECTION)):
        raise ValueError(_missing_message(module, qat, (name,)))
    return module.variable(QUANT_COLLECTION, name, init_fn).value


def _input_variable(
    module: nn.Module,
    qat: QATConfig,
    name: str,
    x: jax.Array,
    init_fn: Callable[[bool], jax.Array],
) -> tuple[bool, jax.Array]:
    """``(signed, value)`` of a learned input quantizer; the name records the signedness."""
    unsigned_name = f"{name}_unsigned"
    for var_name, signed in ((name, True), (unsigned_name, False)):
        if module.has_variable(QUANT_COLLECTION, var_name):
            return signed, module.get_variable(QUANT_COLLECTION, var_name)
    if not module.is_mutable_collection(QUANT_COLLECTION):
        raise ValueError(_missing_message(module, qat, (name, unsigned_name)))
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"Cannot initialise {name!r} of layer {_layer_name(module)}: its input is abstract "
            "(traced by jax.jit/vmap/grad), but whether it is signed must be read from concrete "
            "values. Run quantized_init / init_quant_from_params outside jax transformations."
        )
    if not bool(jnp.any(x != 0)):
        raise ValueError(
            f"Cannot initialise {name!r} of layer {_layer_name(module)}: its input is all zeros in "
            "the init batch, which gives no step size or sign; initialise with a representative "
            "batch of real data (e.g. a training batch), not a dummy array of zeros."
        )
    signed = bool(jnp.min(x) < 0)
    var_name = name if signed else unsigned_name
    return signed, module.variable(QUANT_COLLECTION, var_name, init_fn, signed).value


def _missing_message(module: nn.Module, qat: QATConfig, names: tuple[str, ...]) -> str:
    return (
        f"variables[{QUANT_COLLECTION!r}] has no {' or '.join(map(repr, names))} for layer "
        f"{_layer_name(module)}, which QATConfig {qat.name} quantises with a learned quantizer; "
        "build the collection with quantized_init or init_quant_from_params using the same "
        "QATConfig."
    )


def _layer_name(module: nn.Module) -> str:
    return "/".join(module.path) or "<root>"


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
