"""Quantization-aware training of a model without editing it.

* :mod:`~kure_jax.qat.config`: :class:`QATConfig`, the quantizers and the ``"quant"`` state.
* :mod:`~kure_jax.qat.layer`: what QAT does to one layer's kernel and input (framework-neutral).
* :mod:`~kure_jax.qat.linen`: Flax Linen models, by method interception
  (``quantized_init``, ``quantized_apply``, ``init_quant_from_params``).
* :mod:`~kure_jax.qat.nnx`: Flax NNX models, changed in place (``quantize_model``).

A *quantizer* is a QAT method (``QATConfig.weight_quantizer`` / ``act_quantizer``: one of
``QUANTIZERS``); the layers it applies to are ``QATConfig.layers``, a
:class:`~kure_jax.LayerRule`.
"""

from kure_jax.qat import nnx as nnx
from kure_jax.qat.config import QUANT_COLLECTION as QUANT_COLLECTION
from kure_jax.qat.config import QUANTIZERS as QUANTIZERS
from kure_jax.qat.config import QATConfig as QATConfig
from kure_jax.qat.linen import init_quant_from_params as init_quant_from_params
from kure_jax.qat.linen import quantized_apply as quantized_apply
from kure_jax.qat.linen import quantized_init as quantized_init

__all__ = [
    "QUANTIZERS",
    "QUANT_COLLECTION",
    "QATConfig",
    "init_quant_from_params",
    "nnx",
    "quantized_apply",
    "quantized_init",
]
