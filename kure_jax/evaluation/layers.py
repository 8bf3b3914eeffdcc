"""Which kernels a sweep quantises: the sweep's ``layers`` rule resolved for one model.

``layers`` is read by :func:`kure_jax.selection.as_rule` (``"paper"``, ``"kernels"`` or a
``LayerRule``) and resolved by :meth:`~kure_jax.selection.LayerRule.where`, whose "first" and
"last" layers follow the call order of the model's forward pass
(:func:`kure_jax.selection.layer_order`): a Linen model's ``apply``, or the ``apply_fn`` of a
model known only by it (NNX, plain JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from kure_jax.evaluation._types import Target
from kure_jax.evaluation.forward import inference_kwargs
from kure_jax.qat.linen import rule_predicate
from kure_jax.selection import LayerRule, Selection, as_rule, select

__all__ = ["target_layers"]

PyTree = Any
Names = Callable[[PyTree], list[str]]


def target_layers(target: Target, layers: str | LayerRule) -> tuple[Selection, Names]:
    """The weight-PTQ selection of a target: ``target.where`` if set, else ``layers``.

    Returns:
      ``(where, names)``: the selection for ``quantize_params`` and a function giving the
      selected kernel paths of a params tree, e.g. ``["conv1/kernel"]``.

    Raises:
      ValueError: for an unknown ``layers`` name or a rule that selects no layer.
    """
    if target.where is not None:
        where = target.where
    else:
        rule = as_rule(layers)
        image_shape = tuple(target.dataset.image_shape)
        if target.apply_fn is None:
            where = rule_predicate(rule, target.model, image_shape,
                                   **inference_kwargs(target.model))
        else:
            variables, apply_fn = target.variables, target.apply_fn
            images = lambda: jnp.zeros((1, *image_shape), jnp.float32)  # traced: no memory
            where = rule.where(variables["params"], forward=lambda p: apply_fn(
                {**variables, "params": p}, images()))
    return where, lambda params: [name for name, _ in select(params, where)]
