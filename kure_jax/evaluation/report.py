"""Sweep results on disk: ``results.json`` (written incrementally), ``results.csv`` and the
markdown tables of ``report.md``.

``results.json`` (``SCHEMA_VERSION`` 1)::

    {"schema_version": 1, "complete": bool, "created": ISO time, "sweep": {...config...},
     "checkpoints": [{"label", "group", "path", "model", "dataset", "qat", "kure_lambda",
                      "quantized_layers": [...], "kurtosis": {layer: value}, ...}],
     "points": [{"checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits",
                 "step_ratio", "seed", "policy", "act_policy", "accuracy", "loss", "count"}],
     "skipped": [{"checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits",
                  "reason"}],
     "devices": int,
     "timings": [{"checkpoint", "kind", "quantizer", "points", "seconds",
                  "images_per_second"}]}

``devices`` is the evaluation's device count (all processes) and ``timings`` the wall time of
each task, compilation included (``images_per_second`` = test images x points / seconds);
files written before them lack both.

``skipped`` lists the planned points a model cannot run (W/A PTQ of a model given only as an
``apply_fn``), with the reason; files written before it existed lack it (read as empty).
A record with ``"status": "failed"`` (``FAILED``) is a point that ran but that the toolchain
refused (a real-runtime conversion, see :mod:`kure_jax.evaluation.runtimes`); the reason is
its one-line error. Records without ``status`` are skipped.
It is rewritten atomically (temporary file + rename) after every finished task, so an
interrupted sweep leaves a valid file holding the points finished so far and
``"complete": false``.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kure_jax.evaluation.runtime_report import FAILED, runtimes_section

__all__ = [
    "POINT_FIELDS",
    "SCHEMA_VERSION",
    "SKIPPED_FIELDS",
    "ResultsWriter",
    "accuracy_table",
    "markdown_report",
    "summary_table",
    "validate_results",
    "write_csv",
]

SCHEMA_VERSION = 1
POINT_FIELDS: tuple[str, ...] = (
    "checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits", "step_ratio", "seed",
    "policy", "act_policy", "accuracy", "loss", "count",
)
_TOP_FIELDS = ("schema_version", "complete", "created", "sweep", "checkpoints", "points")
SKIPPED_FIELDS: tuple[str, ...] = (
    "checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits", "reason",
)
Point = Mapping[str, Any]


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic on POSIX: readers never see a half-written file


class ResultsWriter:
    """Accumulates points and keeps ``OUT/results.json`` up to date.

    Args:
      out_dir: output directory (created if missing).
      sweep: the sweep config as a JSON-ready dict.
      checkpoints: one JSON-ready dict per checkpoint.
      write: ``False`` keeps the data in memory only (the other processes of a
        multi-process sweep: process 0 writes).
      devices: the evaluation's device count, recorded as ``"devices"``.
    """

    def __init__(
        self, out_dir: str | pathlib.Path, *, sweep: Mapping[str, Any],
        checkpoints: Sequence[Mapping[str, Any]], write: bool = True, devices: int = 1,
    ) -> None:
        self.path = pathlib.Path(out_dir) / "results.json"
        self._enabled = write
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sweep": dict(sweep),
            "checkpoints": [dict(c) for c in checkpoints],
            "points": [],
            "skipped": [],
            "devices": int(devices),
            "timings": [],
        }
        self._write()

    def skip(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Appends records of points that are not evaluated (``SKIPPED_FIELDS``) and rewrites
        the file."""
        self.data["skipped"].extend(dict(r) for r in records)
        self._write()

    def add(self, points: Sequence[Point]) -> None:
        """Appends finished points and rewrites the file."""
        self.data["points"].extend(dict(p) for p in points)
        self._write()

    def time(self, record: Mapping[str, Any]) -> None:
        """Appends the timing of a finished task (``checkpoint``, ``kind``, ``quantizer``,
        ``points``, ``seconds``, ``images_per_second``); written with the next points."""
        self.data["timings"].append(dict(record))

    def finish(self) -> None:
        """Marks the sweep complete."""
        self.data["complete"] = True
        self._write()

    def _write(self) -> None:
        if not self._enabled:
            return
        _write_atomic(self.path, json.dumps(self.data, indent=1, allow_nan=False) + "\n")


def validate_results(data: Mapping[str, Any]) -> None:
    """Checks the structure of a parsed ``results.json``.

    Raises:
      ValueError: naming the first missing or ill-typed field.
    """
    for key in _TOP_FIELDS:
        if key not in data:
            raise ValueError(f"results.json lacks the field {key!r}.")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results.json has schema_version {data['schema_version']!r}, "
                         f"expected {SCHEMA_VERSION}.")
    labels = set()
    for checkpoint in data["checkpoints"]:
        for key in ("label", "group", "path", "quantized_layers", "kurtosis"):
            if key not in checkpoint:
                raise ValueError(f"a checkpoint entry lacks {key!r}: {checkpoint}.")
        labels.add(checkpoint["label"])
    for index, point in enumerate(data["points"]):
        missing = [k for k in POINT_FIELDS if k not in point]
        if missing:
            raise ValueError(f"point {index} lacks {missing}: {point}.")
        if point["checkpoint"] not in labels:
            raise ValueError(f"point {index} names unknown checkpoint {point['checkpoint']!r}.")
        acc = point["accuracy"]
        if not isinstance(acc, float) or not 0.0 <= acc <= 1.0:
            raise ValueError(f"point {index} has accuracy {acc!r}, expected a float in [0, 1].")
        if not isinstance(point["count"], int) or point["count"] < 1:
            raise ValueError(f"point {index} has count {point['count']!r}, expected an int >= 1.")
    for index, record in enumerate(data.get("skipped", [])):
        missing = [k for k in SKIPPED_FIELDS if k not in record]
        if missing:
            raise ValueError(f"skipped entry {index} lacks {missing}: {record}.")
        if record["checkpoint"] not in labels:
            raise ValueError(f"skipped entry {index} names unknown checkpoint "
                             f"{record['checkpoint']!r}.")
        if not isinstance(record["reason"], str) or not record["reason"]:
            raise ValueError(f"skipped entry {index} has no reason: {record}.")
        if record.get("status", "skipped") not in ("skipped", FAILED):
            raise ValueError(f"skipped entry {index} has status {record['status']!r}, expected "
                             f"'skipped' or {FAILED!r}.")


def _flat(point: Point) -> dict[str, Any]:
    row = {}
    for key, value in point.items():
        if isinstance(value, Mapping):
            row.update({f"{key}.{k}": v for k, v in value.items()})
        elif key not in ("policy", "act_policy"):
            row[key] = value
    return row


def write_csv(path: str | pathlib.Path, points: Sequence[Point]) -> None:
    """One row per point; policy fields flattened as ``policy.clip``, ``act_policy.bits``..."""
    rows = [_flat(p) for p in points]
    columns = list(POINT_FIELDS[:-3])
    columns = [c for c in columns if c not in ("policy", "act_policy")]
    extra = sorted({k for row in rows for k in row} - set(columns) - {"accuracy", "loss", "count"})
    columns += ["accuracy", "loss", "count", *extra]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------- tables


def _rows(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, list[str]]]:
    """(row name, checkpoint labels) in first-seen order."""
    rows: dict[str, list[str]] = {}
    for c in data["checkpoints"]:
        rows.setdefault(c["group"] if by_group else c["label"], []).append(c["label"])
    return list(rows.items())


def accuracy_table(
    data: Mapping[str, Any], *, by_group: bool = False, **match: Any
) -> dict[str, dict[tuple, float]]:
    """Mean accuracy per row and point key, over seeds and (``by_group``) checkpoints.

    Args:
      data: parsed results.
      by_group: rows are groups (accuracy averaged over their checkpoints) instead of
        checkpoints.
      **match: point fields to filter on, e.g. ``kind="weight"``.

    Returns:
      row name -> {(quantizer, weight_bits, act_bits, step_ratio): accuracy}; the same key
      maps to lists' means. With ``by_group`` each checkpoint's seed mean is averaged.
    """
    per_ckpt: dict[str, dict[tuple, list[float]]] = {}
    for p in data["points"]:
        if all(p.get(k) == v for k, v in match.items()):
            key = (p["quantizer"], p["weight_bits"], p["act_bits"], round(p["step_ratio"], 6))
            per_ckpt.setdefault(p["checkpoint"], {}).setdefault(key, []).append(p["accuracy"])
    table: dict[str, dict[tuple, float]] = {}
    for row, labels in _rows(data, by_group):
        merged: dict[tuple, list[float]] = {}
        for label in labels:
            for key, accs in per_ckpt.get(label, {}).items():
                merged.setdefault(key, []).append(float(np.mean(accs)))
        if merged:
            table[row] = {key: float(np.mean(v)) for key, v in merged.items()}
    return table


def _spread(data: Mapping[str, Any], match: Mapping[str, Any], key: tuple, labels: list[str]):
    accs = []
    for label in labels:
        vals = [p["accuracy"] for p in data["points"] if p["checkpoint"] == label
                and all(p.get(k) == v for k, v in match.items())
                and (p["quantizer"], p["weight_bits"], p["act_bits"],
                     round(p["step_ratio"], 6)) == key]
        if vals:
            accs.append(float(np.mean(vals)))
    return float(np.std(accs)) if len(accs) > 1 else None


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    text = f"{100 * value:.1f}"
    return text if std is None else f"{text} ± {100 * std:.1f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mean_worst(accuracy_by_quantizer: Mapping[str, float]) -> tuple[str, str]:
    """``("mean", "worst (quantizer)")`` over quantizers: the worst one is named, since a single
    quantizer (typically ``floor`` rounding) often sets it at every bit width."""
    if not accuracy_by_quantizer:
        return "–", "–"
    worst = min(accuracy_by_quantizer, key=accuracy_by_quantizer.get)
    mean = np.mean(list(accuracy_by_quantizer.values()))
    return _pct(mean), f"{_pct(accuracy_by_quantizer[worst])} ({worst})"


def summary_table(data: Mapping[str, Any], *, by_group: bool = False) -> str:
    """The headline table: FP, per-tensor max-abs weight PTQ per bit width, mean / worst over
    every weight quantizer per bit width, W/A pairs and the worst step-ratio accuracy."""
    fp = accuracy_table(data, by_group=by_group, kind="fp")
    weight = accuracy_table(data, by_group=by_group, kind="weight")
    wa = accuracy_table(data, by_group=by_group, kind="weight_act")
    ratio = accuracy_table(data, by_group=by_group, kind="step_ratio")
    bits = sorted({k[1] for t in weight.values() for k in t}, reverse=True)
    pairs = sorted({(k[1], k[2]) for t in wa.values() for k in t}, reverse=True)
    r_bits = sorted({k[1] for t in ratio.values() for k in t}, reverse=True)
    header = ["model", "FP"]
    header += [f"W{b} max" for b in bits] + [f"W{b} mean / worst" for b in bits]
    header += [f"W{w}A{a}" for w, a in pairs] + [f"W{b} ratio worst" for b in r_bits]
    qat_labels = {c["label"] for c in data["checkpoints"] if c.get("qat")}
    rows, marked = [], False
    for name, labels in _rows(data, by_group):
        cells = [name, _pct(next(iter(fp.get(name, {}).values()), None))]
        if qat_labels.intersection(labels):  # FP/PTQ of a QAT model: float shadow weights.
            cells[0], marked = f"{name} †", True
        w = weight.get(name, {})
        cells += [_pct(w.get(("max", b, None, 1.0))) for b in bits]
        for b in bits:
            accs = {k[0]: v for k, v in w.items() if k[1] == b}
            cells.append(" / ".join(_mean_worst(accs)) if accs else "–")
        cells += [_pct(next((v for k, v in wa.get(name, {}).items() if (k[1], k[2]) == pair),
                            None)) for pair in pairs]
        for b in r_bits:
            accs = [v for k, v in ratio.get(name, {}).items() if k[1] == b]
            cells.append(_pct(min(accs)) if accs else "–")
        rows.append(cells)
    table = _markdown(header, rows)
    if marked:
        table += ("\n\n† QAT checkpoint: these columns evaluate its float shadow weights with "
                  "float activations (BatchNorm statistics of the quantised net), not its own "
                  "quantizer; see the QAT tables of report.md.")
    return table


def _section_tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    out = []
    rows = _rows(data, by_group)
    weight = accuracy_table(data, by_group=by_group, kind="weight")
    quantizers = list(dict.fromkeys(k[0] for t in weight.values() for k in t))
    for b in sorted({k[1] for t in weight.values() for k in t}, reverse=True):
        body = []
        for name, labels in rows:
            w = weight.get(name, {})
            accs = [w.get((q, b, None, 1.0)) for q in quantizers]
            cells = [_pct(a, _spread(data, {"kind": "weight"}, (q, b, None, 1.0), labels)
                          if by_group else None) for q, a in zip(quantizers, accs, strict=True)]
            valid = {q: a for q, a in zip(quantizers, accs, strict=True) if a is not None}
            body.append([name, *cells, *_mean_worst(valid)])
        out.append(f"### Weight-only PTQ, {b} bits\n\n"
                   + _markdown(["model", *quantizers, "mean", "worst"], body))
    wa = accuracy_table(data, by_group=by_group, kind="weight_act")
    pairs = sorted({(k[1], k[2]) for t in wa.values() for k in t}, reverse=True)
    if pairs:
        body = [[name, *(_pct(wa.get(name, {}).get((f"W{w}A{a}", w, a, 1.0))) for w, a in pairs)]
                for name, _ in rows if name in wa]
        out.append("### Weight + activation PTQ (calibrated static activation ranges)\n\n"
                   + _markdown(["model", *(f"W{w}A{a}" for w, a in pairs)], body))
    for kind, title in (("step_ratio", "Step-size ratio sweep (every layer's step × r)"),
                        ("qat_step_ratio", "QAT: learned weight steps × r")):
        table = accuracy_table(data, by_group=by_group, kind=kind)
        keys = sorted({k[1] for t in table.values() for k in t}, reverse=True)
        if not keys:
            continue
        header, body = ["model"], []
        for b in keys:
            header += [f"W{b} r=1", f"W{b} mean", f"W{b} worst", f"W{b} worst r"]
        for name, _ in rows:
            if name not in table:
                continue
            t, cells = table[name], [name]
            for b in keys:
                pts = sorted((k[3], v) for k, v in t.items() if k[1] == b)
                if not pts:
                    cells += ["–"] * 4
                    continue
                at_one = min(pts, key=lambda kv: abs(kv[0] - 1.0))[1]
                worst = min(pts, key=lambda kv: kv[1])
                cells += [_pct(at_one), _pct(np.mean([v for _, v in pts])), _pct(worst[1]),
                          f"{worst[0]:.3g}"]
            body.append(cells)
        out.append(f"### {title}\n\n" + _markdown(header, body))
    qat = accuracy_table(data, by_group=by_group, kind="qat")
    qbits = accuracy_table(data, by_group=by_group, kind="qat_bits")
    if qat:
        bits = sorted({k[1] for t in qbits.values() for k in t}, reverse=True)
        body = []
        for name, _ in rows:
            if name not in qat:
                continue
            # One point, or one per trained width of a multi-bit QAT checkpoint.
            cells = [name, "; ".join(f"{k[0]}: {_pct(v)}" for k, v in qat[name].items())]
            cells += [_pct(next((v for k, v in qbits.get(name, {}).items() if k[1] == b), None))
                      for b in bits]
            body.append(cells)
        out.append("### QAT checkpoints re-quantised at other weight bit widths "
                   "(own quantizer, activations as trained)\n\n"
                   + _markdown(["model", "as trained", *(f"W{b}" for b in bits)], body))
    out.extend(_nested_table(data, by_group))
    return out


def _nested_table(data: Mapping[str, Any], by_group: bool) -> list[str]:
    """The ``nested`` section's table (empty list without its points): per model and width,
    re-quantised / sliced / own QAT quantizer."""
    tables = {kind: accuracy_table(data, by_group=by_group, kind=kind)
              for kind in ("nested_requant", "nested_slice", "qat", "qat_bits")}
    bits = sorted({k[1] for kind in ("nested_requant", "nested_slice")
                   for t in tables[kind].values() for k in t}, reverse=True)
    if not bits:
        return []

    def at(kind: str, name: str, b: int) -> float | None:
        return next((v for k, v in tables[kind].get(name, {}).items() if k[1] == b), None)

    body = []
    for name, _ in _rows(data, by_group):
        if name not in tables["nested_requant"] and name not in tables["nested_slice"]:
            continue
        cells = [name]
        for b in bits:
            own = at("qat", name, b)
            own = at("qat_bits", name, b) if own is None else own
            cells.append(" / ".join(_pct(v) for v in (at("nested_requant", name, b),
                                                       at("nested_slice", name, b), own)))
        body.append(cells)
    c = next((p["policy"]["nest_bits"] for p in data["points"]
              if p["kind"] == "nested_slice" and p.get("policy")), None)
    return [f"### One model at every width: re-quantised / sliced from int{c} codes / own QAT "
            "quantizer\n\n"
            f"Weight-only min-max codes (activations float): the float kernels re-quantised at "
            f"each width, then the top bits of their int{c} codes; third, a QAT checkpoint's own "
            "quantizers at that width (a trained width as trained, others re-quantised).\n\n"
            + _markdown(["model", *(f"W{b}" for b in bits)], body)]


def markdown_report(data: Mapping[str, Any], *, plots: Sequence[str] = ()) -> str:
    """The whole ``report.md``: summary, per-section tables, kurtosis, plots.

    When a group holds several checkpoints (seeds), tables show group means (± std over the
    checkpoints), followed by the per-checkpoint summary.
    """
    grouped = any(len(labels) > 1 for _, labels in _rows(data, True))
    parts = ["# Quantization robustness report", ""]
    if not data.get("complete", False):
        parts += ["**Incomplete sweep**: interrupted; the tables hold the points finished so far.",
                  ""]
    parts += [f"{len(data['checkpoints'])} checkpoint(s), {len(data['points'])} points, "
              f"created {data['created']}. Accuracy in % on the test split; "
              "'worst' is the minimum over the sweep (with the quantizer that gives it), "
              "'mean' the average.", ""]
    if any(c.get("qat") for c in data["checkpoints"]):
        parts += ["For QAT checkpoints, FP and the PTQ columns evaluate the float shadow weights "
                  "with float activations (no learned quantizer); their own quantizers are in "
                  "the QAT tables below.", ""]
    if grouped:
        parts += ["## Summary (mean over the checkpoints of each group)", "",
                  summary_table(data, by_group=True), ""]
    parts += ["## Summary per checkpoint", "", summary_table(data), ""]
    parts += ["## Tables", ""]
    for table in _section_tables(data, grouped):
        parts += [table, ""]
    parts += runtimes_section(data, by_group=grouped)
    parts += ["## Weight kurtosis of the quantised layers", ""]
    layers = list(dict.fromkeys(k for c in data["checkpoints"] for k in c["kurtosis"]))
    parts += [_markdown(["checkpoint", *layers, "mean"], [
        [c["label"], *(f"{c['kurtosis'][layer]:.2f}" if layer in c["kurtosis"] else "–"
                       for layer in layers),
         f"{np.mean(list(c['kurtosis'].values())):.2f}" if c["kurtosis"] else "–"]
        for c in data["checkpoints"]]), ""]
    records = data.get("skipped", [])
    skipped = [r for r in records if r.get("status") != FAILED]
    failed = [r for r in records if r.get("status") == FAILED]
    if failed:
        parts += ["## Failed points", "",
                  f"{len(failed)} point(s) ran but the toolchain refused them:", "",
                  _markdown(["checkpoint", "kind", "quantizer", "reason"],
                            [[r["checkpoint"], r["kind"], r["quantizer"],
                              r["reason"].replace("|", "\\|")] for r in failed]), ""]
    if skipped:
        parts += ["## Skipped points", "",
                  f"{len(skipped)} planned point(s) were not evaluated:", "",
                  _markdown(["checkpoint", "kind", "quantizer", "reason"],
                            [[r["checkpoint"], r["kind"], r["quantizer"], r["reason"]]
                             for r in skipped]), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{pathlib.Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)
