"""Table helpers over parsed ``results.json`` data, shared by the families' renderers.

Rows are checkpoints, or groups (seeds of one recipe) averaged over their checkpoints; a
point's table key is ``(quantizer, weight_bits, act_bits, step_ratio)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["accuracy_table", "at_bits", "bits_of", "grouped", "markdown", "mean_worst", "pct",
           "rows", "spread"]

Table = dict[str, dict[tuple, float]]


def rows(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, list[str]]]:
    """``(row name, checkpoint labels)`` in first-seen order."""
    out: dict[str, list[str]] = {}
    for c in data["checkpoints"]:
        out.setdefault(c["group"] if by_group else c["label"], []).append(c["label"])
    return list(out.items())


def grouped(data: Mapping[str, Any]) -> bool:
    """Whether some group holds several checkpoints."""
    groups = [c["group"] for c in data["checkpoints"]]
    return len(set(groups)) < len(groups)


def _key(point: Mapping[str, Any]) -> tuple:
    return (point["quantizer"], point["weight_bits"], point["act_bits"],
            round(point["step_ratio"], 6))


def accuracy_table(data: Mapping[str, Any], *, by_group: bool = False, **match: Any) -> Table:
    """Mean accuracy per row and point key, over seeds and (``by_group``) checkpoints.

    Args:
      data: parsed results.
      by_group: rows are groups (each checkpoint's seed mean, averaged) instead of checkpoints.
      **match: point fields to filter on, e.g. ``kind=KIND``.

    Returns:
      row name -> {(quantizer, weight_bits, act_bits, step_ratio): accuracy}.
    """
    per_ckpt: dict[str, dict[tuple, list[float]]] = {}
    for p in data["points"]:
        if all(p.get(k) == v for k, v in match.items()):
            per_ckpt.setdefault(p["checkpoint"], {}).setdefault(_key(p), []).append(p["accuracy"])
    table: Table = {}
    for row, labels in rows(data, by_group):
        merged: dict[tuple, list[float]] = {}
        for label in labels:
            for key, accs in per_ckpt.get(label, {}).items():
                merged.setdefault(key, []).append(float(np.mean(accs)))
        if merged:
            table[row] = {key: float(np.mean(v)) for key, v in merged.items()}
    return table


def bits_of(table: Table, index: int = 1) -> list:
    """The distinct ``key[index]`` values of a table (weight bits by default), descending."""
    return sorted({k[index] for t in table.values() for k in t}, reverse=True)


def at_bits(table: Table, row: str, bits: int) -> float | None:
    """The first accuracy of ``row`` at weight ``bits``, or ``None``."""
    return next((v for k, v in table.get(row, {}).items() if k[1] == bits), None)


def spread(data: Mapping[str, Any], match: Mapping[str, Any], key: tuple,
           labels: list[str]) -> float | None:
    """Standard deviation over ``labels`` of each checkpoint's mean accuracy at ``key``."""
    accs = []
    for label in labels:
        vals = [p["accuracy"] for p in data["points"] if p["checkpoint"] == label
                and all(p.get(k) == v for k, v in match.items()) and _key(p) == key]
        if vals:
            accs.append(float(np.mean(vals)))
    return float(np.std(accs)) if len(accs) > 1 else None


def pct(value: float | None, std: float | None = None) -> str:
    """``"93.1"`` (or ``"93.1 ± 0.4"``) percent, ``"–"`` for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def mean_worst(accuracy_by_quantizer: Mapping[str, float]) -> tuple[str, str]:
    """``("mean", "worst (quantizer)")`` over quantizers: the worst one is named, since a single
    quantizer (typically ``floor`` rounding) often sets it at every bit width."""
    if not accuracy_by_quantizer:
        return "–", "–"
    worst = min(accuracy_by_quantizer, key=accuracy_by_quantizer.get)
    mean = np.mean(list(accuracy_by_quantizer.values()))
    return pct(mean), f"{pct(accuracy_by_quantizer[worst])} ({worst})"
