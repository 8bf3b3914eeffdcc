"""The ``runtimes`` family: the model converted and run in real integer runtimes.

``config.runtimes``:

* ``schemes``: names such as ``"litert/int8"``, ``"litert/16x8"``,
  ``"ort/int8_per_channel_minmax"`` (grammar in
  :mod:`kure_jax.evaluation.families.runtime_schemes`); ``()`` (the default sweep's) is off.
* ``litert_batch_size``: the fixed batch size of the LiteRT models.

Each scheme is one task of one point of kind ``"runtime"``: the target's float inference
function (float weights and BatchNorm running statistics, no QAT quantizers) is converted by
the backend of :mod:`kure_jax.deploy` (LiteRT: jax2tf -> TFLite PTQ; ONNX Runtime: jax2onnx ->
``quantize_static``), calibrated on the ``weight_act`` section's calibration images and run on
the whole test split. The point's ``policy`` describes the scheme (and ``model_bytes``).

Outcomes that are not an accuracy:

* a target without its Linen module or calibration images: every task is planned *skipped*;
* a conversion the toolchain refuses: the task returns a *failed* record (``"status":
  FAILED``, the toolchain's one-line message as the reason); the sweep goes on;
* a missing package: planning raises :class:`RuntimePackageError` (an ``ImportError``)
  naming the pip packages, before anything is evaluated.

The ONNX export is done once per target and shared by its ONNX Runtime schemes; LiteRT converts
per scheme (the quantiser is part of the conversion). Report: the "Real integer runtimes"
table, each runtime beside kure_jax's own emulation (the ``weight_act`` point of the same
bit widths).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from kure_jax.deploy import litert, onnx_runtime
from kure_jax.deploy.runtime import RuntimeResult, failure
from kure_jax.evaluation import _checks, _tables
from kure_jax.evaluation._types import FAILED, Context, Family, Task
from kure_jax.evaluation.families import fp, weight_act
from kure_jax.evaluation.families.runtime_schemes import (
    RuntimeScheme,
    missing_packages,
    parse_scheme,
)
from kure_jax.evaluation.forward import logits_metrics

__all__ = ["FAMILY", "KIND", "RuntimePackageError", "RuntimesConfig", "eval_split", "run_scheme"]

SECTION = "runtimes"
KIND = "runtime"


class RuntimePackageError(ImportError):
    """A runtime of the sweep cannot run: its pip packages are not installed."""


def _schemes(values: Any) -> tuple[str, ...]:
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"sweep key '{SECTION}.schemes' must be a tuple of names such as "
                         f"('litert/int8', 'ort/int8_per_channel_minmax'); got {values!r}.")
    names = tuple(parse_scheme(v).name for v in values)
    if len(set(names)) != len(names):
        raise ValueError(f"sweep key '{SECTION}.schemes' lists a name twice: {list(names)}.")
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimesConfig:
    """``config.runtimes`` (module docstring), validated on construction.

    Raises:
      ValueError: naming the key, for any invalid value.
    """

    schemes: tuple[str, ...] = ()
    litert_batch_size: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "schemes", _schemes(self.schemes))
        object.__setattr__(self, "litert_batch_size", _checks.integer(
            self.litert_batch_size, f"{SECTION}.litert_batch_size", 1))


def parse(section: Mapping[str, Any], config: Mapping[str, Any]) -> RuntimesConfig:
    del config
    return _checks.build(RuntimesConfig, section, SECTION)


def check_packages(schemes: list[RuntimeScheme]) -> None:
    """Raises :class:`RuntimePackageError` naming every missing pip package of ``schemes``."""
    missing = missing_packages({s.runtime for s in schemes})
    if missing:
        lacking = {s.runtime for s in schemes if missing_packages({s.runtime})}
        names = ", ".join(s.name for s in schemes if s.runtime in lacking)
        raise RuntimePackageError(
            f"sweep key '{SECTION}.schemes' ({names}) needs the package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)} (or pip install 'kure_jax[runtimes]'), or set "
            f"{SECTION}.schemes=() to turn the runtimes off."
        )


def eval_split(dataset: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole test split of a target's dataset as NumPy arrays.

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
            return litert.measure(fn, calibration, images, labels, scheme=scheme.litert_scheme,
                                   batch_size=batch_size)
        try:
            graph = onnx_graph() if onnx_graph is not None else onnx_runtime.export_onnx(
                fn, images.shape[1:])
        except ImportError:
            raise
        except Exception as err:  # the exporter's refusal is a result, not a crash
            return failure(onnx_runtime.RUNTIME, scheme.ort_scheme.name, err)
        return onnx_runtime.measure(graph, calibration, images, labels,
                                     scheme=scheme.ort_scheme)


def _once(compute: Callable[[], Any]) -> Callable[[], Any]:
    """``compute()`` on the first call, its result (or its error, raised again) after."""
    cache: list[Any] = []

    def get() -> Any:
        if not cache:
            try:
                cache.append(compute())
            except ImportError:
                raise
            except Exception as err:
                cache.append(err)
        if isinstance(cache[0], Exception):
            raise cache[0]
        return cache[0]

    return get


def plan(ctx: Context, cfg: RuntimesConfig) -> list[Task]:
    schemes = [parse_scheme(name) for name in cfg.schemes]
    problem = ctx.calibration_problem("real-runtime PTQ (the Linen model in inference mode, "
                                      "with its BatchNorm statistics)")
    if problem is not None:
        return [ctx.skip(KIND, s.name, problem, weight_bits=s.weight_bits, act_bits=s.act_bits)
                for s in schemes]
    if schemes:
        check_packages(schemes)
    host = jax.device_get(ctx.float_vars)  # NumPy constants for the converters
    fn = lambda images: ctx.apply_fp(host, images)
    calib = weight_act.calibration_of(ctx)
    test = _once(lambda: eval_split(ctx.target.dataset, ctx.batch_size))
    images = _once(lambda: np.asarray(ctx.calibration_images(calib.calibration_images,
                                                             calib.calibration_seed), np.float32))
    onnx = _once(lambda: onnx_runtime.export_onnx(fn, tuple(ctx.target.dataset.image_shape)))

    def task(scheme: RuntimeScheme) -> Task:
        def run() -> list[dict[str, Any]]:
            x, labels = test()
            result = run_scheme(scheme, fn, images(), x, labels,
                                batch_size=cfg.litert_batch_size, onnx_graph=onnx)
            if not result.ok:
                return [ctx.record(KIND, scheme.name, result.error, status=FAILED,
                                   weight_bits=scheme.weight_bits, act_bits=scheme.act_bits)]
            policy = {**scheme.describe(), "model_bytes": result.model_bytes,
                      "calibration_images": len(images())}
            return [ctx.point(KIND, scheme.name, logits_metrics(result.logits, labels),
                              weight_bits=scheme.weight_bits, act_bits=scheme.act_bits,
                              policy=policy)]

        return Task(kind=KIND, quantizer=scheme.name, num_points=1, run=run)

    return [task(s) for s in schemes]


# ------------------------------------------------------------------------------------ report


def _mean(data: Mapping[str, Any], labels: list[str], kind: str,
          quantizer: str | None = None) -> float | None:
    """Mean over ``labels`` of each checkpoint's accuracy for the matching point(s) at r = 1."""
    per = []
    for label in labels:
        accs = [p["accuracy"] for p in data["points"] if p["checkpoint"] == label
                and p["kind"] == kind and (quantizer is None or p["quantizer"] == quantizer)
                and p.get("step_ratio", 1.0) == 1.0]
        if accs:
            per.append(float(np.mean(accs)))
    return float(np.mean(per)) if per else None


def _columns(data: Mapping[str, Any]) -> list[tuple[str, int | None, int | None]]:
    """``(quantizer, weight_bits, act_bits)`` of every runtime scheme, first-seen order."""
    seen: dict[str, tuple[str, int | None, int | None]] = {}
    for record in [*data["points"], *data.get("skipped", [])]:
        if record["kind"] == KIND and record["quantizer"] not in seen:
            seen[record["quantizer"]] = (record["quantizer"], record["weight_bits"],
                                         record["act_bits"])
    return list(seen.values())


def runtimes_table(data: Mapping[str, Any], *, by_group: bool = False) -> str | None:
    """The table (markdown) of the runtime points, or ``None`` if there are none.

    Rows are checkpoints (or groups); columns the runtime schemes grouped by their (weight
    bits, activation bits), each group followed by ``ours WwAa``: the sweep's ``weight_act``
    point at the same widths ("–" without one). A refused point reads ``failed``, a skipped one
    ``skipped``; a note says what "ours" is.
    """
    columns = _columns(data)
    if not columns:
        return None
    status: dict[tuple[str, str], str] = {}
    for r in data.get("skipped", []):
        if r["kind"] == KIND:
            status[(r["checkpoint"], r["quantizer"])] = (
                "failed" if r.get("status") == FAILED else "skipped")
    pairs = list(dict.fromkeys((w, a) for _, w, a in columns))
    header, layout = ["model", "JAX FP"], []
    for pair in pairs:
        for column in columns:
            if (column[1], column[2]) == pair:
                header.append(column[0])
                layout.append((KIND, column[0]))
        if pair[0] is not None:
            header.append(f"ours {weight_act.pair_name(*pair)}")
            layout.append((weight_act.KIND, weight_act.pair_name(*pair)))
    body = []
    for name, labels in _tables.rows(data, by_group):
        cells = [name, _tables.pct(_mean(data, labels, fp.KIND))]
        for kind, quantizer in layout:
            value = _mean(data, labels, kind, quantizer)
            if kind != KIND:
                cells.append(_tables.pct(value))
            elif value is not None:
                # A group mean over the checkpoints that ran; say how many did not.
                missing = [status[(label, quantizer)] for label in labels
                           if (label, quantizer) in status]
                text = _tables.pct(value)
                cells.append(f"{text} ({len(missing)} {missing[0]})" if missing else text)
            else:
                found = [status.get((label, quantizer)) for label in labels]
                cells.append(next((s for s in found if s), "–"))
        body.append(cells)
    sweep = data.get("sweep", {})
    wa = sweep.get(weight_act.KIND, {})
    note = ("'ours WwAa' is kure_jax's own emulation of the closest scheme: the sweep's "
            f"weight+activation PTQ point at those bit widths (weight quantizer "
            f"{wa.get('weight_quantizer', '?')!r}, activation clip {wa.get('act_clip', '?')!r}; "
            f"weights and inputs of the sweep's layers ({sweep.get('layers', '?')!r}) "
            "quantised). The runtimes quantise every layer and every tensor between ops, with "
            "asymmetric int8 activations (LiteRT 16x8: symmetric int16). Both start from the "
            "float weights and BatchNorm statistics.")
    return _tables.markdown(header, body) + "\n\n" + note


def tables(data: Mapping[str, Any], by_group: bool) -> list[str]:
    table = runtimes_table(data, by_group=by_group)
    return [] if table is None else ["### Real integer runtimes (LiteRT, ONNX Runtime)\n\n"
                                     + table]


FAMILY = Family(name=SECTION, kinds=(KIND,), parse=parse, plan=plan, tables=tables)
