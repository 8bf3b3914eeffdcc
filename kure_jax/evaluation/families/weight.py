"""The ``weight`` family: weight-only PTQ with named quantizers at several bit widths.

``config.weight``:

* ``bits``: weight bit widths, e.g. ``(8, 6, 5, 4, 3, 2)``; ``()`` plans nothing.
* ``quantizers``: name -> ``kure_jax.QuantPolicy`` fields but ``bits`` (``{"max": {},
  "per_channel": {"axis": -1}, "mse": {"clip": "mse"}, ...}``); the ``weight_act`` and
  ``step_ratio`` sections name their quantizer from this table.
* ``stochastic_seeds``: points (seeds) of each quantizer with stochastic rounding.

One point per (bits, quantizer) of kind ``"weight"`` (one per seed for stochastic rounding,
evaluated as one mapped program): ``quantize_params`` on the kernels of the sweep's ``layers``,
activations float. Report: the summary's ``W<b> max`` and ``W<b> mean / worst`` columns, one
table per bit width, and ``accuracy_vs_bits.png``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kure_jax.evaluation import _checks, _plotting, _tables
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import fp
from kure_jax.evaluation.forward import evaluate, evaluate_mapped, mapped_eval_step, ptq_transform
from kure_jax.quant import QuantPolicy
from kure_jax.quant.ops import MIN_BITS

__all__ = ["DEFAULT_QUANTIZERS", "FAMILY", "KIND", "WeightConfig", "quantizers_of"]

KIND = "weight"
DEFAULT_QUANTIZERS: dict[str, dict[str, Any]] = {
    "max": {},
    "per_channel": {"axis": -1},
    "asym": {"symmetric": False},
    "mse": {"clip": "mse"},
    "aciq": {"clip": "aciq"},
    "percentile": {"clip": "percentile", "percentile": 99.9},
    "stochastic": {"rounding": "stochastic"},
    "floor": {"rounding": "floor"},
    "pow2": {"pow2_step": True},
}
# ConfigDict sorts its keys; quantizers with these names keep this (table column) order,
# others follow alphabetically.
_ORDER = (*DEFAULT_QUANTIZERS, "aciq_laplace")
_POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(QuantPolicy) if f.name != "bits")


def _quantizers(value: Any) -> dict[str, dict[str, Any]]:
    key = f"{KIND}.quantizers"
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"sweep key {key!r} must map names to QuantPolicy fields, e.g. "
                         f"{{'max': {{}}, 'per_channel': {{'axis': -1}}}}; got {value!r}.")
    out = {}
    rank = {name: i for i, name in enumerate(_ORDER)}
    for name, fields in sorted(value.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        fields = _checks.as_dict(fields)
        unknown = sorted(set(fields) - set(_POLICY_FIELDS))
        if unknown:
            raise ValueError(f"sweep key '{key}.{name}' has unknown QuantPolicy field(s) "
                             f"{unknown}; allowed: {', '.join(_POLICY_FIELDS)} (bits come from "
                             "the sweep's bit lists).")
        if isinstance(fields.get("axis"), list):
            fields["axis"] = tuple(fields["axis"])
        try:
            QuantPolicy(bits=MIN_BITS, **fields)
        except ValueError as err:
            raise ValueError(f"sweep key '{key}.{name}': {err}") from None
        out[str(name)] = fields
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightConfig:
    """``config.weight`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    quantizers: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_QUANTIZERS))
    stochastic_seeds: int = 4

    def __post_init__(self) -> None:
        set_ = _checks.setter(self)
        set_("bits", _checks.bits_tuple(self.bits, f"{KIND}.bits"))
        set_("quantizers", _quantizers(self.quantizers))
        set_("stochastic_seeds", _checks.integer(self.stochastic_seeds,
                                                 f"{KIND}.stochastic_seeds", 1))

    def policy(self, name: str, bits: int) -> QuantPolicy:
        """The ``QuantPolicy`` of quantizer ``name`` at ``bits``."""
        return QuantPolicy(bits=bits, **self.quantizers[name])


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> WeightConfig:
    del config
    return _checks.build(WeightConfig, section, KIND)


def quantizers_of(config: Mapping[str, Any]) -> WeightConfig:
    """The ``weight`` section of a whole sweep config (its defaults if absent), for the
    sections that name a quantizer of its table."""
    return parse(config.get(KIND, {}), config)


def check_quantizer(config: Mapping[str, Any], key: str, name: Any) -> None:
    """Raises ``ValueError`` unless ``name`` (sweep key ``key``) names a weight quantizer."""
    known = quantizers_of(config).quantizers
    if name not in known:
        raise ValueError(f"sweep key {key!r} must name one of weight.quantizers {sorted(known)}; "
                         f"got {name!r}.")


def plan(ctx: Context, cfg: WeightConfig) -> list[Task]:
    tasks = []
    for bits in cfg.bits:
        for name in cfg.quantizers:
            policy = cfg.policy(name, bits)
            if policy.rounding == "stochastic":
                tasks.append(Task(kind=KIND, quantizer=name, num_points=cfg.stochastic_seeds,
                                  run=_stochastic(ctx, cfg, name, policy)))
                continue

            def run(name=name, policy=policy, bits=bits) -> list[Point]:
                quantized = jax.jit(ptq_transform(policy, where=ctx.where))(ctx.float_vars)
                metrics = evaluate(ctx.fp_step, quantized, ctx.batches(), mesh=ctx.mesh)
                return [ctx.point(KIND, name, metrics, weight_bits=bits, policy=policy)]

            tasks.append(Task(kind=KIND, quantizer=name, num_points=1, run=run))
    return tasks


def _stochastic(ctx: Context, cfg: WeightConfig, name: str, policy: QuantPolicy):
    def run() -> list[Point]:
        step = mapped_eval_step(ctx.apply_fp, ptq_transform(policy, where=ctx.where, over="key"),
                                chunk=ctx.map_chunk, mesh=ctx.mesh)
        seeds = np.arange(cfg.stochastic_seeds)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        results = evaluate_mapped(step, ctx.float_vars, keys, ctx.batches(), mesh=ctx.mesh)
        return [ctx.point(KIND, name, m, weight_bits=policy.bits, seed=int(s), policy=policy)
                for s, m in zip(seeds, results, strict=True)]

    return run


def summary(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, dict[str, str]]]:
    weight = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    bits = _tables.bits_of(weight)
    columns = [(f"W{b} max", {row: _tables.pct(t.get(("max", b, None, 1.0)))
                              for row, t in weight.items()}) for b in bits]
    for b in bits:
        cells = {}
        for row, t in weight.items():
            accs = {k[0]: v for k, v in t.items() if k[1] == b}
            cells[row] = " / ".join(_tables.mean_worst(accs)) if accs else "–"
        columns.append((f"W{b} mean / worst", cells))
    return columns


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    weight = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    quantizers = list(dict.fromkeys(k[0] for t in weight.values() for k in t))
    out = []
    for b in _tables.bits_of(weight):
        body = []
        for name, labels in _tables.rows(data, by_group):
            w = weight.get(name, {})
            accs = [w.get((q, b, None, 1.0)) for q in quantizers]
            cells = [_tables.pct(a, _tables.spread(data, {"kind": KIND}, (q, b, None, 1.0),
                                                   labels) if by_group else None)
                     for q, a in zip(quantizers, accs, strict=True)]
            valid = {q: a for q, a in zip(quantizers, accs, strict=True) if a is not None}
            body.append([name, *cells, *_tables.mean_worst(valid)])
        out.append(f"### Weight-only PTQ, {b} bits\n\n"
                   + _tables.markdown(["model", *quantizers, "mean", "worst"], body))
    return out


def plot(data: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """``accuracy_vs_bits.png``: one panel per quantizer, one line per model (group means when
    groups hold several checkpoints); the float accuracy dotted."""
    by_group = _tables.grouped(data)
    weight = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    floats = fp.accuracy(data, by_group)
    quantizers = list(dict.fromkeys(k[0] for t in weight.values() for k in t))
    if not quantizers:
        return []
    fig, axes = _plotting.grid(len(quantizers))
    for ax, q in zip(axes, quantizers, strict=True):
        for i, (name, table) in enumerate(weight.items()):
            pts = sorted((k[1], v) for k, v in table.items() if k[0] == q)
            ax.plot([b for b, _ in pts], [100 * v for _, v in pts], "o-", color=f"C{i}",
                    label=name, ms=3)
            if name in floats:
                ax.axhline(100 * floats[name], color=f"C{i}", ls=":", lw=1)
        ax.set_title(q, fontsize=9)
        ax.set_xticks(sorted({k[1] for t in weight.values() for k in t if k[0] == q}))
        ax.set_xlabel("weight bits")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    return [_plotting.save(fig, out / "accuracy_vs_bits.png")]


FAMILY = Family(name=KIND, kinds=(KIND,), parse=parse, plan=plan, summary=summary,
                tables=tables, plot=plot)
