"""Quantization-aware training (QAT) of any Flax Linen model, without editing the model.

``quantized_apply(model, variables, x, qat=QATConfig(...))`` runs ``model.apply`` with every
``nn.Conv``, ``nn.Dense`` and ``nn.ConvTranspose`` call (subclasses included) seeing a
fake-quantised kernel and a fake-quantised input. Gradients are straight-through, so the float
"shadow" weights in ``variables["params"]`` are what the optimizer (and KURE) updates; learned
quantizer parameters (LSQ steps, learned clips) live in the ``"quant"`` variable collection and are
trained alongside them.

How: a ``flax.linen.intercept_methods`` interceptor wraps each layer call and, for that call only,
replaces the layer's ``promote_dtype`` field (the function every Flax linear layer passes
``(inputs, kernel, bias)`` through right after reading its parameters) by one that quantises
``inputs`` and ``kernel`` first. The layer's own code then does the convolution / matmul, so
strides, padding, dilation, ``feature_group_count`` (depthwise convs), masks and batch dims all
behave exactly as in float. Biases are never quantised. The kernel is quantised in its parameter
dtype (float32) *before* the cast to the compute dtype (e.g. bfloat16).

Layers are identified by their module path (``module.path``, e.g. ``("stage1_block1", "conv1")``);
``variables["quant"]`` mirrors the module tree, e.g. ``quant["stage1_block1"]["conv1"]
["kernel_step"]``. The layers that quantise are ``QATConfig.layers``, a
:class:`~kure_jax.selection.LayerRule` resolved on the model's params with the call order of
the same call (:func:`kure_jax.selection.layer_order`, a shape-only trace), so any model works.

Quantizer state per quantised layer (all float32 scalars, one per tensor):

==================  ===============  ==========================================
quantizer           kernel           input (signed / unsigned)
==================  ===============  ==========================================
``"lsq"``           ``kernel_step``  ``input_step`` / ``input_step_unsigned``
``"learned_clip"``  ``kernel_clip``  ``input_clip`` / ``input_clip_unsigned``
``"dorefa"``        none             none
``"max"``           none             none
==================  ===============  ==========================================

A learned input quantizer is unsigned (codes ``0 .. 2^b - 1``) when the layer's input in the init
batch has no negative entry (e.g. after a ReLU), else signed; the choice is static and recorded
in the variable's name, so it is known inside ``jax.jit``.

References:
  Esser, McKinstry, Bablani, Appuswamy, Modha. "Learned Step Size Quantization", ICLR 2020.
  Zhou et al. "DoReFa-Net", 2016.
  Shkolnik et al. "Robust Quantization: One Model to Rule Them All", NeurIPS 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.qat.config import QUANT_COLLECTION, QATConfig, check_qat
from kure_jax.qat.layer import (
    input_signedness,
    input_variable_names,
    missing_message,
    quantize_input,
    quantize_kernel,
)
from kure_jax.selection import LayerRule, LeafPredicate

__all__ = [
    "QUANTIZABLE_LAYERS",
    "init_quant_from_params",
    "is_quantizable",
    "layer_interceptor",
    "quantized_apply",
    "quantized_init",
    "rule_predicate",
]

# Layers whose ``__call__`` reads ``kernel`` and then calls ``self.promote_dtype(inputs, kernel,
# bias, dtype=...)``; subclasses are included.
QUANTIZABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv, nn.Dense, nn.ConvTranspose)

_T = TypeVar("_T")


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a conv/dense layer that ``kure_jax.qat`` fake-quantises."""
    return isinstance(module, QUANTIZABLE_LAYERS)


LayerCall = Callable[[nn.Module, Callable[..., Any], tuple, dict], Any]


def layer_interceptor(wrap: LayerCall) -> Callable[..., Any]:
    """A ``flax.linen.intercept_methods`` interceptor around every quantisable layer call.

    The one interception rule of the package (QAT here, activation calibration in
    :mod:`kure_jax.evaluation.calibration`): ``wrap(module, call, args, kwargs)`` runs in place
    of each ``__call__`` of a layer in ``QUANTIZABLE_LAYERS`` (``call(*args, **kwargs)`` is the
    original call); other methods and other modules run unchanged.

    Args:
      wrap: ``(module, call, args, kwargs) -> output`` of the layer call.

    Returns:
      The interceptor, for ``with nn.intercept_methods(interceptor): ...``.
    """

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not is_quantizable(context.module):
            return next_fun(*args, **kwargs)
        return wrap(context.module, next_fun, args, kwargs)

    return interceptor


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
    state = _LinenState(module, qat)
    used = []

    def promote(inputs, kernel, *rest, **kwargs):
        used.append(True)
        if qat.act_bits is not None:
            inputs = quantize_input(qat, jnp.asarray(inputs), state)
        if qat.weight_bits is not None:
            kernel = quantize_kernel(qat, jnp.asarray(kernel), state)
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


class _LinenState:
    """:class:`~kure_jax.qat.layer.QuantizerState` over a Linen module's ``"quant"`` variables."""

    def __init__(self, module: nn.Module, qat: QATConfig):
        self.module, self.qat = module, qat

    def get(self, name: str, init_fn: Callable[[], jax.Array]) -> jax.Array:
        module = self.module
        if not (module.has_variable(QUANT_COLLECTION, name)
                or module.is_mutable_collection(QUANT_COLLECTION)):
            raise ValueError(missing_message(self.qat, _layer_name(module), (name,)))
        return module.variable(QUANT_COLLECTION, name, init_fn).value

    def get_input(
        self, name: str, x: jax.Array, init_fn: Callable[[bool], jax.Array]
    ) -> tuple[bool, jax.Array]:
        module = self.module
        names = input_variable_names(name)
        for var_name, signed in names:
            if module.has_variable(QUANT_COLLECTION, var_name):
                return signed, module.get_variable(QUANT_COLLECTION, var_name)
        if not module.is_mutable_collection(QUANT_COLLECTION):
            raise ValueError(missing_message(self.qat, _layer_name(module),
                                             tuple(n for n, _ in names)))
        signed = input_signedness(name, _layer_name(module), x)
        var_name = names[0][0] if signed else names[1][0]
        return signed, module.variable(QUANT_COLLECTION, var_name, init_fn, signed).value


def _layer_name(module: nn.Module) -> str:
    return "/".join(module.path) or "<root>"


def quantized_init(
    model: nn.Module,
    rngs: jax.Array | Mapping[str, jax.Array],
    *args: Any,
    qat: QATConfig,
    **kwargs: Any,
) -> dict[str, Any]:
    """Like ``model.init(rngs, *args, **kwargs)``, plus the ``"quant"`` collection.

    The init forward pass runs quantised, so each learned input quantizer is initialised from
    the activations that layer really receives (already quantised upstream). Call it with a
    representative batch: it sets the LSQ steps / clips of the inputs and their signedness.

    Args:
      model: any Flax Linen module.
      rngs: PRNG key or dict of keys, as for ``model.init``.
      *args: positional arguments of the model call (e.g. the image batch ``(N, H, W, C)``).
      qat: the quantization configuration.
      **kwargs: keyword arguments of ``model.init`` / the model call (e.g. ``train=False``).

    Returns:
      The variables dict of ``model.init`` (``"params"``, ``"batch_stats"``, ...) with a
      ``"quant"`` entry (an empty dict when ``qat`` has no learned quantizer).

    Raises:
      ValueError: if a learned input quantizer's init activations are abstract (``jax.jit``
        traced: their sign must be concrete, so run ``quantized_init`` outside ``jit``) or all
        zero (a dummy ``jnp.zeros`` batch gives no step size).
    """
    check_qat(qat)
    if not qat.quantizes:
        variables = dict(model.init(rngs, *args, **kwargs))
    else:
        # The layers are resolved on abstract variables with the call order of the same pass.
        abstract = jax.eval_shape(lambda: model.init(rngs, *args, **kwargs))
        apply_kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "rngs")}
        apply_rngs = rngs if isinstance(rngs, Mapping) else {"params": rngs}
        forward = lambda v: model.apply(v, *args, rngs=apply_rngs, mutable=True, **apply_kwargs)
        with nn.intercept_methods(_interceptor(qat, _quantized_layers(qat, abstract, forward))):
            variables = dict(model.init(rngs, *args, **kwargs))
    variables.setdefault(QUANT_COLLECTION, {})
    return variables


def quantized_apply(
    model: nn.Module, variables: Mapping[str, Any], *args: Any, qat: QATConfig, **kwargs: Any
) -> Any:
    """Like ``model.apply(variables, *args, **kwargs)``, with fake-quantised kernels and inputs.

    The result follows ``model.apply``'s convention: the output, or ``(output, updates)`` when
    ``mutable`` is given (e.g. ``mutable=["batch_stats"]`` for BatchNorm in train mode). It is
    differentiable with respect to ``variables["params"]`` (straight-through) and
    ``variables["quant"]`` (LSQ / learned-clip gradients), and works under ``jax.jit`` and
    ``jax.grad`` (``qat`` is hashable, so it can be a static argument). With both bit widths
    ``None`` it is exactly ``model.apply``.

    Learned steps and clips are floored at 1e-12 in the forward pass, so an optimizer step that
    makes one negative cannot produce NaN; the floor passes gradients straight through, so such a
    value can recover. Keep them out of weight decay.

    Args:
      model: the Flax Linen module.
      variables: ``{"params": ..., "batch_stats": ..., "quant": ...}`` from ``quantized_init`` or
        ``init_quant_from_params`` with an equal ``qat`` (``"quant"`` may be absent when ``qat``
        has no learned quantizer).
      *args: positional arguments of the model call.
      qat: the quantization configuration.
      **kwargs: keyword arguments of ``model.apply`` (``mutable``, ``rngs``, ``train``, ...).

    Returns:
      Whatever ``model.apply`` returns for these arguments.

    Raises:
      ValueError: if ``qat`` needs learned quantizer state that ``variables["quant"]`` lacks
        (the message names the layer and variable).
    """
    check_qat(qat)
    if not qat.quantizes:
        return model.apply(variables, *args, **kwargs)
    if qat.has_learned_state and QUANT_COLLECTION not in variables and not _mutable_quant(kwargs):
        raise ValueError(
            f"QATConfig {qat.name} has learned quantizer parameters but variables has no "
            f"{QUANT_COLLECTION!r} collection (keys: {sorted(variables)}); create it with "
            "quantized_init or init_quant_from_params."
        )
    forward = lambda v: model.apply(v, *args, **kwargs)
    with nn.intercept_methods(_interceptor(qat, _quantized_layers(qat, variables, forward))):
        return forward(variables)


def init_quant_from_params(
    model: nn.Module, variables: Mapping[str, Any], *args: Any, qat: QATConfig, **kwargs: Any
) -> dict[str, Any]:
    """Builds the ``"quant"`` collection for existing (e.g. float-trained) variables.

    Runs one quantised forward pass on ``args`` and initialises every learned quantizer as
    ``quantized_init`` would, from the given kernels and the activations of this batch. Any
    ``"quant"`` entry already in ``variables`` is ignored. No other variable is changed (the
    pass's BatchNorm updates are discarded).

    Example, to start QAT from a float checkpoint::

        variables = {**float_variables,
                     "quant": init_quant_from_params(model, float_variables, x, qat=qat)}

    Args:
      model: the Flax Linen module.
      variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}``.
      *args: positional arguments of the model call (a representative batch).
      qat: the quantization configuration.
      **kwargs: keyword arguments of the model call (e.g. ``train=False``); ``mutable`` is set
        here and must not be passed.

    Returns:
      The ``"quant"`` collection (a nested dict; empty when ``qat`` has no learned quantizer).

    Raises:
      ValueError: if ``mutable`` is passed, or the activations are abstract or all zero (see
        ``quantized_init``).
    """
    if "mutable" in kwargs:
        raise ValueError("init_quant_from_params sets `mutable` itself; do not pass it.")
    check_qat(qat)
    if not qat.has_learned_state:
        return {}
    float_vars = {k: v for k, v in variables.items() if k != QUANT_COLLECTION}
    # mutable=True lets train-mode models update their statistics; those updates are dropped.
    _, updates = quantized_apply(model, float_vars, *args, qat=qat, mutable=True, **kwargs)
    return dict(updates.get(QUANT_COLLECTION, {}))


def _mutable_quant(kwargs: Mapping[str, Any]) -> bool:
    mutable = kwargs.get("mutable", False)
    if isinstance(mutable, bool):
        return mutable
    if isinstance(mutable, str):
        return mutable == QUANT_COLLECTION
    if callable(mutable):
        return bool(mutable(QUANT_COLLECTION))
    return QUANT_COLLECTION in mutable


def _quantized_layers(
    qat: QATConfig, variables: Mapping[str, Any], forward: Callable[[Any], Any]
) -> frozenset[str]:
    """The layer paths ``qat.layers`` selects, in the call order of ``forward(variables)``."""
    return frozenset(qat.layers.layers(variables, forward=forward))


def rule_predicate(
    rule: LayerRule, model: nn.Module, input_shape: Sequence[int], **init_kwargs: Any
) -> LeafPredicate:
    """``rule`` resolved for a Linen ``model`` taking images ``(N, *input_shape)``.

    The layers come from an abstract ``model.init`` and their call order from
    :func:`kure_jax.selection.layer_order` on ``model.apply`` (no FLOPs), so the predicate is
    the same for any params of the model, including key-sorted restored ones.

    Raises:
      ValueError: as :meth:`kure_jax.selection.LayerRule.layers`.
    """
    images = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, **init_kwargs), images)
    # mutable=True: train-mode models update their statistics; nothing is computed anyway.
    forward = lambda v: model.apply(v, jnp.zeros(images.shape), mutable=True, **init_kwargs)
    return rule.where(variables, forward=forward)


def _interceptor(qat: QATConfig, quantized: frozenset[str]):
    """Method interceptor that fake-quantises the quantisable layers in ``quantized``."""

    def wrap(module, call, args, kwargs):
        if "/".join(module.path) not in quantized:
            return call(*args, **kwargs)
        return quantized_call(module, qat, lambda: call(*args, **kwargs))

    return layer_interceptor(wrap)
