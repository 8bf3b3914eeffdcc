"""Deployment: integer weights you can ship, and accuracy measured in real runtimes.

* :mod:`~kure_jax.deploy.export`: the integer codes, steps and zero points of a
  ``QuantPolicy`` in one safetensors file (``export_integer_weights``,
  ``load_integer_weights``, ``dequantize``); ``python -m kure_jax.deploy.export``.
* :mod:`~kure_jax.deploy.litert`: jax2tf -> TFLite full-integer PTQ -> LiteRT interpreter.
* :mod:`~kure_jax.deploy.onnx_runtime`: jax2onnx -> ONNX Runtime ``quantize_static`` (QDQ).
* :mod:`~kure_jax.deploy.runtime`: ``RuntimeResult``, ``linen_inference`` (a Linen model as
  ``images -> logits``) and the helpers the backends share.

The runtime backends need optional packages (``pip install 'kure_jax[runtimes]'``:
``tensorflow-cpu``, ``ai-edge-litert``, ``jax2onnx``, ``onnxruntime``); importing this package
loads none of them, and a backend without its package raises one ImportError naming it.
"""

from kure_jax.deploy.export import IntegerWeights as IntegerWeights
from kure_jax.deploy.export import dequantize as dequantize
from kure_jax.deploy.export import export_integer_weights as export_integer_weights
from kure_jax.deploy.export import load_integer_weights as load_integer_weights
from kure_jax.deploy.runtime import RuntimeResult as RuntimeResult

__all__ = [
    "IntegerWeights",
    "RuntimeResult",
    "dequantize",
    "export_integer_weights",
    "load_integer_weights",
]
