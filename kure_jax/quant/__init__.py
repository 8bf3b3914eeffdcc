"""Uniform quantisation: fake-quant ops, the DoReFa / learned-clip quantizers, policies, PTQ.

* :mod:`~kure_jax.quant.ops`: ``fake_quant`` (STE + LSQ gradients; jnp or the Pallas kernels of
  :mod:`kure_jax.kernels` by ``impl``), rounding modes, code ranges.
* :mod:`~kure_jax.quant.quantizers`: DoReFa weights/activations, the reference's learned clip.
* :mod:`~kure_jax.quant.policy`: ``QuantPolicy`` and how a step is chosen (clip methods).
* :mod:`~kure_jax.quant.ptq`: ``quantize_params``, post-training quantisation of a pytree.
* :mod:`~kure_jax.quant.nested`: Matryoshka codes, the top bits of int8 codes as a model.

Layers import downward only: ``ops`` <- ``quantizers``, ``policy`` <- ``ptq``.

Words: a *policy* (:class:`QuantPolicy`) is a post-training quantisation configuration (bits,
axes, clip method, rounding); a *clip method* is how a policy picks its step; a *quantizer* is a
QAT method (DoReFa, learned clip, LSQ: :mod:`~kure_jax.quant.quantizers`, chosen by
``kure_jax.QATConfig``).
"""

from kure_jax.quant.ops import fake_quant as fake_quant
from kure_jax.quant.policy import QuantPolicy as QuantPolicy
from kure_jax.quant.policy import compute_step as compute_step
from kure_jax.quant.policy import quantize as quantize
from kure_jax.quant.ptq import quantize_params as quantize_params
from kure_jax.quant.quantizers import dorefa_activation as dorefa_activation
from kure_jax.quant.quantizers import dorefa_weight as dorefa_weight
from kure_jax.quant.quantizers import learned_clip_quant as learned_clip_quant

__all__ = [
    "QuantPolicy",
    "compute_step",
    "dorefa_activation",
    "dorefa_weight",
    "fake_quant",
    "learned_clip_quant",
    "quantize",
    "quantize_params",
]
