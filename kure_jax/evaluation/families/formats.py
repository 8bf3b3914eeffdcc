"""The ``formats`` family: weight-only quantisation in accelerator data types.

``config.formats``:

* ``names``: presets of :data:`kure_jax.quant.formats.PRESETS`, e.g. ``("fp8_e4m3",
  "mxfp8_e4m3", "mxfp6_e3m2", "mxfp4", "nvfp4", "int4_block32", "nf4")``; ``()`` (the default
  sweep's) is off.

One point per name, of kind ``"format"``: the selected kernels (the sweep's ``layers``) in that
data type, ``quantize_params(params, name)`` (:mod:`kure_jax.quant.formats`: element type,
per-tensor, per-channel or per-block scales, OCP MX and NVFP4 scale rules), activations float.
``weight_bits`` is the element's code width and ``policy`` the format's fields. Report: a table
of every format per model beside the float accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from kure_jax.evaluation import _checks, _tables
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import fp
from kure_jax.evaluation.forward import evaluate, ptq_transform
from kure_jax.quant.formats import ELEMENTS, PRESETS

__all__ = ["FAMILY", "KIND", "FormatsConfig"]

SECTION = "formats"
KIND = "format"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FormatsConfig:
    """``config.formats`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for a name that is not a preset or a repeated name.
    """

    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = self.names
        if isinstance(names, str | bytes) or not hasattr(names, "__iter__"):
            raise ValueError(f"sweep key '{SECTION}.names' must be a tuple of format names; "
                             f"got {names!r}.")
        names = tuple(names)
        for name in names:
            if name not in PRESETS:
                raise ValueError(f"sweep key '{SECTION}.names': {name!r} is not a format; "
                                 f"known: {', '.join(PRESETS)}.")
        if len(set(names)) != len(names):
            raise ValueError(f"sweep key '{SECTION}.names' lists a name twice: {list(names)}.")
        object.__setattr__(self, "names", names)


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> FormatsConfig:
    del config
    return _checks.build(FormatsConfig, section, SECTION)


def plan(ctx: Context, cfg: FormatsConfig) -> list[Task]:
    def task(name: str) -> Task:
        fmt = PRESETS[name]

        def run() -> list[Point]:
            quantized = jax.jit(ptq_transform(name, where=ctx.where))(ctx.float_vars)
            metrics = evaluate(ctx.fp_step, quantized, ctx.batches(), mesh=ctx.mesh)
            return [ctx.point(KIND, name, metrics, weight_bits=ELEMENTS[fmt.element].bits,
                              policy=dataclasses.asdict(fmt))]

        return Task(kind=KIND, quantizer=name, num_points=1, run=run)

    return [task(name) for name in cfg.names]


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    table = _tables.accuracy_table(data, by_group=by_group, kind=KIND)
    names = list(dict.fromkeys(k[0] for t in table.values() for k in t))
    if not names:
        return []
    floats = fp.accuracy(data, by_group)
    body = [[row, _tables.pct(floats.get(row)),
             *(_tables.pct(next((v for k, v in t.items() if k[0] == n), None)) for n in names)]
            for row, t in table.items()]
    return ["### Weight-only data types (FP8, MX, NVFP4, block INT4, NF4)\n\n"
            + _tables.markdown(["model", "FP", *names], body)]


FAMILY = Family(name=SECTION, kinds=(KIND,), parse=parse, plan=plan, tables=tables)
