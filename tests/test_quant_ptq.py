"""Tests for kure_jax.quant.ptq.quantize_params on Flax-style params trees."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax.quant.policy import QuantPolicy, compute_step, quantize
from kure_jax.quant.ptq import quantize_params


def _variables(seed=0):
    """A Flax-like variables dict: two kernels, biases, BatchNorm params and statistics."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "params": {
            "Conv_0": {"kernel": normal(3, 3, 2, 4), "bias": normal(4)},
            "BatchNorm_0": {"scale": normal(4), "bias": normal(4)},
            "Dense_0": {"kernel": normal(8, 3), "bias": normal(3)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": normal(4), "var": jnp.abs(normal(4))}},
    }


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p, simple=True, separator="/"), leaf) for p, leaf in leaves]


KERNELS = {"params/Conv_0/kernel", "params/Dense_0/kernel"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("policy", [QuantPolicy(), QuantPolicy(bits=3, axis=-1, clip="mse",
                                                               symmetric=False)],
                         ids=lambda p: p.name)
def test_default_selection_quantises_kernels_only(jit, policy):
    variables = _variables()
    fn = jax.jit(quantize_params, static_argnames="policy") if jit else quantize_params
    out = fn(variables, policy=policy)
    assert jax.tree.structure(out) == jax.tree.structure(variables)
    for (path, before), (_, after) in zip(_paths(variables), _paths(out), strict=True):
        assert after.shape == before.shape and after.dtype == before.dtype
        if path not in KERNELS:
            np.testing.assert_array_equal(after, before)  # bit-identical
            if not jit:
                assert after is before  # eagerly, the very same object
            continue
        scale, zp = (np.asarray(a) for a in compute_step(before, policy))
        codes = np.asarray(after) / scale + zp
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # on the grid
        assert not np.allclose(after, before)
        np.testing.assert_allclose(after, quantize(before, policy), rtol=1e-6, atol=1e-7)


def test_default_policy_is_w4_per_tensor_max():
    variables = _variables()
    out = quantize_params(variables)
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
    step = np.abs(kernel).max() / 7
    expected = np.clip(np.round(kernel / step), -7, 7) * step
    np.testing.assert_allclose(out["params"]["Dense_0"]["kernel"], expected, rtol=1e-6)


def test_where_predicate():
    variables = _variables()
    only_dense = lambda path, leaf: path[-2:] == ("Dense_0", "kernel")
    out = quantize_params(variables, QuantPolicy(bits=2), where=only_dense)
    assert out["params"]["Conv_0"]["kernel"] is variables["params"]["Conv_0"]["kernel"]
    assert not np.allclose(out["params"]["Dense_0"]["kernel"],
                           variables["params"]["Dense_0"]["kernel"])


def test_tree_without_kernel_names_quantises_rank2_leaves():
    rng = np.random.default_rng(1)
    tree = [jnp.asarray(rng.normal(size=(4, 4)), jnp.float32),
            jnp.asarray(rng.normal(size=(5,)), jnp.float32)]
    out = quantize_params(tree, QuantPolicy(bits=2))
    assert len(np.unique(np.asarray(out[0]))) <= 3  # ternary grid
    assert out[1] is tree[1]


def test_low_precision_leaves_keep_dtype():
    tree = {"kernel": jnp.asarray(np.random.default_rng(2).normal(size=(6, 3)), jnp.bfloat16)}
    out = quantize_params(tree, QuantPolicy(bits=4, axis=-1))
    assert out["kernel"].dtype == jnp.bfloat16


def test_errors():
    variables = _variables()
    with pytest.raises(ValueError, match="matched no leaf"):
        quantize_params(variables, where=lambda path, leaf: "nope" in path)
    with pytest.raises(ValueError, match="key"):
        quantize_params(variables, QuantPolicy(rounding="stochastic"))
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        quantize_params(variables, QuantPolicy(axis=3))  # Conv kernel has axis 3, Dense does not.
    with pytest.raises(ValueError, match="QuantPolicy"):
        quantize_params(variables, 4)
    with pytest.raises(ValueError, match="floating"):
        quantize_params({"kernel": jnp.ones((2, 2), jnp.int32)})


def test_stochastic_keys_are_folded_per_leaf():
    kernel = jnp.asarray(np.random.default_rng(3).normal(size=(16, 8)), jnp.float32)
    tree = {"a": {"kernel": kernel}, "b": {"kernel": kernel}}  # two identical layers
    policy = QuantPolicy(bits=3, rounding="stochastic")
    key = jax.random.key(7)
    fn = jax.jit(functools.partial(quantize_params, policy=policy))
    out = fn(tree, key=key)
    assert not np.array_equal(out["a"]["kernel"], out["b"]["kernel"])  # independent noise
    for index, name in enumerate(["a", "b"]):  # leaf i uses fold_in(key, i), flatten order
        expected = quantize(kernel, policy, key=jax.random.fold_in(key, index))
        np.testing.assert_array_equal(out[name]["kernel"], expected)
    np.testing.assert_array_equal(fn(tree, key=key)["a"]["kernel"], out["a"]["kernel"])


def test_vmap_over_keys_equals_loop():
    variables = _variables()
    policy = QuantPolicy(bits=2, rounding="stochastic", axis=-1)
    one = jax.jit(lambda k: quantize_params(variables, policy, key=k))
    keys = jax.random.split(jax.random.key(0), 3)
    batched = jax.jit(jax.vmap(one))(keys)
    for i in range(3):
        expected = one(keys[i])
        jax.tree.map(lambda b, e, i=i: np.testing.assert_array_equal(b[i], e), batched, expected)


def test_vmap_over_step_ratio_equals_loop():
    variables = _variables()
    policy = QuantPolicy(bits=3, clip="aciq", axis=-1)
    one = jax.jit(lambda r: quantize_params(variables, policy, step_ratio=r))
    ratios = jnp.array([0.7, 1.0, 1.3])
    batched = jax.jit(jax.vmap(one))(ratios)
    for i, r in enumerate(ratios):
        expected = one(r)
        jax.tree.map(lambda b, e, i=i: np.testing.assert_allclose(b[i], e, rtol=1e-6),
                     batched, expected)
    # The ratio really changes the selected leaves and only them.
    k = batched["params"]["Dense_0"]["kernel"]
    assert not np.allclose(k[0], k[2])
    np.testing.assert_array_equal(batched["params"]["Dense_0"]["bias"][0],
                                  variables["params"]["Dense_0"]["bias"])


def test_straight_through_gradient_over_the_tree():
    variables = _variables()
    grads = jax.jit(jax.grad(lambda v: sum(
        jnp.sum(leaf) for leaf in jax.tree.leaves(quantize_params(v, QuantPolicy(bits=2))))))(
        variables)
    # Max-abs clip keeps every value inside the range: the STE passes the gradient 1 everywhere.
    jax.tree.map(lambda g: np.testing.assert_array_equal(g, 1.0), grads)
