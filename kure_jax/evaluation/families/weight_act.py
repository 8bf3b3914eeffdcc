"""The ``weight_act`` family: weight + activation PTQ with static, calibrated activation steps.

``config.weight_act``:

* ``pairs``: ``(weight_bits, act_bits)`` pairs, e.g. ``((8, 8), (4, 4))``; ``()`` plans nothing.
* ``weight_quantizer``: a name in ``weight.quantizers``.
* ``act_clip``: clip method of the activation ranges (a ``kure_jax.CLIP_METHODS`` name);
  ``act_percentile``: its percentile for ``"percentile"``.
* ``calibration_images``, ``calibration_seed``: how many training images calibrate the
  activation ranges, and which (the first batch under that data-order seed). The ``runtimes``
  section calibrates on the same images.

One point per pair, of kind ``"weight_act"``, quantizer ``"W<w>A<a>"``: the weights quantised
as the ``weight`` family does, the inputs of every selected conv/dense layer quantised with the
calibrated steps (``act_policy`` records the clip, bits and the layers given unsigned codes).
Inputs are intercepted in Flax Linen layers: for a model without its Linen module, and without
calibration images, the points are *skipped* with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from kure_jax.evaluation import _checks, _tables, calibration
from kure_jax.evaluation._types import Context, Family, Point, Task
from kure_jax.evaluation.families import weight
from kure_jax.evaluation.forward import evaluate, make_eval_step, ptq_transform
from kure_jax.quant.policy import CLIP_METHODS

__all__ = ["FAMILY", "KIND", "WeightActConfig", "pair_name"]

KIND = "weight_act"


def pair_name(weight_bits: int, act_bits: int) -> str:
    """The points' quantizer: ``"W4A8"``."""
    return f"W{weight_bits}A{act_bits}"


def _pairs(values: Any) -> tuple[tuple[int, int], ...]:
    key = f"{KIND}.pairs"
    pairs = []
    for pair in values:
        if isinstance(pair, str | bytes) or len(pair) != 2:
            raise ValueError(f"sweep key {key!r} must hold (weight_bits, act_bits) pairs; "
                             f"got {pair!r}.")
        pairs.append((_checks.bits(pair[0], key), _checks.bits(pair[1], key)))
    return tuple(pairs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightActConfig:
    """``config.weight_act`` (module docstring), validated on construction (the weight
    quantizer's name is checked against ``weight.quantizers`` by :func:`parse`).

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    pairs: tuple[tuple[int, int], ...] = ((8, 8), (6, 6), (5, 5), (4, 4), (3, 3))
    weight_quantizer: str = "max"
    act_clip: str = "mse"
    act_percentile: float = 99.99
    calibration_images: int = 512
    calibration_seed: int = 0

    def __post_init__(self) -> None:
        set_ = _checks.setter(self)
        set_("pairs", _pairs(self.pairs))
        if self.act_clip not in CLIP_METHODS:
            raise ValueError(f"sweep key '{KIND}.act_clip' must be one of {CLIP_METHODS}; "
                             f"got {self.act_clip!r}.")
        percentile = _checks.positive(self.act_percentile, f"{KIND}.act_percentile")
        if percentile > 100:
            raise ValueError(f"sweep key '{KIND}.act_percentile' must be in (0, 100]; "
                             f"got {percentile}.")
        set_("act_percentile", percentile)
        set_("calibration_images", _checks.integer(self.calibration_images,
                                                   f"{KIND}.calibration_images", 1))
        set_("calibration_seed", _checks.integer(self.calibration_seed,
                                                 f"{KIND}.calibration_seed", 0))


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> WeightActConfig:
    cfg = _checks.build(WeightActConfig, section, KIND)
    weight.check_quantizer(config, f"{KIND}.weight_quantizer", cfg.weight_quantizer)
    return cfg


def calibration_of(ctx: Context) -> WeightActConfig:
    """The calibration settings of a sweep (this section's, or its defaults)."""
    return ctx.configs.get(KIND) or WeightActConfig()


def plan(ctx: Context, cfg: WeightActConfig) -> list[Task]:
    problem = ctx.calibration_problem("weight+activation PTQ")
    if problem is not None:
        return [ctx.skip(KIND, pair_name(w, a), problem, weight_bits=w, act_bits=a)
                for w, a in cfg.pairs]
    weights = ctx.configs.get(weight.KIND) or weight.WeightConfig()  # its quantizer table
    cache: dict[int, calibration.ActivationCalibration] = {}

    def calibrated(act_bits: int) -> calibration.ActivationCalibration:
        if not cache:
            images = ctx.calibration_images(cfg.calibration_images, cfg.calibration_seed)
            chunks = [images[i:i + ctx.batch_size] for i in range(0, len(images), ctx.batch_size)]
            layers = calibration.layer_names(ctx.layer_names(ctx.float_vars["params"]))
            cache.update(calibration.calibrate_activations(
                ctx.apply_fp, ctx.float_vars, chunks, layers=layers,
                bits=sorted({a for _, a in cfg.pairs}), clip=cfg.act_clip,
                percentile=cfg.act_percentile, mesh=ctx.mesh))
        return cache[act_bits]

    def task(w_bits: int, a_bits: int) -> Task:
        def run() -> list[Point]:
            calib = calibrated(a_bits)
            w_policy = weights.policy(cfg.weight_quantizer, w_bits)
            quantized = jax.jit(ptq_transform(w_policy, where=ctx.where))(ctx.float_vars)
            act_apply = calibration.activation_quantized(ctx.apply_fp, bits=a_bits,
                                                         signed=calib.signed)
            step = make_eval_step(lambda v, x: act_apply(v[0], v[1], x), mesh=ctx.mesh)
            metrics = evaluate(step, (quantized, calib.steps), ctx.batches(), mesh=ctx.mesh)
            act_policy = {"bits": a_bits, "clip": cfg.act_clip, "percentile": cfg.act_percentile,
                          "calibration_images": cfg.calibration_images,
                          "unsigned_layers": sorted(k for k, v in calib.signed.items() if not v)}
            return [ctx.point(KIND, pair_name(w_bits, a_bits), metrics, weight_bits=w_bits,
                              act_bits=a_bits, policy=w_policy, act_policy=act_policy)]

        return Task(kind=KIND, quantizer=pair_name(w_bits, a_bits), num_points=1, run=run)

    return [task(w, a) for w, a in cfg.pairs]


def accuracy(data: Mapping[str, Any], by_group: bool) -> _tables.Table:
    """Row -> {(quantizer, w, a, 1.0): accuracy} of this family's points."""
    return _tables.accuracy_table(data, by_group=by_group, kind=KIND)


def _pairs_of(table: _tables.Table) -> list[tuple[int, int]]:
    return sorted({(k[1], k[2]) for t in table.values() for k in t}, reverse=True)


def summary(data: Mapping[str, Any], by_group: bool) -> list[tuple[str, dict[str, str]]]:
    wa = accuracy(data, by_group)
    return [(pair_name(w, a), {row: _tables.pct(t.get((pair_name(w, a), w, a, 1.0)))
                               for row, t in wa.items()}) for w, a in _pairs_of(wa)]


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    wa = accuracy(data, by_group)
    pairs = _pairs_of(wa)
    if not pairs:
        return []
    body = [[name, *(_tables.pct(wa.get(name, {}).get((pair_name(w, a), w, a, 1.0)))
                     for w, a in pairs)]
            for name, _ in _tables.rows(data, by_group) if name in wa]
    return ["### Weight + activation PTQ (calibrated static activation ranges)\n\n"
            + _tables.markdown(["model", *(pair_name(w, a) for w, a in pairs)], body)]


FAMILY = Family(name=KIND, kinds=(KIND,), parse=parse, plan=plan, summary=summary,
                tables=tables)
