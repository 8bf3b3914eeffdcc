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
["kernel_step"]``. "First" and "last" layer (``keep_first_float``/``keep_last_float``) are found in
call order by a shape-only trace (``jax.eval_shape``) of the same call, so any model works.

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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from kure_jax import quant
from kure_jax._qat_layer import QUANT_COLLECTION, call_order, is_quantizable, quantized_call
from kure_jax.kernels import IMPLS as KERNEL_IMPLS
from kure_jax.quant import MAX_BITS, MIN_BITS

QUANTIZERS: tuple[str, ...] = ("lsq", "dorefa", "learned_clip", "max")
LEARNED_QUANTIZERS: tuple[str, ...] = ("lsq", "learned_clip")

__all__ = [
    "LEARNED_QUANTIZERS",
    "QUANTIZERS",
    "QUANT_COLLECTION",
    "QATConfig",
    "init_quant_from_params",
    "is_quantizable",
    "quantized_apply",
    "quantized_init",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig:
    """What quantization-aware training fake-quantises, and how (frozen, hashable, validated).

    Attributes:
      weight_bits: bit width of conv/dense kernels in [2, 16]; ``None`` keeps them float.
      act_bits: bit width of conv/dense inputs in [2, 16]; ``None`` keeps them float.
      weight_quantizer: kernel quantizer, one of ``QUANTIZERS``:

        * ``"lsq"``: Esser et al.'s learned step ``s`` (``kure_jax.quant.fake_quant``, signed
          codes ``-2^(b-1) .. 2^(b-1) - 1``), initialised to ``2 mean|w| / sqrt(Q_p)``.
        * ``"dorefa"``: ``kure_jax.qat_ops.dorefa_weight`` (tanh-normalised to [-1, 1]).
          Scale-free: the float scale of the kernel is lost, so follow every DoReFa layer
          with a normalisation (BatchNorm), as DoReFa-Net and ResNets do; a quantised dense
          layer without one (e.g. ``small_cnn``'s ``hidden`` unless ``hidden_norm=True``)
          outputs ~``1 / max|tanh(w)|`` times its float values and training collapses.
        * ``"learned_clip"``: the KURE reference's "LSQ": a learned clip ``alpha`` per tensor
          (``kure_jax.qat_ops.learned_clip_quant``), initialised to ``max|w|``.
        * ``"max"``: step ``max|w| / (2^(b-1) - 1)`` recomputed from the current kernel at every
          call, no learned state; straight-through gradient, no gradient through the step.

      act_quantizer: input quantizer, one of ``QUANTIZERS``:

        * ``"lsq"``: learned step, initialised to ``2 mean|x| / sqrt(Q_p)`` on the init batch.
        * ``"dorefa"``: ``kure_jax.qat_ops.dorefa_activation``: clamp to [0, 1], ``2^b - 1`` levels
          (negative inputs become 0, as in DoReFa-Net).
        * ``"learned_clip"``: learned clip ``alpha``, initialised to ``max|x|`` of the init batch,
          so that nothing is clipped at the start.
        * ``"max"``: step from ``max|x|`` of the current tensor at every call (no learned state);
          unsigned codes ``0 .. 2^b - 1`` when the tensor has no negative entry, else signed.

        The learned quantizers are unsigned or signed per layer as their init batch says (see the
        module docstring).
      keep_first_float: the first quantisable layer called in the forward pass keeps a float
        kernel and a float input (KURE and most QAT papers keep the stem conv in full precision).
      keep_last_float: the last ``nn.Dense`` called (the classifier) stays float. A model with no
        ``nn.Dense`` is not affected.
      lsq_grad_scale: scale the LSQ step gradients by ``1 / sqrt(N Q_p)`` (Esser et al.); used by
        ``"lsq"`` only.
      kernel_impl: how the quantizers with a fused kernel run (``"lsq"`` kernels and inputs,
        ``"max"`` kernels), one of ``kure_jax.kernels.IMPLS``:

        * ``"jnp"`` (default): ``kure_jax.quant.fake_quant``, which XLA fuses with the ops
          around it. Inside a training step that fusion may be worth more than the kernels'
          standalone gain, and a step with the kernels has not been timed yet (BENCHMARKS.md).
        * ``"pallas"``: the fused Pallas kernels of ``kure_jax.kernels.fake_quant`` (same values
          and gradients; off GPU/TPU they run in the Pallas interpreter, slowly).
        * ``"auto"``: the kernels where ``kure_jax.kernels`` measured them faster than XLA on
          their own (16-bit tensors on GPU), the jnp path elsewhere.

        ``"dorefa"``, ``"learned_clip"`` and the ``"max"`` input quantizer (whose zero point
        follows the tensor's sign) have no kernel and always run in jnp.

    Raises:
      ValueError: on construction (or ``dataclasses.replace``) for bits outside [2, 16] (or not an
        int), an unknown quantizer name (the message lists ``QUANTIZERS``), an unknown
        ``kernel_impl`` or a non-bool flag.

    >>> QATConfig(weight_bits=4, act_bits=None, weight_quantizer="dorefa").name
    'w4-dorefa/a-float'
    """

    weight_bits: int | None = 4
    act_bits: int | None = 4
    weight_quantizer: str = "lsq"
    act_quantizer: str = "lsq"
    keep_first_float: bool = True
    keep_last_float: bool = True
    lsq_grad_scale: bool = True
    kernel_impl: str = "jnp"

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            bits = getattr(self, field)
            if bits is None:
                continue
            try:
                object.__setattr__(self, field, quant.validate_bits(bits))
            except ValueError:
                raise ValueError(
                    f"QATConfig.{field} must be None (float) or an int in "
                    f"[{MIN_BITS}, {MAX_BITS}]; got {bits!r}."
                ) from None
        for field in ("weight_quantizer", "act_quantizer"):
            name = getattr(self, field)
            if not isinstance(name, str) or name not in QUANTIZERS:
                raise ValueError(
                    f"QATConfig.{field} must be one of {QUANTIZERS}; got {name!r}."
                )
        if not isinstance(self.kernel_impl, str) or self.kernel_impl not in KERNEL_IMPLS:
            raise ValueError(
                f"QATConfig.kernel_impl must be one of {KERNEL_IMPLS}; got {self.kernel_impl!r}."
            )
        for field in ("keep_first_float", "keep_last_float", "lsq_grad_scale"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(
                    f"QATConfig.{field} must be True or False; got {getattr(self, field)!r}."
                )

    @property
    def quantizes(self) -> bool:
        """Whether anything is quantised (False when both bit widths are ``None``)."""
        return self.weight_bits is not None or self.act_bits is not None

    @property
    def has_learned_state(self) -> bool:
        """Whether some quantizer keeps learned parameters in the ``"quant"`` collection."""
        return (self.weight_bits is not None and self.weight_quantizer in LEARNED_QUANTIZERS) or (
            self.act_bits is not None and self.act_quantizer in LEARNED_QUANTIZERS
        )

    @property
    def name(self) -> str:
        """Short label, e.g. ``'w4-lsq/a4-lsq'``; ``'float'`` when nothing is quantised."""
        w = f"w{self.weight_bits}-{self.weight_quantizer}" if self.weight_bits else "w-float"
        a = f"a{self.act_bits}-{self.act_quantizer}" if self.act_bits else "a-float"
        return "float" if not self.quantizes else f"{w}/{a}"


def _check_qat(qat: QATConfig) -> None:
    if not isinstance(qat, QATConfig):
        raise ValueError(f"qat must be a QATConfig; got {type(qat).__name__}: {qat!r}.")


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
    _check_qat(qat)
    if not qat.quantizes:
        variables = dict(model.init(rngs, *args, **kwargs))
    else:
        thunk = lambda: model.init(rngs, *args, **kwargs)
        with nn.intercept_methods(_interceptor(qat, _float_paths(qat, thunk))):
            variables = dict(thunk())
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
    _check_qat(qat)
    if not qat.quantizes:
        return model.apply(variables, *args, **kwargs)
    if qat.has_learned_state and QUANT_COLLECTION not in variables and not _mutable_quant(kwargs):
        raise ValueError(
            f"QATConfig {qat.name} has learned quantizer parameters but variables has no "
            f"{QUANT_COLLECTION!r} collection (keys: {sorted(variables)}); create it with "
            "quantized_init or init_quant_from_params."
        )
    thunk = lambda: model.apply(variables, *args, **kwargs)
    with nn.intercept_methods(_interceptor(qat, _float_paths(qat, thunk))):
        return thunk()


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
    _check_qat(qat)
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


def _float_paths(qat: QATConfig, thunk: Callable[[], Any]) -> frozenset[tuple[str, ...]]:
    """Paths of the layers that ``keep_first_float`` / ``keep_last_float`` leave in float."""
    if not (qat.keep_first_float or qat.keep_last_float):
        return frozenset()
    calls = call_order(thunk)
    paths = set()
    if qat.keep_first_float and calls:
        paths.add(calls[0][0])
    if qat.keep_last_float:
        dense = [path for path, module_type in calls if issubclass(module_type, nn.Dense)]
        paths.update(dense[-1:])
    return frozenset(paths)


def _interceptor(qat: QATConfig, float_paths: frozenset[tuple[str, ...]]):
    """Method interceptor that fake-quantises every quantisable layer not in ``float_paths``."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or not is_quantizable(module)
            or tuple(module.path) in float_paths
        ):
            return next_fun(*args, **kwargs)
        return quantized_call(module, qat, lambda: next_fun(*args, **kwargs))

    return interceptor
