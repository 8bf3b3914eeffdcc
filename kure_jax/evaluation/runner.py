"""``run_sweep``: restore checkpoints, sweep each under a :class:`SweepSpec`, write the report.

This is the program behind ``eval.py``; tests call it directly. It is the one module of
:mod:`kure_jax.evaluation` that depends on :mod:`kure_jax.training` (to restore checkpoints
written by ``train.py``); the others work on any ``(model, variables, dataset)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kure_jax import QATConfig, kurtosis_report
from kure_jax.evaluation import plots, report
from kure_jax.evaluation.spec import SweepSpec
from kure_jax.evaluation.sweep import SweepTarget, Task, plan_sweep, quantized_layers

__all__ = ["CheckpointError", "LoadedCheckpoint", "load_checkpoint", "run_sweep", "write_outputs"]

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or its weights do not fit its own config."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """A restored checkpoint with what the sweep needs.

    Attributes:
      label: unique name in the results; group: name shared by seeds of one recipe.
      path: the directory given.
      config: its training config; model, variables, dataset, qat: as in ``SweepTarget``.
    """

    label: str
    group: str
    path: str
    config: Any
    model: nn.Module
    variables: dict[str, PyTree]
    dataset: Any
    qat: QATConfig | None

    def target(self) -> SweepTarget:
        """The :class:`SweepTarget` that :func:`plan_sweep` takes."""
        return SweepTarget(label=self.label, group=self.group, model=self.model,
                           variables=self.variables, dataset=self.dataset, qat=self.qat)


def _first_line(err: BaseException, limit: int = 240) -> str:
    """``Type: first line`` of an exception, without TensorStore's long JSON spec."""
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}".rstrip(": ")


def _check_fits(path: str, config: Any, model: Any, variables: dict, image_shape: tuple) -> None:
    """Raises CheckpointError unless the params/batch_stats match the model of the config."""
    expected = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
    )
    for collection in ("params", "batch_stats"):
        want = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape) for k, v in
                jax.tree_util.tree_leaves_with_path(expected.get(collection, {}))}
        have = {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(np.shape(v)) for k, v
                in jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))}
        if want == have:
            continue
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        first = diff[0]
        raise CheckpointError(
            f"checkpoint {path}: its {collection} do not match the model of its own config "
            f"({config.model} {config.model_options.to_dict()}): {collection}/{first} is "
            f"{have.get(first, 'missing')} in the checkpoint, {want.get(first, 'absent')} in the "
            f"model ({len(diff)} mismatching entries)."
        )


def load_checkpoint(
    spec: str, *, which: str = "best", datasets: dict[str, Any] | None = None
) -> LoadedCheckpoint:
    """Restores ``[NAME=]PATH`` written by ``train.py`` and checks it against its config.

    Args:
      spec: a checkpoint path (workdir, ``checkpoints/``/``best/`` directory or step directory),
        optionally prefixed by a group name: ``kure=runs/kure_s0``. The label is the path's last
        component; the group is NAME or the label.
      which: ``"best"`` or ``"latest"`` (see ``restore_for_eval``).
      datasets: cache of ``get_dataset`` results by name, shared between checkpoints.

    Raises:
      CheckpointError: one line naming the path, for a missing or unreadable checkpoint, an
        unknown dataset, or weights whose shapes do not fit the model its config describes.
    """
    # Deferred: `import kure_jax.evaluation` stays free of Orbax and the data pipelines.
    from kure_jax.data import get_dataset
    from kure_jax.training import qat_config, restore_for_eval

    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        name, path = None, spec
    directory = pathlib.Path(path)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory.")
    try:
        config, model, variables = restore_for_eval(directory, which=which)
    except Exception as err:  # Orbax/JSON/IO errors of a damaged checkpoint all end here.
        message = f"checkpoint {path} cannot be restored ({_first_line(err)})."
        raise CheckpointError(message) from err
    datasets = {} if datasets is None else datasets
    try:
        if config.dataset not in datasets:
            datasets[config.dataset] = get_dataset(config.dataset)
        qat = qat_config(config, kernel_impl="jnp")  # not the training machine's kernels
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path}: {_first_line(err)}") from err
    dataset = datasets[config.dataset]
    try:
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
                            model=model, variables=variables, dataset=dataset, qat=qat)


def _unique_labels(loaded: list[LoadedCheckpoint]) -> list[LoadedCheckpoint]:
    seen: dict[str, int] = {}
    out = []
    for c in loaded:
        seen[c.label] = seen.get(c.label, 0) + 1
        if seen[c.label] > 1:
            c = dataclasses.replace(c, label=f"{c.label}#{seen[c.label]}")
        out.append(c)
    return out


def _describe(c: LoadedCheckpoint, spec: SweepSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's results.json entry and the weights of its histogram layers."""
    where, names = quantized_layers(c.model, c.dataset.image_shape, spec.layers)
    params = c.variables["params"]
    selected = names(params)
    kurt = {k: float(v) for k, v in jax.device_get(kurtosis_report(params, where)).items()}
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    weights = {n: np.asarray(flat[n]) for n in selected[: spec.histogram_layers]}
    entry = {
        "label": c.label, "group": c.group, "path": str(pathlib.Path(c.path).absolute()),
        "model": c.config.model, "model_options": c.config.model_options.to_dict(),
        "dataset": c.config.dataset, "num_test_images": int(c.dataset.num_eval_examples),
        "kure_lambda": float(c.config.kure.lambda_), "kure_target": float(c.config.kure.target),
        "qat": None if c.qat is None else c.qat.name, "quantized_layers": selected,
        "kurtosis": kurt, "config": c.config.to_dict(),
    }
    return entry, weights


def run_sweep(
    checkpoints: Sequence[str],
    spec: SweepSpec,
    out_dir: str | pathlib.Path,
    *,
    which: str = "best",
    progress: bool | None = None,
    after_task: Callable[[Task, list[dict]], None] | None = None,
) -> dict[str, Any]:
    """Evaluates every checkpoint under ``spec`` and writes the results into ``out_dir``.

    Every checkpoint is restored and checked before the first evaluation, so a bad path fails
    in seconds. ``results.json`` is rewritten after each task (see
    :mod:`kure_jax.evaluation.report`); on ``KeyboardInterrupt`` the finished points stay in
    it (``"complete": false``), ``results.csv`` and ``report.md`` are written for them, and
    the interrupt is re-raised.

    Args:
      checkpoints: ``[NAME=]PATH`` strings (see :func:`load_checkpoint`); checkpoints of
        different model configs may be mixed, each runs with its own model and dataset.
      spec: the sweep.
      out_dir: output directory: ``results.json``, ``results.csv``, ``report.md``, ``*.png``.
      which: ``"best"`` or ``"latest"`` checkpoint of a workdir.
      progress: show a tqdm progress bar (``None``: only when stderr is a terminal).
      after_task: called with each finished task and its points (e.g. for logging).

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
    described = [_describe(c, spec) for c in loaded]
    out = pathlib.Path(out_dir)
    writer = report.ResultsWriter(out, sweep=spec.to_config_dict(),
                                  checkpoints=[entry for entry, _ in described])
    plans = [(c, plan_sweep(c.target(), spec)) for c in loaded]
    total = sum(t.num_points for _, tasks in plans for t in tasks)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="pt", desc="sweep", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for checkpoint, tasks in plans:
            for task in tasks:
                bar.set_postfix_str(f"{checkpoint.label} {task.kind} {task.quantizer}")
                points = task.run()
                writer.add(points)
                bar.update(task.num_points)
                if after_task is not None:
                    after_task(task, points)
        writer.finish()
    finally:
        bar.close()
        data = writer.data
        if data["complete"]:
            # Histograms of the first checkpoint of each group (seeds look alike).
            weights: dict[str, Any] = {}
            seen: set[str] = set()
            for c, (_, w) in zip(loaded, described, strict=True):
                if c.group not in seen:
                    seen.add(c.group)
                    weights[c.label] = w
            write_outputs(data, out, weights=weights, with_plots=spec.plots)
        else:
            write_outputs(data, out, weights={}, with_plots=False)
    return data


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
