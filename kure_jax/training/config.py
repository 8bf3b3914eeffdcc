"""Validation of training configs and the quantities derived from them.

A training config is an ``ml_collections.ConfigDict``; ``configs/mnist5k_kure.py``
documents every field. :func:`validate_config` checks the choices once, before
anything is built, so a typo fails with the allowed values instead of deep inside
``jit``.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import ml_collections

from kure_jax.kernels import IMPLS
from kure_jax.kurtosis import REDUCTIONS
from kure_jax.models import MODEL_NAMES
from kure_jax.selection import RULE_NAMES, as_rule
from kure_jax.training.multibit import check_options

__all__ = [
    "DTYPES",
    "OPTIMIZERS",
    "PARALLEL_MODES",
    "SCHEDULES",
    "SELECTIONS",
    "config_from_json",
    "config_to_json",
    "every_steps",
    "total_steps",
    "validate_config",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float32", "bfloat16")
PARALLEL_MODES = ("jit", "pmap")
SELECTIONS = RULE_NAMES  # read by kure_jax.selection.as_rule


def _choice(value: Any, allowed: tuple[str, ...], field: str) -> None:
    if value not in allowed:
        raise ValueError(f"config.{field} must be one of {list(allowed)}; got {value!r}.")


def _positive(value: Any, field: str, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"config.{field} must be a finite number {bound}; got {value!r}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every choice and range of a training config.

    Args:
      config: a training config (see ``configs/mnist5k_kure.py`` for the fields).

    Raises:
      ValueError: naming the field and its allowed values or range, for an unknown
        model, optimizer, schedule, dtype, parallel mode, KURE selection, reduction or
        penalty implementation,
        a non-positive size or rate, milestones that do not increase, or a batch size
        that is not divisible by the number of processes; for ``qat.bits`` with QAT off, or
        refused by :func:`kure_jax.training.multibit.width_qats` (learned quantizers, repeated
        or invalid widths), an unknown ``qat.multibit`` and ``qat.bn_per_bits`` without
        ``qat.bits``.
      AttributeError: if a required field is missing (``ml_collections``' message names it).
    """
    _choice(config.model, MODEL_NAMES, "model")
    # None (the default) or "" (configs written before it was a placeholder): a random init.
    if config.init_from is not None and not isinstance(config.init_from, str):
        raise ValueError(
            f"config.init_from must be a checkpoint path or None; got {config.init_from!r}."
        )
    _choice(config.optimizer.name, OPTIMIZERS, "optimizer.name")
    _choice(config.schedule.name, SCHEDULES, "schedule.name")
    _choice(config.dtype, DTYPES, "dtype")
    _choice(config.parallel, PARALLEL_MODES, "parallel")
    try:
        as_rule(config.kure.selection)
    except ValueError as error:
        raise ValueError(f"config.kure.selection: {error}") from None
    _choice(config.kure.reduction, REDUCTIONS, "kure.reduction")
    # Configs written before the field existed (e.g. in old checkpoints) mean "auto".
    _choice(config.kure.get("penalty_impl", "auto"), IMPLS, "kure.penalty_impl")
    for field in ("num_classes", "batch_size", "eval_batch_size", "log_every_steps"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{field} must be an integer >= 1; got {value!r}.")
    for field in ("checkpoint_every_steps", "eval_every_steps", "keep_checkpoints", "keep_best"):
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"config.{field} must be an integer >= 0; got {value!r}.")
    if config.keep_checkpoints < 1:
        raise ValueError("config.keep_checkpoints must be >= 1: resuming needs the latest one.")
    _positive(config.learning_rate, "learning_rate")
    _positive(config.weight_decay, "weight_decay", allow_zero=True)
    _positive(config.kure.lambda_, "kure.lambda_", allow_zero=True)
    _positive(config.schedule.warmup_epochs, "schedule.warmup_epochs", allow_zero=True)
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"config.label_smoothing must be in [0, 1); got {config.label_smoothing}.")
    if config.num_train_steps <= 0:
        _positive(config.num_epochs, "num_epochs (or set num_train_steps > 0)")
    if config.schedule.name == "step":
        milestones = list(config.schedule.milestones)
        if not milestones or any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(
                "config.schedule.milestones must be a non-empty increasing sequence of epochs "
                f"for the 'step' schedule; got {milestones}."
            )
        _positive(config.schedule.gamma, "schedule.gamma")
    _check_multibit(config)


def _check_multibit(config: ml_collections.ConfigDict) -> None:
    """``config.qat.bits``/``multibit``/``bn_per_bits`` (absent in configs older than them)."""
    from kure_jax.training.build import multibit_qat_configs  # build imports the step

    qat = config.qat
    bits = qat.get("bits", None)
    check_options(qat.get("multibit", "sum"), qat.get("bn_per_bits", False), bits is not None,
                  prefix="config.qat.")
    if bits is None:
        return
    if not qat.enabled:
        raise ValueError(f"config.qat.bits={bits!r} trains several bit widths, but "
                         "config.qat.enabled is False.")
    try:
        multibit_qat_configs(config)
    except ValueError as err:
        raise ValueError(f"config.qat.bits: {err}") from None


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``config.num_train_steps`` if positive, else ``ceil(num_epochs * steps_per_epoch)``."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return max(1, math.ceil(config.num_epochs * steps_per_epoch))


def every_steps(value: int, steps_per_epoch: int) -> int:
    """An ``*_every_steps`` field: ``0`` means once per epoch."""
    return value if value > 0 else steps_per_epoch


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as a JSON-compatible dict (tuples become lists), for checkpoints."""
    return json.loads(config.to_json())


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
    """Inverse of :func:`config_to_json` (lists stay lists)."""
    return ml_collections.ConfigDict(data)
