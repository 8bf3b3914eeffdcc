"""``QATConfig``: what quantization-aware training fake-quantises, and how."""

from __future__ import annotations

import dataclasses

from kure_jax.kernels import IMPLS as KERNEL_IMPLS
from kure_jax.quant import formats
from kure_jax.quant.ops import MAX_BITS, MIN_BITS, validate_bits
from kure_jax.selection import PAPER_LAYERS, LayerRule, as_rule

QUANTIZERS: tuple[str, ...] = ("lsq", "dorefa", "learned_clip", "max", "matryoshka")
LEARNED_QUANTIZERS: tuple[str, ...] = ("lsq", "learned_clip")
# Name of the variable collection (Linen) / state subtree holding learned steps and clips.
QUANT_COLLECTION = "quant"
# The state name of each learned quantizer: kernel ones, and input ones (``+ "_unsigned"`` for
# an unsigned input quantizer), e.g. ``variables["quant"]["conv1"]["kernel_step"]``.
KERNEL_STATE_NAMES: dict[str, str] = {"lsq": "kernel_step", "learned_clip": "kernel_clip"}
INPUT_STATE_NAMES: dict[str, str] = {"lsq": "input_step", "learned_clip": "input_clip"}

__all__ = [
    "INPUT_STATE_NAMES",
    "KERNEL_STATE_NAMES",
    "LEARNED_QUANTIZERS",
    "QUANTIZERS",
    "QUANT_COLLECTION",
    "QATConfig",
    "check_qat",
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
        * ``"dorefa"``: ``kure_jax.quant.dorefa_weight`` (tanh-normalised to [-1, 1]).
          Scale-free: the float scale of the kernel is lost, so follow every DoReFa layer
          with a normalisation (BatchNorm), as DoReFa-Net and ResNets do; a quantised dense
          layer without one (e.g. ``small_cnn``'s ``hidden`` unless ``hidden_norm=True``)
          outputs ~``1 / max|tanh(w)|`` times its float values and training collapses.
        * ``"learned_clip"``: the KURE reference's "LSQ": a learned clip ``alpha`` per tensor
          (``kure_jax.quant.learned_clip_quant``), initialised to ``max|w|``.
        * ``"max"``: step ``max|w| / (2^(b-1) - 1)`` recomputed from the current kernel at every
          call, no learned state; straight-through gradient, no gradient through the step.

        * ``"matryoshka"``: the top ``weight_bits`` of per-output-channel asymmetric min-max
          ``nest_bits``-bit codes (``kure_jax.quant.nested``, Matryoshka Quantization): a model
          trained so runs at ``weight_bits`` by slicing its int8 codes. No learned state.
        * a data type, a preset name of :data:`kure_jax.quant.formats.PRESETS` (``"mxfp4"``,
          ``"nvfp4"``, ``"nf4"``, ``"int4_block32"``, ``"fp8_e4m3"``, ...): the kernel in that
          format (:func:`~kure_jax.quant.formats.fake_quant_format`; blocks along the kernel's
          input axis), scales recomputed from the current kernel at every call, no learned
          state. ``weight_bits`` must be the element's width (4: FP4/INT4/NF4, 6: FP6,
          8: FP8/INT8).

      act_quantizer: input quantizer, one of ``QUANTIZERS``:

        * ``"lsq"``: learned step, initialised to ``2 mean|x| / sqrt(Q_p)`` on the init batch.
        * ``"dorefa"``: ``kure_jax.quant.dorefa_activation``: clamp to [0, 1], ``2^b - 1`` levels
          (negative inputs become 0, as in DoReFa-Net).
        * ``"learned_clip"``: learned clip ``alpha``, initialised to ``max|x|`` of the init batch,
          so that nothing is clipped at the start.
        * ``"max"``: step from ``max|x|`` of the current tensor at every call (no learned state);
          unsigned codes ``0 .. 2^b - 1`` when the tensor has no negative entry, else signed.
        * a data type preset (as for kernels; ``act_bits`` its element's width): the input in
          that format, per-block scales along the features (last) axis computed from the
          current tensor as MX hardware does, per-tensor formats from its ``max|x|``.

        The learned quantizers are unsigned or signed per layer as their init batch says (see the
        module docstring).
        * ``"matryoshka"``: the top ``act_bits`` of per-tensor min-max ``nest_bits``-bit codes.

      layers: the layers that quantise, a :class:`~kure_jax.selection.LayerRule` (or a name
        :func:`~kure_jax.selection.as_rule` reads: ``"paper"``, ``"kernels"``); the others keep
        a float kernel and a float input. Default :data:`~kure_jax.selection.PAPER_LAYERS`: the
        first layer called (the stem conv) and the last dense layer (the classifier) stay float,
        as in KURE and most QAT papers; ``LayerRule()`` quantises every conv/dense layer.
      lsq_grad_scale: scale the LSQ step gradients by ``1 / sqrt(N Q_p)`` (Esser et al.); used by
        ``"lsq"`` only.
      kernel_impl: how the quantizers with a fused kernel run (``"lsq"`` kernels and inputs,
        ``"max"`` kernels), one of ``kure_jax.kernels.IMPLS``:

        the ``impl`` of ``kure_jax.quant.fake_quant``, which those quantizers call:

        * ``"jnp"`` (default): XLA's fusion of the jnp op with the ops around it. Inside a
          training step that fusion may be worth more than the kernels' standalone gain, and a
          step with the kernels has not been timed yet (BENCHMARKS.md).
        * ``"pallas"``: the fused Pallas kernels of ``kure_jax.kernels`` (same values and
          gradients; off GPU/TPU they run in the Pallas interpreter, slowly).
        * ``"auto"``: the kernels where ``kure_jax.kernels`` measured them faster than XLA on
          their own (16-bit tensors on GPU), the jnp path elsewhere.

        ``"dorefa"``, ``"learned_clip"`` and the ``"max"`` input quantizer (whose zero point
        follows the tensor's sign) have no kernel and always run in jnp.

      nest_bits: width ``c`` of the codes that ``"matryoshka"`` slices (8 in the paper).

    Raises:
      ValueError: on construction (or ``dataclasses.replace``) for bits outside [2, 16] (or not an
        int), an unknown quantizer name (the message lists ``QUANTIZERS``), an unknown
        ``kernel_impl``, a non-bool flag or ``layers`` that is not a rule.

    >>> QATConfig(weight_bits=4, act_bits=None, weight_quantizer="dorefa").name
    'w4-dorefa/a-float'
    """

    weight_bits: int | None = 4
    act_bits: int | None = 4
    weight_quantizer: str = "lsq"
    act_quantizer: str = "lsq"
    layers: LayerRule = PAPER_LAYERS
    lsq_grad_scale: bool = True
    kernel_impl: str = "jnp"
    nest_bits: int = 8

    def __post_init__(self) -> None:
        for field in ("weight_bits", "act_bits"):
            bits = getattr(self, field)
            if bits is None:
                continue
            try:
                object.__setattr__(self, field, validate_bits(bits))
            except ValueError:
                raise ValueError(
                    f"QATConfig.{field} must be None (float) or an int in "
                    f"[{MIN_BITS}, {MAX_BITS}]; got {bits!r}."
                ) from None
        for field, bits_field in (("weight_quantizer", "weight_bits"),
                                  ("act_quantizer", "act_bits")):
            name = getattr(self, field)
            if isinstance(name, str) and name in formats.PRESETS:
                _check_format_bits(field, name, bits_field, getattr(self, bits_field))
            elif not isinstance(name, str) or name not in QUANTIZERS:
                raise ValueError(
                    f"QATConfig.{field} must be one of {QUANTIZERS} or a data type of "
                    f"{tuple(formats.PRESETS)}; got {name!r}."
                )
        try:
            object.__setattr__(self, "nest_bits", validate_bits(self.nest_bits))
        except ValueError:
            raise ValueError(f"QATConfig.nest_bits must be an int in [{MIN_BITS}, {MAX_BITS}]; "
                             f"got {self.nest_bits!r}.") from None
        for bits, name in ((self.weight_bits, self.weight_quantizer),
                           (self.act_bits, self.act_quantizer)):
            if name == "matryoshka" and bits is not None and bits > self.nest_bits:
                raise ValueError(f"QATConfig: {bits}-bit 'matryoshka' slices need "
                                 f"nest_bits >= {bits}; got nest_bits={self.nest_bits}.")
        if not isinstance(self.kernel_impl, str) or self.kernel_impl not in KERNEL_IMPLS:
            raise ValueError(
                f"QATConfig.kernel_impl must be one of {KERNEL_IMPLS}; got {self.kernel_impl!r}."
            )
        if not isinstance(self.lsq_grad_scale, bool):
            raise ValueError(
                f"QATConfig.lsq_grad_scale must be True or False; got {self.lsq_grad_scale!r}.")
        try:
            object.__setattr__(self, "layers", as_rule(self.layers))
        except ValueError as error:
            raise ValueError(f"QATConfig.layers: {error}") from None

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


def _check_format_bits(field: str, name: str, bits_field: str, bits: int | None) -> None:
    """A data type quantizer's bit width must be its element's (``None``: the tensor is float)."""
    width = formats.ELEMENTS[formats.PRESETS[name].element].bits
    if bits is not None and bits != width:
        raise ValueError(f"QATConfig.{field}={name!r} stores {width}-bit elements; set "
                         f"{bits_field}={width} (or None for float); got {bits}.")


def check_qat(qat: QATConfig) -> None:
    if not isinstance(qat, QATConfig):
        raise ValueError(f"qat must be a QATConfig; got {type(qat).__name__}: {qat!r}.")
