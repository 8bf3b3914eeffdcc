"""Resuming with another config: which changes alter the run, which only its bookkeeping.

A checkpoint stores the config it was trained with. Resuming under a config that changes the
run's meaning (model, data, batch size, schedule, epochs, optimizer, KURE/QAT settings, seed)
would continue a different run from the middle of this one, so it stops unless allowed; the
fields in :data:`HARMLESS_FIELDS` (how often to log, evaluate or checkpoint, eval batch size,
where the data lives, ...) change no trained value and are only noted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["HARMLESS_FIELDS", "ConfigChangedError", "config_changes"]

HARMLESS_FIELDS = (
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "eval_batch_size",
    "keep_checkpoints", "keep_best", "parallel", "init_from", "kure.penalty_impl",
    "dataset_options.data_dir", "dataset_options.manual_dir", "dataset_options.download",
)


class ConfigChangedError(ValueError):
    """Resuming under a config that changes the run; the message lists the fields, one line."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):  # an empty section has no fields to compare
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _harmless(name: str) -> bool:
    return any(name == field or name.startswith(f"{field}.") for field in HARMLESS_FIELDS)


def config_changes(
    stored: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """The differences between a checkpoint's config and the new one, as ``name: old -> new``.

    Args:
      stored: the config saved with the checkpoint (its JSON data).
      current: the new config's JSON data (``config_to_json``).

    Returns:
      ``(changes, notes)``: fields that change the run's meaning, and harmless ones (those in
      :data:`HARMLESS_FIELDS`, and fields the stored config predates), both sorted by name.
    """
    old, new = _flatten(stored), _flatten(current)
    changes, notes = [], []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, "absent"), new.get(name, "absent")
        if before == after:
            continue
        text = f"{name}: {before!r} -> {after!r}"
        (notes if _harmless(name) or name not in old else changes).append(text)
    return changes, notes
