"""QAT of a Flax NNX model without editing it: its conv/linear layers fake-quantise in place.

:func:`quantize_model` gives every ``nnx.Conv``, ``nnx.Linear`` and ``nnx.ConvTranspose`` of a
model that ``QATConfig.layers`` selects (subclasses included; by default all but the first
layer and the last linear one) a
fake-quantised kernel and input, with the quantizers of :mod:`kure_jax.qat.layer`: the same math
as the Linen path (:mod:`kure_jax.qat.linen`), so the same weights give the same logits and
gradients. The layer's own ``__call__`` does the convolution / matmul: for the duration of a
call its ``promote_dtype`` (which every Flax linear layer passes ``(inputs, kernel, bias)``
through) is swapped for one that quantises ``inputs`` and ``kernel`` first.

Learned steps and clips become :class:`QuantParam` variables of the layer (``layer.kernel_step``,
``layer.input_step`` / ``layer.input_step_unsigned``, ``..._clip``), created from one eager
forward pass on a representative batch; train them with the weights by giving the optimizer
``wrt=(nnx.Param, QuantParam)``. ``nnx.state(model, nnx.Param)`` (what the KURE penalty and PTQ
read) does not include them.

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> from kure_jax import LayerRule
>>> from kure_jax.qat import QATConfig, nnx as qat_nnx
>>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
>>> qat_nnx.quantize_model(model, jnp.ones((1, 4)), qat=QATConfig(weight_bits=4, act_bits=8,
...                        layers=LayerRule(skip_last_dense=True)))
['layers/0']
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kure_jax.qat.config import QATConfig, check_qat
from kure_jax.qat.layer import (
    input_signedness,
    input_variable_names,
    missing_message,
    quantize_input,
    quantize_kernel,
)

__all__ = ["QuantParam", "is_quantized", "quantize_model"]

QUANTIZABLE_LAYERS: tuple[type[nnx.Module], ...] = (nnx.Conv, nnx.Linear, nnx.ConvTranspose)


class QuantParam(nnx.Variable):
    """A learned quantizer parameter of QAT (an LSQ step or a clip; float32 scalar)."""


# True while quantize_model's init pass runs: only then may missing QuantParams be created.
_CREATING: contextvars.ContextVar[bool] = contextvars.ContextVar("kure_qat_creating",
                                                                 default=False)


def _quantized_call(float_call: Callable[..., Any]) -> Callable[..., Any]:
    """The ``__call__`` of a quantised layer class, around the float class's ``float_call``."""

    def __call__(self, inputs, *args, **kwargs):
        qat = self.kure_qat
        if qat is None or not qat.quantizes:
            return float_call(self, inputs, *args, **kwargs)
        original, state = self.promote_dtype, _NNXState(self, qat)

        def promote(arrays, *rest, **options):
            x, kernel, *others = arrays
            if qat.act_bits is not None:
                x = quantize_input(qat, jnp.asarray(x), state)
            if qat.weight_bits is not None:
                kernel = quantize_kernel(qat, jnp.asarray(kernel), state)
            return original((x, kernel, *others), *rest, **options)

        # Set and restored around the call only, so the model's graph never holds it.
        object.__setattr__(self, "promote_dtype", promote)
        try:
            return float_call(self, inputs, *args, **kwargs)
        finally:
            object.__setattr__(self, "promote_dtype", original)

    return __call__


_QUANTIZED_CLASSES: dict[type, type] = {}


def _quantized_class(cls: type) -> type:
    """A subclass of ``cls`` whose calls fake-quantise (a mixin base would change the layout)."""
    if getattr(cls, "_kure_quantized", False):
        return cls
    if cls not in _QUANTIZED_CLASSES:
        _QUANTIZED_CLASSES[cls] = type(
            f"Quantized{cls.__name__}", (cls,),
            {"__module__": __name__, "__call__": _quantized_call(cls.__call__),
             "_kure_quantized": True})
    return _QUANTIZED_CLASSES[cls]


class _NNXState:
    """:class:`~kure_jax.qat.layer.QuantizerState` over a layer's :class:`QuantParam` attributes."""

    def __init__(self, layer: nnx.Module, qat: QATConfig):
        self.layer, self.qat = layer, qat

    def _create(self, name: str, value: jax.Array) -> jax.Array:
        setattr(self.layer, name, QuantParam(jnp.asarray(value, jnp.float32)))
        return getattr(self.layer, name)[...]

    def get(self, name: str, init_fn: Callable[[], jax.Array]) -> jax.Array:
        if hasattr(self.layer, name):
            return getattr(self.layer, name)[...]
        if not _CREATING.get():
            raise ValueError(missing_message(self.qat, _layer_name(self.layer), (name,)))
        return self._create(name, init_fn())

    def get_input(
        self, name: str, x: jax.Array, init_fn: Callable[[bool], jax.Array]
    ) -> tuple[bool, jax.Array]:
        names = input_variable_names(name)
        for var_name, signed in names:
            if hasattr(self.layer, var_name):
                return signed, getattr(self.layer, var_name)[...]
        if not _CREATING.get():
            raise ValueError(missing_message(self.qat, _layer_name(self.layer),
                                             tuple(n for n, _ in names)))
        signed = input_signedness(name, _layer_name(self.layer), x)
        return signed, self._create(names[0][0] if signed else names[1][0], init_fn(signed))


def _layer_name(layer: nnx.Module) -> str:
    return getattr(layer, "kure_path", None) or type(layer).__name__


def is_quantized(layer: nnx.Module) -> bool:
    """Whether :func:`quantize_model` made ``layer`` fake-quantise (False for kept-float ones)."""
    return getattr(layer, "_kure_quantized", False) and getattr(layer, "kure_qat", None) is not None


def quantize_model(model: nnx.Module, *args: Any, qat: QATConfig, **kwargs: Any) -> list[str]:
    """Makes ``model``'s conv/linear layers fake-quantise, in place, and creates their state.

    The layers that quantise are ``qat.layers`` resolved on the model's state, with the call
    order of ``model(*args, **kwargs)`` read by :func:`kure_jax.selection.layer_order` (a
    shape-only trace). Then the model runs once eagerly, quantised, to initialise each learned
    quantizer from the kernel and the activations that layer really receives, as
    :func:`kure_jax.qat.linen.quantized_init` does.
    Call it with a representative batch (it sets the input steps and their signedness) and
    outside ``jax.jit``. Any state the forward passes change (e.g. BatchNorm statistics in train
    mode) is put back as it was.

    Args:
      model: a Flax NNX module; it is changed in place.
      *args: positional arguments of the model call (e.g. images ``(N, H, W, C)``).
      qat: the quantization configuration (stored on each layer, static in ``nnx.jit``).
      **kwargs: keyword arguments of the model call.

    Returns:
      The paths (``"/"``-joined attribute names) of the layers that now fake-quantise.

    Raises:
      ValueError: if ``qat`` is not a ``QATConfig``, the model has no quantisable layer,
        ``qat.layers`` selects none, or a learned input quantizer's activations are traced or
        all zero.
    """
    check_qat(qat)
    layers = {id(m): (path, m) for path, m in nnx.iter_modules(model)
              if isinstance(m, QUANTIZABLE_LAYERS)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer among "
                         f"{[c.__name__ for c in QUANTIZABLE_LAYERS]} to quantise.")
    for path, layer in layers.values():
        layer.__class__ = _quantized_class(type(layer))
        layer.kure_qat = None
        layer.kure_path = "/".join(map(str, path))
    saved = nnx.clone(nnx.state(model))
    graphdef, state = nnx.split(model)
    chosen = set(qat.layers.layers(
        state, forward=lambda s: nnx.merge(graphdef, s)(*args, **kwargs)))
    quantized = []
    for _, layer in layers.values():
        if layer.kure_path in chosen:
            layer.kure_qat = qat
            quantized.append(layer.kure_path)
    token = _CREATING.set(True)
    try:
        model(*args, **kwargs)
    finally:
        _CREATING.reset(token)
    nnx.update(model, saved)
    return sorted(quantized)
