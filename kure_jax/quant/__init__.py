"""Uniform quantisation: fake-quant ops, the DoReFa / learned-clip quantizers, policies, PTQ.

* :mod:`~kure_jax.quant.ops`: ``fake_quant`` (STE + LSQ gradients; jnp or the Pallas kernels of
  :mod:`kure_jax.kernels` by ``impl``), rounding modes, code ranges.
* :mod:`~kure_jax.quant.quantizers`: DoReFa weights/activations, the reference's learned clip.
* :mod:`~kure_jax.quant.policy`: ``QuantPolicy`` and how a step is chosen (clip methods).
* :mod:`~kure_jax.quant.ptq`: ``quantize_params``, post-training quantisation of a pytree.
* :mod:`~kure_jax.quant.nested`: Matryoshka codes, the top bits of int8 codes as a model.

Layers import downward only: ``ops`` <- ``quantizers``, ``policy`` <- ``ptq``.
"""

from kure_jax.quant.nested import minmax_codes as minmax_codes
from kure_jax.quant.nested import nested_fake_quant as nested_fake_quant
from kure_jax.quant.nested import slice_codes as slice_codes
from kure_jax.quant.ops import MAX_BITS as MAX_BITS
from kure_jax.quant.ops import MIN_BITS as MIN_BITS
from kure_jax.quant.ops import NOISE_SOURCES as NOISE_SOURCES
from kure_jax.quant.ops import ROUNDING_MODES as ROUNDING_MODES
from kure_jax.quant.ops import check_key as check_key
from kure_jax.quant.ops import fake_quant as fake_quant
from kure_jax.quant.ops import integer_range as integer_range
from kure_jax.quant.ops import lsq_init_scale as lsq_init_scale
from kure_jax.quant.ops import round_values as round_values
from kure_jax.quant.ops import validate_bits as validate_bits
from kure_jax.quant.ops import validate_flag as validate_flag
from kure_jax.quant.ops import validate_rounding as validate_rounding
from kure_jax.quant.policy import CLIP_METHODS as CLIP_METHODS
from kure_jax.quant.policy import QuantPolicy as QuantPolicy
from kure_jax.quant.policy import compute_step as compute_step
from kure_jax.quant.policy import kept_axes as kept_axes
from kure_jax.quant.policy import quantize as quantize
from kure_jax.quant.ptq import quantize_params as quantize_params
from kure_jax.quant.quantizers import dorefa_activation as dorefa_activation
from kure_jax.quant.quantizers import dorefa_weight as dorefa_weight
from kure_jax.quant.quantizers import learned_clip_quant as learned_clip_quant

__all__ = [
    "CLIP_METHODS",
    "MAX_BITS",
    "MIN_BITS",
    "NOISE_SOURCES",
    "ROUNDING_MODES",
    "QuantPolicy",
    "check_key",
    "compute_step",
    "dorefa_activation",
    "dorefa_weight",
    "fake_quant",
    "integer_range",
    "kept_axes",
    "learned_clip_quant",
    "lsq_init_scale",
    "minmax_codes",
    "nested_fake_quant",
    "quantize",
    "quantize_params",
    "round_values",
    "slice_codes",
    "validate_bits",
    "validate_flag",
    "validate_rounding",
]
