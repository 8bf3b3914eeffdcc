"""Orbax checkpoints of a run: the latest few for resuming, the best few by eval accuracy.

Layout of a workdir::

    WORKDIR/checkpoints/<step>/{state,config,meta}   latest ``keep_checkpoints`` steps
    WORKDIR/best/<step>/{state,config,meta}          best ``keep_best`` by eval accuracy

``state`` is the full :class:`~kure_jax.training.state.TrainState` as a plain pytree
(params, batch_stats, quant, opt_state, step and the RNG key's raw data), ``config``
the training config as JSON (so :func:`restore_for_eval` needs no flags) and ``meta``
facts about the run that the config does not state (image shape, steps per epoch).
"""

from __future__ import annotations

import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from kure_jax._interrupts import interrupts_deferred
from kure_jax.training._orbax_noise import drop_closed_loop_callbacks
from kure_jax.training.build import build_model
from kure_jax.training.config import config_from_json

__all__ = ["BEST_DIR", "LATEST_DIR", "Checkpoints", "restore_for_eval"]

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
PyTree = Any


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
        self.latest = ocp.CheckpointManager(
            root / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, multiprocessing_options=_barriers(LATEST_DIR)
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
        """
        with interrupts_deferred():
            if latest and step not in self.latest.all_steps():
                self.latest.save(step, args=self._args(tree, config, meta), force=True)
            best = self.best
            if eval_metrics is not None and best is not None and step not in best.all_steps():
                best.save(step, args=self._args(tree, config, meta), metrics=eval_metrics,
                          force=True)

    def restore(self, step: int, abstract_tree: PyTree) -> PyTree:
        """Restores the ``state`` item of ``step`` as ``abstract_tree``'s shapes and shardings."""
        drop_closed_loop_callbacks()  # a damaged checkpoint: see kure_jax/training/_orbax_noise.py
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree))
        )
        return restored["state"]

    def close(self) -> None:
        """Waits for pending saves and releases the managers (a Ctrl-C waits for them too)."""
        with interrupts_deferred():
            for manager in (self.latest, self.best):
                if manager is not None:
                    manager.wait_until_finished()
                    manager.close()


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _resolve(path: pathlib.Path, which: str) -> tuple[pathlib.Path, int]:
    """(manager directory, step) for a workdir, a manager directory or a step directory."""
    if _is_step_dir(path):
        return path.parent, int(path.name)
    if (path / LATEST_DIR).is_dir() or (path / BEST_DIR).is_dir():
        order = (BEST_DIR, LATEST_DIR) if which == "best" else (LATEST_DIR, BEST_DIR)
        candidates = [path / name for name in order if (path / name).is_dir()]
    else:
        candidates = [path]
    for directory in candidates:
        steps = sorted(int(p.name) for p in directory.iterdir() if _is_step_dir(p))
        if not steps:
            continue
        if directory.name == BEST_DIR and which == "best":
            manager = ocp.CheckpointManager(
                directory,
                options=_read_only_options(best_fn=lambda m: float(m["accuracy"])),
                item_handlers=_handlers(),
            )
            step = manager.best_step()
            manager.close()
            if step is not None:
                return directory, step
        return directory, steps[-1]
    raise FileNotFoundError(
        f"No checkpoint under {path}: expected a workdir (with {LATEST_DIR}/ or {BEST_DIR}/), "
        "a checkpoint directory of numbered steps, or one step directory."
    )


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


def restore_for_eval(
    path: str | pathlib.Path, *, which: str = "best"
) -> tuple[ml_collections.ConfigDict, nn.Module, dict[str, PyTree]]:
    """Rebuilds a trained model from a checkpoint, without the original flags.

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
      Exception: Orbax/TensorStore errors of a damaged checkpoint, as raised by them; the
        "Event loop is closed" tracebacks their threads leave behind are dropped (see
        ``kure_jax/training/_orbax_noise.py``).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest'; got {which!r}.")
    drop_closed_loop_callbacks()
    directory, step = _resolve(pathlib.Path(path).absolute(), which)
    restored = _restore_state_and_config(directory, step)
    config = config_from_json(restored["config"])
    state = restored["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    if state["quant"]:
        variables["quant"] = state["quant"]
    return config, build_model(config, axis_name=None), variables
