"""Flax Linen image classifiers: ResNet-18/50/20, MobileNet-V2 and a small MNIST CNN.

All models take NHWC images, keep BatchNorm statistics in the ``batch_stats``
collection, compute in ``dtype`` with float32 parameters, return float32 logits,
and name their first conv ``stem_conv`` and their classifier ``head``. Every model of
``MODEL_NAMES`` (ResNet-20 included) is built by :func:`get_model`.
"""

from kure_jax.models.mobilenet import MobileNetV2 as MobileNetV2
from kure_jax.models.registry import MODEL_INPUT_SHAPES as MODEL_INPUT_SHAPES
from kure_jax.models.registry import MODEL_NAMES as MODEL_NAMES
from kure_jax.models.registry import get_model as get_model
from kure_jax.models.resnet import ResNet as ResNet
from kure_jax.models.resnet import ResNet18 as ResNet18
from kure_jax.models.resnet import ResNet50 as ResNet50
from kure_jax.models.small import SmallCNN as SmallCNN

__all__ = [
    "MODEL_INPUT_SHAPES",
    "MODEL_NAMES",
    "MobileNetV2",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "SmallCNN",
    "get_model",
]
