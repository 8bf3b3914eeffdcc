"""The ``qat`` family: a QAT checkpoint with its own quantizers (other checkpoints: no points).

``config.qat``:

* ``bits``: weight bit widths at which the checkpoint's own quantizers re-quantise its float
  shadow weights (activations as trained).
* ``step_ratio``: also sweep its learned weight steps (LSQ) or clips (learned clip) over the
  ``step_ratio`` section's grid, at its trained bit widths.

Point kinds:

* ``"qat"``: the checkpoint as trained (its quantizers, learned steps, BatchNorm statistics);
  ``quantizer`` is the ``QATConfig.name``. A multi-bit checkpoint (``Target.widths``) gets one
  per trained width.
* ``"qat_bits"``: re-quantised at each width of ``bits``. Learned LSQ steps are rescaled to
  keep the learned clip range (``s * Q_p(trained) / Q_p(bits)``); learned clips are kept. A
  multi-bit checkpoint's quantizers run at that width (weights, and activations where they
  were quantised), with the BatchNorm statistics of the nearest trained width (the wider one
  on a tie); a width its quantizer refuses (e.g. ``"matryoshka"`` above its ``nest_bits``) is
  left out.
* ``"qat_step_ratio"``: the learned weight steps or clips times ``r`` (single-width only).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kure_jax import QATConfig
from kure_jax.evaluation import _checks, _plotting, _tables
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import step_ratio
from kure_jax.evaluation.forward import (
    classifier_apply,
    evaluate,
    evaluate_mapped,
    make_eval_step,
    mapped_eval_step,
)

__all__ = ["BITS_KIND", "FAMILY", "KIND", "RATIO_KIND", "QatConfig", "nearest_width"]

KIND = "qat"
BITS_KIND = "qat_bits"
RATIO_KIND = "qat_step_ratio"
_QUANT_STATE = {"lsq": "kernel_step", "learned_clip": "kernel_clip"}
PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatConfig:
    """``config.qat`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    step_ratio: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _checks.bits_tuple(self.bits, f"{KIND}.bits"))
        _checks.boolean(self.step_ratio, f"{KIND}.step_ratio")


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> QatConfig:
    del config
    return _checks.build(QatConfig, section, KIND)


def nearest_width(bits: int, trained: Sequence[int]) -> int:
    """The trained width closest to ``bits`` (the wider one on a tie)."""
    return min(trained, key=lambda t: (abs(t - bits), -t))


def _scale_weight_quant(quant: PyTree, name: str, factor: Any) -> PyTree:
    """``quant`` with every leaf called ``name`` multiplied by ``factor``."""
    def scale(path: tuple, leaf: jax.Array) -> jax.Array:
        return leaf * factor if getattr(path[-1], "key", None) == name else leaf

    return jax.tree_util.tree_map_with_path(scale, quant)


def plan(ctx: Context, cfg: QatConfig) -> list[Task]:
    target = ctx.target
    if target.qat is None or not target.qat.quantizes:
        return []
    if target.model is None:
        raise ValueError(f"target {target.label}: QAT points need its Linen model.")
    if target.widths:
        return _multibit(ctx, cfg)
    return _single(ctx, cfg)


def _single(ctx: Context, cfg: QatConfig) -> list[Task]:
    target, mesh = ctx.target, ctx.mesh
    qat, variables, trained = target.qat, target.variables, target.qat.weight_bits

    def as_trained() -> list[Point]:
        step = make_eval_step(classifier_apply(target.model, qat=qat), mesh=mesh)
        metrics = evaluate(step, variables, ctx.batches(), mesh=mesh)
        return [ctx.point(KIND, qat.name, metrics, weight_bits=trained, act_bits=qat.act_bits)]

    tasks = [Task(kind=KIND, quantizer=qat.name, num_points=1, run=as_trained)]
    if trained is None:
        return tasks
    state_name = _QUANT_STATE.get(qat.weight_quantizer)

    def rebit(bits: int) -> Task:
        def run() -> list[Point]:
            rebit_vars = dict(variables)
            if qat.weight_quantizer == "lsq":  # keep the learned clip s * Q_p
                factor = (2 ** (trained - 1) - 1) / (2 ** (bits - 1) - 1)
                rebit_vars["quant"] = _scale_weight_quant(variables["quant"], state_name, factor)
            apply = classifier_apply(target.model, qat=dataclasses.replace(qat, weight_bits=bits))
            metrics = evaluate(make_eval_step(apply, mesh=mesh), rebit_vars, ctx.batches(),
                               mesh=mesh)
            return [ctx.point(BITS_KIND, qat.weight_quantizer, metrics, weight_bits=bits,
                              act_bits=qat.act_bits)]

        return Task(kind=BITS_KIND, quantizer=qat.weight_quantizer, num_points=1, run=run)

    tasks += [rebit(bits) for bits in cfg.bits]
    if cfg.step_ratio and state_name is not None:
        ratios = step_ratio.grid_of(ctx.configs)

        def run_ratio() -> list[Point]:
            transform = lambda v, r: {**v, "quant": _scale_weight_quant(v["quant"], state_name, r)}
            step = mapped_eval_step(classifier_apply(target.model, qat=qat), transform,
                                    chunk=ctx.map_chunk, mesh=mesh)
            results = evaluate_mapped(step, variables, jnp.asarray(ratios), ctx.batches(),
                                      mesh=mesh)
            return [ctx.point(RATIO_KIND, qat.weight_quantizer, m, weight_bits=trained,
                              act_bits=qat.act_bits, step_ratio=round(float(r), 6))
                    for r, m in zip(ratios, results, strict=True)]

        tasks.append(Task(kind=RATIO_KIND, quantizer=qat.weight_quantizer,
                          num_points=len(ratios), run=run_ratio))
    return tasks


def _multibit(ctx: Context, cfg: QatConfig) -> list[Task]:
    """One ``"qat"`` point per trained width, ``"qat_bits"`` points at ``cfg.bits``."""
    target = ctx.target
    steps: dict[QATConfig, Callable[..., jax.Array]] = {}

    def task(kind: str, qat: QATConfig, stats: PyTree) -> Task:
        quantizer = qat.name if kind == KIND else qat.weight_quantizer

        def run() -> list[Point]:
            if qat not in steps:
                steps[qat] = make_eval_step(classifier_apply(target.model, qat=qat),
                                            mesh=ctx.mesh)
            metrics = evaluate(steps[qat], {**target.variables, "batch_stats": stats},
                               ctx.batches(), mesh=ctx.mesh)
            return [ctx.point(kind, quantizer, metrics, weight_bits=qat.weight_bits,
                              act_bits=qat.act_bits)]

        return Task(kind=kind, quantizer=quantizer, num_points=1, run=run)

    tasks = [task(KIND, qat, stats) for qat, stats in target.widths.values()]
    trained = list(target.widths)
    for bits in cfg.bits:
        base, stats = target.widths[nearest_width(bits, trained)]
        try:
            qat = dataclasses.replace(base, weight_bits=None if base.weight_bits is None else bits,
                                      act_bits=None if base.act_bits is None else bits)
        except ValueError:  # e.g. "matryoshka" above its nest_bits: not a width of this model
            continue
        tasks.append(task(BITS_KIND, qat, stats))
    return tasks


def own_accuracy(data: Mapping[str, Any], by_group: bool, row: str, bits: int) -> float | None:
    """A QAT model's own quantizer at ``bits``: as trained if it was trained at that width,
    else re-quantised; ``None`` if neither was evaluated."""
    for kind in (KIND, BITS_KIND):
        value = _tables.at_bits(_tables.accuracy_table(data, by_group=by_group, kind=kind),
                                row, bits)
        if value is not None:
            return value
    return None


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    out = step_ratio.ratio_table(data, by_group, RATIO_KIND, "QAT: learned weight steps × r")
    qat = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    if not qat:
        return out
    qbits = _tables.accuracy_table(data, by_group=by_group, kind=BITS_KIND)
    bits = _tables.bits_of(qbits)
    body = []
    for name, _ in _tables.rows(data, by_group):
        if name not in qat:
            continue
        # One point, or one per trained width of a multi-bit QAT checkpoint.
        cells = [name, "; ".join(f"{k[0]}: {_tables.pct(v)}" for k, v in qat[name].items())]
        cells += [_tables.pct(_tables.at_bits(qbits, name, b)) for b in bits]
        body.append(cells)
    out.append("### QAT checkpoints re-quantised at other weight bit widths "
               "(own quantizer, activations as trained)\n\n"
               + _tables.markdown(["model", "as trained", *(f"W{b}" for b in bits)], body))
    return out


def plot(data: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """``qat_bits.png`` (re-quantised widths) and ``qat_step_ratio.png`` (learned steps × r)."""
    written = step_ratio.ratio_panels(data, RATIO_KIND, "QAT learned step",
                                      out / "qat_step_ratio.png")
    table = _tables.accuracy_table(data, by_group=_tables.grouped(data), kind=BITS_KIND)
    if not table:
        return written
    fig, (ax,) = _plotting.grid(1, size=(4.5, 3.0))
    for name, t in table.items():
        pts = sorted((k[1], v) for k, v in t.items())
        ax.plot([b for b, _ in pts], [100 * v for _, v in pts], "o-", label=name, ms=3)
    ax.set_xlabel("weight bits (QAT quantizer, activations as trained)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    return [*written, _plotting.save(fig, out / "qat_bits.png")]


FAMILY = Family(name=KIND, kinds=(KIND, BITS_KIND, RATIO_KIND), parse=parse, plan=plan,
                tables=tables, plot=plot)
