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
* ``"nested_requant"`` / ``"nested_slice"``: weight-only, at each width of ``nested.bits``:
  the float kernels re-quantised to min-max codes of that width, or the top bits of their int8
  codes (Matryoshka slicing); see :mod:`kure_jax.evaluation.nested_sweep`, which also gives a
  multi-bit QAT checkpoint (``SweepTarget.widths``) its ``"qat"`` point per trained width.
* ``"runtime"``: the float model converted and run in a real integer runtime (LiteRT, ONNX
  Runtime), ``quantizer`` e.g. ``"litert/int8"``; see :mod:`kure_jax.evaluation.runtimes`.

The weight-only and W/A PTQ points treat a QAT checkpoint's shadow weights like any float
model's (activations float unless quantised by a W/A pair), so their columns mean the same
for every checkpoint.

A target given as an ``apply_fn`` without its Linen module (an NNX or plain-JAX model, see
:func:`kure_jax.evaluation.evaluate_model`) gets every weight-only point; its W/A points are
*skipped*: planned as tasks whose ``skipped`` record (kind, quantizer, bits and a reason)
goes into ``results.json`` instead of an accuracy, since they intercept the inputs of Linen
``nn.Conv``/``nn.Dense`` layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from kure_jax import QATConfig, QuantPolicy, paper_selection, select
from kure_jax.evaluation import calibration, nested_sweep
from kure_jax.evaluation.forward import (
    ApplyFn,
    Metrics,
    classifier_apply,
    evaluate,
    evaluate_mapped,
    inference_kwargs,
    make_eval_step,
    mapped_eval_step,
    ptq_transform,
)
from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.evaluation.spec import SweepSpec
from kure_jax.selection import LeafPredicate, Selection, selection_mask

__all__ = ["POINT_KINDS", "SweepTarget", "Task", "apply_layers", "calibration_images", "plan_sweep",
           "quantized_layers", "target_layers", "test_batches"]

POINT_KINDS: tuple[str, ...] = (
    "fp", "weight", "weight_act", "step_ratio", "qat", "qat_bits", "qat_step_ratio", "runtime",
    "nested_requant", "nested_slice",
)
PyTree = Any
Point = dict[str, Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepTarget:
    """A trained model to sweep.

    Attributes:
      label: unique name of the checkpoint in the results.
      group: name shared by runs of the same recipe (e.g. seeds), for averaged tables.
      model: the unbound Flax Linen classifier, or ``None`` for a model known only by its
        ``apply_fn`` (then W/A and QAT points are not possible).
      variables: ``{"params", ...}``: weight PTQ quantises the selected kernels of
        ``variables["params"]`` (``{"params", "batch_stats"[, "quant"]}`` for checkpoints).
      dataset: a ``kure_jax.data.Dataset``, or any object with ``image_shape`` and
        ``eval_batches(global_batch_size=...)`` yielding ``{"image", "label", "mask"}``
        (the test split); its ``train_batches``, when it has them, give the W/A calibration
        images unless ``calibration`` is set.
      qat: the ``QATConfig`` the checkpoint was trained with, or ``None``.
      apply_fn: ``(variables, images) -> logits``; ``None``: ``classifier_apply(model)``.
      where: the kernel selection of weight PTQ, overriding ``spec.layers`` (``None``: use it).
      calibration: W/A calibration images ``(N, H, W, C)``, or a function returning them
        (called once, when the first W/A point runs); at most ``spec.calibration_images``
        are used.
      widths: a multi-bit QAT checkpoint's ``{bits: (QATConfig, batch_stats)}`` (each trained
        width's quantizers and BatchNorm statistics), or ``None``; then ``qat`` is its widest
        width and ``variables["batch_stats"]`` that width's statistics.
    """

    label: str
    group: str
    model: nn.Module | None = None
    variables: dict[str, PyTree]
    dataset: Any
    qat: QATConfig | None = None
    apply_fn: ApplyFn | None = None
    where: Selection = None
    calibration: np.ndarray | Callable[[], np.ndarray] | None = None
    widths: Mapping[int, tuple[QATConfig, PyTree]] | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    """A unit of work of a sweep: ``run()`` evaluates ``num_points`` points.

    A task the target cannot run has ``skipped`` set: the JSON-ready record ``{"checkpoint",
    "group", "kind", "quantizer", "weight_bits", "act_bits", "reason"}`` that the runner
    writes to ``results.json`` instead; its ``num_points`` is 0 and ``run()`` returns ``[]``.
    """

    kind: str
    quantizer: str
    num_points: int
    run: Callable[[], list[Point]]
    skipped: dict[str, Any] | None = None


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
            variables = model.init(jax.random.key(0), x, **inference_kwargs(model))
            found.append(paper_selection(variables["params"]))  # names and shapes only
            return variables

        jax.eval_shape(init, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
        where = found[0]
    return where, lambda params: [name for name, _ in select(params, where)]


def _kernel_call_order(
    apply_fn: ApplyFn, variables: dict[str, PyTree], image_shape: Sequence[int]
) -> list[tuple[str, Any]]:
    """``(path, abstract leaf)`` of the kernels of ``variables["params"]`` in call order.

    The order is the first use of each kernel in the jaxpr of ``apply_fn``: tracing runs the
    Python code top to bottom, so a layer called earlier consumes its kernel earlier. It needs
    no framework hook, so NNX (whose states are sorted by name) and plain JAX get it too.
    """
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                          variables["params"])
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    closed = jax.make_jaxpr(lambda p, x: apply_fn({**variables, "params": p}, x))(params, images)
    flags = jax.tree_util.tree_leaves(selection_mask(params))
    names = iter(select(params))
    invars = closed.jaxpr.invars[: len(flags)]  # the params' leaves, then the images
    kernels = {var: next(names) for var, flag in zip(invars, flags, strict=True) if flag}
    order: list[tuple[str, Any]] = []
    for eqn in closed.jaxpr.eqns:
        for var in eqn.invars:
            if not isinstance(var, jax_core.Literal) and var in kernels:
                order.append(kernels.pop(var))
    return order + list(kernels.values())  # unused kernels (if any) last


def apply_layers(
    apply_fn: ApplyFn, variables: dict[str, PyTree], image_shape: Sequence[int], layers: str
) -> tuple[LeafPredicate | None, Callable[[PyTree], list[str]]]:
    """:func:`quantized_layers` for a model known only by ``apply_fn(variables, images)``.

    ``"paper"`` applies ``kure_jax.paper_selection`` (the names ``stem_conv``/``head`` when
    present, else the first conv and the last dense) with the layer order read from the jaxpr
    of ``apply_fn`` on ``(1, *image_shape)`` float32 images: the order of each kernel's first
    use. Kernels are the rank >= 2 leaves named ``kernel`` of ``variables["params"]``.

    Raises:
      ValueError: for another ``layers`` value, or from ``paper_selection`` (e.g. no leaf
        named ``kernel`` of rank 4).
    """
    if layers not in ("paper", "kernels"):
        raise ValueError(f"layers must be 'paper' or 'kernels'; got {layers!r}.")
    where = None
    if layers == "paper":
        # A nested dict in call order: paper_selection reads the layer order from insertion.
        ordered: dict[str, Any] = {}
        for name, leaf in _kernel_call_order(apply_fn, variables, image_shape):
            node = ordered
            for key in name.split("/")[:-1]:
                node = node.setdefault(key, {})
            node["kernel"] = leaf
        where = paper_selection(ordered)
    return where, lambda params: [name for name, _ in select(params, where)]


def target_layers(
    target: SweepTarget, spec: SweepSpec
) -> tuple[Selection, Callable[[PyTree], list[str]]]:
    """The weight-PTQ selection of a target: ``target.where`` if set, else ``spec.layers``
    resolved by :func:`quantized_layers` (Linen model, no ``apply_fn``) or :func:`apply_layers`.

    Returns:
      ``(where, names)`` as :func:`quantized_layers`.

    Raises:
      ValueError: as :func:`quantized_layers` / :func:`apply_layers`.
    """
    image_shape = tuple(target.dataset.image_shape)
    if target.where is not None:
        return target.where, lambda params: [name for name, _ in select(params, target.where)]
    if target.apply_fn is None:
        return quantized_layers(target.model, image_shape, spec.layers)
    return apply_layers(target.apply_fn, target.variables, image_shape, spec.layers)


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


def plan_sweep(
    target: SweepTarget, spec: SweepSpec, *, mesh: EvalMesh | None = None
) -> list[Task]:
    """Every task of ``spec`` for ``target``, in order; nothing is evaluated yet.

    Compiled programs are shared between tasks: the float forward pass is compiled once and
    reused by every weight-only point (only the small quantisation program is compiled per
    policy), and each mapped sweep is one program.

    With ``mesh`` every forward pass (and the activation calibration) runs with the batch
    sharded over its devices and the variables replicated; the global eval batch is
    ``spec.eval_batch_size`` rounded up to a multiple of ``mesh.row_multiple``, and with
    several processes each reads its share of it from ``target.dataset``. The points equal one
    device's to float32 rounding, and bit for bit with ``mesh.micro_batch`` set (see
    :mod:`kure_jax.evaluation.parallel`).

    Raises:
      ValueError: if ``spec.layers`` selects nothing in the model, the model cannot be
        traced with the dataset's image shape, or a QAT target has no Linen ``model``.
    """
    if target.qat is not None and target.qat.quantizes and target.model is None:
        raise ValueError(f"target {target.label}: QAT points need its Linen model.")
    variables, dataset = target.variables, target.dataset
    batch_size = spec.eval_batch_size if mesh is None else mesh.global_batch_size(
        spec.eval_batch_size)
    batches = test_batches(dataset, batch_size, mesh)
    where, names = target_layers(target, spec)
    if mesh is not None:  # placed once: every task's programs take them as they are
        variables = mesh.replicate(variables)
        widths = target.widths and {b: (q, mesh.replicate(stats))
                                    for b, (q, stats) in target.widths.items()}
        target = dataclasses.replace(target, variables=variables, widths=widths)
    float_vars = {k: v for k, v in variables.items() if k != "quant"}
    apply_fp = classifier_apply(target.model) if target.apply_fn is None else target.apply_fn
    fp_step = make_eval_step(apply_fp, mesh=mesh)
    tasks: list[Task] = []
    add = lambda kind, quantizer, n, run: tasks.append(Task(kind, quantizer, n, run))

    add("fp", "fp", 1,
        lambda: [_point(target, "fp", "fp", evaluate(fp_step, float_vars, batches(),
                                                     mesh=mesh))])

    for bits in spec.weight_bits:
        for name in spec.weight_quantizers:
            policy = spec.weight_policy(name, bits)
            if policy.rounding == "stochastic":
                add("weight", name, spec.stochastic_seeds,
                    _stochastic_task(target, spec, apply_fp, float_vars, batches, name, policy,
                                     where, mesh))
                continue

            def run(name=name, policy=policy, bits=bits) -> list[Point]:
                quantized = jax.jit(ptq_transform(policy, where=where))(float_vars)
                metrics = evaluate(fp_step, quantized, batches(), mesh=mesh)
                return [_point(target, "weight", name, metrics, weight_bits=bits, policy=policy)]

            add("weight", name, 1, run)

    skip_wa = _wa_skip_reason(target)
    if spec.wa_pairs and skip_wa is not None:
        for w_bits, a_bits in spec.wa_pairs:
            record = {"checkpoint": target.label, "group": target.group, "kind": "weight_act",
                      "quantizer": f"W{w_bits}A{a_bits}", "weight_bits": w_bits,
                      "act_bits": a_bits, "reason": skip_wa}
            tasks.append(Task("weight_act", record["quantizer"], 0, lambda: [],
                              skipped=record))
    elif spec.wa_pairs:
        layer_names = calibration.layer_names(names(variables["params"]))
        cache: dict[int, calibration.ActivationCalibration] = {}

        def calibrated(act_bits: int) -> calibration.ActivationCalibration:
            if not cache:
                images = _calibration_images(target, spec)
                chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
                cache.update(calibration.calibrate_activations(
                    apply_fp, float_vars, chunks, layers=layer_names,
                    bits=sorted({a for _, a in spec.wa_pairs}), clip=spec.act_clip,
                    percentile=spec.act_percentile, mesh=mesh))
            return cache[act_bits]

        for w_bits, a_bits in spec.wa_pairs:
            def run_wa(w_bits=w_bits, a_bits=a_bits) -> list[Point]:
                calib = calibrated(a_bits)
                w_policy = spec.weight_policy(spec.wa_weight_quantizer, w_bits)
                quantized = jax.jit(ptq_transform(w_policy, where=where))(float_vars)
                act_apply = calibration.activation_quantized(
                    apply_fp, bits=a_bits, signed=calib.signed)
                step = make_eval_step(lambda v, x: act_apply(v[0], v[1], x), mesh=mesh)
                metrics = evaluate(step, (quantized, calib.steps), batches(), mesh=mesh)
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
                                    chunk=spec.map_chunk, mesh=mesh)
            results = evaluate_mapped(step, float_vars, jnp.asarray(ratios), batches(), mesh=mesh)
            return [_point(target, "step_ratio", spec.step_ratio_quantizer, m, weight_bits=bits,
                           step_ratio=round(float(r), 6), policy=policy)
                    for r, m in zip(ratios, results, strict=True)]

        add("step_ratio", spec.step_ratio_quantizer, len(ratios), run_ratio)

    point = lambda kind, quantizer, metrics, **fields: _point(target, kind, quantizer, metrics,
                                                              **fields)
    if target.widths:  # multi-bit QAT: every trained width as trained
        for task in nested_sweep.multibit_qat_tasks(target.model, variables, target.widths, spec,
                                                    batches=batches, point=point, mesh=mesh):
            add(*task)
    elif target.qat is not None and target.qat.quantizes:
        tasks.extend(_qat_tasks(target, spec, batches, mesh))
    for task in nested_sweep.nested_tasks(spec, float_vars=float_vars, fp_step=fp_step,
                                          batches=batches, where=where, point=point, mesh=mesh):
        add(*task)
    if spec.runtime_schemes:  # real integer runtimes (LiteRT, ONNX Runtime): their own module
        from kure_jax.evaluation.runtimes import runtime_tasks

        tasks.extend(Task("runtime", t.quantizer, t.num_points, t.run, skipped=t.skipped)
                     for t in runtime_tasks(target, spec, apply_fn=apply_fp, variables=float_vars,
                                            calibration=lambda: _calibration_images(target, spec),
                                            point=point))
    return tasks


def test_batches(dataset: Any, batch_size: int, mesh: EvalMesh | None) -> Callable[[], Any]:
    """``() -> iterator`` over this process's share of the test split's global batches of
    ``batch_size`` rows (``dataset.eval_batches``; with one process, all of each batch)."""
    if mesh is None or mesh.process_count == 1:
        return lambda: dataset.eval_batches(global_batch_size=batch_size)
    return lambda: dataset.eval_batches(global_batch_size=batch_size,
                                        process_index=mesh.process_index,
                                        process_count=mesh.process_count)


def _wa_skip_reason(target: SweepTarget) -> str | None:
    """Why the target's W/A points cannot run, or ``None``."""
    if target.model is None:
        return ("weight+activation PTQ intercepts the inputs of Flax Linen nn.Conv/nn.Dense "
                "layers; this model has no Linen module (an NNX or plain-JAX apply_fn)")
    if target.calibration is None and not hasattr(target.dataset, "train_batches"):
        return "weight+activation PTQ needs calibration images; none were given"
    return None


def _calibration_images(target: SweepTarget, spec: SweepSpec) -> np.ndarray:
    """The W/A calibration images: ``target.calibration`` or the first training batch of
    the dataset under ``spec.calibration_seed``, at most ``spec.calibration_images``."""
    if target.calibration is not None:
        images = target.calibration() if callable(target.calibration) else target.calibration
        return np.asarray(images)[: spec.calibration_images]
    return calibration_images(target.dataset, spec)


def calibration_images(dataset: Any, spec: SweepSpec) -> np.ndarray:
    """The W/A calibration images of a ``kure_jax.data.Dataset``: its first training batch
    under data-order seed ``spec.calibration_seed``, float32 ``(N, H, W, C)`` with
    ``N = min(spec.calibration_images, dataset.num_train_examples)``."""
    return next(dataset.train_batches(
        seed=spec.calibration_seed, start_step=0,
        global_batch_size=min(spec.calibration_images, dataset.num_train_examples),
    ))["image"]


def _stochastic_task(target, spec, apply_fp, float_vars, batches, name, policy, where, mesh):
    def run() -> list[Point]:
        step = mapped_eval_step(apply_fp, ptq_transform(policy, where=where, over="key"),
                                chunk=spec.map_chunk, mesh=mesh)
        seeds = np.arange(spec.stochastic_seeds)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
        results = evaluate_mapped(step, float_vars, keys, batches(), mesh=mesh)
        return [_point(target, "weight", name, m, weight_bits=policy.bits, seed=int(s),
                       policy=policy) for s, m in zip(seeds, results, strict=True)]

    return run


def _qat_tasks(
    target: SweepTarget, spec: SweepSpec, batches: Callable, mesh: EvalMesh | None
) -> list[Task]:
    qat, variables = target.qat, target.variables
    trained = qat.weight_bits
    tasks = [Task("qat", qat.name, 1, lambda: [_point(
        target, "qat", qat.name,
        evaluate(make_eval_step(classifier_apply(target.model, qat=qat), mesh=mesh), variables,
                 batches(), mesh=mesh),
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
            step = make_eval_step(classifier_apply(target.model, qat=rebit), mesh=mesh)
            metrics = evaluate(step, rebit_vars, batches(), mesh=mesh)
            return [_point(target, "qat_bits", qat.weight_quantizer, metrics, weight_bits=bits,
                           act_bits=qat.act_bits)]

        tasks.append(Task("qat_bits", qat.weight_quantizer, 1, run))
    if spec.qat_step_ratio and state_name is not None:
        ratios = spec.step_ratios()

        def run_ratio() -> list[Point]:
            transform = lambda v, r: {**v, "quant": _scale_weight_quant(v["quant"], state_name, r)}
            step = mapped_eval_step(classifier_apply(target.model, qat=qat), transform,
                                    chunk=spec.map_chunk, mesh=mesh)
            results = evaluate_mapped(step, variables, jnp.asarray(ratios), batches(), mesh=mesh)
            return [_point(target, "qat_step_ratio", qat.weight_quantizer, m, weight_bits=trained,
                           act_bits=qat.act_bits, step_ratio=round(float(r), 6))
                    for r, m in zip(ratios, results, strict=True)]

        tasks.append(Task("qat_step_ratio", qat.weight_quantizer, len(ratios), run_ratio))
    return tasks
