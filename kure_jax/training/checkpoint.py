"""Orbax checkpoints of a run: the latest few for resuming, the best few by eval accuracy.

Layout of a workdir::

    WORKDIR/checkpoints/<step>/{state,config,meta}   latest ``keep_checkpoints`` steps
    WORKDIR/best/<step>/{state,config,meta}          best ``keep_best`` by eval accuracy

``state`` is the full :class:`~kure_jax.training.state.TrainState` as a plain pytree
(params, batch_stats, quant, opt_state, step and the RNG key's raw data), ``config``
the training config as JSON (so :func:`restore_for_eval` needs no flags) and ``meta``
facts about the run that the config does not state (image shape, steps per epoch).

Faults (docs/interruptions.md): a step that does not restore (a truncated file, a damaged
``_METADATA``) is skipped with one warning line for the newest step that does; in a training
workdir the damaged step is renamed ``<step>.damaged-<time>`` (kept, not deleted). A save
that fails raises :class:`CheckpointSaveError` at the next step boundary (or when waited
for), not one interval later. Unfinished ``*.orbax-checkpoint-tmp*`` folders of an earlier
run are removed when a workdir is opened for training.
"""

from __future__ import annotations

import pathlib
import shutil
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from kure_jax._arrays import leaf_shapes, shape_mismatch
from kure_jax._distributed import all_processes
from kure_jax._interrupts import interrupts_deferred
from kure_jax.training._orbax_noise import drop_closed_loop_callbacks
from kure_jax.training.build import build_model
from kure_jax.training.config import config_from_json

__all__ = [
    "BEST_DIR",
    "LATEST_DIR",
    "CheckpointError",
    "CheckpointSaveError",
    "Checkpoints",
    "LoadedCheckpoint",
    "load_checkpoint",
    "restore_for_eval",
]

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
PyTree = Any
DAMAGED_MARK = ".damaged-"
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, said in one line (no traceback needed): no step under
    a directory restores (each step's reason is given), or the checkpoint does not fit the
    model it is restored into (the first differing leaf and both shapes)."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint save failed (disk full, permission, ...); the run must not go on believing
    it is checkpointed. The checkpoints saved before it are untouched.

    Attributes:
      step: the step whose save failed.
      cause: the error the save raised (also ``__cause__``).
    """

    def __init__(self, step: int | None, directory: pathlib.Path, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        what = f"step {step}" if step is not None else "a step"
        super().__init__(f"the checkpoint of {what} could not be saved under {directory}: "
                         f"{_one_line(cause)}")


def _one_line(err: BaseException, limit: int = 200) -> str:
    """``"Type: first line of the message"``, shortened: Orbax/TensorStore errors run to pages."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _remove_unfinished(*directories: pathlib.Path) -> None:
    """Removes the ``*.orbax-checkpoint-tmp*`` folders of saves that never finished.

    Before the managers start, and waited for: Orbax's own ``cleanup_tmp_directories`` runs in
    the background and races with a save of the same step (same temporary name).
    """
    if jax.process_index() == 0:
        for directory in directories:
            unfinished = [p for p in directory.glob(f"*{_TMP_MARK}*") if p.is_dir()]
            for path in unfinished:
                shutil.rmtree(path)
            if unfinished:
                logging.info("Removed %d unfinished checkpoint folders from %s.", len(unfinished),
                             directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kure_jax_unfinished_removed")


def _check_fits(metadata: PyTree, abstract: PyTree, where: str) -> None:
    """Raises :class:`CheckpointError` unless the stored leaves have ``abstract``'s paths and
    shapes (another model would otherwise fail deep inside Orbax, as a tree-mismatch traceback)."""
    have, want = leaf_shapes(metadata), leaf_shapes(abstract)
    mismatch = shape_mismatch(want, have)
    if mismatch is not None:
        first, count = mismatch
        raise CheckpointError(
            f"{where} does not fit this model: {first} is {have.get(first, 'missing')} in the "
            f"checkpoint, {want.get(first, 'absent')} in the model ({count} differing leaves).")


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {
        "state": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _read_only_options(**options: Any) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False, **options
    )


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
    # On several processes each save synchronises them at barriers named after the step; the
    # two managers often save the same step at once, and without their own key prefixes their
    # barriers collide ("Barrier _async_write_complete.4 is already ongoing") and the run hangs.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class Checkpoints:
    """The two checkpoint managers of a workdir.

    Saves are asynchronous (Orbax copies the arrays to host memory before ``save``
    returns, so the next step may donate their buffers); :meth:`close` waits for them.

    Args:
      workdir: the run's directory.
      keep: how many of the latest checkpoints to keep (>= 1).
      keep_best: how many of the best checkpoints (by eval ``accuracy``) to keep; 0 keeps none.
    """

    def __init__(self, workdir: str | pathlib.Path, *, keep: int, keep_best: int) -> None:
        root = pathlib.Path(workdir).absolute()
        self._pending: int | None = None  # the step of the save that may still be running
        _remove_unfinished(root / LATEST_DIR, root / BEST_DIR)
        self.latest = ocp.CheckpointManager(
            root / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, multiprocessing_options=_barriers(LATEST_DIR),
            ),
            item_handlers=_handlers(),
        )
        self.best = None
        if keep_best > 0:
            self.best = ocp.CheckpointManager(
                root / BEST_DIR,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep_best,
                    best_fn=lambda metrics: float(metrics["accuracy"]),
                    best_mode="max",
                    keep_checkpoints_without_metrics=False,
                    create=True,
                    multiprocessing_options=_barriers(BEST_DIR),
                ),
                item_handlers=_handlers(),
            )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` for a fresh workdir."""
        return self.latest.latest_step()

    @staticmethod
    def _args(tree: PyTree, config: dict[str, Any], meta: dict[str, Any]) -> ocp.args.Composite:
        return ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta),
        )

    def save(
        self,
        step: int,
        tree: PyTree,
        *,
        config: dict[str, Any],
        meta: dict[str, Any],
        latest: bool = True,
        eval_metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves ``tree`` as a latest checkpoint if ``latest``, as a best one if ``eval_metrics``.

        Steps already saved are skipped (a resumed run may reach them again). A Ctrl-C during
        the call takes effect when it returns.

        Raises:
          CheckpointSaveError: for this save, or an earlier one that failed in the background.
        """
        with interrupts_deferred():
            self.check(wait=True)  # Orbax would wait for it too; this names its step
            try:
                if latest and step not in self.latest.all_steps():
                    self.latest.save(step, args=self._args(tree, config, meta), force=True)
                best = self.best
                if eval_metrics is not None and best is not None and step not in best.all_steps():
                    best.save(step, args=self._args(tree, config, meta), metrics=eval_metrics,
                              force=True)
            except Exception as err:
                raise CheckpointSaveError(step, self.latest.directory, err) from err
            self._pending = step

    def check(self, *, wait: bool = False) -> None:
        """Raises the error of a background save that failed; with ``wait``, waits for it first.

        Cheap without ``wait`` (a flag read while a save runs), so the loop calls it each step.

        Raises:
          CheckpointSaveError: naming the failed save's step and its cause.
        """
        if self._pending is None:
            return
        managers = [m for m in (self.latest, self.best) if m is not None]
        if not wait and any(m.is_saving_in_progress() for m in managers):
            return
        try:
            with interrupts_deferred():
                for manager in managers:
                    # Returns at once when no save runs, raising what the finished one raised
                    # (its finalize thread keeps the error; check_for_errors may miss it).
                    manager.wait_until_finished()
        except Exception as err:
            step, self._pending = self._pending, None
            raise CheckpointSaveError(step, self.latest.directory, err) from err
        self._pending = None

    def restore(self, step: int, abstract_tree: PyTree) -> PyTree:
        """Restores the ``state`` item of ``step`` as ``abstract_tree``'s shapes and shardings."""
        drop_closed_loop_callbacks()  # a damaged checkpoint: see kure_jax/training/_orbax_noise.py
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree))
        )
        return restored["state"]

    def stored_config(self, step: int) -> dict[str, Any]:
        """The training config saved with ``step`` (as JSON data)."""
        restored = self.latest.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def restore_latest(
        self, abstract_tree: PyTree, *, check_config: Any = None
    ) -> tuple[int, PyTree] | None:
        """The newest step that restores, as ``(step, state tree)``; ``None`` without steps.

        A step whose config, metadata or arrays cannot be read is skipped: once an older step
        restores, each skipped one is renamed ``<step>.damaged-<time>`` (kept for inspection,
        out of Orbax's way) with one warning line naming it and why.

        Args:
          abstract_tree: the state's ``jax.ShapeDtypeStruct`` tree (shapes and shardings).
          check_config: called as ``check_config(stored_config_dict, step)`` before a step is
            restored; what it raises propagates (e.g. a config that changed the run).

        Raises:
          CheckpointError: if no step restores (each one's reason in the message; nothing is
            moved), or a step's arrays do not fit ``abstract_tree``.
        """
        failures: list[tuple[int, str]] = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            where = f"checkpoint step {step} in {self.latest.directory}"
            try:
                stored = self.stored_config(step)
                metadata = self.latest.item_metadata(step)["state"]
                ok, problem = True, None
            except Exception as err:
                ok, problem = False, _one_line(err)
            if all_processes(ok):
                if check_config is not None:
                    check_config(stored, step)
                _check_fits(metadata, abstract_tree, where)
                try:
                    tree, ok = self.restore(step, abstract_tree), True
                except Exception as err:
                    ok, problem = False, _one_line(err)
                if all_processes(ok):
                    self._move_aside(failures, step)
                    return step, tree
            failures.append((step, problem or "failed on another process"))
        if not failures:
            return None
        reasons = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint in {self.latest.directory} restores ({reasons}); "
                              "move the directory away to start afresh.")

    def _move_aside(self, failures: list[tuple[int, str]], restored: int) -> None:
        if not failures:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        directory = pathlib.Path(self.latest.directory)
        for step, why in failures:
            target = directory / f"{step}{DAMAGED_MARK}{stamp}"
            if jax.process_index() == 0:
                (directory / str(step)).rename(target)
                logging.warning("Checkpoint step %d is damaged (%s): moved to %s; resuming from "
                                "step %d.", step, why, target, restored)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kure_jax_damaged_moved_aside")
        self.latest.reload()

    def close(self, *, check: bool = True) -> None:
        """Waits for pending saves and releases the managers (a Ctrl-C waits for them too).

        Args:
          check: raise a failed save's error (after releasing the managers); ``False`` when
            another error is already on its way out.

        Raises:
          CheckpointSaveError: with ``check``, if a pending save failed.
        """
        error = None
        try:
            self.check(wait=True)
        except CheckpointSaveError as err:
            error = err
        with interrupts_deferred():
            for manager in (self.latest, self.best):
                if manager is not None:
                    try:
                        manager.close()
                    except Exception as err:  # the failed save again: reported once
                        error = error or CheckpointSaveError(None, manager.directory, err)
        if error is not None and check:
            raise error


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _best_step(directory: pathlib.Path) -> int | None:
    manager = ocp.CheckpointManager(
        directory,
        options=_read_only_options(best_fn=lambda m: float(m["accuracy"])),
        item_handlers=_handlers(),
    )
    try:
        return manager.best_step()
    finally:
        manager.close()


def _candidates(path: pathlib.Path, which: str) -> list[tuple[pathlib.Path, int]]:
    """``(manager directory, step)`` pairs to try in order, for a workdir, a manager directory
    or a step directory: the chosen step first, then the others newest first."""
    if _is_step_dir(path):
        return [(path.parent, int(path.name))]
    if (path / LATEST_DIR).is_dir() or (path / BEST_DIR).is_dir():
        order = (BEST_DIR, LATEST_DIR) if which == "best" else (LATEST_DIR, BEST_DIR)
        directories = [path / name for name in order if (path / name).is_dir()]
    else:
        directories = [path]
    found = []
    for directory in directories:
        steps = sorted((int(p.name) for p in directory.iterdir() if _is_step_dir(p)),
                       reverse=True)
        if steps and directory.name == BEST_DIR and which == "best":
            best = _best_step(directory)
            steps = sorted(steps, key=lambda s: s != best)  # stable: the rest stay newest first
        found += [(directory, step) for step in steps]
    if not found:
        raise FileNotFoundError(
            f"No checkpoint under {path}: expected a workdir (with {LATEST_DIR}/ or {BEST_DIR}/), "
            "a checkpoint directory of numbered steps, or one step directory."
        )
    return found


def _restore_state_and_config(directory: pathlib.Path, step: int) -> dict[str, Any]:
    """``{"state", "config"}`` of one step, restored read-only onto the default device."""
    manager = ocp.CheckpointManager(
        directory,
        options=_read_only_options(),
        item_handlers=_handlers(),
    )
    try:
        # Shapes and dtypes come from the checkpoint itself: no model init, no optimizer.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            manager.item_metadata(step)["state"],
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()
            ),
        )
    finally:  # Also after a failed restore: stops Orbax's background threads.
        manager.close()
    return restored


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes:
      config: the training config saved with the checkpoint.
      model: the unbound Flax model (single-device, no ``bn_axis_name``).
      variables: ``{"params", "batch_stats"[, "quant"]}`` on the default device.
      step: the step that was restored.
      directory: its checkpoint directory (``WORKDIR/best``, ``WORKDIR/checkpoints``, ...).
      skipped: ``(step directory, reason)`` of each newer candidate that did not restore.
    """

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, PyTree]
    step: int
    directory: pathlib.Path
    skipped: tuple[tuple[pathlib.Path, str], ...]


def load_checkpoint(path: str | pathlib.Path, *, which: str = "best") -> LoadedCheckpoint:
    """Rebuilds a trained model from a checkpoint, skipping damaged steps; changes nothing on disk.

    The candidates, tried in order until one restores: for ``which="best"`` on a workdir the
    best step of ``best/``, the other kept best steps newest first, then ``checkpoints/``
    newest first; for ``"latest"`` the reverse order of the two directories; for a manager
    directory its steps; for a step directory that step only. Each candidate that fails (a
    truncated array file, a damaged ``_METADATA``, ...) is logged as one warning line naming
    it and why.

    Args:
      path: a workdir, one of its checkpoint directories or a single step directory.
      which: ``"best"`` or ``"latest"``.

    Returns:
      A :class:`LoadedCheckpoint` (its ``step`` and ``directory`` say what was evaluated).

    Raises:
      ValueError: for an unknown ``which``.
      FileNotFoundError: if no checkpoint is found under ``path``.
      CheckpointError: if no candidate restores; one line with each step's reason.
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest'; got {which!r}.")
    drop_closed_loop_callbacks()
    skipped: list[tuple[pathlib.Path, str]] = []
    for directory, step in _candidates(pathlib.Path(path).absolute(), which):
        try:
            restored = _restore_state_and_config(directory, step)
        except Exception as err:
            why = _one_line(err)
            skipped.append((directory / str(step), why))
            logging.warning("Skipping checkpoint %s: it does not restore (%s).",
                            directory / str(step), why)
            continue
        config = config_from_json(restored["config"])
        state = restored["state"]
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        if state["quant"]:
            variables["quant"] = state["quant"]
        return LoadedCheckpoint(config, build_model(config, axis_name=None), variables, step,
                                directory, tuple(skipped))
    reasons = "; ".join(f"{p}: {why}" for p, why in skipped)
    raise CheckpointError(f"no checkpoint under {path} restores ({reasons}).")


def restore_for_eval(
    path: str | pathlib.Path, *, which: str = "best"
) -> tuple[ml_collections.ConfigDict, nn.Module, dict[str, PyTree]]:
    """Rebuilds a trained model from a checkpoint, without the original flags.

    :func:`load_checkpoint` without the step and directory it chose.

    Args:
      path: a workdir, one of its checkpoint directories (``checkpoints/``, ``best/``)
        or a single step directory (``checkpoints/1234``).
      which: for a workdir or ``best/``: ``"best"`` (highest eval accuracy, falling back
        to the latest) or ``"latest"``.

    Returns:
      ``(config, model, variables)``: the training config, the unbound Flax model
      (built for single-device use, no ``bn_axis_name``) and its variables
      ``{"params", "batch_stats"[, "quant"]}`` on the default device. With
      ``config.qat.enabled`` apply them with :func:`kure_jax.quantized_apply`. A multi-bit
      run with ``config.qat.bn_per_bits`` has ``batch_stats`` keyed by width (``"w8"``, ...):
      select one with :func:`kure_jax.training.multibit.batch_stats_at` and the width's
      ``QATConfig`` with :func:`kure_jax.training.build.multibit_qat_configs`.

    Raises:
      ValueError: for an unknown ``which``.
      FileNotFoundError: if no checkpoint is found under ``path``.
      CheckpointError: (a ``ValueError``) if no step restores: one line naming each step and
        why; a damaged newer step is skipped with a warning line when an older one restores.
    """
    loaded = load_checkpoint(path, which=which)
    return loaded.config, loaded.model, loaded.variables
