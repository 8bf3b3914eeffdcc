"""kure_jax: KURE kurtosis regularisation and quantization-robustness tools for JAX/Flax.

Reference: M. Shkolnik et al., "Robust Quantization: One Model to Rule Them All",
NeurIPS 2020 (arXiv:2002.07686).
"""

from kure_jax import theory as theory
from kure_jax.kurtosis import REDUCTIONS as REDUCTIONS
from kure_jax.kurtosis import UNIFORM_KURTOSIS as UNIFORM_KURTOSIS
from kure_jax.kurtosis import AddPenaltyState as AddPenaltyState
from kure_jax.kurtosis import Moments as Moments
from kure_jax.kurtosis import add_penalty as add_penalty
from kure_jax.kurtosis import kurtosis as kurtosis
from kure_jax.kurtosis import kurtosis_many as kurtosis_many
from kure_jax.kurtosis import kurtosis_report as kurtosis_report
from kure_jax.kurtosis import penalty as penalty
from kure_jax.kurtosis import penalty_and_kurtosis as penalty_and_kurtosis
from kure_jax.kurtosis import tensor_moments as tensor_moments
from kure_jax.qat import LEARNED_QUANTIZERS as LEARNED_QUANTIZERS
from kure_jax.qat import QUANT_COLLECTION as QUANT_COLLECTION
from kure_jax.qat import QUANTIZERS as QUANTIZERS
from kure_jax.qat import QATConfig as QATConfig
from kure_jax.qat import init_quant_from_params as init_quant_from_params
from kure_jax.qat import quantized_apply as quantized_apply
from kure_jax.qat import quantized_init as quantized_init
from kure_jax.quant import CLIP_METHODS as CLIP_METHODS
from kure_jax.quant import MAX_BITS as MAX_BITS
from kure_jax.quant import MIN_BITS as MIN_BITS
from kure_jax.quant import ROUNDING_MODES as ROUNDING_MODES
from kure_jax.quant import QuantPolicy as QuantPolicy
from kure_jax.quant import compute_step as compute_step
from kure_jax.quant import dorefa_activation as dorefa_activation
from kure_jax.quant import dorefa_weight as dorefa_weight
from kure_jax.quant import fake_quant as fake_quant
from kure_jax.quant import integer_range as integer_range
from kure_jax.quant import learned_clip_quant as learned_clip_quant
from kure_jax.quant import lsq_init_scale as lsq_init_scale
from kure_jax.quant import quantize as quantize
from kure_jax.quant import quantize_params as quantize_params
from kure_jax.quant import round_values as round_values
from kure_jax.selection import PAPER_LAYERS as PAPER_LAYERS
from kure_jax.selection import LayerRule as LayerRule
from kure_jax.selection import default_selection as default_selection
from kure_jax.selection import paper_selection as paper_selection
from kure_jax.selection import path_to_str as path_to_str
from kure_jax.selection import select as select
from kure_jax.selection import selection_mask as selection_mask

__version__ = "0.1.0"

__all__ = [
    "CLIP_METHODS",
    "LEARNED_QUANTIZERS",
    "MAX_BITS",
    "MIN_BITS",
    "PAPER_LAYERS",
    "QUANTIZERS",
    "QUANT_COLLECTION",
    "REDUCTIONS",
    "ROUNDING_MODES",
    "UNIFORM_KURTOSIS",
    "AddPenaltyState",
    "LayerRule",
    "Moments",
    "QATConfig",
    "QuantPolicy",
    "add_penalty",
    "compute_step",
    "default_selection",
    "dorefa_activation",
    "dorefa_weight",
    "fake_quant",
    "init_quant_from_params",
    "integer_range",
    "kurtosis",
    "kurtosis_many",
    "kurtosis_report",
    "learned_clip_quant",
    "lsq_init_scale",
    "paper_selection",
    "path_to_str",
    "penalty",
    "penalty_and_kurtosis",
    "quantize",
    "quantize_params",
    "quantized_apply",
    "quantized_init",
    "round_values",
    "select",
    "selection_mask",
    "tensor_moments",
    "theory",
]
