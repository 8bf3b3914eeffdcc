"""Learning-rate schedules and optimizers built from a training config.

The optimizer acts on the *trainable* tree ``{"params": ..., "quant": ...}``: the model
weights and, under QAT, the learned quantizer steps. Weight decay comes from optax
(never added to the loss by hand) and touches only ``"params"``; like PyTorch's
``weight_decay``, which the paper's recipes use, it includes biases and BatchNorm scales.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

__all__ = ["make_optimizer", "make_schedule"]


def make_schedule(
    config: ml_collections.ConfigDict, *, steps_per_epoch: int, num_steps: int
) -> optax.Schedule:
    """The learning rate as a function of the step.

    ``config.schedule.name``: ``"constant"``; ``"cosine"`` (from ``learning_rate`` to 0 at
    ``num_steps``); ``"step"`` (multiply by ``gamma`` at each epoch in ``milestones``).
    A linear warmup from 0 over ``warmup_epochs`` precedes any of them.

    Args:
      config: a validated training config.
      steps_per_epoch: optimizer steps per epoch (converts epochs to steps).
      num_steps: total training steps.

    Returns:
      An ``optax.Schedule`` (jit-compatible: ``schedule(step) -> lr``).

    Raises:
      ValueError: for an unknown schedule name (lists the allowed ones).
    """
    base = float(config.learning_rate)
    spec = config.schedule
    warmup = round(spec.warmup_epochs * steps_per_epoch)
    if spec.name == "constant":
        main = optax.constant_schedule(base)
    elif spec.name == "cosine":
        main = optax.cosine_decay_schedule(base, decay_steps=max(1, num_steps - warmup))
    elif spec.name == "step":
        # join_schedules shifts the main schedule by the warmup; milestones are absolute epochs.
        boundaries = {
            max(1, round(m * steps_per_epoch) - warmup): float(spec.gamma) for m in spec.milestones
        }
        main = optax.piecewise_constant_schedule(base, boundaries)
    else:
        raise ValueError(
            f"config.schedule.name must be 'constant', 'cosine' or 'step'; got {spec.name!r}."
        )
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(0.0, base, transition_steps=warmup)
    return optax.join_schedules([ramp, main], boundaries=[warmup])


def _decay_mask(trainable: dict[str, Any]) -> dict[str, Any]:
    return {name: jax.tree.map(lambda _, n=name: n == "params", tree)
            for name, tree in trainable.items()}


def make_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer of ``config.optimizer`` with ``config.weight_decay``.

    * ``"sgd"``: PyTorch-style SGD, ``g + wd * w`` then (Nesterov) momentum.
    * ``"adam"``: Adam with L2 weight decay added to the gradient (PyTorch ``Adam``).
    * ``"adamw"``: decoupled weight decay (Loshchilov & Hutter), scaled by the schedule.

    Args:
      config: a validated training config.
      schedule: the learning rate schedule.

    Returns:
      An ``optax.GradientTransformation`` for the tree ``{"params": ..., "quant": ...}``.

    Raises:
      ValueError: for an unknown optimizer name (lists the allowed ones).
    """
    spec = config.optimizer
    decay = float(config.weight_decay)
    if spec.name == "adamw":
        return optax.adamw(
            schedule, b1=spec.b1, b2=spec.b2, eps=spec.eps, weight_decay=decay, mask=_decay_mask
        )
    if spec.name == "sgd":
        base = optax.sgd(schedule, momentum=spec.momentum or None, nesterov=spec.nesterov)
    elif spec.name == "adam":
        base = optax.adam(schedule, b1=spec.b1, b2=spec.b2, eps=spec.eps)
    else:
        raise ValueError(
            f"config.optimizer.name must be 'sgd', 'adam' or 'adamw'; got {spec.name!r}."
        )
    if decay == 0.0:
        return base
    return optax.chain(optax.add_decayed_weights(decay, mask=_decay_mask), base)
