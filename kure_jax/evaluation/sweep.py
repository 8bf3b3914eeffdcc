"""The sweep of one trained model: a plan of tasks, each evaluating one or more points.

A *point* is one evaluation of the test split under one quantizer, a JSON-ready dict::

    {"checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits", "step_ratio",
     "seed", "policy", "act_policy", "accuracy", "loss", "count"}

with ``kind`` one of ``POINT_KINDS``:

* ``"fp"``: the float model.
* ``"weight"``: weight PTQ (``quantize_params``) with one named quantizer at one bit width;
  stochastic rounding gives one point per seed.
* ``"weight_act"``: weight PTQ plus static, calibrated activation quantisation (W/A pairs);
  ``act_policy`` records the activation clip, bits and which layers got unsigned codes.
* ``"step_ratio"``: weight PTQ with every layer's step multiplied by ``step_ratio``.
* ``"qat"``: a QAT checkpoint as trained (its own quantizers and learned steps).
* ``"qat_bits"``: a QAT checkpoint's float shadow weights re-quantised by its own weight
  quantizer at another bit width, activations as trained. Learned LSQ steps are rescaled to
  keep the learned clip range (``s * Q_p(trained) / Q_p(bits)``); learned clips are kept.
* ``"qat_step_ratio"``: a QAT checkpoint with its learned weight steps (LSQ) or clips (learned
  clip) multiplied by ``step_ratio``, at its trained bit widths.

The weight-only and W/A PTQ points treat a QAT checkpoint's shadow weights like any float
model's (activations float unless quantised by a W/A pair), so their columns mean the same
for every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import QATConfig, QuantPolicy, paper_selection, select
from kure_jax.evaluation import calibration
from kure_jax.evaluation.forward import (
    Metrics,
    classifier_apply,
    evaluate,
    evaluate_mapped,
    make_eval_step,
    mapped_eval_step,
    ptq_transform,
)
from kure_jax.evaluation.spec import SweepSpec
from kure_jax.selection import LeafPredicate

__all__ = ["POINT_KINDS", "SweepTarget", "Task", "plan_sweep", "quantized_layers"]

POINT_KINDS: tuple[str, ...] = (
    "fp", "weight", "weight_act", "step_ratio", "qat", "qat_bits", "qat_step_ratio",
)
PyTree = Any
Point = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepTarget:
    """A trained model to sweep.

    Attributes:
      label: unique name of the checkpoint in the results.
      group: name shared by runs of the same recipe (e.g. seeds), for averaged tables.
      model: the unbound Flax classifier.
      variables: ``{"params", "batch_stats"[, "quant"]}``.
      dataset: a ``kure_jax.data.Dataset`` (test split: ``eval_batches``).
      qat: the ``QATConfig`` the checkpoint was trained with, or ``None``.
    """

    label: str
    group: str
    model: nn.Module
    variables: dict[str, PyTree]
    dataset: Any
    qat: QATConfig | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """A unit of work of a sweep: ``run()`` evaluates ``num_points`` points."""

    kind: str
    quantizer: str
    num_points: int
    run: Callable[[], list[Point]]


def quantized_layers(
    model: nn.Module, image_shape: Sequence[int], layers: str
) -> tuple[LeafPredicate | None, Callable[[PyTree], list[str]]]:
    """The kernel selection of a sweep's ``layers`` setting.

    ``"paper"`` excludes the first conv and the classifier (``kure_jax.paper_selection``),
    found from the call order of an abstract ``model.init`` (restored checkpoints have
    key-sorted dicts, which lose the order); ``"kernels"`` selects every conv/dense kernel.

    Returns:
      ``(where, names)``: the predicate for ``quantize_params`` (``None`` = all kernels) and
      a function giving the selected kernel paths of a params tree, e.g. ``["conv1/kernel"]``.

    Raises:
      ValueError: for another ``layers`` value or from ``paper_selection``.
    """
    if layers not in ("paper", "kernels"):
        raise ValueError(f"layers must be 'paper' or 'kernels'; got {layers!r}.")
    where = None
    if layers == "paper":
        found: list[LeafPredicate] = []

        def init(x: jax.Array) -> PyTree:
            variables = model.init(jax.random.key(0), x, train=False)
            found.append(paper_selection(variables["params"]))  # names and shapes only
            return variables

        jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
        where = found[0]
    return where, lambda params: [name for name, _ in select(params, where)]


def _policy_dict(policy: QuantPolicy | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    out = dataclasses.asdict(policy)
    out["axis"] = None if policy.axis is None else list(policy.axis)
    return out


def _point(
    target: SweepTarget, kind: str, quantizer: str, metrics: Metrics, **fields: Any
) -> Point:
    point = {
        "checkpoint": target.label, "group": target.group, "kind": kind, "quantizer": quantizer,
        "weight_bits": None, "act_bits": None, "step_ratio": 1.0, "seed": None,
        "policy": None, "act_policy": None,
    }
    for key, value in fields.items():
        point[key] = _policy_dict(value) if isinstance(value, QuantPolicy) else value
    # JSON has no NaN/Inf: a diverged loss is recorded as null.
    loss = metrics.loss if math.isfinite(metrics.loss) else None
    point.update(accuracy=metrics.accuracy, loss=loss, count=metrics.count)
    return point


_QUANT_STATE = {"lsq": "kernel_step", "learned_clip": "kernel_clip"}


def _scale_weight_quant(quant: PyTree, name: str, factor: Any) -> PyTree:
    """``quant`` with every leaf called ``name`` multiplied by ``factor``."""
    def scale(path: tuple, leaf: jax.Array) -> jax.Array:
        key = getattr(path[-1], "key", None)
        return leaf * factor if key == name else leaf

    return jax.tree_util.tree_map_with_path(scale, quant)


def plan_sweep(target: SweepTarget, spec: SweepSpec) -> list[Task]:
    """Every task of ``spec`` for ``target``, in order; nothing is evaluated yet.

    Compiled programs are shared between tasks: the float forward pass is compiled once and
    reused by every weight-only point (only the small quantisation program is compiled per
    policy), and each mapped sweep is one program.

    Raises:
      ValueError: if ``spec.layers`` selects nothing in the model, or the model cannot be
        traced with the dataset's image shape.
    """
    model, variables, dataset = target.model, target.variables, target.dataset
    batch_size = spec.eval_batch_size
    batches = lambda: dataset.eval_batches(global_batch_size=batch_size)
    where, names = quantized_layers(model, dataset.image_shape, spec.layers)
    layer_names = calibration.layer_names(names(variables["params"]))
    float_vars = {k: v for k, v in variables.items() if k != "quant"}
    apply_fp = classifier_apply(model)
    fp_step = make_eval_step(apply_fp)
    tasks: list[Task] = []
    add = lambda kind, quantizer, n, run: tasks.append(Task(kind, quantizer, n, run))

    add("fp", "fp", 1,
        lambda: [_point(target, "fp", "fp", evaluate(fp_step, float_vars, batches()))])

    for bits in spec.weight_bits:
        for name in spec.weight_quantizers:
            policy = spec.weight_policy(name, bits)
            if policy.rounding == "stochastic":
                add("weight", name, spec.stochastic_seeds,
                    _stochastic_task(target, spec, apply_fp, float_vars, batches, name, policy,
                                     where))
                continue

            def run(name=name, policy=policy, bits=bits) -> list[Point]:
                quantized = jax.jit(ptq_transform(policy, where=where))(float_vars)
                metrics = evaluate(fp_step, quantized, batches())
                return [_point(target, "weight", name, metrics, weight_bits=bits, policy=policy)]

            add("weight", name, 1, run)

    if spec.wa_pairs:
        cache: dict[int, calibration.ActivationCalibration] = {}

        def calibrated(act_bits: int) -> calibration.ActivationCalibration:
            if not cache:
                images = next(dataset.train_batches(
                    seed=spec.calibration_seed, start_step=0,
                    global_batch_size=min(spec.calibration_images, dataset.num_train_examples),
                ))["image"]
                chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
                cache.update(calibration.calibrate_activations(
                    apply_fp, float_vars, chunks, layers=layer_names,
                    bits=sorted({a for _, a in spec.wa_pairs}), clip=spec.act_clip,
                    percentile=spec.act_percentile))
            return cache[act_bits]

        for w_bits, a_bits in spec.wa_pairs:
            def run_wa(w_bits=w_bits, a_bits=a_bits) -> list[Point]:
                calib = calibrated(a_bits)
                w_policy = spec.weight_policy(spec.wa_weight_quantizer, w_bits)
                quantized = jax.jit(ptq_transform(w_policy, where=where))(float_vars)
                act_apply = calibration.activation_quantized(
                    apply_fp, bits=a_bits, signed=calib.signed)
                step = make_eval_step(lambda v, x: act_apply(v[0], v[1], x))
                metrics = evaluate(step, (quantized, calib.steps), batches())
                act_policy = {"bits": a_bits, "clip": spec.act_clip,
                              "percentile": spec.act_percentile,
                              "calibration_images": spec.calibration_images,
                              "unsigned_layers": sorted(k for k, v in calib.signed.items()
                                                        if not v)}
                return [_point(target, "weight_act", f"W{w_bits}A{a_bits}", metrics,
                               weight_bits=w_bits, act_bits=a_bits, policy=w_policy,
                               act_policy=act_policy)]

            add("weight_act", f"W{w_bits}A{a_bits}", 1, run_wa)

    ratios = spec.step_ratios()
    for bits in spec.step_ratio_bits:
        policy = spec.weight_policy(spec.step_ratio_quantizer, bits)

        def run_ratio(policy=policy, bits=bits) -> list[Point]:
            step = mapped_eval_step(apply_fp, ptq_transform(policy, where=where, over="step_ratio"),
                                    chunk=spec.map_chunk)
            results = evaluate_mapped(step, float_vars, jnp.asarray(ratios), batches())
            return [_point(target, "step_ratio", spec.step_ratio_quantizer, m, weight_bits=bits,
                           step_ratio=round(float(r), 6), policy=policy)
                    for r, m in zip(ratios, results, strict=True)]

        add("step_ratio", spec.step_ratio_quantizer, len(ratios), run_ratio)

    if target.qat is not None and target.qat.quantizes:
        tasks.extend(_qat_tasks(target, spec, batches))
    return tasks


def _stochastic_task(target, spec, apply_fp, float_vars, batches, name, policy, where):
    def run() -> list[Point]:
        step = mapped_eval_step(apply_fp, ptq_transform(policy, where=where, over="key"),
                                chunk=spec.map_chunk)
        seeds = np.arange(spec.stochastic_seeds)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        results = evaluate_mapped(step, float_vars, keys, batches())
        return [_point(target, "weight", name, m, weight_bits=policy.bits, seed=int(s),
                       policy=policy) for s, m in zip(seeds, results, strict=True)]

    return run


def _qat_tasks(target: SweepTarget, spec: SweepSpec, batches: Callable) -> list[Task]:
    qat, variables = target.qat, target.variables
    trained = qat.weight_bits
    tasks = [Task("qat", qat.name, 1, lambda: [_point(
        target, "qat", qat.name, evaluate(make_eval_step(classifier_apply(target.model, qat=qat)),
                                          variables, batches()),
        weight_bits=trained, act_bits=qat.act_bits)])]
    if trained is None:
        return tasks
    state_name = _QUANT_STATE.get(qat.weight_quantizer)
    for bits in spec.qat_bits:
        def run(bits=bits) -> list[Point]:
            rebit = dataclasses.replace(qat, weight_bits=bits)
            rebit_vars = dict(variables)
            if qat.weight_quantizer == "lsq":  # keep the learned clip s * Q_p
                factor = (2 ** (trained - 1) - 1) / (2 ** (bits - 1) - 1)
                rebit_vars["quant"] = _scale_weight_quant(variables["quant"], state_name, factor)
            step = make_eval_step(classifier_apply(target.model, qat=rebit))
            metrics = evaluate(step, rebit_vars, batches())
            return [_point(target, "qat_bits", qat.weight_quantizer, metrics, weight_bits=bits,
                           act_bits=qat.act_bits)]

        tasks.append(Task("qat_bits", qat.weight_quantizer, 1, run))
    if spec.qat_step_ratio and state_name is not None:
        ratios = spec.step_ratios()

        def run_ratio() -> list[Point]:
            transform = lambda v, r: {**v, "quant": _scale_weight_quant(v["quant"], state_name, r)}
            step = mapped_eval_step(classifier_apply(target.model, qat=qat), transform,
                                    chunk=spec.map_chunk)
            results = evaluate_mapped(step, variables, jnp.asarray(ratios), batches())
            return [_point(target, "qat_step_ratio", qat.weight_quantizer, m, weight_bits=trained,
                           act_bits=qat.act_bits, step_ratio=round(float(r), 6))
                    for r, m in zip(ratios, results, strict=True)]

        tasks.append(Task("qat_step_ratio", qat.weight_quantizer, len(ratios), run_ratio))
    return tasks
