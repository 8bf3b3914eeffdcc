"""ResNets (He et al., 2016) for ImageNet (ResNet-18/50) and CIFAR (ResNet-20).

Layouts match torchvision's ``resnet18``/``resnet50`` (ResNet v1.5: a bottleneck
block downsamples in its 3x3 conv), so parameter counts are identical at 1000
classes: 11,689,512 and 25,557,032 (BatchNorm scale/bias included, running
statistics excluded since they live in ``batch_stats``).

Parameter names (``params`` collection)::

    stem_conv/kernel, stem_norm/{scale,bias}
    stage{s}_block{b}/conv{1,2[,3]}/kernel, stage{s}_block{b}/norm{1,2[,3]}/{scale,bias}
    stage{s}_block{b}/proj_conv/kernel, .../proj_norm/{scale,bias}   (when the shape changes)
    head/{kernel,bias}

with ``s`` and ``b`` counted from 1.

References:
  He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016.
  Goyal et al. "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017
  (zero-initialised last BatchNorm scale in each residual block).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

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

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet50",
]

_STEMS = ("imagenet", "cifar")


def _last_norm(norm: ModuleDef, zero_init: bool, name: str) -> nn.Module:
    # A zero scale makes the block start as the identity (Goyal et al., 2017).
    if zero_init:
        return norm(name=name, scale_init=nn.initializers.zeros)
    return norm(name=name)


def _shortcut(
    x: jax.Array, out_channels: int, strides: int, conv: ModuleDef, norm: ModuleDef
) -> jax.Array:
    """Identity, or a strided 1x1 conv + norm projection when the shape changes."""
    if strides == 1 and x.shape[-1] == out_channels:
        return x
    x = conv(out_channels, (1, 1), strides=(strides, strides), padding="VALID", name="proj_conv")(x)
    return norm(name="proj_norm")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; ``filters`` output channels.

    Attributes:
      filters: output channels of both convs.
      conv: conv constructor with dtype/bias already bound (see ``Classifier``).
      norm: norm constructor with train mode already bound.
      act: activation.
      strides: stride of the first conv (and of the projection shortcut).
      zero_init_last_norm: initialise ``norm2``'s scale to zero.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Activation = nn.relu
    strides: int = 1
    zero_init_last_norm: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(N, H, W, C)`` to ``(N, H / strides, W / strides, filters)``."""
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), strides=s, padding=padding(3), name="conv1")(x)
        y = self.act(self.norm(name="norm1")(y))
        y = self.conv(self.filters, (3, 3), padding=padding(3), name="conv2")(y)
        y = _last_norm(self.norm, self.zero_init_last_norm, "norm2")(y)
        residual = _shortcut(x, self.filters, self.strides, self.conv, self.norm)
        return self.act(y + residual)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand to ``4 * filters`` channels.

    Attributes: as :class:`BasicBlock`; the output has ``4 * filters`` channels and
    ``norm3`` is the last norm.
    """

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Activation = nn.relu
    strides: int = 1
    zero_init_last_norm: bool = False

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``(N, H, W, C)`` to ``(N, H / strides, W / strides, 4 * filters)``."""
        out_channels = self.filters * self.expansion
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = self.act(self.norm(name="norm1")(y))
        y = self.conv(self.filters, (3, 3), strides=s, padding=padding(3), name="conv2")(y)
        y = self.act(self.norm(name="norm2")(y))
        y = self.conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
        y = _last_norm(self.norm, self.zero_init_last_norm, "norm3")(y)
        residual = _shortcut(x, out_channels, self.strides, self.conv, self.norm)
        return self.act(y + residual)


class ResNet(Classifier, kw_only=True):
    """A ResNet classifier (keyword-only fields; see ``Classifier`` for the shared ones).

    Attributes:
      stage_sizes: number of blocks per stage, e.g. ``(2, 2, 2, 2)``.
      block_cls: :class:`BasicBlock` or :class:`BottleneckBlock`.
      stage_widths: ``filters`` of each stage's blocks; same length as ``stage_sizes``.
        Every stage after the first halves the resolution in its first block.
      stem: ``"imagenet"`` (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or ``"cifar"``
        (3x3/1 conv, BN, ReLU; no pooling). The stem conv has ``stage_widths[0]`` filters.
      zero_init_residual: initialise the last BatchNorm scale of every block to zero
        (Goyal et al., 2017). Default ``False``, as torchvision and the KURE reference.
      act: activation.
    """

    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    zero_init_residual: bool = False
    act: Activation = nn.relu

    def __post_init__(self) -> None:
        if self.stem not in _STEMS:
            raise ValueError(f"stem must be one of {_STEMS}; got {self.stem!r}.")
        if len(self.stage_sizes) != len(self.stage_widths) or not self.stage_sizes:
            raise ValueError(
                "stage_sizes and stage_widths must be non-empty and of equal length; got "
                f"{tuple(self.stage_sizes)} and {tuple(self.stage_widths)}."
            )
        if any(n < 1 for n in self.stage_sizes):
            raise ValueError(f"every stage needs >= 1 block; got {tuple(self.stage_sizes)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Classifies a batch of images.

        Args:
          x: ``(batch, height, width, channels)`` images, any float dtype.
          train: use and update batch statistics (apply with ``mutable=["batch_stats"]``)
            instead of the running averages.

        Returns:
          float32 logits of shape ``(batch, num_classes)``.

        Raises:
          ValueError: if ``x`` is not rank 4.
        """
        check_images(x, type(self).__name__)
        conv, norm, dense = self.layer_factories(train)
        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = conv(self.stage_widths[0], (7, 7), strides=(2, 2), padding=padding(7),
                     name=STEM_NAME)(x)
            x = self.act(norm(name="stem_norm")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding(3))
        else:
            x = conv(self.stage_widths[0], (3, 3), padding=padding(3), name=STEM_NAME)(x)
            x = self.act(norm(name="stem_norm")(x))
        for s, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths,
                                                    strict=True)):
            for b in range(num_blocks):
                x = self.block_cls(
                    filters=width,
                    conv=conv,
                    norm=norm,
                    act=self.act,
                    strides=2 if s > 0 and b == 0 else 1,
                    zero_init_last_norm=self.zero_init_residual,
                    name=f"stage{s + 1}_block{b + 1}",
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.classify(x, dense)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet18.__doc__ = "ResNet-18 for 224x224 ImageNet images (11,689,512 params at 1000 classes)."

ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
ResNet50.__doc__ = "ResNet-50 v1.5 for 224x224 ImageNet images (25,557,032 params at 1000 classes)."

ResNet20 = functools.partial(
    ResNet, stage_sizes=(3, 3, 3), stage_widths=(16, 32, 64), block_cls=BasicBlock, stem="cifar"
)
ResNet20.__doc__ = (
    "ResNet-20 for 32x32 CIFAR images: 3 stages of 16/32/64 channels, 3 basic blocks each. "
    "Unlike He et al.'s option-A (zero-padding) shortcuts, the two downsampling blocks use "
    "1x1 conv + BN projections (option B): 272,474 params at 10 classes instead of 269,722."
)
