"""``config.init_from``: a new run starts from another checkpoint's params and batch_stats, with a
fresh optimizer state and step; a checkpoint of another model fails at start-up, naming the
first differing leaf and both shapes (train.py: one ``error:`` line, exit code 2)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from _training_helpers import ROOT, load_config

from kure_jax.training import restore_for_eval, train_and_evaluate
from kure_jax.training.loop import StartupError

# Every test uses the module fixture's trained source run.
# Compile time dominates these tiny runs, and every state compared comes from the same setting.
pytestmark = [pytest.mark.usefixtures("persistent_compilation_cache", "fast_compiles"),
              pytest.mark.slow]


def _config(**overrides):
    config = load_config("mnist5k_kure", "tiny")  # small CNN on the shipped digits
    config.num_train_steps = 3
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A workdir trained 3 steps (SGD with momentum: a non-zero optimizer state)."""
    workdir = tmp_path_factory.mktemp("source")
    result = train_and_evaluate(_config(), workdir)
    return workdir, result.state


def test_init_from_restores_params_and_batch_stats_with_a_fresh_optimizer(source, tmp_path):
    workdir, trained = source
    _, _, saved = restore_for_eval(workdir)  # what init_from reads: the best checkpoint
    # stop_at_step=0: the state as initialised, before any step of the new run.
    result = train_and_evaluate(_config(init_from=str(workdir)), tmp_path, stop_at_step=0)
    state = result.state
    for name in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, name), saved[name])
    assert int(state.step) == 0
    trained_momentum = jax.tree.leaves(trained.opt_state)
    assert any(np.any(np.asarray(x) != 0) for x in trained_momentum)  # the source's is not fresh
    fresh = state.tx.init(state.trainable)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state.opt_state))
    assert result.eval_metrics["accuracy"] > 0  # and the run can evaluate it


def test_init_from_then_trains(source, tmp_path):
    workdir, _ = source
    result = train_and_evaluate(_config(init_from=str(workdir), num_train_steps=2), tmp_path)
    assert int(result.state.step) == 2


@pytest.mark.parametrize("overrides, match", [
    # The same model, another width (hidden 32 -> 16): the first differing leaf is the head.
    ({"model_options.hidden": 16},
     r"params/head/kernel is \(32, 10\) in the checkpoint, \(16, 10\) in the model"),
    # Another architecture: leaf names differ (the first in sorted order is named).
    ({"model": "resnet20", "model_options": {}}, r"params/\S+ is (missing|\(.*\)) in the"),
])
def test_a_checkpoint_of_another_model_is_refused(source, tmp_path, overrides, match):
    workdir, _ = source
    config = _config(init_from=str(workdir))
    for key, value in overrides.items():
        if key == "model_options":
            config.model_options = value
        else:
            config.update_from_flattened_dict({key: value})
    with pytest.raises(StartupError, match=match) as info:
        train_and_evaluate(config, tmp_path)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"config.init_from={workdir}: pretrained 'params'")
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))  # nothing trained or saved


def test_train_cli_mismatch_is_one_error_line(source, tmp_path):
    workdir, _ = source
    config = f"{ROOT / 'configs' / 'mnist5k_kure.py'}:tiny"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"--config={config}",
         f"--config.init_from={workdir}", "--config.model_options.hidden=16",
         f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
        text=True, timeout=240,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "params/head/kernel is (32, 10) in the checkpoint, (16, 10) in the model" in errors[0]
