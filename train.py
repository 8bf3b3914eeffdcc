"""Trains a model with KURE (and optionally QAT) from a config file.

    python train.py                                   # configs/mnist5k_kure.py, runs/mnist5k_kure
    python train.py --config configs/mnist5k_baseline.py --workdir runs/baseline
    python train.py --config.num_epochs=2 --config.kure.lambda_=0.1

Rerunning with the same ``--workdir`` resumes from its latest checkpoint. Ctrl-C first saves the
last finished step as a checkpoint (single process; not a non-finite state). Exit codes: 0 done,
2 non-finite loss, 130 interrupted.
"""

import logging
import pathlib
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import kure_jax.training

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "mnist5k_kure.py"

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


def _not_orbax_info(record: logging.LogRecord) -> bool:
    # Orbax logs several INFO lines per checkpoint; keep its warnings, drop the chatter.
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    absl_logging.get_absl_handler().addFilter(_not_orbax_info)
    if _DISTRIBUTED.value:
        import jax

        # CPU processes (tests, CPU clusters) need a collectives backend; GPU/TPU ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    workdir = _WORKDIR.value
    if workdir is None:
        config_path = config_flags.get_config_filename(flags.FLAGS["config"])
        workdir = str(pathlib.Path("runs") / pathlib.Path(config_path).stem)
    try:
        result = kure_jax.training.train_and_evaluate(_CONFIG.value, workdir,
                                                      stop_at_step=_STOP_AT_STEP.value)
    except kure_jax.training.NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    app.run(main)
