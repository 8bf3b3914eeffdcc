"""``run_sweep`` and ``evaluate_model``: sweep models under a :class:`Sweep`, write the report.

* :func:`run_sweep` restores checkpoints written by ``train.py`` (this is the one module of
  :mod:`kure_jax.evaluation` that depends on :mod:`kure_jax.training`, and only there).
* :func:`evaluate_model` takes any model as ``apply_fn(params, images) -> logits``.

Both plan their points with :func:`~kure_jax.evaluation.sweep.plan_sweep` and run them
through one loop (``_run_prepared``): the same ``results.json``, ``results.csv``,
``report.md`` and plots. This is the program behind ``eval.py``; tests call it directly.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import QATConfig, kurtosis_report
from kure_jax._arrays import first_non_finite, leaf_shapes, shape_mismatch
from kure_jax.evaluation import plots, report
from kure_jax.evaluation._types import Target, Task
from kure_jax.evaluation.forward import ApplyFn, check_apply
from kure_jax.evaluation.layers import target_layers
from kure_jax.evaluation.parallel import EvalMesh
from kure_jax.evaluation.sweep import Sweep, plan_sweep
from kure_jax.selection import Selection, select

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "evaluate_model",
    "load_checkpoint",
    "run_sweep",
    "write_outputs",
]

PyTree = Any
AfterTask = Callable[[Task, list[dict]], None]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or its weights do not fit its own config."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """A restored checkpoint with what the sweep needs.

    Attributes:
      label: unique name in the results; group: name shared by seeds of one recipe.
      path: the directory given.
      config: its training config; model, variables, dataset, qat, widths: as in
        ``Target`` (``widths`` for a multi-bit QAT checkpoint, ``config.qat.bits``).
      step: the training step restored; which: ``"best"`` or ``"latest"``, how it was chosen;
      skipped: ``(step directory, reason)`` of each newer step that did not restore.
    """

    label: str
    group: str
    path: str
    config: Any
    model: nn.Module
    variables: dict[str, PyTree]
    dataset: Any
    qat: QATConfig | None
    widths: Mapping[int, tuple[QATConfig, PyTree]] | None = None
    step: int | None = None
    which: str | None = None
    skipped: tuple[tuple[str, str], ...] = ()

    def target(self) -> Target:
        """The :class:`Target` that :func:`plan_sweep` takes."""
        return Target(label=self.label, group=self.group, model=self.model,
                           variables=self.variables, dataset=self.dataset, qat=self.qat,
                           widths=self.widths)


def _first_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an exception, without TensorStore's long JSON spec."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}".rstrip(": ")


def non_finite_problem(tree: PyTree, what: str) -> str | None:
    """``"<what>: <leaf> holds 2 NaN of 288 values; ..."`` for the first leaf of ``tree`` with
    a NaN or an infinity, or ``None``: such weights give NaN logits and a meaningless report."""
    found = first_non_finite(tree)
    if found is None:
        return None
    return (f"{what}: {found[0]} holds {found[1]}; non-finite weights cannot be evaluated (a "
            "diverged run or a damaged file).")


def _check_fits(path: str, config: Any, model: Any, variables: dict, image_shape: tuple) -> None:
    """Raises CheckpointError unless the params/batch_stats match the model of the config."""
    expected = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
    )
    for collection in ("params", "batch_stats"):
        want = leaf_shapes(expected.get(collection, {}))
        have = leaf_shapes(variables.get(collection, {}))
        mismatch = shape_mismatch(want, have)
        if mismatch is None:
            continue
        first, count = mismatch
        raise CheckpointError(
            f"checkpoint {path}: its {collection} do not match the model of its own config "
            f"({config.model} {config.model_options.to_dict()}): {collection}/{first} is "
            f"{have.get(first, 'missing')} in the checkpoint, {want.get(first, 'absent')} in the "
            f"model ({count} mismatching entries)."
        )


def load_checkpoint(
    spec: str, *, which: str = "best", datasets: dict[str, Any] | None = None
) -> LoadedCheckpoint:
    """Restores ``[NAME=]PATH`` written by ``train.py`` and checks it against its config.

    Args:
      spec: a checkpoint path (workdir, ``checkpoints/``/``best/`` directory or step directory),
        optionally prefixed by a group name: ``kure=runs/kure_s0``. The label is the path's last
        component; the group is NAME or the label.
      which: ``"best"`` or ``"latest"`` (see ``kure_jax.training.checkpoint.load_checkpoint``:
        a damaged newer step is skipped, and listed in the entry's ``skipped_steps``).
      datasets: cache of ``get_dataset`` results by name and ``config.dataset_options``,
        shared between checkpoints.

    A multi-bit QAT checkpoint (``config.qat.bits``) gets ``widths``: each trained width's
    ``QATConfig`` and BatchNorm statistics (its own with ``bn_per_bits``); its ``qat`` and
    ``variables["batch_stats"]`` are those of the widest width.

    Raises:
      CheckpointError: one line naming the path, for a missing or unreadable checkpoint, an
        unknown dataset, a NaN or infinity in its variables (naming the first such leaf),
        weights whose shapes do not fit the model its config describes (every
        width's statistics are checked), or per-width statistics without an entry of a width.
    """
    # Deferred: `import kure_jax.evaluation` stays free of Orbax and the data pipelines.
    from kure_jax.data import get_dataset
    from kure_jax.training import qat_config
    from kure_jax.training.build import multibit_widths
    from kure_jax.training.checkpoint import load_checkpoint as restore_checkpoint

    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        name, path = None, spec
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory.")
    try:
        restored = restore_checkpoint(directory, which=which)
    except Exception as err:  # Orbax/JSON/IO errors of a damaged checkpoint all end here.
        message = f"checkpoint {path} cannot be restored ({_first_line(err)})."
        raise CheckpointError(message) from err
    config, model, variables = restored.config, restored.model, restored.variables
    problem = non_finite_problem(variables, f"checkpoint {path}")
    if problem is not None:
        raise CheckpointError(problem)
    datasets = {} if datasets is None else datasets
    # The dataset as the run read it (data_dir, manual_dir, ...): one per name and options.
    options = config.get("dataset_options", {})
    options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
    dataset_key = f"{config.dataset} {sorted(options.items())}"
    try:
        if dataset_key not in datasets:
            datasets[dataset_key] = get_dataset(config.dataset, **options)
        qat = qat_config(config, kernel_impl="jnp")  # not the training machine's kernels
        widths = multibit_widths(config, variables["batch_stats"], kernel_impl="jnp") or None
    except (ValueError, AttributeError, KeyError, FileNotFoundError, ImportError) as err:
        raise CheckpointError(f"checkpoint {path}: {_first_line(err)}") from err
    if widths:  # multi-bit QAT: its float/PTQ points use the widest width's BatchNorm stats
        qat, stats = widths[max(widths)]
        variables = {**variables, "batch_stats": stats}
    dataset = datasets[dataset_key]
    try:
        for _, stats in (widths or {}).values():  # every width's statistics, not only one
            _check_fits(path, config, model, {**variables, "batch_stats": stats},
                        tuple(dataset.image_shape))
        _check_fits(path, config, model, variables, tuple(dataset.image_shape))
    except CheckpointError:
        raise
    except Exception as err:  # e.g. an option the model class does not accept
        raise CheckpointError(
            f"checkpoint {path}: its model ({config.model}) cannot be built or traced "
            f"({_first_line(err)})."
        ) from err
    label = directory.absolute().name
    return LoadedCheckpoint(label=label, group=name or label, path=str(path), config=config,
                            model=model, variables=variables, dataset=dataset, qat=qat,
                            widths=widths, step=int(restored.step), which=which,
                            skipped=tuple((str(d), why) for d, why in restored.skipped))


def _unique_labels(loaded: list[LoadedCheckpoint]) -> list[LoadedCheckpoint]:
    seen: dict[str, int] = {}
    out = []
    for c in loaded:
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c = dataclasses.replace(c, label=f"{c.label}#{seen[c.label]}")
        out.append(c)
    return out


def _layers_entry(
    target: Target, sweep: Sweep
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``quantized_layers`` and ``kurtosis`` of a target's results.json entry, and the weights
    of its histogram layers (name -> array)."""
    where, _ = target_layers(target, sweep.layers)
    params = target.variables["params"]
    chosen = select(params, where)  # names as kure_jax gives them (NNX ".value" dropped)
    kurt = {k: float(v) for k, v in jax.device_get(kurtosis_report(params, where)).items()}
    weights = {n: np.asarray(leaf) for n, leaf in chosen[: sweep.report.histogram_layers]}
    return {"quantized_layers": [n for n, _ in chosen], "kurtosis": kurt}, weights


def _describe(c: LoadedCheckpoint, sweep: Sweep) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's results.json entry and the weights of its histogram layers."""
    layers, weights = _layers_entry(c.target(), sweep)
    entry = {
        "label": c.label, "group": c.group, "path": str(pathlib.Path(c.path).absolute()),
        "model": c.config.model, "model_options": c.config.model_options.to_dict(),
        "dataset": c.config.dataset, "num_test_images": int(c.dataset.num_eval_examples),
        "kure_lambda": float(c.config.kure.lambda_), "kure_target": float(c.config.kure.target),
        "qat": None if c.qat is None else c.qat.name,
        "qat_widths": sorted(c.widths, reverse=True) if c.widths else None,
        "step": c.step, "which": c.which,
        "skipped_steps": [{"path": d, "reason": why} for d, why in c.skipped],
        **layers, "config": c.config.to_dict(),
    }
    return entry, weights


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A target ready to sweep: its results.json entry and its histogram weights."""

    target: Target
    entry: dict[str, Any]
    weights: dict[str, np.ndarray]


def _run_prepared(
    prepared: Sequence[_Prepared],
    sweep: Sweep,
    out_dir: str | pathlib.Path,
    *,
    progress: bool | None,
    after_task: AfterTask | None,
    mesh: EvalMesh | None,
) -> dict[str, Any]:
    """The sweep loop shared by :func:`run_sweep` and :func:`evaluate_model`: plans every
    target, records skipped tasks, runs the others, writes the outputs (also on interrupt).

    Every task's images/s go to the progress bar and to ``results.json``'s ``"timings"``.
    With several processes only process 0 writes files (all compute the same points)."""
    out = pathlib.Path(out_dir)
    chief = jax.process_index() == 0
    devices = 1 if mesh is None else mesh.num_devices
    writer = report.ResultsWriter(out, sweep=sweep.to_dict(),
                                  checkpoints=[p.entry for p in prepared], write=chief,
                                  devices=devices)
    plans = [(p, plan_sweep(p.target, sweep, mesh=mesh)) for p in prepared]
    skipped = [t.skipped for _, tasks in plans for t in tasks if t.skipped is not None]
    if skipped:  # known before any evaluation: an interrupted run's file lists them too
        writer.skip(skipped)
    total = sum(t.num_points for _, tasks in plans for t in tasks)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="pt", desc=f"sweep ({devices} device{'s' * (devices > 1)})",
               dynamic_ncols=True, disable=None if progress is None else not progress)
    rate = ""
    try:
        for p, tasks in plans:
            for task in tasks:
                if task.skipped is not None:
                    continue
                bar.set_postfix_str(f"{p.target.label} {task.kind} {task.quantizer}{rate}")
                start = time.perf_counter()
                points = task.run()
                seconds = time.perf_counter() - start
                images = sum(point.get("count") or 0 for point in points)
                writer.time({"checkpoint": p.target.label, "kind": task.kind,
                             "quantizer": task.quantizer, "points": len(points),
                             "seconds": round(seconds, 4),
                             "images_per_second": round(images / seconds, 1) if seconds else None})
                rate = f" | last {images / max(seconds, 1e-9):,.0f} img/s"
                # A point the toolchain refused (runtime tasks) is a record with a reason.
                failed = [r for r in points if r.get("status") == report.FAILED]
                if failed:
                    writer.skip(failed)
                    points = [r for r in points if r.get("status") != report.FAILED]
                writer.add(points)
                bar.update(task.num_points)
                if after_task is not None:
                    after_task(task, points)
        writer.finish()
    finally:
        bar.close()
        data = writer.data  # other processes hold the same points: process 0 writes them
        if chief and data["complete"]:
            # Histograms of the first checkpoint of each group (seeds look alike).
            weights: dict[str, Any] = {}
            seen: set[str] = set()
            for p in prepared:
                if p.target.group not in seen:
                    seen.add(p.target.group)
                    weights[p.target.label] = p.weights
            write_outputs(data, out, weights=weights, with_plots=sweep.report.plots)
        elif chief:
            write_outputs(data, out, weights={}, with_plots=False)
    return data


def run_sweep(
    checkpoints: Sequence[str],
    sweep: Sweep,
    out_dir: str | pathlib.Path,
    *,
    which: str = "best",
    progress: bool | None = None,
    after_task: AfterTask | None = None,
    mesh: EvalMesh | None = None,
) -> dict[str, Any]:
    """Evaluates every checkpoint under ``sweep`` and writes the results into ``out_dir``.

    Every checkpoint is restored and checked before the first evaluation, so a bad path fails
    in seconds. ``results.json`` is rewritten after each task (see
    :mod:`kure_jax.evaluation.report`); on ``KeyboardInterrupt`` the finished points stay in
    it (``"complete": false``), ``results.csv`` and ``report.md`` are written for them, and
    the interrupt is re-raised.

    Args:
      checkpoints: ``[NAME=]PATH`` strings (see :func:`load_checkpoint`); checkpoints of
        different model configs may be mixed, each runs with its own model and dataset.
      sweep: the sweep (:meth:`~kure_jax.evaluation.Sweep.from_config`).
      out_dir: output directory: ``results.json``, ``results.csv``, ``report.md``, ``*.png``.
      which: ``"best"`` or ``"latest"`` checkpoint of a workdir.
      progress: show a tqdm progress bar (``None``: only when stderr is a terminal).
      after_task: called with each finished task and its points (e.g. for logging).
      mesh: evaluate data-parallel over its devices (and processes), with results equal to
        one device's (:mod:`kure_jax.evaluation.parallel`); ``None``: the default device.
        With several processes each process calls ``run_sweep`` alike; process 0 writes.

    Returns:
      The results dict, as written to ``results.json``.

    Raises:
      CheckpointError: for a missing, damaged or mismatched checkpoint.
      ValueError: if no checkpoint is given or ``which`` is invalid.
    """
    if not checkpoints:
        raise ValueError("run_sweep needs at least one checkpoint.")
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest'; got {which!r}.")
    datasets: dict[str, Any] = {}
    loaded = _unique_labels([load_checkpoint(c, which=which, datasets=datasets)
                             for c in checkpoints])
    prepared = [_Prepared(c.target(), *_describe(c, sweep)) for c in loaded]
    return _run_prepared(prepared, sweep, out_dir, progress=progress, after_task=after_task,
                         mesh=mesh)


class _UserBatches:
    """The test split of :func:`evaluate_model` as the ``dataset`` of a :class:`Target`:
    ``eval_batches`` yields the user's batches (their own batch size) as dicts with a mask."""

    def __init__(self, batches: Any, image_shape: tuple[int, ...]) -> None:
        self._batches = batches
        self.image_shape = image_shape

    def eval_batches(self, *, global_batch_size: int | None = None) -> Iterator[dict]:
        del global_batch_size  # the user's batching is kept
        source = self._batches() if callable(self._batches) else self._batches
        for index, batch in enumerate(source):
            yield _as_batch(batch, index)


def _as_batch(batch: Any, index: int) -> dict[str, np.ndarray]:
    """``{"image", "label", "mask"}`` of an ``(images, labels)`` pair or a mapping."""
    if isinstance(batch, Mapping):
        try:
            images, labels = batch["image"], batch["label"]
        except KeyError as err:
            raise ValueError(f"batch {index} is a mapping without {err.args[0]!r}; expected "
                             "keys 'image' and 'label' (and optionally 'mask').") from None
        mask = batch.get("mask")
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        (images, labels), mask = batch, None
    else:
        raise ValueError(f"batch {index} is a {type(batch).__name__}; expected an "
                         "(images, labels) pair or a mapping with 'image' and 'label'.")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"batch {index}: images {images.shape} and labels {labels.shape} do "
                         "not match; expected images (B, ...) and integer labels (B,).")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"batch {index}: labels have dtype {labels.dtype}; expected integers.")
    mask = np.ones(len(labels), np.float32) if mask is None else np.asarray(mask, np.float32)
    return {"image": images, "label": labels.astype(np.int32), "mask": mask}


def evaluate_model(
    apply_fn: ApplyFn,
    params: PyTree,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    sweep: Sweep,
    *,
    out: str | pathlib.Path,
    name: str = "model",
    progress: bool | None = None,
    module: nn.Module | None = None,
    calibration: np.ndarray | Callable[[], np.ndarray] | None = None,
    where: Selection = None,
    group: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    after_task: AfterTask | None = None,
    mesh: EvalMesh | None = None,
) -> dict[str, Any]:
    """The robustness report of any model: ``sweep`` of ``apply_fn`` at ``params``.

    Writes ``results.json``, ``results.csv``, ``report.md`` and the PNG plots into ``out``
    as :func:`run_sweep` does for checkpoints (the same loop), with one entry labelled
    ``name``. Weight PTQ (the ``weight`` points and the step-ratio curve) quantises the
    kernels of ``params`` and works for any model. W/A PTQ intercepts the inputs of Linen
    ``nn.Conv``/``nn.Dense`` layers: it runs only when the Linen ``module`` that ``apply_fn``
    applies is given, together with ``calibration`` images; otherwise each W/A point is
    recorded under ``"skipped"`` in results.json (and in report.md) with the reason.
    On ``KeyboardInterrupt`` the finished points are kept as in :func:`run_sweep`.

    Args:
      apply_fn: ``apply_fn(params, images) -> logits``: float32 images ``(B, *image_shape)``
        to float logits ``(B, num_classes)``; pure and traceable (it is jitted). E.g.
        ``lambda v, x: model.apply(v, x, train=False)`` (Linen), an ``nnx.merge`` of a
        split NNX model, or plain JAX.
      params: the pytree of arrays ``apply_fn`` takes. Weight PTQ acts on its rank >= 2
        leaves named ``kernel`` (``sweep.layers="kernels"``), by default less the first
        layer and the last dense one (``"paper"``; the layer order is read from the jaxpr of
        ``apply_fn``); ``where`` overrides this selection.
      batches: the test split: ``(images, labels)`` pairs of NumPy arrays (images float32
        ``(B, ...)``, labels int ``(B,)``), or mappings with ``"image"``, ``"label"`` and
        optionally ``"mask"`` (0 on padding rows). Every point reads it once more, so give
        a re-iterable (a list, or an object whose ``__iter__`` starts over) or a
        zero-argument function returning a fresh iterator; a one-shot iterator is rejected.
        Batches are used as given (``sweep.eval_batch_size`` does not apply).
      sweep: the sweep (:meth:`~kure_jax.evaluation.Sweep.from_config`).
      out: the output directory (created).
      name: the model's label (and group, unless ``group`` is given) in the results.
      progress: show a tqdm progress bar (``None``: only when stderr is a terminal).
      module: the Linen module that ``apply_fn`` applies: enables the W/A points.
      calibration: W/A calibration images ``(N, *image_shape)`` (training images, say; at
        most ``weight_act.calibration_images`` are used), or a function returning them.
      where: the weight selection (any ``kure_jax`` ``where=``), overriding ``sweep.layers``.
      group: group name (models sharing one are averaged in the report).
      metadata: extra JSON-ready fields of the model's results.json entry (``"path"``,
        ``"model"``, ``"dataset"``, ...).
      after_task: called with each finished task and its points.
      mesh: evaluate data-parallel over its devices, as :func:`run_sweep`; with several
        processes, each process's ``batches`` are its share of every global batch.

    Returns:
      The results dict, as written to ``results.json``.

    Raises:
      ValueError: for a one-shot iterator, an empty or malformed first batch, params holding
        a NaN or an infinity (naming the first such leaf), images the
        model rejects or outputs that are not ``(B, C)`` logits (naming the shapes), or a
        selection that matches no kernel.
    """
    if not callable(batches) and iter(batches) is batches:
        raise ValueError("batches is a one-shot iterator, but every point of the sweep reads "
                         "the test split again: pass a list, or a function returning a fresh "
                         "iterator.")
    first = next(iter(batches() if callable(batches) else batches), None)
    if first is None:
        raise ValueError("batches yielded no batch.")
    image_shape = tuple(_as_batch(first, 0)["image"].shape[1:])
    problem = non_finite_problem(params, f"model {name}")
    if problem is not None:
        raise ValueError(problem)
    variables = {"params": params}
    # PTQ quantises variables["params"]: here the user's whole pytree.
    apply = lambda v, images: apply_fn(v["params"], images)
    check_apply(apply, variables, image_shape)
    target = Target(label=name, group=group or name, model=module, variables=variables,
                         dataset=_UserBatches(batches, image_shape), apply_fn=apply,
                         where=where, calibration=calibration)
    layers, weights = _layers_entry(target, sweep)
    entry = {"label": name, "group": target.group, "path": None, "model": None,
             "model_kind": "linen" if module is not None else "apply_fn", "qat": None,
             **dict(metadata or {}), **layers}
    return _run_prepared([_Prepared(target, entry, weights)], sweep, out, progress=progress,
                         after_task=after_task, mesh=mesh)


def write_outputs(
    data: dict[str, Any],
    out_dir: str | pathlib.Path,
    *,
    weights: dict[str, dict[str, np.ndarray]],
    with_plots: bool = True,
) -> None:
    """Writes ``results.csv``, the PNG plots (if ``with_plots``) and ``report.md`` for
    ``data`` (parsed ``results.json``); ``weights``: label -> layer -> array for histograms."""
    out = pathlib.Path(out_dir)
    report.write_csv(out / "results.csv", data["points"])
    written = [p.name for p in plots.write_plots(data, out, weights=weights)] if with_plots else []
    (out / "report.md").write_text(report.markdown_report(data, plots=written))
