"""The ``fp`` family: the float model, one point (``config.fp``, a section without keys).

Its accuracy is the reference of every table (the summary's ``FP`` column, the runtimes'
``JAX FP``); a QAT checkpoint's float point evaluates its float shadow weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kure_jax.evaluation import _checks, _tables
from kure_jax.evaluation._types import Context, Family, Task
from kure_jax.evaluation.forward import evaluate

__all__ = ["FAMILY", "KIND", "FpConfig"]

KIND = "fp"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FpConfig:
    """``config.fp``: no keys; the section's presence turns the float point on."""


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> FpConfig:
    del config
    return _checks.build(FpConfig, section, KIND)


def plan(ctx: Context, cfg: FpConfig) -> list[Task]:
    del cfg

    def run() -> list[dict]:
        metrics = evaluate(ctx.fp_step, ctx.float_vars, ctx.batches(), mesh=ctx.mesh)
        return [ctx.point(KIND, KIND, metrics)]

    return [Task(kind=KIND, quantizer=KIND, num_points=1, run=run)]


def accuracy(data: Mapping[str, Any], by_group: bool) -> dict[str, float]:
    """Row name -> float accuracy."""
    table = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    return {row: next(iter(t.values())) for row, t in table.items()}


def summary(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, dict[str, str]]]:
    return [("FP", {row: _tables.pct(v) for row, v in accuracy(data, by_group).items()})]


FAMILY = Family(name=KIND, kinds=(KIND,), parse=parse, plan=plan, summary=summary)
