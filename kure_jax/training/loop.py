"""``train_and_evaluate(config, workdir)``: the whole training program, resumable."""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from kure_jax import kurtosis_report
from kure_jax._distributed import all_processes
from kure_jax._interrupts import interrupts_deferred, signal_name
from kure_jax.data import Dataset, get_dataset
from kure_jax.training.build import build_model, qat_config, step_config
from kure_jax.training.checkpoint import CheckpointError, Checkpoints, restore_for_eval
from kure_jax.training.config import config_to_json, every_steps, total_steps, validate_config
from kure_jax.training.lock import WorkdirLock, WorkdirLockedError
from kure_jax.training.metrics import MetricsWriter, Progress, format_metrics, mean_metrics
from kure_jax.training.multibit import per_width_batch_stats
from kure_jax.training.optim import make_optimizer, make_schedule
from kure_jax.training.parallel import Parallel, make_parallel
from kure_jax.training.preemption import RunStopped, stop_signal, stop_signals
from kure_jax.training.resume import ConfigChangedError, config_changes
from kure_jax.training.state import TrainState, create_train_state, state_from_tree, state_to_tree
from kure_jax.training.step import StepConfig, make_state_eval_step, make_train_step

__all__ = ["NonFiniteLossError", "RunStopped", "StartupError", "TrainResult",
           "train_and_evaluate"]


class StartupError(Exception):
    """A run could not start: invalid config, data not on disk, or an ``init_from`` checkpoint
    that is missing or does not fit the model. Nothing was trained.

    Raised as a subclass that is also the original error's type (``ValueError`` or
    ``FileNotFoundError``, the original chained as ``__cause__``), so code catching those still
    does; ``train.py`` prints it as one ``error:`` line.
    """


class _StartupValueError(StartupError, ValueError):
    """A :class:`StartupError` from a ``ValueError``."""


class _StartupFileNotFoundError(StartupError, FileNotFoundError):
    """A :class:`StartupError` from a ``FileNotFoundError``."""


def _startup_error(err: Exception, context: str = "") -> StartupError:
    kind = _StartupFileNotFoundError if isinstance(err, FileNotFoundError) else _StartupValueError
    return kind(f"{context}{err}")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss, gradient or state; nothing from that step was saved.

    Attributes:
      step: the 1-based optimizer step whose result was not finite.
      metrics: that step's metrics.
    """

    def __init__(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics = metrics
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "finite")
        super().__init__(
            f"Non-finite loss, gradient or state at step {step} ({shown}). Training stopped and "
            "no checkpoint of this state was written; lower the learning rate or the KURE "
            "lambda, or check the input data, then rerun to resume from the last checkpoint."
        )


class TrainResult(NamedTuple):
    """What :func:`train_and_evaluate` returns.

    Attributes:
      state: the final state, with unsharded-equivalent (replicated) arrays.
      eval_metrics: the last evaluation: ``accuracy``, ``loss``, ``count``, ``kurtosis``.
    """

    state: TrainState
    eval_metrics: dict[str, Any]


def _evaluate(
    eval_step: Callable[[TrainState, Any], dict[str, jax.Array]],
    state: TrainState,
    dataset: Dataset,
    parallel: Parallel,
    batch_size: int,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the whole evaluation split.

    Args:
      eval_step: ``parallel.compile_eval_step(make_state_eval_step(...))``.
      state: the state as placed by ``parallel``.
      dataset: the dataset; its eval batches are placed by ``parallel``.
      parallel: the data-parallel strategy.
      batch_size: global eval batch size.

    Returns:
      ``{"accuracy", "loss", "count"}`` over the unmasked examples; for multi-bit QAT also
      ``accuracy_w8``, ``loss_w8``, ... per width, and ``accuracy``/``loss`` are their means.
    """
    totals: dict[str, float] = {}
    for batch in dataset.eval_batches(
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        sums = parallel.metrics_to_host(eval_step(state, parallel.place_batch(batch)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals["count"]
    metrics = {"accuracy": totals["correct"] / count, "loss": totals["loss_sum"] / count,
               "count": int(count)}
    # Multi-bit QAT: each width's own numbers; "accuracy" (which picks the best checkpoint) is
    # their mean.
    for key, value in totals.items():
        for name, out in (("correct_", "accuracy_"), ("loss_sum_", "loss_")):
            if key.startswith(name):
                metrics[out + key[len(name):]] = value / count
    return metrics


def _check_sizes(config: ml_collections.ConfigDict, dataset: Dataset, parallel: Parallel) -> None:
    if dataset.num_classes != config.num_classes:
        raise ValueError(
            f"config.num_classes={config.num_classes} but dataset {config.dataset!r} has "
            f"{dataset.num_classes} classes."
        )
    for field in ("batch_size", "eval_batch_size"):
        if config[field] % parallel.num_devices:
            raise ValueError(
                f"config.{field}={config[field]} must be divisible by the number of devices "
                f"({parallel.num_devices})."
            )
    if config.batch_size > dataset.num_train_examples:
        raise ValueError(
            f"config.batch_size={config.batch_size} exceeds the {dataset.num_train_examples} "
            f"training examples of {config.dataset!r}."
        )


def _layer_kurtosis(state: TrainState, spec: StepConfig) -> dict[str, float]:
    report = jax.device_get(kurtosis_report(state.params, spec.kure_where))
    return {name: float(value) for name, value in report.items()}


def _save_on_interrupt(step, state, unchecked, parallel, save, is_chief) -> None:
    """On Ctrl-C, saves the last finished step so that rerunning the command resumes there.

    Skipped (the last periodic checkpoint stands) on several processes, where a save needs
    every process and only this one was interrupted; when a step not yet checked is not
    finite; and when the interrupt came inside a step call after it donated its input state
    (the loop holds Ctrl-C back over that call, unless another SIGINT handler is installed).
    """
    reason = None
    if jax.process_count() > 1:
        reason = "a save needs every process"
    elif any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)):
        reason = "the interrupt came inside a step"
    elif not all(parallel.metrics_to_host(m)["finite"] for _, m in unchecked):
        reason = "the last steps were not finite"
    else:
        try:
            save(step, latest=True, eval_metrics=None)
        except Exception as err:  # e.g. interrupted inside a periodic save: keep the Ctrl-C
            reason = f"the save failed: {type(err).__name__}: {err}"
    if is_chief:
        logging.warning("Interrupted after step %d: %s.", step,
                        f"not saved ({reason}); the latest checkpoint stands" if reason
                        else "saved a checkpoint; rerun the same command to resume")


def _config_check(config_json: dict[str, Any], allow: bool, is_chief: bool) -> Callable:
    """``check_config`` for :meth:`Checkpoints.restore_latest`: stops a resume whose config
    changes the run (unless ``allow``), notes the harmless differences."""

    def check(stored: dict[str, Any], step: int) -> None:
        changes, notes = config_changes(stored, config_json)
        if changes and not allow:
            raise ConfigChangedError(
                f"the config changes the run being resumed (checkpoint step {step}): "
                f"{'; '.join(changes)}. Resume with the original values, use another --workdir, "
                "or pass --allow_config_change (allow_config_change=True) to resume anyway."
            )
        if (changes or notes) and is_chief:
            logging.warning("Resuming from step %d with a changed config: %s.", step,
                            "; ".join(changes + notes))

    return check


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    stop_at_step: int | None = None,
    force_unlock: bool = False,
    allow_config_change: bool = False,
) -> TrainResult:
    """Trains ``config.model`` on ``config.dataset`` with KURE (and QAT), evaluating and
    checkpointing into ``workdir``; resumes from the latest checkpoint there.

    A resumed run continues exactly like an uninterrupted one: the state is restored
    bit for bit, the batch of step ``s`` is a pure function of ``(config.seed, s)`` and
    the step's RNG is ``fold_in(state.rng, s)``.

    Args:
      config: a training config (see ``configs/mnist5k_kure.py``).
      workdir: directory for checkpoints, ``metrics.jsonl`` and TensorBoard files.
      stop_at_step: end this call at that step (after a checkpoint) instead of at the end
        of training, e.g. to fit a job time limit; calling again resumes.
      force_unlock: take ``workdir``'s lock (:mod:`kure_jax.training.lock`) even from a job
        that seems alive or runs on another host.
      allow_config_change: resume even if ``config`` changes the run's meaning compared with
        the checkpoint's config (:mod:`kure_jax.training.resume`).

    Returns:
      A :class:`TrainResult` with the final state and the last evaluation.

    Raises:
      StartupError: before anything is trained, as a ``ValueError`` for an invalid config
        (see :func:`validate_config`), an unknown dataset, batch sizes that do not divide
        over the devices, or an ``init_from`` checkpoint whose params/batch_stats do not fit
        the model (naming the first differing leaf and both shapes); as a
        ``FileNotFoundError`` for a dataset that is not on disk (saying what to download and
        where) or an ``init_from`` path without a checkpoint; also (as ``ValueError``) when
        another job holds ``workdir`` (naming it), when resuming under a config that changes the
        run (listing the fields), when no checkpoint of ``workdir`` restores (each step's
        reason; a damaged newer step is otherwise skipped and renamed ``<step>.damaged-<time>``)
        or a checkpoint does not fit the model.
      NonFiniteLossError: if a step's loss, gradients or new state are not finite;
        checkpoints written before it remain, none of the bad state is written.
      CheckpointSaveError: when a checkpoint save fails (disk full, permission), at the next
        step boundary; the checkpoints saved before it are untouched.
      RunStopped: on SIGTERM or SIGINT (every process, in agreement on several): after the
        current step, once its checkpoint is saved and written.
      KeyboardInterrupt: on a second Ctrl-C (or one where the handlers are not ours),
        re-raised after saving the last finished step (single process, finite state).
    """
    try:
        validate_config(config)
        dataset = get_dataset(config.dataset, **config.dataset_options.to_dict())
        parallel = make_parallel(config.parallel)
        _check_sizes(config, dataset, parallel)
    except (ValueError, FileNotFoundError) as err:
        raise _startup_error(err) from err
    workdir = pathlib.Path(workdir)
    with _workdir_lock(workdir, force=force_unlock):
        return _run(config, workdir, dataset, parallel, stop_at_step=stop_at_step,
                    allow_config_change=allow_config_change)


@contextlib.contextmanager
def _workdir_lock(workdir: pathlib.Path, *, force: bool) -> Iterator[None]:
    """Process 0 holds ``workdir``'s lock for the run; every process stops if it cannot."""
    lock = WorkdirLock(workdir, force=force)
    error = None
    if jax.process_index() == 0:
        try:
            lock.__enter__()
        except WorkdirLockedError as err:
            error = err
    if not all_processes(error is None):
        error = error or WorkdirLockedError(f"workdir {workdir} is in use (see process 0).")
        raise _startup_error(error) from error
    try:
        yield
    finally:
        lock.__exit__()


def _run(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    dataset: Dataset,
    parallel: Parallel,
    *,
    stop_at_step: int | None,
    allow_config_change: bool,
) -> TrainResult:
    """:func:`train_and_evaluate` once the config is checked and the workdir locked."""
    steps_per_epoch = dataset.num_train_examples // config.batch_size
    num_steps = total_steps(config, steps_per_epoch)
    end_step = num_steps if stop_at_step is None else min(num_steps, stop_at_step)
    log_every = config.log_every_steps
    eval_every = every_steps(config.eval_every_steps, steps_per_epoch)
    ckpt_every = every_steps(config.checkpoint_every_steps, steps_per_epoch)

    schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, num_steps=num_steps)
    try:
        model = build_model(config, axis_name=parallel.axis_name)
        qat = qat_config(config)
    except ValueError as err:
        raise _startup_error(err) from err
    sample_images = None
    if qat is not None:  # the whole first global batch, identical on every process
        first = dataset.train_batches(
            seed=config.seed, start_step=0, global_batch_size=config.batch_size
        )
        sample_images = next(first)["image"]
    is_chief = jax.process_index() == 0
    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints, keep_best=config.keep_best)
    resuming = checkpoints.latest_step() is not None
    pretrained = None
    init_from = config.init_from if not resuming else None  # a resumed run has its own weights
    context = f"config.init_from={init_from}: " if init_from else ""
    try:
        if init_from and not pathlib.Path(init_from).exists():
            raise FileNotFoundError(
                "no such file or directory; expected a train.py workdir (or one of its "
                "checkpoint directories) or the --out directory of python -m "
                "kure_jax.models.convert."
            )
        if init_from:
            # Only params and batch_stats are taken: the optimizer state and step start afresh
            # (a fine-tune is a new run), and an old QAT "quant" collection is re-initialised.
            _, _, pretrained = restore_for_eval(init_from, which="best")
            if is_chief:
                logging.info("Initialising params and batch_stats from %s.", init_from)
        state = create_train_state(
            model,
            rng=jax.random.key(config.seed),
            input_shape=dataset.image_shape,
            tx=make_optimizer(config, schedule),
            qat=qat,
            sample_images=sample_images,
            pretrained=pretrained,
        )
    except (ValueError, FileNotFoundError) as err:
        checkpoints.close(check=False)
        raise _startup_error(err, context) from err
    spec = step_config(config, model, dataset.image_shape, axis_name=parallel.axis_name)
    if spec.bn_per_bits:  # switchable BatchNorm: every width starts from the same statistics
        state = state.replace(
            batch_stats=per_width_batch_stats(state.batch_stats, spec.qat_bits))
    config_json = config_to_json(config)
    meta = {"image_shape": list(dataset.image_shape), "steps_per_epoch": steps_per_epoch,
            "num_steps": num_steps}
    start_step = 0
    if resuming:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.canonical_sharding),
            jax.eval_shape(state_to_tree, state),
        )
        check = _config_check(config_json, allow_config_change, is_chief)
        try:
            start_step, tree = checkpoints.restore_latest(abstract, check_config=check)
        except (CheckpointError, ConfigChangedError) as err:
            checkpoints.close(check=False)
            raise _startup_error(err) from err
        state = state_from_tree(state, tree)
        if is_chief:
            logging.info("Resuming from step %d in %s.", start_step, workdir)
    state = parallel.place_state(state)

    train_step = parallel.compile_train_step(make_train_step(model, spec))
    eval_step = parallel.compile_eval_step(make_state_eval_step(model, spec))
    writer = MetricsWriter(workdir, enabled=is_chief, resume_step=start_step)
    progress = Progress(start_step, num_steps, enabled=is_chief)
    batches = dataset.train_batches(
        seed=config.seed,
        start_step=start_step,
        global_batch_size=config.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    def save(step: int, *, latest: bool, eval_metrics: dict[str, float] | None) -> None:
        tree = state_to_tree(parallel.canonical_state(state))
        checkpoints.save(
            step, tree, config=config_json, meta=meta, latest=latest, eval_metrics=eval_metrics
        )

    def run_eval() -> dict[str, Any]:
        metrics = _evaluate(eval_step, state, dataset, parallel, config.eval_batch_size)
        metrics["kurtosis"] = _layer_kurtosis(parallel.canonical_state(state), spec)
        return metrics

    unchecked: list[tuple[int, Any]] = []  # device metrics not yet fetched
    window: list[dict[str, float]] = []  # fetched metrics since the last log line
    window_start, paused = time.perf_counter(), 0.0  # paused: eval/checkpoint time in window
    eval_metrics: dict[str, Any] = {}
    done_step = start_step  # the step that `state` holds
    signals = stop_signals()
    handlers = contextlib.ExitStack()  # SIGTERM/SIGINT handlers, for the loop only
    if signals is not None:
        handlers.enter_context(signals)
    finished = False
    try:
        for step in range(start_step + 1, end_step + 1):
            with interrupts_deferred():  # Ctrl-C lands between steps, never mid-donation
                state, metrics = train_step(state, parallel.place_batch(next(batches)))
                done_step = step
                unchecked.append((step, metrics))  # checked before any save, also on Ctrl-C
            progress.update()
            checkpoints.check()  # a background save that failed stops the run here
            stop = stop_signal(signals, step)
            is_eval = step % eval_every == 0 or step == num_steps
            is_ckpt = step % ckpt_every == 0 or step == end_step or stop is not None
            if not (step % log_every == 0 or is_eval or is_ckpt):
                continue
            # Syncing only here keeps the device busy; every step is checked before any save.
            for done, device_metrics in unchecked:
                host = parallel.metrics_to_host(device_metrics)
                if not host["finite"]:
                    raise NonFiniteLossError(done, {k: float(v) for k, v in host.items()})
                window.append(host)
            unchecked.clear()
            if step % log_every == 0 or step == end_step:
                elapsed = time.perf_counter() - window_start - paused
                summary = mean_metrics(window)
                summary["learning_rate"] = float(schedule(step - 1))
                summary["images_per_sec"] = len(window) * config.batch_size / elapsed
                writer.write("train", step, summary)
                progress.log(format_metrics(step, num_steps, summary), summary)
                window, window_start, paused = [], time.perf_counter(), 0.0
            pause_start = time.perf_counter()
            if is_eval:
                eval_metrics = run_eval()
                writer.write("eval", step, eval_metrics)
                kurt = list(eval_metrics["kurtosis"].values())
                widths = "".join(f" {k} {v:.4f}" for k, v in eval_metrics.items()
                                 if k.startswith("accuracy_"))  # multi-bit: each width's
                progress.log(
                    f"eval step {step}: accuracy {eval_metrics['accuracy']:.4f}{widths} loss "
                    f"{eval_metrics['loss']:.4f} | kurtosis mean {np.mean(kurt):.3f} "
                    f"max {np.max(kurt):.3f}"
                )
            if is_ckpt or is_eval:
                best = {"accuracy": eval_metrics["accuracy"]} if is_eval else None
                save(step, latest=is_ckpt, eval_metrics=best)
            paused += time.perf_counter() - pause_start
            if stop is not None:
                checkpoints.check(wait=True)  # saved and written before the process goes
                if is_chief:
                    logging.warning("Stopped by %s after step %d: its checkpoint is saved; rerun "
                                    "the same command to resume.", signal_name(stop), step)
                raise RunStopped(stop, step)
        if not eval_metrics:  # nothing evaluated in this call (stopped early, or already done)
            eval_metrics = run_eval()
        finished = True
    except RunStopped:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C, or one whose handler is not ours
        handlers.close()
        if done_step > start_step:  # else nothing new to save
            _save_on_interrupt(done_step, state, unchecked, parallel, save, is_chief)
        raise
    finally:
        handlers.close()
        progress.close()
        writer.close()
        checkpoints.close(check=finished)
    return TrainResult(parallel.canonical_state(state), eval_metrics)
