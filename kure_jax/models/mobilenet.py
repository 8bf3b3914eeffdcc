"""MobileNet-V2 (Sandler et al., 2018) with torchvision's layout.

At width 1.0 and 1000 classes it has 3,504,872 parameters, like torchvision's
``mobilenet_v2``. Parameter names (``params`` collection)::

    stem_conv/kernel, stem_norm/{scale,bias}                   3x3/2 conv, 32 channels
    block{i}/expand_conv/kernel, block{i}/expand_norm/...      1x1, absent when t == 1
    block{i}/depthwise_conv/kernel, block{i}/depthwise_norm/...
    block{i}/project_conv/kernel, block{i}/project_norm/...    linear bottleneck
    last_conv/kernel, last_norm/{scale,bias}                   1x1 to 1280 channels
    head/{kernel,bias}

with ``i`` = 1..17 in call order. Depthwise kernels have shape ``(3, 3, 1, C)``.

References:
  Sandler, Howard, Zhu, Zhmoginov, Chen. "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from kure_jax.models._base import (
    STEM_NAME,
    Activation,
    Classifier,
    ModuleDef,
    check_images,
    padding,
)

__all__ = ["InvertedResidual", "MobileNetV2", "make_divisible"]

# (expand ratio t, output channels c, repeats n, first stride s) from the paper's Table 2.
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds ``value`` to the nearest multiple of ``divisor``, never below 90% of it.

    The channel rounding of the reference MobileNet implementations, so that widths
    other than 1.0 give the same channel counts as torchvision.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3, strided) -> project (1x1, linear) [+ identity].

    Attributes:
      out_channels: channels after the linear projection.
      strides: depthwise stride; the identity shortcut is used only when ``strides == 1``
        and the input already has ``out_channels`` channels.
      expand_ratio: hidden width as a multiple of the input width; 1 skips the expansion.
      conv: conv constructor with dtype/bias bound.
      norm: norm constructor with train mode bound.
      act: activation after expansion and depthwise convs (ReLU6).
    """

    out_channels: int
    strides: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef
    act: Activation = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(N, H, W, C)`` to ``(N, H / strides, W / strides, out_channels)``."""
        in_channels = x.shape[-1]
        hidden = in_channels * self.expand_ratio
        y = x
        if self.expand_ratio != 1:
            y = self.conv(hidden, (1, 1), padding="VALID", name="expand_conv")(y)
            y = self.act(self.norm(name="expand_norm")(y))
        y = self.conv(
            hidden,
            (3, 3),
            strides=(self.strides, self.strides),
            padding=padding(3),
            feature_group_count=hidden,
            name="depthwise_conv",
        )(y)
        y = self.act(self.norm(name="depthwise_norm")(y))
        y = self.conv(self.out_channels, (1, 1), padding="VALID", name="project_conv")(y)
        y = self.norm(name="project_norm")(y)
        if self.strides == 1 and in_channels == self.out_channels:
            y = y + x
        return y


class MobileNetV2(Classifier, kw_only=True):
    """MobileNet-V2 classifier (keyword-only fields; see ``Classifier`` for the shared ones).

    Attributes:
      width_mult: channel multiplier (1.0 is the standard network).
      round_nearest: channel counts are rounded to multiples of this.
      last_channels: channels of the final 1x1 conv at ``width_mult <= 1`` (1280).
      dropout_rate: dropout before ``head`` in train mode (torchvision uses 0.2).
        When it is > 0, ``apply(..., train=True)`` needs ``rngs={"dropout": key}``.
      act: activation (ReLU6).
    """

    width_mult: float = 1.0
    round_nearest: int = 8
    last_channels: int = 1280
    dropout_rate: float = 0.2
    act: Activation = nn.relu6

    def __post_init__(self) -> None:
        if not self.width_mult > 0:
            raise ValueError(f"width_mult must be > 0; got {self.width_mult!r}.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {self.dropout_rate!r}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Classifies a batch of images.

        Args:
          x: ``(batch, height, width, channels)`` images (224x224x3 for ImageNet).
          train: use and update batch statistics (apply with ``mutable=["batch_stats"]``)
            and apply dropout.

        Returns:
          float32 logits of shape ``(batch, num_classes)``.

        Raises:
          ValueError: if ``x`` is not rank 4, or if ``train`` and ``dropout_rate > 0``
            but no ``"dropout"`` rng was passed to ``apply``.
        """
        check_images(x, type(self).__name__)
        if train and self.dropout_rate > 0 and not self.has_rng("dropout"):
            raise ValueError(
                f"MobileNetV2 with dropout_rate={self.dropout_rate} needs "
                "apply(..., rngs={'dropout': key}) when train=True (or set dropout_rate=0)."
            )
        conv, norm, dense = self.layer_factories(train)
        x = jnp.asarray(x, self.dtype)

        def width(channels: int) -> int:
            return make_divisible(channels * self.width_mult, self.round_nearest)

        x = conv(width(32), (3, 3), strides=(2, 2), padding=padding(3), name=STEM_NAME)(x)
        x = self.act(norm(name="stem_norm")(x))
        index = 0
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                index += 1
                x = InvertedResidual(
                    out_channels=width(c),
                    strides=s if i == 0 else 1,
                    expand_ratio=t,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    name=f"block{index}",
                )(x)
        last = make_divisible(self.last_channels * max(1.0, self.width_mult), self.round_nearest)
        x = conv(last, (1, 1), padding="VALID", name="last_conv")(x)
        x = self.act(norm(name="last_norm")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.classify(x, dense)
