"""Building the model, QAT settings and step settings a training config describes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from kure_jax import QATConfig
from kure_jax.models import get_model
from kure_jax.qat.linen import rule_predicate
from kure_jax.selection import LayerRule, LeafPredicate, as_rule
from kure_jax.training.multibit import MULTIBIT_FIELDS
from kure_jax.training.step import StepConfig

__all__ = [
    "build_model",
    "kure_selection",
    "multibit_bits",
    "multibit_qat_configs",
    "multibit_widths",
    "qat_config",
    "step_config",
]

PyTree = Any


def build_model(config: ml_collections.ConfigDict, *, axis_name: str | None) -> nn.Module:
    """The classifier of ``config.model`` in ``config.dtype``.

    Args:
      config: a training config.
      axis_name: BatchNorm's cross-device axis (``"batch"`` under ``pmap``, else ``None``).

    Returns:
      An unbound Flax module with the fields in ``config.model_options`` (e.g.
      ``features``/``hidden`` of ``small_cnn``).

    Raises:
      ValueError: for an unknown model name, option or dtype (from
        :func:`kure_jax.models.get_model`, which lists the allowed ones).
    """
    options = config.model_options.to_dict() if "model_options" in config else {}
    # JSON (checkpointed configs) turns tuples into lists; module fields should be hashable.
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return get_model(
        config.model,
        num_classes=config.num_classes,
        dtype=jnp.dtype(config.dtype),
        bn_axis_name=axis_name,
        **options,
    )


def qat_config(
    config: ml_collections.ConfigDict, *, kernel_impl: str | None = None
) -> QATConfig | None:
    """A :class:`kure_jax.QATConfig` from ``config.qat`` if ``enabled``, else ``None``.

    Every field of ``config.qat`` except ``enabled`` and the multi-bit ones (``bits``,
    ``multibit``, ``bn_per_bits``: :func:`step_config`'s) is passed to ``QATConfig``, which
    validates them (ValueError with the allowed values). With ``config.qat.bits`` set this is
    the template of every width (:func:`multibit_qat_configs` gives them). ``kernel_impl``, if
    given, replaces ``config.qat.kernel_impl``: which kernels run is a choice for the machine
    at hand (a checkpoint trained with ``"pallas"`` on a GPU would run interpreted kernels on a
    CPU), and
    the values do not depend on it.
    """
    if not config.qat.enabled:
        return None
    fields = {k: v for k, v in config.qat.to_dict().items()
              if k != "enabled" and k not in MULTIBIT_FIELDS}
    if kernel_impl is not None:
        fields["kernel_impl"] = kernel_impl
    return QATConfig(**fields)


def multibit_bits(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """``config.qat.bits`` as a tuple (JSON configs hold a list), or ``None`` for one width.

    ``None`` also for a config without the field (written before it existed) or with QAT off.
    """
    bits = config.qat.get("bits", None)
    if bits is None or not config.qat.enabled:
        return None
    return tuple(bits) if isinstance(bits, list | tuple) else bits  # a scalar: refused later


def multibit_qat_configs(
    config: ml_collections.ConfigDict, *, kernel_impl: str | None = None
) -> dict[int, QATConfig]:
    """``{bits: QATConfig}`` of every width of a multi-bit config; ``{}`` for one width.

    Raises:
      ValueError: as :func:`kure_jax.training.multibit.width_qats` (e.g. learned quantizers).
    """
    from kure_jax.training.multibit import width_qats

    bits = multibit_bits(config)
    if bits is None:
        return {}
    return dict(width_qats(qat_config(config, kernel_impl=kernel_impl), bits))


def multibit_widths(
    config: ml_collections.ConfigDict, batch_stats: PyTree, *, kernel_impl: str | None = None
) -> dict[int, tuple[QATConfig, PyTree]]:
    """``{bits: (QATConfig, batch_stats)}``: how a multi-bit checkpoint runs at each width.

    Args:
      config: the checkpoint's training config.
      batch_stats: its ``"batch_stats"``: keyed by width (``"w8"``, ...) with
        ``config.qat.bn_per_bits``, else the shared statistics.
      kernel_impl: as in :func:`qat_config`.

    Returns:
      One entry per trained width (the order of ``config.qat.bits``): its ``QATConfig``
      (:func:`multibit_qat_configs`) and the BatchNorm statistics it uses
      (:func:`kure_jax.training.multibit.batch_stats_at`); ``{}`` for a single-width config.

    Raises:
      ValueError: as :func:`multibit_qat_configs`.
      KeyError: with ``bn_per_bits``, if ``batch_stats`` lacks a width.
    """
    from kure_jax.training.multibit import batch_stats_at

    qats = multibit_qat_configs(config, kernel_impl=kernel_impl)
    per_bits = bool(config.qat.get("bn_per_bits", False))
    return {b: (q, batch_stats_at(batch_stats, b, per_bits=per_bits)) for b, q in qats.items()}


def kure_selection(
    config: ml_collections.ConfigDict, model: nn.Module, input_shape: Sequence[int]
) -> LeafPredicate | None:
    """``config.kure.selection`` as a predicate for :func:`kure_jax.penalty`.

    The value is read by :func:`kure_jax.selection.as_rule`: ``"kernels"`` -> ``None`` (every
    conv/dense kernel); ``"paper"`` or another rule -> the rule resolved in the call order of
    an abstract ``model.init`` (:func:`kure_jax.qat.linen.rule_predicate`).

    Args:
      config: a training config.
      model: the Flax classifier.
      input_shape: ``(height, width, channels)`` of one image.

    Raises:
      ValueError: for another selection name, or if the rule leaves no layer.
    """
    rule = as_rule(config.kure.selection)
    if rule == LayerRule():
        return None
    return rule_predicate(rule, model, input_shape, train=False)


def step_config(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    axis_name: str | None,
) -> StepConfig:
    """The :class:`StepConfig` of a training config (see :func:`kure_selection`).

    ``config.qat.bits``/``multibit``/``bn_per_bits`` become ``StepConfig.qat_bits``/
    ``multibit``/``bn_per_bits`` (ignored without ``bits`` or with QAT off, where
    :func:`~kure_jax.training.config.validate_config` refuses them).

    Raises:
      ValueError: as :class:`StepConfig` (e.g. multi-bit QAT with learned quantizers).
    """
    return StepConfig(
        num_classes=config.num_classes,
        kure_lambda=float(config.kure.lambda_),
        kure_target=float(config.kure.target),
        kure_where=kure_selection(config, model, input_shape),
        kure_reduction=config.kure.reduction,
        penalty_impl=config.kure.get("penalty_impl", "auto"),  # absent from older configs
        label_smoothing=float(config.label_smoothing),
        qat=qat_config(config),
        axis_name=axis_name,
        qat_bits=multibit_bits(config),
        # Absent from configs written before multi-bit QAT: one width, shared BatchNorm.
        multibit=config.qat.get("multibit", "sum"),
        bn_per_bits=multibit_bits(config) is not None and config.qat.get("bn_per_bits", False),
    )
