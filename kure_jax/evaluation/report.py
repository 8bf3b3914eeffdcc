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
refused (a real-runtime conversion, see :mod:`kure_jax.evaluation.families.runtimes`); the reason is
its one-line error. Records without ``status`` are skipped.
It is rewritten atomically (temporary file + rename) after every finished task, so an
interrupted sweep leaves a valid file holding the points finished so far and
``"complete": false``.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kure_jax.evaluation import _tables
from kure_jax.evaluation._types import FAILED
from kure_jax.evaluation.families import FAMILIES

__all__ = [
    "POINT_FIELDS",
    "SCHEMA_VERSION",
    "SKIPPED_FIELDS",
    "ResultsWriter",
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


def summary_table(data: Mapping[str, Any], *, by_group: bool = False) -> str:
    """The headline table: one row per checkpoint (or group), the columns of every family
    that has some (FP, weight-only PTQ per bit width, W/A pairs, worst step ratio, ...)."""
    columns = [column for family in FAMILIES.values() if family.summary is not None
               for column in family.summary(data, by_group)]
    qat_labels = {c["label"] for c in data["checkpoints"] if c.get("qat")}
    body, marked = [], False
    for name, labels in _tables.rows(data, by_group):
        label = name
        if qat_labels.intersection(labels):  # FP/PTQ of a QAT model: float shadow weights.
            label, marked = f"{name} †", True
        body.append([label, *(cells.get(name, "–") for _, cells in columns)])
    table = _tables.markdown(["model", *(header for header, _ in columns)], body)
    if marked:
        table += ("\n\n† QAT checkpoint: these columns evaluate its float shadow weights with "
                  "float activations (BatchNorm statistics of the quantised net), not its own "
                  "quantizer; see the QAT tables of report.md.")
    return table


def _records(title: str, intro: str, records: Sequence[Mapping[str, Any]]) -> list[str]:
    if not records:
        return []
    return [f"## {title}", "", f"{len(records)} {intro}:", "",
            _tables.markdown(["checkpoint", "kind", "quantizer", "reason"],
                             [[r["checkpoint"], r["kind"], r["quantizer"],
                               r["reason"].replace("|", "\\|")] for r in records]), ""]


def markdown_report(data: Mapping[str, Any], *, plots: Sequence[str] = ()) -> str:
    """The whole ``report.md``: summary, every family's tables, kurtosis, plots.

    When a group holds several checkpoints (seeds), tables show group means (± std over the
    checkpoints), followed by the per-checkpoint summary.
    """
    grouped = _tables.grouped(data)
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
    for family in FAMILIES.values():
        for table in family.tables(data, grouped) if family.tables is not None else ():
            parts += [table, ""]
    parts += ["## Weight kurtosis of the quantised layers", ""]
    layers = list(dict.fromkeys(k for c in data["checkpoints"] for k in c["kurtosis"]))
    parts += [_tables.markdown(["checkpoint", *layers, "mean"], [
        [c["label"], *(f"{c['kurtosis'][layer]:.2f}" if layer in c["kurtosis"] else "–"
                       for layer in layers),
         f"{np.mean(list(c['kurtosis'].values())):.2f}" if c["kurtosis"] else "–"]
        for c in data["checkpoints"]]), ""]
    records = data.get("skipped", [])
    parts += _records("Failed points", "point(s) ran but the toolchain refused them",
                      [r for r in records if r.get("status") == FAILED])
    parts += _records("Skipped points", "planned point(s) were not evaluated",
                      [r for r in records if r.get("status") != FAILED])
    if plots:
        parts += ["## Plots", ""] + [f"![{pathlib.Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(parts)
