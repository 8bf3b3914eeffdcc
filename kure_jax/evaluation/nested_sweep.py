"""One model at every bit width: the ``nested`` section of a sweep and multi-bit QAT points.

Two weight-only evaluations of every checkpoint at each width ``r`` of ``spec.nested_bits``
(activations float, the kernels of ``spec.layers``), with asymmetric min-max codes
(:mod:`kure_jax.quant.nested`; per output channel with ``spec.nested_per_channel``):

* ``"nested_requant"``: the float kernels re-quantised to ``r``-bit codes (their own
  ``r``-bit grid: ``nested_fake_quant(w, bits=r, nest_bits=r)``).
* ``"nested_slice"``: the top ``r`` bits ``S(q_c, r)`` of the kernels'
  ``c = spec.nested_nest_bits``-bit codes, read back with the ``c``-bit scale and zero point:
  what a deployment that stores only int8 codes runs at ``r`` bits (Matryoshka Quantization).

At ``r = c`` both are the same ``c``-bit model. A ``"matryoshka"`` QAT checkpoint (which keeps
the first and last layers float, as ``layers="paper"``) sliced at a trained width is exactly
that width as trained.

A multi-bit QAT checkpoint (``SweepTarget.widths``: ``{bits: (QATConfig, batch_stats)}``, from
``config.qat.bits``) gets, instead of the single-width QAT points:

* ``"qat"``: one point per trained width, as trained (its quantizers, its BatchNorm statistics);
  ``quantizer`` is the width's ``QATConfig.name``.
* ``"qat_bits"``: the checkpoint's quantizers at each width of ``spec.qat_bits`` (weights, and
  activations where they were quantised, at that width, as every width was trained), with the
  BatchNorm statistics of the nearest trained width (the wider one on a tie).

The functions here return ``(kind, quantizer, num_points, run)`` tuples that
:func:`kure_jax.evaluation.sweep.plan_sweep` turns into its tasks; ``point(kind, quantizer,
metrics, **fields)`` is its point constructor for the target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from kure_jax import QATConfig
from kure_jax.evaluation.forward import classifier_apply, evaluate, make_eval_step
from kure_jax.evaluation.spec import SweepSpec
from kure_jax.quant.nested import nested_fake_quant
from kure_jax.selection import Selection, selection_mask

__all__ = ["multibit_qat_tasks", "nearest_width", "nested_tasks", "nested_transform"]

PyTree = Any
Point = dict[str, Any]
PointFn = Callable[..., Point]
TaskSpec = tuple[str, str, int, Callable[[], list[Point]]]


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
        mask = selection_mask(params, where)
        quantized = jax.tree.map(
            lambda w, chosen: nested_fake_quant(w, bits=bits, nest_bits=nest_bits,
                                                channel_axes=axes) if chosen else w,
            params, mask)
        return {**variables, "params": quantized}

    return transform


def nested_tasks(
    spec: SweepSpec,
    *,
    float_vars: PyTree,
    fp_step: Callable[..., jax.Array],
    batches: Callable[[], Any],
    where: Selection,
    point: PointFn,
    mesh: Any = None,
) -> list[TaskSpec]:
    """The ``nested_requant`` and ``nested_slice`` tasks of ``spec.nested_bits`` (one point
    each), evaluated with the float forward pass ``fp_step`` on ``float_vars`` (under
    ``mesh``, an :class:`~kure_jax.evaluation.parallel.EvalMesh` or ``None``)."""
    tasks: list[TaskSpec] = []
    c = spec.nested_nest_bits
    scope = "per_channel" if spec.nested_per_channel else "per_tensor"
    for r in spec.nested_bits:
        for kind, nest in (("nested_requant", r), ("nested_slice", c)):
            name = f"minmax_{scope}" if kind == "nested_requant" else f"int{c}_slice_{scope}"

            def run(kind=kind, nest=nest, name=name, r=r) -> list[Point]:
                transform = nested_transform(r, nest_bits=nest, per_channel=spec.nested_per_channel,
                                             where=where)
                metrics = evaluate(fp_step, jax.jit(transform)(float_vars), batches(), mesh=mesh)
                policy = {"bits": r, "nest_bits": nest, "symmetric": False,
                          "per_channel": spec.nested_per_channel}
                return [point(kind, name, metrics, weight_bits=r, policy=policy)]

            tasks.append((kind, name, 1, run))
    return tasks


def nearest_width(bits: int, trained: Sequence[int]) -> int:
    """The trained width closest to ``bits`` (the wider one on a tie)."""
    return min(trained, key=lambda t: (abs(t - bits), -t))


def multibit_qat_tasks(
    model: Any,
    variables: PyTree,
    widths: Mapping[int, tuple[QATConfig, PyTree]],
    spec: SweepSpec,
    *,
    batches: Callable[[], Any],
    point: PointFn,
    mesh: Any = None,
) -> list[TaskSpec]:
    """The ``"qat"`` point of every trained width and the ``"qat_bits"`` points of
    ``spec.qat_bits`` of a multi-bit QAT checkpoint (see the module docstring).

    Args:
      model: the Linen classifier.
      variables: ``{"params", "batch_stats"[, "quant"]}`` (``batch_stats`` is replaced by
        each width's).
      widths: ``{bits: (QATConfig, batch_stats)}`` of the trained widths (placed like
        ``variables``: replicated on ``mesh``'s devices when it is given).
      mesh: as in :func:`nested_tasks`.
    """
    steps: dict[QATConfig, Callable[..., jax.Array]] = {}

    def run_at(qat: QATConfig, stats: PyTree):
        if qat not in steps:
            steps[qat] = make_eval_step(classifier_apply(model, qat=qat), mesh=mesh)
        return evaluate(steps[qat], {**variables, "batch_stats": stats}, batches(), mesh=mesh)

    def qat_task(kind: str, qat: QATConfig, stats: PyTree) -> TaskSpec:
        quantizer = qat.name if kind == "qat" else qat.weight_quantizer

        def run() -> list[Point]:
            return [point(kind, quantizer, run_at(qat, stats), weight_bits=qat.weight_bits,
                          act_bits=qat.act_bits)]

        return kind, quantizer, 1, run

    tasks = [qat_task("qat", qat, stats) for qat, stats in widths.values()]
    trained = list(widths)
    for bits in spec.qat_bits:
        base, stats = widths[nearest_width(bits, trained)]
        try:
            qat = dataclasses.replace(base, weight_bits=None if base.weight_bits is None else bits,
                                      act_bits=None if base.act_bits is None else bits)
        except ValueError:  # e.g. "matryoshka" above its nest_bits: not a width of this model
            continue
        tasks.append(qat_task("qat_bits", qat, stats))
    return tasks
