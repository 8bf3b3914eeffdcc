"""Robustness evaluation: one checkpoint under many quantizers (the engine of ``eval.py``).

* :mod:`~kure_jax.evaluation.spec`: :class:`SweepSpec`, the validated sweep config.
* :mod:`~kure_jax.evaluation.forward`: quantised forward passes and their test accuracy;
  mapped (``lax.map``/``vmap``) sweeps over step ratios or PRNG keys in one program.
* :mod:`~kure_jax.evaluation.parallel`: :class:`EvalMesh`, the test batch sharded over all
  devices and processes, with results equal to one device's.
* :mod:`~kure_jax.evaluation.calibration`: static activation ranges from training images.
* :mod:`~kure_jax.evaluation.sweep`: the tasks and points of one model's sweep.
* :mod:`~kure_jax.evaluation.report` / :mod:`~kure_jax.evaluation.plots`: results.json,
  results.csv, report.md and PNG plots.
* :mod:`~kure_jax.evaluation.runner`: :func:`run_sweep` over checkpoints written by train.py,
  :func:`evaluate_model` for any model given as ``apply_fn(params, images) -> logits``.
* :mod:`~kure_jax.evaluation.factory`: ``eval.py --model MODULE:FACTORY --params PATH``: the
  factory protocol (Linen, NNX or ``(apply_fn, params_template)``), Orbax/safetensors params.
"""

from kure_jax.evaluation.calibration import ActivationCalibration as ActivationCalibration
from kure_jax.evaluation.calibration import activation_quantized as activation_quantized
from kure_jax.evaluation.calibration import calibrate_activations as calibrate_activations
from kure_jax.evaluation.calibration import layer_inputs as layer_inputs
from kure_jax.evaluation.factory import ModelError as ModelError
from kure_jax.evaluation.factory import UserModel as UserModel
from kure_jax.evaluation.factory import evaluate_factory as evaluate_factory
from kure_jax.evaluation.factory import load_factory as load_factory
from kure_jax.evaluation.factory import load_params as load_params
from kure_jax.evaluation.factory import model_from_factory as model_from_factory
from kure_jax.evaluation.factory import save_safetensors as save_safetensors
from kure_jax.evaluation.forward import Metrics as Metrics
from kure_jax.evaluation.forward import check_apply as check_apply
from kure_jax.evaluation.forward import classifier_apply as classifier_apply
from kure_jax.evaluation.forward import evaluate as evaluate
from kure_jax.evaluation.forward import evaluate_mapped as evaluate_mapped
from kure_jax.evaluation.forward import make_eval_step as make_eval_step
from kure_jax.evaluation.forward import mapped_eval_step as mapped_eval_step
from kure_jax.evaluation.forward import ptq_transform as ptq_transform
from kure_jax.evaluation.parallel import EvalMesh as EvalMesh
from kure_jax.evaluation.report import SCHEMA_VERSION as SCHEMA_VERSION
from kure_jax.evaluation.report import markdown_report as markdown_report
from kure_jax.evaluation.report import summary_table as summary_table
from kure_jax.evaluation.report import validate_results as validate_results
from kure_jax.evaluation.runner import CheckpointError as CheckpointError
from kure_jax.evaluation.runner import evaluate_model as evaluate_model
from kure_jax.evaluation.runner import load_checkpoint as load_checkpoint
from kure_jax.evaluation.runner import run_sweep as run_sweep
from kure_jax.evaluation.spec import SweepSpec as SweepSpec
from kure_jax.evaluation.spec import load_sweep as load_sweep
from kure_jax.evaluation.sweep import POINT_KINDS as POINT_KINDS
from kure_jax.evaluation.sweep import SweepTarget as SweepTarget
from kure_jax.evaluation.sweep import plan_sweep as plan_sweep

__all__ = [
    "POINT_KINDS",
    "SCHEMA_VERSION",
    "ActivationCalibration",
    "CheckpointError",
    "EvalMesh",
    "Metrics",
    "ModelError",
    "SweepSpec",
    "SweepTarget",
    "UserModel",
    "activation_quantized",
    "calibrate_activations",
    "check_apply",
    "classifier_apply",
    "evaluate",
    "evaluate_factory",
    "evaluate_mapped",
    "evaluate_model",
    "layer_inputs",
    "load_checkpoint",
    "load_factory",
    "load_params",
    "load_sweep",
    "make_eval_step",
    "mapped_eval_step",
    "markdown_report",
    "model_from_factory",
    "plan_sweep",
    "ptq_transform",
    "run_sweep",
    "save_safetensors",
    "summary_table",
    "validate_results",
]
