"""The "Real integer runtimes" table of ``report.md``: runtime accuracies beside our emulation.

Rows are checkpoints (or groups, averaged over their checkpoints, when a group holds several);
columns are the ``runtime`` points' quantizers (``litert/int8``, ``ort/int8_per_channel_minmax``,
...), grouped by their (weight bits, activation bits). After each group comes
``ours WwAa``: kure_jax's own emulation of the closest scheme, the sweep's ``weight_act`` point
at the same bit widths (its weight quantizer and activation clip are named in the note), or
"–" when the sweep has no such pair. A cell of a point the toolchain refused reads ``failed``
(the reason is in the "Failed points" section), one of a planned-but-skipped point ``skipped``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kure_jax.evaluation.runtime_schemes import FAILED, KIND

__all__ = ["FAILED", "runtimes_section", "runtimes_table"]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _rows(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, list[str]]]:
    """(row name, checkpoint labels) in first-seen order, as the other tables of report.md."""
    rows: dict[str, list[str]] = {}
    for c in data["checkpoints"]:
        rows.setdefault(c["group"] if by_group else c["label"], []).append(c["label"])
    return list(rows.items())


def _mean(data: Mapping[str, Any], labels: Sequence[str], kind: str,
          quantizer: str | None = None) -> float | None:
    """Mean over ``labels`` of each checkpoint's accuracy for the matching point(s)."""
    per = []
    for label in labels:
        accs = [p["accuracy"] for p in data["points"] if p["checkpoint"] == label
                and p["kind"] == kind and (quantizer is None or p["quantizer"] == quantizer)
                and p.get("step_ratio", 1.0) == 1.0]
        if accs:
            per.append(float(np.mean(accs)))
    return float(np.mean(per)) if per else None


def _columns(data: Mapping[str, Any]) -> list[tuple[str, int | None, int | None]]:
    """``(quantizer, weight_bits, act_bits)`` of every runtime scheme, first-seen order."""
    seen: dict[str, tuple[str, int | None, int | None]] = {}
    for record in [*data["points"], *data.get("skipped", [])]:
        if record["kind"] == KIND and record["quantizer"] not in seen:
            seen[record["quantizer"]] = (record["quantizer"], record["weight_bits"],
                                         record["act_bits"])
    return list(seen.values())


def runtimes_table(data: Mapping[str, Any], *, by_group: bool = False) -> str | None:
    """The table (markdown) of the ``runtime`` points, or ``None`` if there are none.

    Args:
      data: parsed ``results.json``.
      by_group: rows are groups (mean over their checkpoints) instead of checkpoints.

    Returns:
      ``| model | JAX FP | <runtime columns> | ours WwAa | ... |`` followed by a note saying
      what "ours" is.
    """
    columns = _columns(data)
    if not columns:
        return None
    status: dict[tuple[str, str], str] = {}
    for r in data.get("skipped", []):
        if r["kind"] == KIND:
            status[(r["checkpoint"], r["quantizer"])] = (
                "failed" if r.get("status") == FAILED else "skipped")
    pairs = list(dict.fromkeys((w, a) for _, w, a in columns))
    header, layout = ["model", "JAX FP"], []
    for pair in pairs:
        for column in columns:
            if (column[1], column[2]) == pair:
                header.append(column[0])
                layout.append(("runtime", column))
        if pair[0] is not None:
            header.append(f"ours W{pair[0]}A{pair[1]}")
            layout.append(("ours", pair))
    body = []
    for name, labels in _rows(data, by_group):
        cells = [name, _pct(_mean(data, labels, "fp"))]
        for what, item in layout:
            if what == "ours":
                cells.append(_pct(_mean(data, labels, "weight_act", f"W{item[0]}A{item[1]}")))
                continue
            quantizer = item[0]
            value = _mean(data, labels, KIND, quantizer)
            if value is not None:
                # A group mean over the checkpoints that ran; say how many did not.
                missing = [status[(label, quantizer)] for label in labels
                           if (label, quantizer) in status]
                text = _pct(value)
                cells.append(f"{text} ({len(missing)} {missing[0]})" if missing else text)
            else:
                found = [status.get((label, quantizer)) for label in labels]
                cells.append(next((s for s in found if s), "–"))
        body.append(cells)
    sweep = data.get("sweep", {})
    wa = sweep.get("weight_act", {})
    layers = {"paper": "all conv/dense layers but the first conv and the classifier",
              "kernels": "every conv/dense layer"}.get(sweep.get("layers"), "the sweep's layers")
    note = ("'ours WwAa' is kure_jax's own emulation of the closest scheme: the sweep's "
            f"weight+activation PTQ point at those bit widths (weight quantizer "
            f"{wa.get('weight_quantizer', '?')!r}, activation clip {wa.get('act_clip', '?')!r}; "
            f"weights and inputs of {layers} quantised). The runtimes quantise every layer and "
            "every tensor between ops, with asymmetric int8 activations (LiteRT 16x8: "
            "symmetric int16). Both start from the float weights and BatchNorm statistics.")
    return _markdown(header, body) + "\n\n" + note


def runtimes_section(data: Mapping[str, Any], *, by_group: bool = False) -> list[str]:
    """``report.md`` lines of the runtimes section (``[]`` without runtime points)."""
    table = runtimes_table(data, by_group=by_group)
    if table is None:
        return []
    return ["### Real integer runtimes (LiteRT, ONNX Runtime)", "", table, ""]
