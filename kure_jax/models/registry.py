"""Models by name, with their default input shapes."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kure_jax.models._base import Dtype
from kure_jax.models.mobilenet import MobileNetV2
from kure_jax.models.resnet import ResNet18, ResNet20, ResNet50
from kure_jax.models.small import SmallCNN

__all__ = ["MODEL_INPUT_SHAPES", "MODEL_NAMES", "get_model"]

_CONSTRUCTORS: Mapping[str, Callable[..., nn.Module]] = types.MappingProxyType({
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
    "resnet20": ResNet20,
    "small_cnn": SmallCNN,
})

MODEL_NAMES: tuple[str, ...] = tuple(_CONSTRUCTORS)

# Default (height, width, channels) of one input image per model.
MODEL_INPUT_SHAPES: Mapping[str, tuple[int, int, int]] = types.MappingProxyType({
    "resnet18": (224, 224, 3),
    "resnet50": (224, 224, 3),
    "mobilenet_v2": (224, 224, 3),
    "resnet20": (32, 32, 3),
    "small_cnn": (28, 28, 1),
})


def _model_class(constructor: Callable[..., nn.Module]) -> type[nn.Module]:
    return constructor.func if hasattr(constructor, "func") else constructor  # type: ignore[attr-defined]


def get_model(
    name: str, *, num_classes: int, dtype: Dtype = jnp.float32, **kwargs: Any
) -> nn.Module:
    """Builds a classifier by name.

    Args:
      name: one of ``MODEL_NAMES``: ``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"``,
        ``"resnet20"``, ``"small_cnn"``.
      num_classes: number of logits, >= 1.
      dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16``, ``"bfloat16"``, ...);
        parameters stay in ``param_dtype`` (float32 unless overridden in ``kwargs``).
      **kwargs: further fields of the model, e.g. ``zero_init_residual=True``,
        ``bn_axis_name="batch"``, ``dropout_rate=0.0``, ``conv=MyQuantConv``.

    Returns:
      An unbound Flax module; call ``model.init(key, x)`` with ``x`` of shape
      ``(batch, *MODEL_INPUT_SHAPES[name])``, then
      ``model.apply(variables, x, train=True, mutable=["batch_stats"])``.

    Raises:
      ValueError: for an unknown ``name`` or field, a non-floating ``dtype`` or an
        invalid field value (e.g. ``num_classes < 1``).
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"Unknown model {name!r}; allowed names: {list(MODEL_NAMES)}.")
    constructor = _CONSTRUCTORS[name]
    fields = sorted(
        f.name for f in dataclasses.fields(_model_class(constructor))
        if f.name not in ("parent", "name", "num_classes", "dtype")
    )
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}; allowed: {fields}.")
    try:
        floating = dtype is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise ValueError(
            f"dtype must be a floating dtype (e.g. float32, bfloat16, float16); got {dtype!r}."
        )
    return constructor(num_classes=num_classes, dtype=jnp.dtype(dtype), **kwargs)
