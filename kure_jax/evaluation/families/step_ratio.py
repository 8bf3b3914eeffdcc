"""The ``step_ratio`` family: every layer's quantisation step multiplied by ``r``.

``config.step_ratio``:

* ``bits``: weight bit widths, e.g. ``(4, 3)``; ``()`` plans nothing.
* ``quantizer``: a deterministic quantizer of ``weight.quantizers``.
* ``start``, ``stop``, ``num``: the ratio grid ``r = linspace(start, stop, num)`` (also the
  grid of the ``qat`` section's learned-step sweep).

Per bit width one task, one compiled (``lax.map``-ped) program, ``num`` points of kind
``"step_ratio"`` with ``step_ratio = r``. Report: the summary's ``W<b> ratio worst``, a table
(r = 1, mean, worst and where) and ``accuracy_vs_step_ratio.png``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from kure_jax.evaluation import _checks, _plotting, _tables
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import weight
from kure_jax.evaluation.forward import evaluate_mapped, mapped_eval_step, ptq_transform

__all__ = ["FAMILY", "KIND", "StepRatioConfig", "grid_of", "ratio_panels", "ratio_table"]

KIND = "step_ratio"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRatioConfig:
    """``config.step_ratio`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    bits: tuple[int, ...] = (4, 3)
    quantizer: str = "max"
    start: float = 0.7
    stop: float = 1.3
    num: int = 61

    def __post_init__(self) -> None:
        set_ = _checks.setter(self)
        set_("bits", _checks.bits_tuple(self.bits, f"{KIND}.bits"))
        set_("start", _checks.positive(self.start, f"{KIND}.start"))
        set_("stop", _checks.positive(self.stop, f"{KIND}.stop"))
        set_("num", _checks.integer(self.num, f"{KIND}.num", 1))
        if self.stop < self.start:
            raise ValueError(f"sweep keys '{KIND}.start' ({self.start}) and '{KIND}.stop' "
                             f"({self.stop}) must satisfy start <= stop.")

    def ratios(self) -> np.ndarray:
        """The ratio grid, float32 ``(num,)``."""
        return np.linspace(self.start, self.stop, self.num, dtype=np.float32)


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> StepRatioConfig:
    cfg = _checks.build(StepRatioConfig, section, KIND)
    weight.check_quantizer(config, f"{KIND}.quantizer", cfg.quantizer)
    if weight.quantizers_of(config).quantizers[cfg.quantizer].get("rounding") == "stochastic":
        raise ValueError(f"sweep key '{KIND}.quantizer' must name a deterministic quantizer; "
                         f"{cfg.quantizer!r} uses stochastic rounding.")
    return cfg


def grid_of(configs: Mapping[str, Any]) -> np.ndarray:
    """The ratio grid of a sweep's validated configs (this section's defaults if absent)."""
    return (configs.get(KIND) or StepRatioConfig()).ratios()


def plan(ctx: Context, cfg: StepRatioConfig) -> list[Task]:
    ratios = cfg.ratios()
    weights = ctx.configs.get(weight.KIND) or weight.WeightConfig()

    def task(bits: int) -> Task:
        policy = weights.policy(cfg.quantizer, bits)

        def run() -> list[Point]:
            step = mapped_eval_step(ctx.apply_fp,
                                    ptq_transform(policy, where=ctx.where, over="step_ratio"),
                                    chunk=ctx.map_chunk, mesh=ctx.mesh)
            results = evaluate_mapped(step, ctx.float_vars, jnp.asarray(ratios), ctx.batches(),
                                      mesh=ctx.mesh)
            return [ctx.point(KIND, cfg.quantizer, m, weight_bits=bits,
                              step_ratio=round(float(r), 6), policy=policy)
                    for r, m in zip(ratios, results, strict=True)]

        return Task(kind=KIND, quantizer=cfg.quantizer, num_points=len(ratios), run=run)

    return [task(bits) for bits in cfg.bits]


def summary(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, dict[str, str]]]:
    table = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    columns = []
    for b in _tables.bits_of(table):
        cells = {}
        for row, t in table.items():
            accs = [v for k, v in t.items() if k[1] == b]
            cells[row] = _tables.pct(min(accs)) if accs else "–"
        columns.append((f"W{b} ratio worst", cells))
    return columns


def ratio_table(data: Mapping[str, Any], by_group: bool, kind: str, title: str) -> list[str]:
    """The ``report.md`` section of ratio-swept points of ``kind``: per bit width the accuracy
    at r = 1, the mean, the worst and its r (``[]`` without such points)."""
    table = _tables.accuracy_table(data, by_group=by_group, kind=kind)
    keys = _tables.bits_of(table)
    if not keys:
        return []
    header, body = ["model"], []
    for b in keys:
        header += [f"W{b} r=1", f"W{b} mean", f"W{b} worst", f"W{b} worst r"]
    for name, _ in _tables.rows(data, by_group):
        if name not in table:
            continue
        cells = [name]
        for b in keys:
            pts = sorted((k[3], v) for k, v in table[name].items() if k[1] == b)
            if not pts:
                cells += ["–"] * 4
                continue
            at_one = min(pts, key=lambda kv: abs(kv[0] - 1.0))[1]
            worst = min(pts, key=lambda kv: kv[1])
            cells += [_tables.pct(at_one), _tables.pct(np.mean([v for _, v in pts])),
                      _tables.pct(worst[1]), f"{worst[0]:.3g}"]
        body.append(cells)
    return [f"### {title}\n\n" + _tables.markdown(header, body)]


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    return ratio_table(data, by_group, KIND, "Step-size ratio sweep (every layer's step × r)")


def ratio_panels(data: Mapping[str, Any], kind: str, label: str,
                 path: pathlib.Path) -> list[pathlib.Path]:
    """Accuracy vs r of ``kind``'s points: one panel per bit width, one line per model."""
    table = _tables.accuracy_table(data, by_group=_tables.grouped(data), kind=kind)
    panels = _tables.bits_of(table)
    if not panels:
        return []
    fig, axes = _plotting.grid(len(panels), size=(4.0, 2.8))
    for ax, b in zip(axes, panels, strict=True):
        for name, t in table.items():
            pts = sorted((k[3], v) for k, v in t.items() if k[1] == b)
            if pts:
                ax.plot([r for r, _ in pts], [100 * v for _, v in pts], label=name, lw=1.3)
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{label}, W{b}", fontsize=9)
        ax.set_xlabel("step ratio r (step × r)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    return [_plotting.save(fig, path)]


def plot(data: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    return ratio_panels(data, KIND, "PTQ", out / "accuracy_vs_step_ratio.png")


FAMILY = Family(name=KIND, kinds=(KIND,), parse=parse, plan=plan, summary=summary,
                tables=tables, plot=plot)
