"""Robustness evaluation: one model under many quantizers (the engine of ``eval.py``).

A sweep config (``configs/sweeps/default.py``: one section per family of points) is validated
by :meth:`Sweep.from_config`; :func:`run_sweep` evaluates train.py checkpoints under it and
:func:`evaluate_model` any model given as ``apply_fn(params, images) -> logits``, both writing
``results.json`` (:func:`validate_results`), ``results.csv``, ``report.md`` and PNG plots.

Modules:

* :mod:`~kure_jax.evaluation.families`: one module per kind of point (float, weight-only and
  weight+activation PTQ, step ratios, QAT, nested widths, data types, real runtimes), each
  owning its config section, its planning and its tables and plots; the registry ``FAMILIES``.
* :mod:`~kure_jax.evaluation.sweep`: :class:`Sweep` and ``plan_sweep`` (loops over the
  families of a sweep); :mod:`~kure_jax.evaluation.layers`: the sweep's layer rule for a model.
* :mod:`~kure_jax.evaluation.forward`: quantised forward passes and their accuracy
  (:func:`evaluate`), mapped sweeps over step ratios or PRNG keys in one program.
* :mod:`~kure_jax.evaluation.parallel`: :class:`EvalMesh`, the test batch sharded over all
  devices and processes, with results equal to one device's.
* :mod:`~kure_jax.evaluation.calibration`: static activation ranges from training images.
* :mod:`~kure_jax.evaluation.runner`: :func:`run_sweep`, :func:`evaluate_model`,
  :func:`load_checkpoint`; :mod:`~kure_jax.evaluation.report` / ``plots``: the outputs.
* :mod:`~kure_jax.evaluation.factory`: a user's model (Linen, NNX or ``(apply_fn,
  params_template)``) and its params files (Orbax, safetensors).
* :mod:`~kure_jax.evaluation.cli`: the ``eval.py`` application (flags, errors, ``--model``).
"""

from kure_jax.evaluation.calibration import calibrate_activations as calibrate_activations
from kure_jax.evaluation.factory import ModelError as ModelError
from kure_jax.evaluation.factory import save_safetensors as save_safetensors
from kure_jax.evaluation.forward import evaluate as evaluate
from kure_jax.evaluation.forward import make_eval_step as make_eval_step
from kure_jax.evaluation.parallel import EvalMesh as EvalMesh
from kure_jax.evaluation.report import summary_table as summary_table
from kure_jax.evaluation.report import validate_results as validate_results
from kure_jax.evaluation.runner import CheckpointError as CheckpointError
from kure_jax.evaluation.runner import evaluate_model as evaluate_model
from kure_jax.evaluation.runner import load_checkpoint as load_checkpoint
from kure_jax.evaluation.runner import run_sweep as run_sweep
from kure_jax.evaluation.sweep import Sweep as Sweep

__all__ = [
    "CheckpointError",
    "EvalMesh",
    "ModelError",
    "Sweep",
    "calibrate_activations",
    "evaluate",
    "evaluate_model",
    "load_checkpoint",
    "make_eval_step",
    "run_sweep",
    "save_safetensors",
    "summary_table",
    "validate_results",
]
