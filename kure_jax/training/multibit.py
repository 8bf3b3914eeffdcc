"""Multi-bit QAT: one set of float shadow weights trained at several bit widths at once.

The training step (:func:`kure_jax.training.make_train_step` with ``StepConfig.qat_bits``) runs
the model fake-quantised at every width of ``qat_bits`` (``multibit="sum"``) or at one width
drawn per step (``"sample"``), as Any-Precision DNNs (Yu et al., AAAI 2021: DoReFa quantizers,
switchable BatchNorm) and Matryoshka Quantization (Nair et al., ICML 2025: the ``"matryoshka"``
quantizer, int8 codes whose top bits are the int4/int2 models) do. This module holds what the
step, the state and the config validation share:

* :func:`width_qats`: the :class:`~kure_jax.QATConfig` of each width, from a single-width
  template whose ``weight_bits``/``act_bits`` that are not ``None`` are replaced by the width
  (``None`` stays float), and the one error for quantizers with learned state.
* :func:`width_key`: the name of a width in metrics and in per-width BatchNorm statistics,
  ``"w8"``; with ``bn_per_bits`` the state's ``batch_stats`` is ``{"w8": stats, "w4": ...}``
  (:func:`per_width_batch_stats`), a plain pytree that Orbax saves like any other.
* :func:`sample_width_index`: the width of a ``"sample"`` step, a pure function of the state's
  RNG key and step (so every device of a data-parallel step and a resumed run agree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kure_jax import QATConfig
from kure_jax.qat.config import LEARNED_QUANTIZERS

__all__ = [
    "MULTIBIT_FIELDS",
    "MULTIBIT_MODES",
    "batch_stats_at",
    "check_options",
    "per_width_batch_stats",
    "sample_width_index",
    "width_key",
    "width_qats",
]

PyTree = Any

# "sum": one forward per width, loss = the sum of their cross-entropies (Any-Precision sums);
# "sample": one width per step, drawn uniformly from the step's RNG.
MULTIBIT_MODES: tuple[str, ...] = ("sum", "sample")
# The fields of a training config's ``qat`` that are the step's, not ``QATConfig``'s.
MULTIBIT_FIELDS: tuple[str, ...] = ("bits", "multibit", "bn_per_bits")
# Folded into the step's key to draw the width: the dropout key of the step stays unchanged.
_SAMPLE_SALT = 0x6D62  # "mb"


def check_options(multibit: Any, bn_per_bits: Any, has_bits: bool, *, prefix: str = "") -> None:
    """Checks the multi-bit options of a step or training config (one place for both).

    Args:
      multibit: a :data:`MULTIBIT_MODES` name.
      bn_per_bits: whether BatchNorm statistics are kept per width (a bool).
      has_bits: whether the bit widths (``qat_bits`` / ``config.qat.bits``) are set.
      prefix: prepended to the field names in the messages, e.g. ``"config.qat."``.

    Raises:
      ValueError: naming the field, for an unknown mode, a non-bool ``bn_per_bits``, or
        ``bn_per_bits`` without bit widths.
    """
    if multibit not in MULTIBIT_MODES:
        raise ValueError(f"{prefix}multibit must be one of {MULTIBIT_MODES}; got {multibit!r}.")
    if not isinstance(bn_per_bits, bool):
        raise ValueError(f"{prefix}bn_per_bits must be True or False; got {bn_per_bits!r}.")
    if bn_per_bits and not has_bits:
        widths = f"{prefix}bits" if prefix else "qat_bits"
        raise ValueError(f"{prefix}bn_per_bits keeps BatchNorm statistics per bit width: it "
                         f"needs {widths} (e.g. (8, 4, 2)) too.")


def width_key(bits: int) -> str:
    """``"w8"`` for 8 bits: the width's name in metrics (``accuracy_w8``) and batch_stats."""
    return f"w{bits}"


def width_qats(qat: QATConfig, bits: Sequence[int]) -> tuple[tuple[int, QATConfig], ...]:
    """``((b, qat at b), ...)`` for every width ``b`` of ``bits``, in the given order.

    At width ``b``, ``weight_bits`` and ``act_bits`` become ``b`` where they are not ``None``;
    a ``None`` one stays float (``act_bits=None``: weight-only multi-bit, as Matryoshka
    Quantization). Every other field is ``qat``'s.

    Args:
      qat: the single-width template.
      bits: a non-empty sequence of distinct ints in [2, 16] (e.g. ``(8, 4, 2)``; a list from a
        JSON config is fine).

    Returns:
      A tuple of ``(int, QATConfig)`` pairs.

    Raises:
      ValueError: for an empty or repeated ``bits``, a width outside [2, 16] (or above
        ``nest_bits`` for ``"matryoshka"``), a template that quantises nothing, or a learned
        quantizer (``"lsq"``, ``"learned_clip"``): their steps/clips depend on the width and
        per-width quantizer state is not implemented.
    """
    if isinstance(bits, str | bytes) or not isinstance(bits, Sequence) or not bits:
        raise ValueError(f"multi-bit QAT needs a non-empty tuple of bit widths; got {bits!r}.")
    if len(set(bits)) != len(bits):
        raise ValueError(f"multi-bit QAT bit widths must be distinct; got {tuple(bits)}.")
    if not qat.quantizes:
        raise ValueError(
            "multi-bit QAT replaces weight_bits/act_bits that are not None by each width, but "
            f"both are None in {qat.name!r}: nothing would be quantised."
        )
    learned = [f"{field}={name!r}" for field, name, width in (
        ("weight_quantizer", qat.weight_quantizer, qat.weight_bits),
        ("act_quantizer", qat.act_quantizer, qat.act_bits),
    ) if width is not None and name in LEARNED_QUANTIZERS]
    if learned:
        raise ValueError(
            f"multi-bit QAT (bits={tuple(bits)}) needs quantizers without learned state "
            f"('dorefa', 'max', 'matryoshka'); got {', '.join(learned)}, whose learned steps/"
            "clips depend on the bit width (per-width quantizer state is not implemented). "
            "Use a stateless quantizer, or a single width (bits=None)."
        )
    out = []
    for b in bits:
        try:
            out.append((int(b), dataclasses.replace(  # re-validates, e.g. b <= nest_bits
                qat,
                weight_bits=None if qat.weight_bits is None else b,
                act_bits=None if qat.act_bits is None else b,
            )))
        except ValueError as err:
            raise ValueError(f"multi-bit QAT width {b!r} of {tuple(bits)}: {err}") from None
    return tuple(out)


def per_width_batch_stats(batch_stats: PyTree, bits: Sequence[int]) -> dict[str, PyTree]:
    """``{"w8": batch_stats, "w4": batch_stats, ...}``: one copy of the statistics per width.

    The starting point of switchable BatchNorm (``bn_per_bits``): every width starts from the
    same (e.g. fresh, or a float model's) running statistics and then keeps its own.

    Args:
      batch_stats: a model's ``"batch_stats"`` collection (``{}`` without BatchNorm).
      bits: the widths.

    Returns:
      A dict keyed by :func:`width_key`, each width with its own copy of the arrays.
    """
    # Separate buffers: the train step donates the state, and XLA must not free one buffer
    # that stands in it twice (a shared array crashes the donated step).
    return {width_key(b): jax.tree.map(lambda x: jnp.array(x, copy=True), batch_stats)
            for b in bits}


def batch_stats_at(batch_stats: PyTree, bits: int, *, per_bits: bool) -> PyTree:
    """The statistics that width ``bits`` uses: its own with ``per_bits``, else the shared ones.

    Raises:
      KeyError: with ``per_bits``, if ``batch_stats`` has no entry for the width.
    """
    if not per_bits:
        return batch_stats
    key = width_key(bits)
    if key not in batch_stats:
        raise KeyError(f"no per-width BatchNorm statistics {key!r}; have {sorted(batch_stats)}.")
    return batch_stats[key]


def sample_width_index(rng: jax.Array, step: jax.Array | int, num_widths: int) -> jax.Array:
    """The index (int32 scalar in ``[0, num_widths)``, uniform) of a ``"sample"`` step's width.

    Drawn from ``fold_in(fold_in(rng, step), salt)``: the step's key of
    :func:`~kure_jax.training.make_train_step`, before any per-device fold, so every device
    of a data-parallel step trains the same width and a resumed run draws the same widths.

    Args:
      rng: the state's ``jax.random.key``.
      step: the step counter (int32 scalar) before the update.
      num_widths: how many widths there are (>= 1).
    """
    key = jax.random.fold_in(jax.random.fold_in(rng, step), _SAMPLE_SALT)
    return jax.random.randint(key, (), 0, num_widths, dtype=jnp.int32)
