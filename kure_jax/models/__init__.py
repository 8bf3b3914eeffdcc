"""Flax Linen image classifiers: ResNet-18/50/20, MobileNet-V2 and a small MNIST CNN.

All models take NHWC images, keep BatchNorm statistics in the ``batch_stats``
collection, compute in ``dtype`` with float32 parameters, return float32 logits,
and name their first conv ``stem_conv`` and their classifier ``head``.
"""

from kure_jax.models._base import HEAD_NAME, STEM_NAME, Classifier, ModuleDef
from kure_jax.models.mobilenet import InvertedResidual, MobileNetV2
from kure_jax.models.registry import MODEL_INPUT_SHAPES, MODEL_NAMES, get_model
from kure_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet, ResNet18, ResNet20, ResNet50
from kure_jax.models.small import SmallCNN

__all__ = [
    "HEAD_NAME",
    "MODEL_INPUT_SHAPES",
    "MODEL_NAMES",
    "STEM_NAME",
    "BasicBlock",
    "BottleneckBlock",
    "Classifier",
    "InvertedResidual",
    "MobileNetV2",
    "ModuleDef",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "ResNet50",
    "SmallCNN",
    "get_model",
]
