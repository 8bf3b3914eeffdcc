"""The ``runtimes`` family of a sweep: the model converted and run in real integer runtimes.

Each name of ``spec.runtime_schemes`` (``"litert/int8"``, ``"ort/int8_per_channel_minmax"``,
...; see :mod:`kure_jax.evaluation.runtime_schemes`) is one task of one point of kind
``"runtime"``: the target's float inference function (float weights and BatchNorm running
statistics, no QAT quantizers) is converted by the backend of :mod:`kure_jax.deploy`
(LiteRT: jax2tf -> TFLite PTQ; ONNX Runtime: jax2onnx -> ``quantize_static``), calibrated on the
sweep's W/A calibration images (``weight_act.calibration_images`` / ``calibration_seed``) and
run on the whole test split. The point holds::

    {"kind": "runtime", "quantizer": "litert/int8", "weight_bits": 8, "act_bits": 8,
     "policy": {"runtime", "scheme", "weight_bits", "act_bits", "per_channel", ...,
                "model_bytes"}, "accuracy", "loss" (cross-entropy of the runtime's logits),
     "count", ...}

Outcomes that are not an accuracy:

* a target without its Linen module (an NNX or plain-JAX ``apply_fn``), or without calibration
  images: every runtime task is planned *skipped*, its record (with the reason) goes to
  ``results.json["skipped"]``;
* a conversion or quantisation the toolchain refuses: the task returns a *failed* record
  (``SKIPPED_FIELDS`` plus ``"status": "failed"``, the toolchain's one-line message as the
  reason), which the runner writes to ``results.json["skipped"]`` too; the sweep goes on;
* a missing package: :func:`runtime_tasks` raises :class:`RuntimePackageError` (an
  ``ImportError``) naming the pip packages, before anything is evaluated.

The ONNX export is done once per target and shared by its ONNX Runtime schemes; LiteRT converts
per scheme (the quantiser is part of the conversion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from kure_jax.deploy import litert, onnx_runtime
from kure_jax.deploy.runtime import RuntimeResult, failure
from kure_jax.evaluation.forward import ApplyFn, Metrics, logits_metrics
from kure_jax.evaluation.runtime_schemes import (
    FAILED,
    KIND,
    RuntimeScheme,
    missing_packages,
    parse_scheme,
)
from kure_jax.evaluation.spec import SweepSpec

__all__ = ["FAILED", "KIND", "RuntimePackageError", "RuntimeTask", "check_packages",
           "eval_split", "run_scheme", "runtime_tasks"]

PyTree = Any
SweepTarget = Any  # kure_jax.evaluation.sweep.SweepTarget (not imported: sweep imports us)


@dataclasses.dataclass(frozen=True)
class RuntimeTask:
    """One runtime point to plan: what ``plan_sweep`` wraps into a ``sweep.Task``.

    Attributes:
      quantizer: the scheme's name, e.g. ``"litert/int8"``.
      num_points: 1, or 0 for a skipped task.
      run: returns ``[point]`` or ``[failed record]`` (see the module docstring).
      skipped: the skipped record, or ``None``.
    """

    quantizer: str
    num_points: int
    run: Callable[[], list[dict[str, Any]]]
    skipped: dict[str, Any] | None = None


class RuntimePackageError(ImportError):
    """A runtime of the sweep cannot run: its pip packages are not installed."""


def check_packages(schemes: list[RuntimeScheme]) -> None:
    """Raises :class:`RuntimePackageError` naming every missing pip package of ``schemes``."""
    missing = missing_packages({s.runtime for s in schemes})
    if missing:
        lacking = {s.runtime for s in schemes if missing_packages({s.runtime})}
        names = ", ".join(s.name for s in schemes if s.runtime in lacking)
        raise RuntimePackageError(
            f"sweep key 'runtimes.schemes' ({names}) needs the package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)} (or pip install 'kure_jax[runtimes]'), or set "
            "runtimes.schemes=() to turn the runtimes off."
        )


def eval_split(dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split of a sweep target's dataset as NumPy arrays.

    Args:
      dataset: an object whose ``eval_batches(global_batch_size=...)`` yields ``{"image",
        "label", "mask"}`` (rows with mask 0 are padding and dropped).
      batch_size: the batch size to read it with.

    Returns:
      ``(images float32 (N, H, W, C), labels int32 (N,))``.

    Raises:
      ValueError: if the split is empty.
    """
    images, labels = [], []
    for batch in dataset.eval_batches(global_batch_size=batch_size):
        keep = np.asarray(batch["mask"]) > 0
        images.append(np.asarray(batch["image"], np.float32)[keep])
        labels.append(np.asarray(batch["label"], np.int32)[keep])
    if not images or sum(len(x) for x in labels) == 0:
        raise ValueError("the test split is empty: no runtime point can be evaluated.")
    return np.concatenate(images), np.concatenate(labels)


def run_scheme(
    scheme: RuntimeScheme,
    fn: Callable[[Any], Any],
    calibration: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 100,
    onnx_graph: Callable[[], Any] | None = None,
) -> RuntimeResult:
    """Runs one runtime scheme through :mod:`kure_jax.deploy` (the backends' own ``evaluate``).

    Args:
      scheme: the parsed scheme.
      fn: ``images (B, H, W, C) float32 -> logits``, inference mode.
      calibration: ``(N, H, W, C)`` float32 calibration images.
      images, labels: the test split.
      batch_size: LiteRT's fixed batch size.
      onnx_graph: returns the float ONNX export of ``fn`` (shared between ORT schemes; it may
        raise the exporter's error); ``None`` exports here.

    Returns:
      The backend's :class:`~kure_jax.deploy.RuntimeResult` (``accuracy=None`` and the reason
      when the toolchain refuses).

    Raises:
      ImportError: if a package of the backend is missing.
    """
    # ORT's calibrators print their progress ("Collecting tensor data ..."): kept off stdout,
    # where it would bury the sweep's progress bar and tables.
    with contextlib.redirect_stdout(io.StringIO()):
        if scheme.runtime == "litert":
            return litert.evaluate(fn, calibration, images, labels, scheme=scheme.litert_scheme,
                                   batch_size=batch_size)
        try:
            graph = onnx_graph() if onnx_graph is not None else onnx_runtime.export_onnx(
                fn, images.shape[1:])
        except ImportError:
            raise
        except Exception as err:  # the exporter's refusal is a result, not a crash
            return failure(onnx_runtime.RUNTIME, scheme.ort_scheme.name, err)
        return onnx_runtime.evaluate(graph, calibration, images, labels,
                                     scheme=scheme.ort_scheme)


def _skip_reason(target: SweepTarget) -> str | None:
    if target.model is None:
        return ("real-runtime points convert the Linen model in inference mode (with its "
                "BatchNorm statistics); this model has no Linen module (an NNX or plain-JAX "
                "apply_fn)")
    if target.calibration is None and not hasattr(target.dataset, "train_batches"):
        return "real-runtime PTQ needs calibration images; none were given"
    return None


def _record(target: SweepTarget, scheme: RuntimeScheme, reason: str, **extra: Any) -> dict:
    return {"checkpoint": target.label, "group": target.group, "kind": KIND,
            "quantizer": scheme.name, "weight_bits": scheme.weight_bits,
            "act_bits": scheme.act_bits, "reason": reason, **extra}


class _Shared:
    """What a target's runtime tasks compute once: the test split, the calibration images and
    the ONNX export (or the exporter's error)."""

    def __init__(self, target: SweepTarget, spec: SweepSpec, fn: Callable,
                 calibration: Callable[[], np.ndarray]) -> None:
        self._target, self._spec, self._fn, self._calibration = target, spec, fn, calibration
        self._cache: dict[str, Any] = {}

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        if "test" not in self._cache:
            self._cache["test"] = eval_split(self._target.dataset, self._spec.eval_batch_size)
        return self._cache["test"]

    def calibration(self) -> np.ndarray:
        if "calibration" not in self._cache:
            self._cache["calibration"] = np.asarray(self._calibration(), np.float32)
        return self._cache["calibration"]

    def onnx(self) -> Any:
        if "onnx" not in self._cache:
            try:
                self._cache["onnx"] = onnx_runtime.export_onnx(
                    self._fn, tuple(self._target.dataset.image_shape))
            except ImportError:
                raise
            except Exception as err:
                self._cache["onnx"] = err
        if isinstance(self._cache["onnx"], Exception):
            raise self._cache["onnx"]
        return self._cache["onnx"]


def runtime_tasks(
    target: SweepTarget,
    spec: SweepSpec,
    *,
    apply_fn: ApplyFn,
    variables: PyTree,
    calibration: Callable[[], np.ndarray],
    point: Callable[..., dict[str, Any]],
) -> list[RuntimeTask]:
    """One task per ``spec.runtime_schemes`` name for ``target``; nothing is converted yet.

    Args:
      target: the model to sweep (a ``SweepTarget``).
      spec: the sweep (``runtime_schemes``, ``runtime_batch_size``, ``eval_batch_size``).
      apply_fn: ``(variables, images) -> logits`` of the float model in inference mode.
      variables: its float variables (``{"params", "batch_stats"}``; no ``"quant"``).
      calibration: returns the sweep's W/A calibration images ``(N, H, W, C)`` (called once,
        by the first task that runs).
      point: the sweep's point constructor for the target, ``point(kind, quantizer,
        metrics, **fields)`` (accuracy and loss reduced from the runtime's logits by
        :func:`~kure_jax.evaluation.forward.logits_metrics`, as every other point).

    Returns:
      :class:`RuntimeTask` s, one point each (skipped tasks for a target without its
      Linen module or calibration images); ``[]`` when the runtimes are off.

    Raises:
      RuntimePackageError: if a runtime's pip package is missing (the message names it).
    """
    if not spec.runtime_schemes:
        return []
    schemes = [parse_scheme(name) for name in spec.runtime_schemes]
    reason = _skip_reason(target)
    if reason is not None:
        return [RuntimeTask(s.name, 0, lambda: [], skipped=_record(target, s, reason))
                for s in schemes]
    check_packages(schemes)
    host = jax.device_get(variables)  # NumPy constants for the converters (also if sharded)
    fn = lambda images: apply_fn(host, images)
    shared = _Shared(target, spec, fn, calibration)

    def task(scheme: RuntimeScheme) -> RuntimeTask:
        def run() -> list[dict[str, Any]]:
            images, labels = shared.test()
            result = run_scheme(scheme, fn, shared.calibration(), images, labels,
                                batch_size=spec.runtime_batch_size, onnx_graph=shared.onnx)
            if not result.ok:
                return [_record(target, scheme, result.error, status=FAILED)]
            policy = {**scheme.describe(), "model_bytes": result.model_bytes,
                      "calibration_images": len(shared.calibration())}
            metrics: Metrics = logits_metrics(result.logits, labels)
            return [point(KIND, scheme.name, metrics, weight_bits=scheme.weight_bits,
                          act_bits=scheme.act_bits, policy=policy)]

        return RuntimeTask(scheme.name, 1, run)

    return [task(s) for s in schemes]
