"""The vocabulary of a sweep: a :class:`Target` to sweep, the :class:`Task` s planned for it,
the :class:`Point` s they evaluate, the :class:`Context` every family plans with, and the
:class:`Family` protocol of one kind of point.

A *point* is one evaluation of the test split under one quantizer, a JSON-ready dict::

    {"checkpoint", "group", "kind", "quantizer", "weight_bits", "act_bits", "step_ratio",
     "seed", "policy", "act_policy", "accuracy", "loss", "count"}

Its ``kind`` is named by the family that plans it (:mod:`kure_jax.evaluation.families`); this
module knows no kind.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from kure_jax import QATConfig, QuantPolicy

__all__ = ["FAILED", "Context", "Family", "Point", "Target", "Task"]

PyTree = Any
Point = dict[str, Any]
# The "status" of a results.json "skipped" record for a point that ran but that the toolchain
# refused (a real-runtime conversion); records without a status were skipped before running.
FAILED = "failed"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Target:
    """A trained model to sweep.

    Attributes:
      label: unique name of the model in the results.
      group: name shared by runs of the same recipe (e.g. seeds), for averaged tables.
      model: the unbound Flax Linen classifier, or ``None`` for a model known only by its
        ``apply_fn`` (then W/A, QAT and real-runtime points are not possible).
      variables: ``{"params", ...}``: weight PTQ quantises the selected kernels of
        ``variables["params"]`` (``{"params", "batch_stats"[, "quant"]}`` for checkpoints).
      dataset: a ``kure_jax.data.Dataset``, or any object with ``image_shape`` and
        ``eval_batches(global_batch_size=...)`` yielding ``{"image", "label", "mask"}``
        (the test split); its ``train_batches``, when it has them, give the calibration
        images unless ``calibration`` is set.
      qat: the ``QATConfig`` the checkpoint was trained with, or ``None``.
      apply_fn: ``(variables, images) -> logits``; ``None``: ``classifier_apply(model)``.
      where: the kernel selection of weight PTQ, overriding the sweep's ``layers``.
      calibration: calibration images ``(N, H, W, C)``, a function returning them (called
        once, by the first task that needs them), or a dataset whose first training batch
        (under the sweep's calibration seed) gives them.
      widths: a multi-bit QAT checkpoint's ``{bits: (QATConfig, batch_stats)}``, or ``None``;
        then ``qat`` is its widest width and ``variables["batch_stats"]`` that width's.
    """

    label: str
    group: str
    model: nn.Module | None = None
    variables: dict[str, PyTree]
    dataset: Any
    qat: QATConfig | None = None
    apply_fn: Callable[[PyTree, Any], Any] | None = None
    where: Any = None
    calibration: Any = None
    widths: Mapping[int, tuple[QATConfig, PyTree]] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
    """A unit of work of a sweep: ``run()`` evaluates ``num_points`` points.

    A task the target cannot run has ``skipped`` set: the JSON-ready record ``{"checkpoint",
    "group", "kind", "quantizer", "weight_bits", "act_bits", "reason"}`` that the runner
    writes to ``results.json`` instead; its ``num_points`` is 0 and ``run()`` returns ``[]``.
    ``run()`` may also return records with ``"status": FAILED`` (a point the toolchain refused).
    """

    kind: str
    quantizer: str
    num_points: int
    run: Callable[[], list[Point]]
    skipped: dict[str, Any] | None = None


def _policy_dict(policy: QuantPolicy) -> dict[str, Any]:
    out = dataclasses.asdict(policy)
    out["axis"] = None if policy.axis is None else list(policy.axis)
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What the families' planners share for one target (built by ``plan_sweep``).

    Attributes:
      target: the model (its variables placed on ``mesh`` when one is given).
      float_vars: ``target.variables`` without QAT state: what PTQ quantises.
      apply_fp: ``(variables, images) -> logits`` of the float model.
      fp_step: the compiled evaluation step of ``apply_fp``, shared by every weight-only point.
      batches: ``() -> iterator`` over this process's share of the test batches.
      where: the kernel selection of weight PTQ; layer_names: ``params -> [kernel paths]``.
      mesh: an ``EvalMesh`` or ``None``.
      batch_size: the global eval batch size; map_chunk: points per vectorised chunk.
      configs: every family's validated config, by section name (cross-section settings).
    """

    target: Target
    float_vars: PyTree
    apply_fp: Callable[..., Any]
    fp_step: Callable[..., Any]
    batches: Callable[[], Any]
    where: Any
    layer_names: Callable[[PyTree], list[str]]
    mesh: Any
    batch_size: int
    map_chunk: int
    configs: Mapping[str, Any]
    _images: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)

    def point(self, kind: str, quantizer: str, metrics: Any, **fields: Any) -> Point:
        """The JSON-ready point of ``metrics`` (a ``Metrics``); ``QuantPolicy`` fields become
        dicts and a non-finite loss is recorded as ``None`` (JSON has no NaN)."""
        point = {"checkpoint": self.target.label, "group": self.target.group, "kind": kind,
                 "quantizer": quantizer, "weight_bits": None, "act_bits": None,
                 "step_ratio": 1.0, "seed": None, "policy": None, "act_policy": None}
        for key, value in fields.items():
            point[key] = _policy_dict(value) if isinstance(value, QuantPolicy) else value
        loss = metrics.loss if math.isfinite(metrics.loss) else None
        point.update(accuracy=metrics.accuracy, loss=loss, count=metrics.count)
        return point

    def record(self, kind: str, quantizer: str, reason: str, **fields: Any) -> dict[str, Any]:
        """A ``results.json`` "skipped" record (``weight_bits``/``act_bits`` in ``fields``)."""
        return {"checkpoint": self.target.label, "group": self.target.group, "kind": kind,
                "quantizer": quantizer, "weight_bits": None, "act_bits": None, **fields,
                "reason": reason}

    def skip(self, kind: str, quantizer: str, reason: str, **fields: Any) -> Task:
        """A task planned but not run, with its record and reason."""
        return Task(kind=kind, quantizer=quantizer, num_points=0, run=lambda: [],
                    skipped=self.record(kind, quantizer, reason, **fields))

    def calibration_problem(self, what: str) -> str | None:
        """Why ``what`` (points that intercept or convert the Linen model and calibrate
        activations) cannot run for this target, or ``None``."""
        if self.target.model is None:
            return (f"{what} needs the model's Flax Linen module; this model has no Linen "
                    "module (an NNX or plain-JAX apply_fn)")
        if self.target.calibration is None and not hasattr(self.target.dataset, "train_batches"):
            return f"{what} needs calibration images; none were given"
        return None

    def calibration_images(self, count: int, seed: int) -> np.ndarray:
        """At most ``count`` calibration images, float32 ``(N, H, W, C)``: ``target.calibration``
        or the first training batch under data-order ``seed``; computed once per setting."""
        if (count, seed) not in self._images:
            self._images[(count, seed)] = calibration_images(
                self.target.dataset, count, seed, given=self.target.calibration)
        return self._images[(count, seed)]


def calibration_images(dataset: Any, count: int, seed: int, *, given: Any = None) -> np.ndarray:
    """At most ``count`` calibration images: ``given`` (images, a function returning them, or a
    dataset), else ``dataset``'s; a dataset's are its first training batch under data-order
    ``seed`` (``train_batches``)."""
    if given is not None and not hasattr(given, "train_batches"):
        return np.asarray(given() if callable(given) else given)[:count]
    dataset = dataset if given is None else given
    return next(dataset.train_batches(
        seed=seed, start_step=0, global_batch_size=min(count, dataset.num_train_examples),
    ))["image"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """One kind of point: its config section, planner and renderers.

    Attributes:
      name: the sweep config section it owns (``config.<name>``), and its registry key.
      kinds: the point kinds it plans.
      parse: ``(section, config) -> its validated config`` (a frozen dataclass): ``section``
        is its own section as a dict, ``config`` the whole sweep config (for the few keys it
        reads from another section). Raises ``ValueError`` naming the key.
      plan: ``(Context, its config) -> [Task]``: nothing is evaluated yet.
      summary: ``(results, by_group) -> [(header, {row: cell})]``: its columns of the
        summary table, or ``None``.
      tables: ``(results, by_group) -> [markdown section]`` of ``report.md``, or ``None``.
      plot: ``(results, out_dir) -> [written PNG paths]``, or ``None``.
    """

    name: str
    kinds: tuple[str, ...]
    parse: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    plan: Callable[[Context, Any], list[Task]]
    summary: Callable[[Mapping[str, Any], bool], Sequence[tuple[str, dict[str, str]]]] | None = None
    tables: Callable[[Mapping[str, Any], bool], list[str]] | None = None
    plot: Callable[[Mapping[str, Any], Any], list[Any]] | None = None
