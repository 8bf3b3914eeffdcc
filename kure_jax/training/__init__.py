"""The training program: state, pure steps, data parallelism, checkpoints and the loop.

``train.py`` only parses flags and calls :func:`train_and_evaluate`; tests call it directly.
"""

from kure_jax.training.build import build_model as build_model
from kure_jax.training.build import qat_config as qat_config
from kure_jax.training.build import step_config as step_config
from kure_jax.training.checkpoint import Checkpoints as Checkpoints
from kure_jax.training.checkpoint import restore_for_eval as restore_for_eval
from kure_jax.training.config import validate_config as validate_config
from kure_jax.training.loop import NonFiniteLossError as NonFiniteLossError
from kure_jax.training.loop import TrainResult as TrainResult
from kure_jax.training.loop import train_and_evaluate as train_and_evaluate
from kure_jax.training.metrics import MetricsWriter as MetricsWriter
from kure_jax.training.optim import make_optimizer as make_optimizer
from kure_jax.training.optim import make_schedule as make_schedule
from kure_jax.training.parallel import MeshParallel as MeshParallel
from kure_jax.training.parallel import PmapParallel as PmapParallel
from kure_jax.training.parallel import make_parallel as make_parallel
from kure_jax.training.state import TrainState as TrainState
from kure_jax.training.state import create_train_state as create_train_state
from kure_jax.training.step import StepConfig as StepConfig
from kure_jax.training.step import cross_entropy as cross_entropy
from kure_jax.training.step import make_state_eval_step as make_state_eval_step
from kure_jax.training.step import make_train_step as make_train_step

__all__ = [
    "Checkpoints",
    "MeshParallel",
    "MetricsWriter",
    "NonFiniteLossError",
    "PmapParallel",
    "StepConfig",
    "TrainResult",
    "TrainState",
    "build_model",
    "create_train_state",
    "cross_entropy",
    "make_optimizer",
    "make_parallel",
    "make_schedule",
    "make_state_eval_step",
    "make_train_step",
    "qat_config",
    "restore_for_eval",
    "step_config",
    "train_and_evaluate",
    "validate_config",
]
