"""Fields and helpers shared by every classifier in :mod:`kure_jax.models`.

Conventions every model follows (later code relies on them):

* NHWC inputs, logits ``(batch, num_classes)`` returned in float32.
* ``dtype`` is the compute dtype; parameters and batch statistics are stored in
  ``param_dtype`` (float32 by default) and BatchNorm reductions run in float32.
* The first conv is the submodule ``stem_conv`` and the classifier is ``head``, so
  their weights are ``params["stem_conv"]["kernel"]`` and ``params["head"]["kernel"]``.
  Every conv/dense weight leaf is named ``kernel``. ``stem_conv`` is the first
  module called and ``head`` the last, so insertion order also identifies them.
* BatchNorm statistics live in the ``batch_stats`` collection; ``train=True`` uses
  and updates batch statistics (apply with ``mutable=["batch_stats"]``),
  ``train=False`` uses the running averages and updates nothing.
* Convs use symmetric ``kernel // 2`` padding (PyTorch's convention, so that
  torchvision weights map one to one) and no bias (BatchNorm follows each conv).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any
Activation = Callable[[jax.Array], jax.Array]

STEM_NAME = "stem_conv"
HEAD_NAME = "head"

# He et al. (2015) init for ReLU nets, fan-out as in torchvision's ResNet/MobileNet.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_images(x: jax.Array, model_name: str) -> None:
    """Raises ValueError unless ``x`` is a rank-4 NHWC batch (static shape check)."""
    if x.ndim != 4:
        raise ValueError(
            f"{model_name} expects NHWC images of rank 4 (batch, height, width, channels); "
            f"got shape {tuple(x.shape)}."
        )


class Classifier(nn.Module, kw_only=True):
    """Base fields of an image classifier (all keyword-only).

    Attributes:
      num_classes: number of logits, >= 1.
      dtype: compute dtype of convs, dense layers and normalisation outputs
        (e.g. ``jnp.bfloat16``); logits are cast to float32 at the end.
      param_dtype: storage dtype of parameters and batch statistics.
      conv: conv layer class (``nn.Conv`` or a drop-in, e.g. a fake-quantised conv).
      dense: dense layer class (``nn.Dense`` or a drop-in).
      norm: normalisation layer class, called like ``nn.BatchNorm``.
      bn_momentum: running-average decay, ``new = momentum * old + (1 - momentum) * batch``
        (0.9 is PyTorch's ``momentum=0.1``).
      bn_epsilon: BatchNorm epsilon (PyTorch's default 1e-5).
      bn_axis_name: mapped axis over which BatchNorm averages statistics under
        ``pmap``/``shard_map``; ``None`` under ``jit`` with sharded arrays (XLA then
        reduces over the global batch by itself).
    """

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = nn.BatchNorm
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or (
            self.num_classes < 1
        ):
            raise ValueError(
                f"num_classes must be an integer >= 1; got {self.num_classes!r}."
            )
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1); got {self.bn_momentum!r}.")
        super().__post_init__()

    def layer_factories(self, train: bool) -> tuple[ModuleDef, ModuleDef, ModuleDef]:
        """The ``(conv, norm, dense)`` constructors with dtypes and train mode bound."""
        conv = functools.partial(
            self.conv,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=conv_kernel_init,
        )
        norm = functools.partial(
            self.norm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
        )
        dense = functools.partial(self.dense, dtype=self.dtype, param_dtype=self.param_dtype)
        return conv, norm, dense

    def classify(self, x: jax.Array, dense: ModuleDef) -> jax.Array:
        """Final ``head`` dense layer; returns float32 logits ``(batch, num_classes)``."""
        logits = dense(self.num_classes, name=HEAD_NAME)(x)
        return jnp.asarray(logits, jnp.float32)


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric PyTorch-style padding ``kernel_size // 2`` on both spatial axes."""
    p = kernel_size // 2
    return ((p, p), (p, p))

