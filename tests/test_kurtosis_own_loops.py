"""KURE in users' own loops: optax hyperparameter injection, schedules, MultiSteps, Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from flax import nnx

import kure_jax
from kure_jax.kurtosis import AddPenaltyState


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                  "bias": jnp.zeros((5,), jnp.float32)},
        "conv": {"kernel": jnp.asarray(rng.laplace(size=(3, 3, 2, 4)), jnp.float32)},
    }


def _zeros(params):
    return jax.tree.map(jnp.zeros_like, params)


def _assert_update_is(updates, params, weight, **penalty_kwargs):
    """updates == weight * grad(penalty)(params) (the task gradients are zero)."""
    expected = jax.tree.map(lambda g: weight * g,
                            jax.grad(lambda p: kure_jax.penalty(p, **penalty_kwargs))(params))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    jax.tree.map(close, updates, expected)


def test_inject_hyperparams_default_arguments_under_jit():
    # The failing call of the issue: every numeric default (ddof) became a traced hyperparameter.
    params = _params()
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=0.5)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(_zeros(params), state, params)
    _assert_update_is(updates, params, 0.5)
    assert float(state.hyperparams["coeff"]) == 0.5


def test_injected_coeff_and_target_can_be_changed_in_the_state():
    params = _params()
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=0.5, target=1.8)
    state = tx.init(params)
    state.hyperparams["coeff"] = jnp.asarray(2.0)
    state.hyperparams["target"] = jnp.asarray(3.0)
    updates, _ = jax.jit(tx.update)(_zeros(params), state, params)
    _assert_update_is(updates, params, 2.0, target=3.0)


@pytest.mark.parametrize("ddof", [0, 1])
def test_injected_ddof_is_used_as_given(ddof):
    params = _params()
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=1.0, ddof=ddof)
    updates, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    _assert_update_is(updates, params, 1.0, ddof=ddof)


def test_injected_scheduled_coeff_warms_up():
    params = _params()
    warmup = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=warmup)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(6):
        updates, state = update(_zeros(params), state, params)
        _assert_update_is(updates, params, float(warmup(step)))


def test_a_schedule_as_coeff_counts_steps_in_its_own_state():
    params = _params()
    warmup = optax.linear_schedule(0.0, 1.0, transition_steps=4)
    tx = kure_jax.add_penalty(coeff=warmup, axis=(0,))
    state = tx.init(params)
    assert isinstance(state, AddPenaltyState) and int(state.count) == 0
    update = jax.jit(tx.update)
    for step in range(6):
        updates, state = update(_zeros(params), state, params)
        _assert_update_is(updates, params, float(warmup(step)), axis=(0,))
    assert int(state.count) == 6


def test_a_constant_coeff_keeps_optax_empty_state():
    assert isinstance(kure_jax.add_penalty(1.0).init(_params()), optax.EmptyState)


def test_predicates_go_in_static_args():
    params = _params()
    convs = lambda path, leaf: leaf.ndim == 4
    tx = optax.inject_hyperparams(kure_jax.add_penalty, static_args=("where",))(
        coeff=1.0, where=convs)
    updates, _ = jax.jit(tx.update)(_zeros(params), tx.init(params), params)
    _assert_update_is(updates, params, 1.0, where=convs)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) == 0.0


def test_an_injected_int_axis_says_how_to_fix_it():
    params = _params()
    tx = optax.inject_hyperparams(kure_jax.add_penalty)(coeff=1.0, axis=0)
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(tx.update)(_zeros(params), tx.init(params), params)


def test_multisteps_applies_the_penalty_of_the_mean_gradient():
    params = _params()
    tx = optax.MultiSteps(optax.chain(kure_jax.add_penalty(0.5), optax.sgd(1.0)),
                          every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(_zeros(params), state, params)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(first))
    second, state = update(_zeros(params), state, params)
    # sgd(1.0) negates: the applied update is -(0.5 * grad(penalty)) at the same params.
    _assert_update_is(jax.tree.map(jnp.negative, second), params, 0.5)


def test_bad_static_options_are_refused_at_construction():
    with pytest.raises(ValueError, match="ddof"):
        kure_jax.add_penalty(ddof=-1)
    with pytest.raises(ValueError, match="ddof"):
        kure_jax.add_penalty(ddof=jnp.asarray(1.5))


class _NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv(x))))
        return self.linear(x.mean(axis=(1, 2)))


def test_nnx_state_gets_linen_style_names():
    state = nnx.state(_NNXNet(nnx.Rngs(0)), nnx.Param)
    report = kure_jax.kurtosis_report(state)
    assert list(report) == ["conv/kernel", "conv2/kernel", "linear/kernel"]
    conv = np.asarray(state["conv"]["kernel"][...])
    np.testing.assert_allclose(report["conv/kernel"],
                               scipy.stats.kurtosis(conv, axis=None, fisher=False), rtol=1e-5)
    assert [n for n, _ in kure_jax.select(state, kure_jax.PAPER_LAYERS)] == [
        "conv2/kernel"]


def test_nnx_penalty_equals_the_penalty_of_the_same_weights_as_a_dict():
    state = nnx.state(_NNXNet(nnx.Rngs(0)), nnx.Param)
    as_dict = nnx.to_pure_dict(state)
    np.testing.assert_allclose(jax.jit(kure_jax.penalty)(state), kure_jax.penalty(as_dict),
                               rtol=1e-6)


def test_nnx_optimizer_with_add_penalty_matches_the_penalty_in_the_loss():
    images = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 1)), jnp.float32)
    labels = jnp.array([0, 1, 2, 0])

    def task_loss(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    chained_model = _NNXNet(nnx.Rngs(0))
    chained = nnx.Optimizer(chained_model, optax.chain(kure_jax.add_penalty(0.5), optax.sgd(0.1)),
                            wrt=nnx.Param)

    @nnx.jit
    def chained_step(model, optimizer):
        optimizer.update(model, nnx.grad(task_loss)(model))

    in_loss_model = _NNXNet(nnx.Rngs(0))
    in_loss = nnx.Optimizer(in_loss_model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def in_loss_step(model, optimizer):
        loss = lambda m: task_loss(m) + 0.5 * kure_jax.penalty(nnx.state(m, nnx.Param))
        optimizer.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        chained_step(chained_model, chained)
        in_loss_step(in_loss_model, in_loss)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, nnx.state(chained_model, nnx.Param), nnx.state(in_loss_model, nnx.Param))


def test_nnx_ptq_round_trip_through_nnx_update():
    model = _NNXNet(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    float_weights = nnx.to_pure_dict(state)  # a copy: `state` may alias the model's variables
    policy = kure_jax.QuantPolicy(bits=3, axis=-1)
    reference = kure_jax.quantize_params(float_weights, policy)
    nnx.update(model, kure_jax.quantize_params(state, policy))
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, reference)
    kernel = np.asarray(got["conv"]["kernel"])
    assert all(len(np.unique(kernel[..., o])) <= 2**3 for o in range(kernel.shape[-1]))
    np.testing.assert_array_equal(got["conv"]["bias"], float_weights["conv"]["bias"])
