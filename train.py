"""Trains a model with KURE (and optionally QAT) from a config file.

    python train.py                                   # configs/mnist5k_kure.py, runs/mnist5k_kure
    python train.py --config configs/mnist5k_baseline.py --workdir runs/baseline
    python train.py --config.num_epochs=2 --config.kure.lambda_=0.1

Rerunning with the same ``--workdir`` resumes from its latest checkpoint, exactly as if the run
had not stopped. What each signal and fault does (docs/interruptions.md):

* SIGTERM (scheduler preemption, ``scancel``, a time limit) or Ctrl-C: the current step ends, its
  checkpoint is saved and waited for (on every process of a multi-process run, at a step they
  agree on), one line says so, exit 143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C stops at
  once (after any save in flight), from the last finished step if it can be saved.
* A damaged latest checkpoint: skipped, renamed ``<step>.damaged-<time>``, one warning line; the
  run resumes from the newest step that restores.
* A second job on a workdir in use (``WORKDIR/train.lock``): exit 2; ``--force_unlock`` takes
  the lock of a job known to be gone (a dead holder on the same host is taken over by itself).
* A config that changes the run being resumed (model, data, batch size, schedule, epochs,
  optimizer, KURE/QAT, seed): exit 2 listing the fields; ``--allow_config_change`` resumes
  anyway. Harmless changes (log/eval/checkpoint intervals, eval batch size) are noted.

Exit codes, each fault with one ``error:`` line on stderr and no traceback:
0 done (or stopped at ``--stop_at_step``); 2 a start-up error (unknown config field or bad flag
value, invalid config, dataset not on disk, an ``init_from`` checkpoint that does not fit the
model, workdir locked, config changed on resume, no checkpoint that restores) or a non-finite
loss; 74 a checkpoint save failed (disk full, permission; the checkpoints before it are intact,
unfinished ones are cleaned at the next start); 130 SIGINT; 143 SIGTERM; 1 anything unforeseen
(with its traceback).
"""

import difflib
import importlib.util
import logging
import pathlib
import re
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import kure_jax.training
from kure_jax._interrupts import signal_name
from kure_jax.training.checkpoint import CheckpointSaveError
from kure_jax.training.loop import RunStopped, StartupError

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "mnist5k_kure.py"


def _with_explicit_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=<default>`` added when it names no config file.

    ml_collections loads a default config, and applies the ``--config.*`` overrides to it, when
    the flag is defined, i.e. on import, where an unknown field ends in a traceback; with the
    file on the command line that happens in flag parsing, which :func:`_parse_flags` handles.
    """
    if any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
        return argv
    return [argv[0], f"--config={_DEFAULT_CONFIG}", *argv[1:]]


if __name__ == "__main__":
    sys.argv = _with_explicit_config(sys.argv)

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training config file.", lock_config=True
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host run (TPU pod, several GPU hosts): call jax.distributed.initialize() first, "
    "which reads the coordinator from the TPU/cluster environment.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --distributed, outside a detected cluster (TPU, SLURM, MPI): HOST:PORT of process 0.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed and --coordinator_address: number of processes.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed and --coordinator_address: this process's index.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None,
    "Stop at this step after writing a checkpoint (e.g. a job's time slot); rerunning the same "
    "command continues the run as if uninterrupted.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints and metrics directory (default: runs/<config file name>)."
)
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False,
    "Take the workdir's lock (WORKDIR/train.lock) even though its holder seems alive or runs on "
    "another host: only when that job is known to be gone.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume even if the config changes the run (model, data, batch size, schedule, ...).",
)


def _not_orbax_info(record: logging.LogRecord) -> bool:
    # Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter. Its
    # errors keep their line but not their traceback: a failed save is reported in one line.
    if "orbax" not in record.pathname:
        return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= logging.WARNING


def _load_config(spec: str):
    """``get_config([variant])`` of a ``FILE.py[:VARIANT]`` flag value, as ml_collections does."""
    path, sep, variant = spec.partition(":") if not pathlib.Path(spec).is_file() else (spec, "", "")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    if module_spec is None or module_spec.loader is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if sep else module.get_config()


def _unknown_field(config, dotted: str) -> str | None:
    """Why ``--config.<dotted>`` names no field of ``config`` (with the closest names), or None."""
    node, prefix = config, "config"
    for part in dotted.split("."):
        if "[" in part or not hasattr(node, "keys"):  # indexing or a leaf: ml_collections' call
            return None
        if part not in node:
            names = sorted(node.keys())
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.0)
            hint = (f"closest: {', '.join(f'{prefix}.{c}' for c in close)}" if close
                    else f"{prefix} has no fields")
            return f"unknown config field {prefix}.{part} (in --config.{dotted}); {hint}."
        node, prefix = node[part], f"{prefix}.{part}"
    return None


def _config_spec(argv: list[str]) -> str | None:
    """The ``FILE.py[:VARIANT]`` of ``--config=...`` in ``argv``, if given that way."""
    config_arg = next((a for a in argv[1:] if re.match(r"^--?config(=|$)", a)), None)
    return config_arg.split("=", 1)[1] if config_arg and "=" in config_arg else None


def _flag_error(argv: list[str], err: Exception) -> str:
    """The one-line message for a flag-parsing error: an unknown config field, else ``err``."""
    spec = _config_spec(argv)
    if spec is not None:
        try:
            config = _load_config(spec)
        except Exception as load_err:  # the file itself is broken: report that
            return f"cannot load config file {spec}: {type(load_err).__name__}: {load_err}"
        for arg in argv[1:]:
            match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
            problem = match and _unknown_field(config, match[1])
            if problem:
                return problem
    # A KeyError's str() is the repr of its argument: show the argument itself.
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one ``error:`` line and exit code 2."""
    spec = _config_spec(argv)
    path = spec and (spec if pathlib.Path(spec).is_file() else spec.partition(":")[0])
    if path and not pathlib.Path(path).is_file():
        # ml_collections would defer this to the first field read, as a traceback.
        print(f"error: config file {path} does not exist.", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        # ml_collections raises AttributeError/KeyError for an unknown field, absl flags.Error
        # for a value it cannot parse; --help exits through SystemExit, which passes.
        print(f"error: {_flag_error(argv, err)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    absl_logging.get_absl_handler().addFilter(_not_orbax_info)
    if _DISTRIBUTED.value:
        from kure_jax._distributed import initialize

        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value
    if workdir is None:
        config_path = config_flags.get_config_filename(flags.FLAGS["config"])
        workdir = str(pathlib.Path("runs") / pathlib.Path(config_path).stem)
    try:
        result = kure_jax.training.train_and_evaluate(
            _CONFIG.value, workdir, stop_at_step=_STOP_AT_STEP.value,
            force_unlock=_FORCE_UNLOCK.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except (StartupError, kure_jax.training.NonFiniteLossError) as err:
        # Start-up errors say what to fix (field, file, download); a traceback adds nothing.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckpointSaveError as err:
        print(f"error: {err}; the run stopped (the checkpoints saved before it are intact).",
              file=sys.stderr)
        return 74
    except RunStopped as stop:
        print(f"stopped by {signal_name(stop.signum)} after step {stop.step} (checkpoint saved): "
              f"rerun the same command to continue from {workdir}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to continue from the checkpoints in "
              f"{workdir}", file=sys.stderr)
        return 130
    metrics = result.eval_metrics
    step = int(result.state.step)
    if _STOP_AT_STEP.value is not None and step == _STOP_AT_STEP.value:
        print(f"stopped at step {step}: test accuracy {metrics['accuracy']:.4f}; rerun the same "
              f"command to continue from the checkpoint in {workdir}")
    else:
        print(f"final test accuracy {metrics['accuracy']:.4f} ({metrics['count']} images); "
              f"checkpoints and metrics.jsonl in {workdir}")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
