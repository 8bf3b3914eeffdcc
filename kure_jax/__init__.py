"""kure_jax: KURE kurtosis regularisation and quantization-robustness tools for JAX/Flax.

The names below are the public API of the paper's workflow (``docs/api.md`` lists every
package's): the KURE penalty and its optax transform, the layer selection rule, fake
quantisation and post-training quantisation, quantization-aware training, and the theory of
uniform quantisation noise. The subpackages (``kure_jax.quant``, ``qat``, ``models``, ``data``,
``training``, ``evaluation``, ``deploy``, ``kernels``) each choose their public names in their
``__init__``'s ``__all__``; their modules are the implementation.

Reference: M. Shkolnik et al., "Robust Quantization: One Model to Rule Them All",
NeurIPS 2020 (arXiv:2002.07686).
"""

from kure_jax import theory as theory
from kure_jax.kurtosis import UNIFORM_KURTOSIS as UNIFORM_KURTOSIS
from kure_jax.kurtosis import add_penalty as add_penalty
from kure_jax.kurtosis import kurtosis as kurtosis
from kure_jax.kurtosis import kurtosis_report as kurtosis_report
from kure_jax.kurtosis import penalty as penalty
from kure_jax.qat import QATConfig as QATConfig
from kure_jax.qat import init_quant_from_params as init_quant_from_params
from kure_jax.qat import quantized_apply as quantized_apply
from kure_jax.qat import quantized_init as quantized_init
from kure_jax.quant import QuantPolicy as QuantPolicy
from kure_jax.quant import fake_quant as fake_quant
from kure_jax.quant import quantize as quantize
from kure_jax.quant import quantize_params as quantize_params
from kure_jax.selection import PAPER_LAYERS as PAPER_LAYERS
from kure_jax.selection import LayerRule as LayerRule
from kure_jax.selection import select as select

__version__ = "0.1.0"

__all__ = [
    "PAPER_LAYERS",
    "UNIFORM_KURTOSIS",
    "LayerRule",
    "QATConfig",
    "QuantPolicy",
    "add_penalty",
    "fake_quant",
    "init_quant_from_params",
    "kurtosis",
    "kurtosis_report",
    "penalty",
    "quantize",
    "quantize_params",
    "quantized_apply",
    "quantized_init",
    "select",
    "theory",
]
