"""Checkpoints: bit-exact resume, best-k by accuracy, restore_for_eval, NaN guard."""

import asyncio
import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from _training_helpers import ROOT, interrupt_when, load_config

from kure_jax.data import get_dataset
from kure_jax.training import NonFiniteLossError, restore_for_eval, train_and_evaluate
from kure_jax.training._orbax_noise import drop_closed_loop_callbacks

NUM_STEPS = 6

# Compile time dominates these tiny runs, and every state compared comes from the same setting.
pytestmark = pytest.mark.usefixtures("persistent_compilation_cache", "fast_compiles")


def tiny_config(**overrides):
    config = load_config("mnist5k_kure", "tiny")  # 6 steps, checkpoint + eval every 3
    config.num_train_steps = NUM_STEPS
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train_and_evaluate(tiny_config(), workdir)


def read_metrics(workdir):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path, straight):
    _, expected = straight
    # Stop at step 4 (between the checkpoints at 3 and 6), then resume to the end. The
    # cosine schedule spans all 6 steps either way.
    first = train_and_evaluate(tiny_config(), tmp_path, stop_at_step=4)
    assert int(first.state.step) == 4
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 4]
    resumed = train_and_evaluate(tiny_config(), tmp_path)
    assert int(resumed.state.step) == NUM_STEPS
    for name in ("params", "batch_stats", "opt_state"):
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
            getattr(resumed.state, name),
            getattr(expected.state, name),
        )
    np.testing.assert_array_equal(
        jax.random.key_data(resumed.state.rng), jax.random.key_data(expected.state.rng)
    )
    assert resumed.eval_metrics["accuracy"] == expected.eval_metrics["accuracy"]
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path)]
    assert ("train", 4) in steps and ("eval", 6) in steps


@pytest.mark.slow
def test_metrics_jsonl_records(straight):
    workdir, result = straight
    records = read_metrics(workdir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    for key in ("loss", "ce", "kure", "accuracy", "kurtosis_mean", "kurtosis_max",
                "images_per_sec", "learning_rate", "grad_norm"):
        assert np.isfinite(train[-1][key]), key
    np.testing.assert_allclose(train[-1]["loss"], train[-1]["ce"] + train[-1]["kure"], rtol=1e-5)
    assert set(evals[-1]["kurtosis"]) == {"conv1/kernel", "hidden/kernel"}  # paper selection
    assert evals[-1]["accuracy"] == result.eval_metrics["accuracy"]
    assert evals[-1]["count"] == 1000


@pytest.mark.slow
def test_best_checkpoint_has_the_highest_eval_accuracy(straight):
    workdir, _ = straight
    evals = [r for r in read_metrics(workdir) if r["kind"] == "eval"]
    best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))
    assert [int(p.name) for p in (workdir / "best").iterdir()] == [best["step"]]  # keep_best=1


@pytest.mark.parametrize("which", ["latest", "best"])
@pytest.mark.slow
def test_restore_for_eval_rebuilds_model_without_flags(straight, which):
    workdir, result = straight
    config, model, variables = restore_for_eval(workdir, which=which)
    assert config.to_json() == tiny_config().to_json()
    assert set(variables) == {"params", "batch_stats"}
    if which == "latest":
        jax.tree.map(np.testing.assert_array_equal, variables["params"], result.state.params)
        # The restored model reproduces the run's final test accuracy.
        test = get_dataset("mnist5k")
        logits = model.apply(variables, test.eval_images, train=False)
        accuracy = np.mean(np.argmax(np.asarray(logits), -1) == test.eval_labels)
        np.testing.assert_allclose(accuracy, result.eval_metrics["accuracy"])
    step_dir = workdir / "checkpoints" / str(NUM_STEPS)
    _, _, same = restore_for_eval(step_dir)
    jax.tree.map(np.testing.assert_array_equal, same["params"], result.state.params)


@pytest.mark.slow
def test_restore_for_eval_errors(tmp_path, straight):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        restore_for_eval(tmp_path)
    with pytest.raises(ValueError, match="'best' or 'latest'"):
        restore_for_eval(straight[0], which="first")


@pytest.mark.slow
def test_damaged_checkpoint_raises_one_error_and_prints_nothing(tmp_path, straight):
    # A fresh interpreter, so that the late TensorStore callbacks up to its exit are included.
    damaged = shutil.copytree(straight[0], tmp_path / "damaged")
    for data_file in damaged.glob("*/*/state/d/*"):
        data_file.write_bytes(b"\x00not an array" * 4)
    script = ("import sys\nfrom kure_jax.training import restore_for_eval\n"
              "try:\n    restore_for_eval(sys.argv[1])\n"
              "except ValueError as err:\n    print(type(err).__name__)\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script, str(damaged)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    name, message = result.stdout.strip().split("\n", 1)
    assert result.returncode == 0 and name == "CheckpointError", result  # a ValueError
    assert "\n" not in message and "no checkpoint under" in message, message
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr


def _unraisable(err):
    return types.SimpleNamespace(exc_type=type(err), exc_value=err, exc_traceback=err.__traceback__,
                                 err_msg=None, object=None)


def test_only_closed_loop_callbacks_are_dropped(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    drop_closed_loop_callbacks()
    hook = sys.unraisablehook
    drop_closed_loop_callbacks()  # once per process: not wrapped twice
    assert sys.unraisablehook is hook
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
        loop.call_soon_threadsafe(print)  # what TensorStore's threads do after a failed restore
    hook(_unraisable(closed.value))
    assert seen == []
    same_text = RuntimeError("Event loop is closed")  # not from call_soon_threadsafe: kept
    hook(_unraisable(same_text))
    assert [u.exc_value for u in seen] == [same_text]

    class Raises:
        def __del__(self):
            raise ValueError("from __del__")

    Raises()  # a real unraisable exception, reported through the hook
    gc.collect()
    assert [u.exc_type for u in seen] == [RuntimeError, ValueError]


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving_the_bad_state(tmp_path):
    # A checkpoint after every step: without the guard the diverged state would be saved.
    config = tiny_config(learning_rate=100.0, checkpoint_every_steps=1, eval_every_steps=100)
    with pytest.raises(NonFiniteLossError, match="Non-finite") as info:
        train_and_evaluate(config, tmp_path)
    bad_step = info.value.step
    assert 1 < bad_step <= NUM_STEPS and not np.isfinite(info.value.metrics["loss"])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and all(step < bad_step for step in saved)
    for step in saved:  # every checkpoint that exists holds a finite state
        _, _, variables = restore_for_eval(tmp_path / "checkpoints" / str(step))
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


@pytest.mark.slow
def test_init_from_starts_qat_from_a_previous_run(tmp_path, straight):
    pytest.importorskip("kure_jax.qat")
    source, _ = straight
    _, _, best = restore_for_eval(source)
    config = tiny_config(init_from=str(source), num_train_steps=1, learning_rate=1e-9)
    config.weight_decay, config.qat.enabled = 0.0, True
    result = train_and_evaluate(config, tmp_path)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        result.state.params,
        best["params"],
    )
    assert result.state.quant, "LSQ steps are initialised for the loaded weights"


def _interrupt_after(monkeypatch, step):
    """Raises KeyboardInterrupt in the training loop right after step ``step`` (as Ctrl-C)."""
    from kure_jax.training import metrics

    original = metrics.Progress.update

    def update(self, *args, **kwargs):
        original(self, *args, **kwargs)
        update.calls += 1
        if update.calls == step:
            raise KeyboardInterrupt

    update.calls = 0
    monkeypatch.setattr(metrics.Progress, "update", update)


@pytest.mark.slow
def test_ctrl_c_saves_the_last_step_and_resumes_bit_exact(tmp_path, straight, monkeypatch):
    _, expected = straight
    _interrupt_after(monkeypatch, 5)  # between the checkpoints at 3 and 6
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(tiny_config(), tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 5]
    monkeypatch.undo()
    resumed = train_and_evaluate(tiny_config(), tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 (resumed.state.params, resumed.state.opt_state),
                 (expected.state.params, expected.state.opt_state))


@pytest.mark.slow
def test_ctrl_c_does_not_save_a_non_finite_state(tmp_path, monkeypatch):
    # lr 100 diverges within a few steps. With no log, eval or checkpoint before the last
    # step, nothing is checked before the interrupt after step 5: the save on interrupt must
    # check the pending steps itself and refuse.
    config = tiny_config(learning_rate=100.0, eval_every_steps=100, log_every_steps=100,
                         checkpoint_every_steps=100)
    with pytest.raises(NonFiniteLossError) as probe:
        train_and_evaluate(config, tmp_path / "probe")
    assert probe.value.step <= 5  # diverged before the interrupt below
    _interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(config, tmp_path / "run")
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]


@pytest.mark.slow
def test_train_cli_ctrl_c_exits_130_after_saving_the_step(tmp_path):
    workdir = tmp_path / "run"
    metrics = workdir / "metrics.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    code, stderr = interrupt_when(
        ROOT / "train.py",
        ["--config", f"{ROOT / 'configs' / 'mnist5k_kure.py'}:tiny",
         "--config.num_train_steps=100000", "--config.log_every_steps=1",
         "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000",
         "--workdir", workdir],
        ready=lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, env=env)
    assert code == 130, stderr[-3000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2, (saved, stderr[-2000:])
    # The step ends, its checkpoint is written, and one line says so.
    assert f"stopped by SIGINT after step {saved[0]} (checkpoint saved): rerun the same " \
           "command" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_ctrl_c_during_a_save_takes_effect_after_it():
    # A KeyboardInterrupt inside Orbax's save can leave its threads waiting for each other
    # (seen as a hang on Ctrl-C); the save blocks hold the interrupt back until they finish.
    from kure_jax._interrupts import interrupts_deferred

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # see WITH_CTRL_C
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the signal is handled here, and held back
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with interrupts_deferred():  # no signal: no interrupt afterwards
            finished.append(True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert finished == [True, True]
