"""StepConfig.penalty_impl: the train step's KURE penalty through the Pallas kernel (interpreted
on CPU) equals the jnp penalty, and the choice is validated and read from the config."""

import importlib.util
import pathlib

import jax
import numpy as np
import optax
import pytest
from _references import np_kurtosis

import kure_jax
from kure_jax.models import SmallCNN
from kure_jax.training import StepConfig, create_train_state, make_train_step, validate_config
from kure_jax.training.build import step_config

SHAPE = (12, 12, 1)
LR = 0.1
KERNELS = ("stem_conv", "conv1", "hidden", "head")  # the default selection: every kernel


@pytest.fixture(scope="module")
def setup():
    model = SmallCNN(num_classes=10, features=(4, 8), hidden=16)
    state = create_train_state(model, rng=jax.random.key(0), input_shape=SHAPE, tx=optax.sgd(LR))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(4, *SHAPE)).astype(np.float32),
        "label": rng.integers(0, 10, size=4).astype(np.int32),
    }
    return model, state, batch


def run_step(model, state, batch, impl, kure_lambda=1.0):
    spec = StepConfig(num_classes=10, kure_lambda=kure_lambda, penalty_impl=impl)
    step = make_train_step(model, spec)
    has_kernel = "pallas_call" in str(jax.make_jaxpr(step)(state, batch))
    new_state, metrics = jax.jit(step)(state, batch)
    # Plain SGD: the gradient is (old - new) / learning rate.
    grads = jax.tree.map(lambda a, b: (a - b) / LR, state.params, new_state.params)
    return metrics, grads, has_kernel


def test_pallas_penalty_matches_jnp_penalty(setup):
    model, state, batch = setup
    ref_metrics, ref_grads, ref_kernel = run_step(model, state, batch, "jnp")
    metrics, grads, kernel = run_step(model, state, batch, "pallas")
    assert kernel and not ref_kernel  # each impl really took its own path
    kurts = np.array([np_kurtosis(state.params[name]["kernel"]) for name in KERNELS])
    np.testing.assert_allclose(metrics["kure"], np.mean((kurts - 1.8) ** 2), rtol=1e-4)
    for key in ("loss", "kure", "ce", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
    )
    # The comparison above is sensitive to the penalty's gradient: it moves every kernel's
    # gradient by far more than the tolerance.
    _, ce_grads, _ = run_step(model, state, batch, "jnp", kure_lambda=0.0)
    for name in KERNELS:
        change = np.linalg.norm(grads[name]["kernel"] - ce_grads[name]["kernel"])
        assert change > 1e-2 * np.linalg.norm(grads[name]["kernel"]), name


@pytest.mark.parametrize(("impl", "kure_lambda"),
                         [("jnp", 0.0), ("jnp", 1.0), ("pallas", 0.0), ("pallas", 1.0)])
def test_logged_kurtosis_is_the_penalty_s(setup, impl, kure_lambda):
    # With the penalty on, the logged kurtosis is the vector the penalty was computed from
    # (not a second computation); without it, it is computed for the log alone, by the same
    # implementation.
    model, state, batch = setup
    metrics, _, _ = run_step(model, state, batch, impl, kure_lambda=kure_lambda)
    kurts = np.array([np_kurtosis(state.params[name]["kernel"]) for name in KERNELS])
    np.testing.assert_allclose(metrics["kurtosis_mean"], kurts.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kurtosis_max"], kurts.max(), rtol=1e-5)
    expected_kure = np.mean((kurts - 1.8) ** 2) if kure_lambda else 0.0
    np.testing.assert_allclose(metrics["kure"], expected_kure, rtol=1e-4)


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
def test_step_penalty_is_kurtosis_penalty(setup, impl):
    # The step takes its penalty from kure_jax.kurtosis (penalty_and_kurtosis), not its own
    # reduction: equal to kurtosis.penalty with the same impl, and the step's gradient holds
    # lambda * dpenalty/dW.
    model, state, batch = setup
    metrics, grads, _ = run_step(model, state, batch, impl)
    _, ce_grads, _ = run_step(model, state, batch, impl, kure_lambda=0.0)
    expected = kure_jax.penalty(state.params, 1.8, impl=impl)
    np.testing.assert_allclose(metrics["kure"], expected, rtol=1e-5)
    penalty_grads = jax.grad(lambda p: kure_jax.penalty(p, 1.8, impl=impl))(state.params)
    for name in KERNELS:
        np.testing.assert_allclose(grads[name]["kernel"] - ce_grads[name]["kernel"],
                                   penalty_grads[name]["kernel"], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "max"])
def test_reductions_match_the_core_penalty(setup, reduction):
    model, state, batch = setup
    spec = StepConfig(num_classes=10, kure_lambda=1.0, kure_reduction=reduction,
                      penalty_impl="jnp")
    _, metrics = jax.jit(make_train_step(model, spec))(state, batch)
    expected = kure_jax.penalty(state.params, 1.8, reduction=reduction)
    np.testing.assert_allclose(metrics["kure"], expected, rtol=1e-5)  # jit vs eager rounding


def test_unknown_reduction_raises():
    with pytest.raises(ValueError, match=r"kure_reduction must be one of \('mean', 'sum', 'max'\)"):
        StepConfig(num_classes=10, kure_reduction="median")


def test_auto_is_the_dispatchers_choice(setup):
    model, state, batch = setup
    _, _, kernel = run_step(model, state, batch, "auto")
    assert kernel == (jax.default_backend() == "gpu")  # kernels.AUTO_PALLAS_BACKENDS


@pytest.mark.parametrize("impl", ["triton", "Pallas", None, ""])
def test_unknown_penalty_impl_raises(impl):
    with pytest.raises(ValueError, match=r"penalty_impl must be one of \('auto', 'pallas'"):
        StepConfig(num_classes=10, penalty_impl=impl)


def test_config_field_reaches_step_config(setup):
    model, _, _ = setup
    path = pathlib.Path(__file__).parent.parent / "configs" / "mnist5k_kure.py"
    spec = importlib.util.spec_from_file_location("mnist5k_kure", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    assert config.kure.penalty_impl == "auto"
    config.kure.penalty_impl = "pallas"
    validate_config(config)
    assert step_config(config, model, SHAPE, axis_name=None).penalty_impl == "pallas"
    del config.kure.penalty_impl  # as in a config saved before the field existed
    validate_config(config)
    assert step_config(config, model, SHAPE, axis_name=None).penalty_impl == "auto"
    config.kure.penalty_impl = "cuda"
    with pytest.raises(ValueError, match=r"kure\.penalty_impl.*'pallas'"):
        validate_config(config)
