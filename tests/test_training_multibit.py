"""Multi-bit QAT in the training program: "sum"/"sample" steps against single-width steps,
per-width BatchNorm, per-width evaluation, bit-exact resume, the learned-quantizer error, the
shipped configs through train.py.

The references are the single-width QAT steps (``StepConfig(qat=QATConfig at b)``, the path
every other QAT test checks) run through ``jit`` on the same params and batch. Gradients are
read exactly from the step: the optimizer below leaves the params alone and stores the
gradient as its state.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _training_helpers import ROOT, load_config

import kure_jax
from kure_jax import UNIFORM_KURTOSIS, QATConfig
from kure_jax.data import get_dataset
from kure_jax.models import get_model
from kure_jax.training import (
    StepConfig,
    create_train_state,
    make_state_eval_step,
    make_train_step,
    train_and_evaluate,
    validate_config,
)
from kure_jax.training.multibit import per_width_batch_stats, sample_width_index
from kure_jax.training.state import state_to_tree

pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")

SHAPE = (28, 28, 1)
BITS = (8, 4, 2)
# Any-Precision's quantizers; a BatchNorm after every quantised layer (DoReFa is scale-free).
TEMPLATE = QATConfig(weight_bits=4, act_bits=4, weight_quantizer="dorefa",
                     act_quantizer="dorefa")
KEYS = {b: f"w{b}" for b in BITS}


def at(bits, **overrides):
    """The single-width reference config at ``bits`` (built here, not by the code under test)."""
    return dataclasses.replace(TEMPLATE, weight_bits=bits, act_bits=bits, **overrides)


def grad_recorder():
    """An "optimizer" whose update is 0 and whose state is the last gradient, exactly."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


_COMPILED = {}


def step(spec):
    if ("train", spec) not in _COMPILED:
        _COMPILED["train", spec] = jax.jit(make_train_step(MODEL, spec))
    return _COMPILED["train", spec]


def eval_step(spec):
    if ("eval", spec) not in _COMPILED:
        _COMPILED["eval", spec] = jax.jit(make_state_eval_step(MODEL, spec))
    return _COMPILED["eval", spec]


def single(bits, lam=0.0):
    return StepConfig(num_classes=10, kure_lambda=lam, qat=at(bits))


def multi(mode, *, lam=0.0, bn_per_bits=False):
    return StepConfig(num_classes=10, kure_lambda=lam, qat=TEMPLATE, qat_bits=BITS,
                      multibit=mode, bn_per_bits=bn_per_bits)


MODEL = get_model("small_cnn", num_classes=10, features=(8, 16), hidden=32, hidden_norm=True)


@pytest.fixture(scope="module")
def batch():
    return next(get_dataset("mnist5k").train_batches(seed=0, start_step=0, global_batch_size=32))


@pytest.fixture(scope="module")
def state0():
    return create_train_state(MODEL, rng=jax.random.key(0), input_shape=SHAPE,
                              tx=grad_recorder())


def assert_close(a, b, *, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rel_err(a, b):
    """``|a - b| / |b|`` over all leaves (global 2-norms)."""
    return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)) / optax.tree.norm(b))


def differs(a, b):
    return any(not np.allclose(x, y, rtol=1e-4)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ---------------------------------------------------------------- "sum"


def test_sum_gradient_is_the_sum_of_single_width_gradients(state0, batch):
    lam = 0.5
    new, metrics = step(multi("sum", lam=lam))(state0, batch)
    refs = {b: step(single(b))(state0, batch) for b in BITS}
    assert differs(refs[8][0].opt_state, refs[2][0].opt_state)  # the widths' gradients differ
    # The penalty is on the float weights and counted once (StepConfig's default target and
    # selection: every kernel, K_T = 1.8).
    kure, kure_grad = jax.value_and_grad(lambda p: kure_jax.penalty(p, UNIFORM_KURTOSIS))(
        state0.params)
    kure_grad = {"params": jax.tree.map(lambda g: lam * g, kure_grad), "quant": {}}
    expected = jax.tree.map(lambda *g: sum(g), *(r.opt_state for r, _ in refs.values()),
                            kure_grad)
    assert_close(new.opt_state, expected, rtol=2e-5, atol=1e-6)
    assert_equal(new.params, state0.params)  # the recorder really recorded, nothing else

    for b, (_, m) in refs.items():
        np.testing.assert_allclose(metrics[f"ce_{KEYS[b]}"], m["ce"], rtol=1e-6)
        np.testing.assert_allclose(metrics[f"accuracy_{KEYS[b]}"], m["accuracy"])
    ce_sum = sum(float(m["ce"]) for _, m in refs.values())
    np.testing.assert_allclose(metrics["ce"], ce_sum, rtol=1e-6)
    np.testing.assert_allclose(metrics["kure"], kure, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ce_sum + lam * float(kure), rtol=1e-6)
    # Shared BatchNorm: the mean of the widths' updated running statistics.
    mean_stats = jax.tree.map(lambda *s: np.mean(np.stack(s), axis=0),
                              *(r.batch_stats for r, _ in refs.values()))
    assert_close(new.batch_stats, mean_stats, rtol=1e-6, atol=1e-7)
    assert differs(refs[8][0].batch_stats, refs[2][0].batch_stats)


# ---------------------------------------------------------------- "sample"


def test_sample_draws_every_width_uniformly():
    n = 3000
    by_seed = jax.vmap(lambda s: sample_width_index(jax.random.key(s), 0, 3))(jnp.arange(n))
    by_step = jax.vmap(lambda s: sample_width_index(jax.random.key(0), s, 3))(jnp.arange(n))
    for draws in (by_seed, by_step):
        counts = np.bincount(np.asarray(draws), minlength=3)
        # n/3 = 1000 each, binomial sd ~26: 6 sd either side.
        assert counts.shape == (3,) and np.all(np.abs(counts - n / 3) < 160), counts
    # A pure function of (key, step): a resumed run draws the same widths.
    np.testing.assert_array_equal(
        by_step, jax.vmap(lambda s: sample_width_index(jax.random.key(0), s, 3))(jnp.arange(n)))


def _first_step_drawing(state, index):
    for s in range(64):
        if int(sample_width_index(state.rng, s, len(BITS))) == index:
            return s
    raise AssertionError(f"no step of 64 draws width index {index}")


def test_sample_step_is_the_drawn_widths_single_step(state0, batch):
    bn_per_bits = True  # shared statistics: the drawn width's update, as a single-width step
    spec = multi("sample", bn_per_bits=bn_per_bits)
    for i, bits in enumerate(BITS):
        s = _first_step_drawing(state0, i)
        ref_state = state0.replace(step=jnp.asarray(s, jnp.int32))
        ref, ref_metrics = step(single(bits))(ref_state, batch)
        start = ref_state
        if bn_per_bits:
            start = ref_state.replace(
                batch_stats=per_width_batch_stats(ref_state.batch_stats, BITS))
        new, metrics = step(spec)(start, batch)
        assert float(metrics["bits"]) == bits
        # Inside lax.switch XLA fuses differently: ~3e-6 relative, where the widths' gradients
        # are 0.5-1.2 apart (a DoReFa rounding that flips moves the gradient a little).
        assert rel_err(new.opt_state, ref.opt_state) < 1e-4
        others = [step(single(b))(ref_state, batch)[0].opt_state for b in BITS if b != bits]
        assert min(rel_err(new.opt_state, g) for g in others) > 0.1
        for name in ("ce", "accuracy"):
            np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6)
        if not bn_per_bits:
            assert_close(new.batch_stats, ref.batch_stats, rtol=1e-6, atol=1e-7)
            continue
        # Switchable BatchNorm: only the drawn width's statistics move.
        assert sorted(new.batch_stats) == sorted(KEYS.values())
        for other in BITS:
            if other == bits:
                assert_close(new.batch_stats[KEYS[bits]], ref.batch_stats, rtol=1e-6, atol=1e-7)
                assert differs(new.batch_stats[KEYS[bits]], state0.batch_stats)
            else:
                assert_equal(new.batch_stats[KEYS[other]], state0.batch_stats)


# ---------------------------------------------------------------- per-width BatchNorm + eval


@pytest.fixture(scope="module")
def per_width_after_sum(state0, batch):
    start = state0.replace(batch_stats=per_width_batch_stats(state0.batch_stats, BITS))
    new, _ = step(multi("sum", bn_per_bits=True))(start, batch)
    return new


def test_sum_with_bn_per_bits_updates_each_width_from_its_own_forward(
    state0, batch, per_width_after_sum
):
    assert sorted(per_width_after_sum.batch_stats) == sorted(KEYS.values())
    for b in BITS:
        ref, _ = step(single(b))(state0, batch)
        assert_close(per_width_after_sum.batch_stats[KEYS[b]], ref.batch_stats,
                     rtol=1e-6, atol=1e-7)


def test_eval_at_each_width_uses_its_own_statistics(batch, per_width_after_sum):
    state = per_width_after_sum
    stats = state.batch_stats
    assert differs(stats["w8"], stats["w2"])  # else the check below could not tell them apart
    mask = np.ones(32, np.float32)
    mask[-3:] = 0  # padded rows do not count
    eval_batch = dict(batch, mask=mask)
    sums = eval_step(multi("sum", bn_per_bits=True))(state, eval_batch)
    assert float(sums["count"]) == 29
    for b in BITS:
        ref = eval_step(single(b))(state.replace(batch_stats=stats[KEYS[b]]), eval_batch)
        assert float(sums[f"correct_{KEYS[b]}"]) == float(ref["correct"])
        np.testing.assert_allclose(sums[f"loss_sum_{KEYS[b]}"], ref["loss_sum"], rtol=1e-6)
    wrong = eval_step(single(2))(state.replace(batch_stats=stats["w8"]), eval_batch)
    assert not np.isclose(float(wrong["loss_sum"]), float(sums["loss_sum_w2"]), rtol=1e-4)
    # The loop's "accuracy" (which picks the best checkpoint) is the mean over the widths.
    for name in ("correct", "loss_sum"):
        mean = np.mean([float(sums[f"{name}_{KEYS[b]}"]) for b in BITS])
        np.testing.assert_allclose(sums[name], mean, rtol=1e-6)


# ---------------------------------------------------------------- the training program


# The shipped Matryoshka config with switchable BatchNorm and one width per step: the widths
# drawn from the RNG and the per-width statistics must resume. The CLI test below runs the same
# config (so its programs come from the compilation cache).
OVERRIDES = {"qat.bn_per_bits": True, "qat.multibit": "sample"}


def matryoshka_tiny():
    config = load_config("mnist5k_matryoshka", "tiny")  # 6 steps, eval + checkpoint every 3
    for field, value in OVERRIDES.items():
        section, name = field.split(".")
        config[section][name] = value
    return config


@pytest.mark.slow
def test_resume_is_bit_exact_with_per_width_batch_stats(tmp_path):
    straight = train_and_evaluate(matryoshka_tiny(), tmp_path / "straight")
    first = train_and_evaluate(matryoshka_tiny(), tmp_path / "resumed", stop_at_step=4)
    assert int(first.state.step) == 4
    resumed = train_and_evaluate(matryoshka_tiny(), tmp_path / "resumed")
    assert int(resumed.state.step) == 6
    expected, got = state_to_tree(straight.state), state_to_tree(resumed.state)
    assert sorted(got["batch_stats"]) == ["w2", "w4", "w8"]
    assert differs(got["batch_stats"]["w8"], got["batch_stats"]["w2"])
    assert_equal(got, expected)  # every leaf: params, per-width stats, opt_state, step, rng
    for b in BITS:
        assert resumed.eval_metrics[f"accuracy_{KEYS[b]}"] == straight.eval_metrics[
            f"accuracy_{KEYS[b]}"]
    accuracies = [straight.eval_metrics[f"accuracy_{KEYS[b]}"] for b in BITS]
    assert straight.eval_metrics["accuracy"] == pytest.approx(np.mean(accuracies))


def test_learned_quantizers_with_several_widths_are_refused():
    match = "needs quantizers without learned state"
    with pytest.raises(ValueError, match=match):
        StepConfig(num_classes=10, qat=QATConfig(weight_quantizer="lsq"), qat_bits=(8, 4))
    config = load_config("mnist5k_qat_w4a4")  # lsq
    config.qat.bits = (8, 4)
    with pytest.raises(ValueError, match=match):
        validate_config(config)
    config.qat.weight_quantizer = config.qat.act_quantizer = "max"
    validate_config(config)  # stateless: fine
    for field, value, message in [("bits", (4, 4), "distinct"), ("bits", (4, 1), "width 1"),
                                  ("multibit", "mean", "qat.multibit")]:
        bad = config.copy_and_resolve_references()
        bad.qat[field] = value
        with pytest.raises(ValueError, match=re.escape(message)):
            validate_config(bad)
    single_width = load_config("mnist5k_qat_w4a4")
    single_width.qat.bn_per_bits = True
    with pytest.raises(ValueError, match=re.escape("needs config.qat.bits")):
        validate_config(single_width)


@pytest.mark.slow
def test_command_line_sets_the_widths(tmp_path):
    # A tuple override reaches validate_config: repeated widths fail at start-up, before any
    # compilation, with the one-line error of train.py.
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         f"--config={ROOT / 'configs' / 'mnist5k_matryoshka.py'}:tiny",
         "--config.qat.bits=(4, 4)", f"--workdir={tmp_path / 'run'}"],
        cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
        text=True, timeout=240,
    )
    assert result.returncode != 0
    assert "config.qat.bits: multi-bit QAT bit widths must be distinct; got (4, 4)" in (
        result.stderr + result.stdout)


@pytest.mark.slow
def test_train_cli_runs_the_matryoshka_config(tmp_path, persistent_compilation_cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(persistent_compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"),
         f"--config={ROOT / 'configs' / 'mnist5k_matryoshka.py'}:tiny",
         *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), f"--workdir={workdir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final test accuracy" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    metrics = evals[-1]
    widths = sorted(k for k in metrics if k.startswith("accuracy_"))
    assert widths == ["accuracy_w2", "accuracy_w4", "accuracy_w8"]
    assert metrics["accuracy"] == pytest.approx(np.mean([metrics[k] for k in widths]))
    train = [r for r in records if r["kind"] == "train"]
    assert all(2 <= r["bits"] <= 8 for r in train)  # "sample": the mean drawn width
