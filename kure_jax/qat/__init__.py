"""Quantization-aware training of a model without editing it.

* :mod:`~kure_jax.qat.config`: :class:`QATConfig`, the quantizers and the ``"quant"`` state.
* :mod:`~kure_jax.qat.layer`: what QAT does to one layer's kernel and input (framework-neutral).
* :mod:`~kure_jax.qat.linen`: Flax Linen models, by method interception
  (``quantized_init``, ``quantized_apply``, ``init_quant_from_params``).
* :mod:`~kure_jax.qat.nnx`: Flax NNX models, changed in place (``quantize_model``).
"""

from kure_jax.qat import nnx as nnx
from kure_jax.qat.config import INPUT_STATE_NAMES as INPUT_STATE_NAMES
from kure_jax.qat.config import KERNEL_STATE_NAMES as KERNEL_STATE_NAMES
from kure_jax.qat.config import LEARNED_QUANTIZERS as LEARNED_QUANTIZERS
from kure_jax.qat.config import QUANT_COLLECTION as QUANT_COLLECTION
from kure_jax.qat.config import QUANTIZERS as QUANTIZERS
from kure_jax.qat.config import QATConfig as QATConfig
from kure_jax.qat.linen import QUANTIZABLE_LAYERS as QUANTIZABLE_LAYERS
from kure_jax.qat.linen import call_order as call_order
from kure_jax.qat.linen import init_quant_from_params as init_quant_from_params
from kure_jax.qat.linen import is_quantizable as is_quantizable
from kure_jax.qat.linen import layer_order as layer_order
from kure_jax.qat.linen import quantized_apply as quantized_apply
from kure_jax.qat.linen import quantized_init as quantized_init
from kure_jax.qat.linen import rule_predicate as rule_predicate

__all__ = [
    "INPUT_STATE_NAMES",
    "KERNEL_STATE_NAMES",
    "LEARNED_QUANTIZERS",
    "QUANTIZABLE_LAYERS",
    "QUANTIZERS",
    "QUANT_COLLECTION",
    "QATConfig",
    "call_order",
    "init_quant_from_params",
    "is_quantizable",
    "layer_order",
    "quantized_apply",
    "quantized_init",
    "rule_predicate",
]
