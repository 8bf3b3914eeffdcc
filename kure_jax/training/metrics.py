"""Where training metrics go: ``metrics.jsonl``, optional TensorBoard, log lines, a tqdm bar.

``WORKDIR/metrics.jsonl`` holds one JSON object per line, appended across resumed
runs (a run resumed from step ``s`` first drops the records after ``s``, which it writes again,
so each ``(kind, step)`` appears once; TensorBoard purges those events likewise):
``{"kind": "train", "step": ..., "loss": ..., "images_per_sec": ...}`` every
``log_every_steps`` and ``{"kind": "eval", "step": ..., "accuracy": ..., "kurtosis":
{layer: value}}`` at each evaluation. TensorBoard event files are written only if
``tensorboardX`` is importable.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

__all__ = ["MetricsWriter", "Progress", "format_metrics", "mean_metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | np.generic):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literal
    return value


def mean_metrics(records: list[Mapping[str, Any]]) -> dict[str, float]:
    """Averages per-step scalar metrics over steps (``*_max`` keys take the maximum)."""
    keys = [k for k in records[0] if k != "finite"]
    return {
        k: float(np.max([r[k] for r in records]) if k.endswith("_max")
                 else np.mean([r[k] for r in records]))
        for k in keys
    }


def format_metrics(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """One log line, e.g. ``step 100/470 | loss 0.312 ce 0.29 kure 0.022 acc 0.934 | ...``."""
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(
            f"loss {metrics['loss']:.4f} ce {metrics['ce']:.4f} kure {metrics['kure']:.4f} "
            f"acc {metrics['accuracy']:.4f}"
        )
    if "kurtosis_mean" in metrics:
        parts.append(
            f"kurtosis mean {metrics['kurtosis_mean']:.3f} max {metrics['kurtosis_max']:.3f}"
        )
    if "learning_rate" in metrics:
        parts.append(f"lr {metrics['learning_rate']:.3g}")
    if "images_per_sec" in metrics:
        parts.append(f"{metrics['images_per_sec']:.0f} img/s")
    return " | ".join(parts)


def _drop_records_after(path: pathlib.Path, step: int) -> int:
    """Rewrites ``path`` without the records after ``step`` (and a line cut short by a crash);
    returns how many lines were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, path)  # a crash here leaves the old file whole
    return dropped


class MetricsWriter:
    """Appends records to ``WORKDIR/metrics.jsonl`` (and TensorBoard if available).

    Only process 0 writes; on other processes every method is a no-op.

    Args:
      workdir: the run's directory (created if missing).
      enabled: whether this process writes (``jax.process_index() == 0``).
      resume_step: the step a run starts from: records (and TensorBoard events) after it, left
        by the run that wrote the checkpoint and went on, are dropped, as this run writes them
        again. ``None`` keeps everything.
    """

    def __init__(
        self, workdir: str | pathlib.Path, *, enabled: bool = True, resume_step: int | None = None
    ) -> None:
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        path = pathlib.Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            dropped = _drop_records_after(path / "metrics.jsonl", resume_step)
            if dropped:
                logging.info("Dropped %d metrics.jsonl records after step %d (written again).",
                             dropped, resume_step)
        self._file = open(path / "metrics.jsonl", "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        purge = None if resume_step is None else resume_step + 1  # events at steps >= purge
        self._tensorboard = SummaryWriter(str(path / "tensorboard"), purge_step=purge)

    def write(self, kind: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record; nested mappings (e.g. per-layer kurtosis) stay nested in JSON."""
        if self._file is None:
            return
        record = {"kind": kind, "step": int(step), **_jsonable(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, Mapping):
                    for sub, v in value.items():
                        self._tensorboard.add_scalar(f"{kind}/{key}/{sub}", float(v), step)
                elif np.ndim(value) == 0:
                    self._tensorboard.add_scalar(f"{kind}/{key}", float(value), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


class Progress:
    """Log lines through ``absl.logging`` plus a tqdm bar when stderr is a terminal.

    Args:
      start: the first step of this run (non-zero when resuming).
      total: the last step.
      enabled: whether this process reports (``jax.process_index() == 0``).
    """

    def __init__(self, start: int, total: int, *, enabled: bool = True) -> None:
        self.total = total
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self._enabled = enabled

    def update(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, message: str, metrics: Mapping[str, float] | None = None) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            if metrics is not None:
                short = {k: f"{metrics[k]:.3g}" for k in ("loss", "accuracy") if k in metrics}
                self._bar.set_postfix(short)
            self._bar.write(message, file=sys.stderr)
        else:
            logging.info("%s", message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
