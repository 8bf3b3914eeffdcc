"""The ``nested`` family: one model at every bit width, re-quantised or sliced (Matryoshka).

``config.nested``:

* ``bits``: widths ``r`` (``()``: off, the default sweep's setting).
* ``nest_bits``: the width ``c >= max(bits)`` of the codes that are sliced (8: int8).
* ``per_channel``: one min-max range per output channel (as the ``"matryoshka"`` QAT
  quantizer) instead of one per tensor.

Two weight-only points per width (activations float, the kernels of the sweep's ``layers``,
asymmetric min-max codes of :mod:`kure_jax.quant.nested`):

* ``"nested_requant"``: the float kernels re-quantised to ``r``-bit codes;
* ``"nested_slice"``: the top ``r`` bits ``S(q_c, r)`` of their ``c``-bit codes, read back with
  the ``c``-bit scale and zero point: what a deployment that stores only int8 codes runs at
  ``r`` bits (Matryoshka Quantization).

At ``r = c`` both are the same ``c``-bit model. Report: a table and ``nested_bits.png`` with,
third, a QAT checkpoint's own quantizers at each width (the ``qat`` family's points).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax

from kure_jax.evaluation import _checks, _plotting, _tables
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import qat
from kure_jax.evaluation.forward import evaluate
from kure_jax.quant.nested import nested_fake_quant
from kure_jax.selection import Selection, selection_mask

__all__ = ["FAMILY", "REQUANT_KIND", "SLICE_KIND", "NestedConfig", "nested_transform"]

SECTION = "nested"
REQUANT_KIND = "nested_requant"
SLICE_KIND = "nested_slice"
PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class NestedConfig:
    """``config.nested`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    bits: tuple[int, ...] = ()
    nest_bits: int = 8
    per_channel: bool = True

    def __post_init__(self) -> None:
        set_ = _checks.setter(self)
        set_("bits", _checks.bits_tuple(self.bits, f"{SECTION}.bits"))
        set_("nest_bits", _checks.bits(self.nest_bits, f"{SECTION}.nest_bits"))
        if any(b > self.nest_bits for b in self.bits):
            raise ValueError(f"sweep key '{SECTION}.bits' {self.bits} must not exceed "
                             f"'{SECTION}.nest_bits' ({self.nest_bits}): the slices are the top "
                             "bits of those codes.")
        _checks.boolean(self.per_channel, f"{SECTION}.per_channel")


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> NestedConfig:
    del config
    return _checks.build(NestedConfig, section, SECTION)


def nested_transform(
    bits: int, *, nest_bits: int, per_channel: bool, where: Selection
) -> Callable[[PyTree], PyTree]:
    """``transform(variables)``: the selected kernels of ``variables["params"]`` at ``bits``,
    read as the top bits of their ``nest_bits``-bit min-max codes (:func:`nested_fake_quant`;
    ``nest_bits == bits`` re-quantises them to ``bits``-bit codes).

    Args:
      bits: the width ``r``; nest_bits: the code width ``c >= r``.
      per_channel: one range per output channel (last axis) instead of one per tensor.
      where: the kernel selection (``kure_jax`` ``where=``; ``None``: every conv/dense kernel).

    Returns:
      A pure function of ``{"params", ...}`` returning the same structure and dtypes.

    Raises:
      ValueError: (when called) if the selection matches nothing or a width is invalid.
    """
    axes = -1 if per_channel else None

    def transform(variables: PyTree) -> PyTree:
        params = variables["params"]
        quantized = jax.tree.map(
            lambda w, chosen: nested_fake_quant(w, bits=bits, nest_bits=nest_bits,
                                                channel_axes=axes) if chosen else w,
            params, selection_mask(params, where))
        return {**variables, "params": quantized}

    return transform


def plan(ctx: Context, cfg: NestedConfig) -> list[Task]:
    c = cfg.nest_bits
    scope = "per_channel" if cfg.per_channel else "per_tensor"

    def task(kind: str, r: int, nest: int, name: str) -> Task:
        def run() -> list[Point]:
            transform = nested_transform(r, nest_bits=nest, per_channel=cfg.per_channel,
                                         where=ctx.where)
            metrics = evaluate(ctx.fp_step, jax.jit(transform)(ctx.float_vars), ctx.batches(),
                               mesh=ctx.mesh)
            policy = {"bits": r, "nest_bits": nest, "symmetric": False,
                      "per_channel": cfg.per_channel}
            return [ctx.point(kind, name, metrics, weight_bits=r, policy=policy)]

        return Task(kind=kind, quantizer=name, num_points=1, run=run)

    return [t for r in cfg.bits for t in (task(REQUANT_KIND, r, r, f"minmax_{scope}"),
                                          task(SLICE_KIND, r, c, f"int{c}_slice_{scope}"))]


def _curves(data: Mapping[str, Any], by_group: bool) -> tuple[dict, list[int]]:
    curves = {kind: _tables.accuracy_table(data, by_group=by_group, kind=kind)
              for kind in (REQUANT_KIND, SLICE_KIND)}
    bits = sorted({k[1] for t in curves.values() for row in t.values() for k in row},
                  reverse=True)
    return curves, bits


def _nest_bits(data: Mapping[str, Any]) -> int | None:
    return next((p["policy"]["nest_bits"] for p in data["points"]
                 if p["kind"] == SLICE_KIND and p.get("policy")), None)


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    curves, bits = _curves(data, by_group)
    if not bits:
        return []
    body = []
    for name, _ in _tables.rows(data, by_group):
        if not any(name in t for t in curves.values()):
            continue
        cells = [name]
        for b in bits:
            values = (_tables.at_bits(curves[REQUANT_KIND], name, b),
                      _tables.at_bits(curves[SLICE_KIND], name, b),
                      qat.own_accuracy(data, by_group, name, b))
            cells.append(" / ".join(_tables.pct(v) for v in values))
        body.append(cells)
    c = _nest_bits(data)
    return [f"### One model at every width: re-quantised / sliced from int{c} codes / own QAT "
            "quantizer\n\n"
            f"Weight-only min-max codes (activations float): the float kernels re-quantised at "
            f"each width, then the top bits of their int{c} codes; third, a QAT checkpoint's own "
            "quantizers at that width (a trained width as trained, others re-quantised).\n\n"
            + _tables.markdown(["model", *(f"W{b}" for b in bits)], body)]


def plot(data: Mapping[str, Any], out: pathlib.Path) -> list[pathlib.Path]:
    """``nested_bits.png``: accuracy vs weight bits, one colour per model: re-quantised (solid),
    sliced (dashed), and the trained widths of QAT checkpoints as trained (crosses)."""
    by_group = _tables.grouped(data)
    curves, bits = _curves(data, by_group)
    names = list(dict.fromkeys(name for t in curves.values() for name in t))
    if not names:
        return []
    curves[qat.KIND] = _tables.accuracy_table(data, by_group=by_group, kind=qat.KIND)
    c = _nest_bits(data)
    fig, (ax,) = _plotting.grid(1, size=(6.0, 3.8))
    for i, name in enumerate(names):
        for kind, style, label in ((REQUANT_KIND, "o-", "re-quantised"),
                                   (SLICE_KIND, "s--", f"int{c} sliced"),
                                   (qat.KIND, "x", "as trained")):
            pts = sorted((k[1], v) for k, v in curves[kind].get(name, {}).items()
                         if k[1] is not None)
            if pts:
                ax.plot([b for b, _ in pts], [100 * v for _, v in pts], style, color=f"C{i}",
                        ms=6 if kind == qat.KIND else 3, mew=1.5, lw=1.2,
                        label=f"{name}, {label}")
    ax.set_xticks(sorted(bits))
    ax.set_xlabel("weight bits (min-max codes, activations float)")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=6, ncol=2)
    return [_plotting.save(fig, out / "nested_bits.png")]


FAMILY = Family(name=SECTION, kinds=(REQUANT_KIND, SLICE_KIND), parse=parse, plan=plan,
                tables=tables, plot=plot)
