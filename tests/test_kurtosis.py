"""Kurtosis, KURE penalty, report and optax transform against NumPy/SciPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import kure_jax
from kure_jax.kurtosis import (
    Moments,
    add_penalty,
    kurtosis,
    kurtosis_many,
    kurtosis_report,
    penalty,
    penalty_and_kurtosis,
    tensor_moments,
)

JIT_MODES = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def maybe_jit(fn, use_jit, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs) if use_jit else fn


def numpy_penalty(leaves, target, reduction="mean"):
    """Reference: scipy's Pearson kurtosis per leaf, then (k - target)^2 reduced."""
    kurts = np.array([scipy.stats.kurtosis(np.ravel(w), fisher=False) for w in leaves])
    terms = (kurts - target) ** 2
    return {"mean": terms.mean(), "sum": terms.sum(), "max": terms.max()}[reduction]


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "Conv_0": {"kernel": rng.normal(size=(3, 3, 1, 8)).astype(np.float32),
                       "bias": rng.normal(size=(8,)).astype(np.float32)},
            "Conv_1": {"kernel": rng.laplace(size=(3, 3, 8, 16)).astype(np.float32)},
            "BatchNorm_0": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)},
            "Dense_0": {"kernel": rng.uniform(-1, 1, size=(64, 10)).astype(np.float32),
                        "bias": np.zeros(10, np.float32)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": np.zeros(16, np.float32),
                                        "var": np.ones(16, np.float32)}},
    }


KERNELS = ("Conv_0", "Conv_1", "Dense_0")


@JIT_MODES
@pytest.mark.parametrize("dist", ["normal", "laplace", "uniform"])
@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 3, 4, 8)])
def test_kurtosis_matches_scipy(use_jit, dist, shape):
    rng = np.random.default_rng(1)
    x = getattr(rng, dist)(size=shape).astype(np.float32)
    got = maybe_jit(kurtosis, use_jit)(x)
    np.testing.assert_allclose(got, scipy.stats.kurtosis(x, axis=None, fisher=False), rtol=2e-5)


@JIT_MODES
@pytest.mark.parametrize("axis", [0, -1, (0, 1, 2), (1, 3)])
def test_kurtosis_per_axis_matches_scipy(use_jit, axis):
    x = np.random.default_rng(2).standard_t(df=5, size=(3, 4, 5, 6)).astype(np.float32)
    got = maybe_jit(kurtosis, use_jit, static_argnums=1)(x, axis)
    moved = np.moveaxis(x, np.atleast_1d(axis), range(-np.size(axis), 0))
    flat = moved.reshape(*moved.shape[: x.ndim - np.size(axis)], -1)
    np.testing.assert_allclose(got, scipy.stats.kurtosis(flat, axis=-1, fisher=False), rtol=2e-5)


def test_kurtosis_ddof1_is_reference_definition():
    x = np.random.default_rng(3).normal(size=50)
    # The KURE reference: mean(((w - mean) / w.std(unbiased))**4).
    expected = np.mean(((x - x.mean()) / x.std(ddof=1)) ** 4)
    np.testing.assert_allclose(kurtosis(x, ddof=1), expected, rtol=1e-5)


@pytest.mark.parametrize("value", [0.0, 0.1, -3.7, 1e4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kurtosis_constant_tensor_is_finite_with_finite_gradient(value, dtype):
    x = jnp.full((4, 5), value, dtype)
    k = jax.jit(kurtosis)(x)
    grad = jax.grad(lambda w: kurtosis(w))(x.astype(jnp.float32))
    assert k == 0.0
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.isfinite(penalty({"w": x})))


def test_kurtosis_bfloat16_close_to_float32():
    x = np.random.default_rng(4).normal(size=(64, 64)).astype(np.float32)
    got = kurtosis(jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    expected = scipy.stats.kurtosis(rounded, axis=None, fisher=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_kurtosis_vmap_matches_loop():
    xs = np.random.default_rng(5).laplace(size=(6, 40)).astype(np.float32)
    batched = jax.vmap(kurtosis)(xs)
    np.testing.assert_allclose(batched, [kurtosis(x) for x in xs], rtol=1e-6)


def test_kurtosis_gradient_matches_finite_differences():
    x = np.random.default_rng(6).normal(size=(12,))
    grad = np.asarray(jax.grad(kurtosis)(jnp.asarray(x, jnp.float32)), np.float64)
    ref = lambda v: scipy.stats.kurtosis(v, fisher=False)
    eps = 1e-5
    fd = np.array([(ref(x + eps * e) - ref(x - eps * e)) / (2 * eps) for e in np.eye(x.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-4)


def _analytic_kurtosis_grad(x):
    """d Kurt / dx from the published formula, in float64: (4 / (n var^2)) ((x - mu)^3 - m3)
    - (4 m4 / (n var^3)) (x - mu), with the ddof=0 moments m_k = E[(x - mu)^k]."""
    d = x - x.mean()
    var, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    return 4 / (x.size * var**2) * (d**3 - m3) - 4 * m4 / (x.size * var**3) * d


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e-5, 1e-3, 1e5, 1e10, 1e30])
def test_kurtosis_and_gradient_are_scale_free(scale):
    # Weights with a small spread (e.g. shrunk by weight decay) once gave NaN gradients: the
    # float32 var^4 in the gradient underflowed below a std of ~2e-5.
    base = np.random.default_rng(8).laplace(size=(32, 16))
    x = jnp.asarray(base * scale, jnp.float32)
    value, grad = jax.jit(jax.value_and_grad(kurtosis))(x)
    np.testing.assert_allclose(value, scipy.stats.kurtosis(base, axis=None, fisher=False),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad, np.float64) * scale,
                               _analytic_kurtosis_grad(base), rtol=1e-4, atol=1e-9)


def test_penalty_gradient_finite_with_a_dead_channel():
    # Per-channel KURE with one channel of std 5e-6: every gradient entry stays finite, and
    # the optax transform adds no NaN.
    w = np.random.default_rng(9).normal(size=(3, 3, 8, 4)).astype(np.float32)
    w[..., 2] *= 5e-6
    params = {"Conv_0": {"kernel": jnp.asarray(w)}}
    grads = jax.grad(lambda p: penalty(p, axis=(0, 1, 2)))(params)
    assert np.all(np.isfinite(grads["Conv_0"]["kernel"]))
    tx = add_penalty(1.0, axis=(0, 1, 2))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["Conv_0"]["kernel"], grads["Conv_0"]["kernel"],
                               rtol=1e-6)


@pytest.mark.parametrize("ddof", [-1, 2.5, True, "1"])
def test_kurtosis_bad_ddof_raises(ddof):
    with pytest.raises(ValueError, match="ddof must be an int >= 0"):
        kurtosis(jnp.ones((4, 5)), ddof=ddof)
    with pytest.raises(ValueError, match="ddof must be an int >= 0"):
        penalty({"kernel": jnp.ones((4, 5))}, ddof=ddof)


def test_kurtosis_takes_numpy_integers():
    x = np.random.default_rng(10).normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(kurtosis(x, axis=np.int64(0), ddof=np.int64(1)),
                                  kurtosis(x, axis=0, ddof=1))
    np.testing.assert_array_equal(kurtosis(x, axis=(np.int32(0), 1)), kurtosis(x))


@pytest.mark.parametrize("axis", [5, -5, (0, 0), (), "1", 1.0])
def test_kurtosis_bad_axis_raises(axis):
    with pytest.raises(ValueError, match="axis"):
        kurtosis(jnp.ones((2, 3, 4, 5)), axis)


@JIT_MODES
@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
@pytest.mark.parametrize("target", [1.8, 3.0])
def test_penalty_matches_numpy(use_jit, reduction, target):
    params = make_params()
    fn = maybe_jit(functools.partial(penalty, target=target, reduction=reduction), use_jit)
    expected = numpy_penalty([params["params"][k]["kernel"] for k in KERNELS], target, reduction)
    np.testing.assert_allclose(fn(params), expected, rtol=1e-5)


def test_penalty_without_params_key_and_without_kernel_names():
    params = make_params()
    inner = params["params"]
    np.testing.assert_allclose(penalty(inner), penalty(params), rtol=1e-7)
    # A plain list of matrices has no "kernel" key: every rank >= 2 leaf is taken.
    matrices = [inner[k]["kernel"] for k in KERNELS] + [np.ones(3, np.float32)]
    np.testing.assert_allclose(
        penalty(matrices), numpy_penalty(matrices[:3], 1.8), rtol=1e-5
    )


def test_penalty_gradient_matches_finite_differences():
    rng = np.random.default_rng(7)
    params = {"a": {"kernel": rng.normal(size=(4, 3))}, "b": {"kernel": rng.laplace(size=(2, 5))}}
    grads = jax.grad(penalty)(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
    eps = 1e-5
    for name in ("a", "b"):
        w = params[name]["kernel"]
        fd = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            step = np.zeros_like(w)
            step[idx] = eps
            plus = {**params, name: {"kernel": w + step}}
            minus = {**params, name: {"kernel": w - step}}
            leaves = lambda p: [p["a"]["kernel"], p["b"]["kernel"]]
            diff = numpy_penalty(leaves(plus), 1.8) - numpy_penalty(leaves(minus), 1.8)
            fd[idx] = diff / (2 * eps)
        np.testing.assert_allclose(grads[name]["kernel"], fd, rtol=2e-3, atol=1e-4)


def test_penalty_gradient_is_zero_on_unselected_leaves():
    grads = jax.grad(penalty)(jax.tree.map(jnp.asarray, make_params()))
    assert not np.any(grads["params"]["Conv_0"]["bias"])
    assert not np.any(grads["batch_stats"]["BatchNorm_0"]["var"])
    assert np.any(grads["params"]["Conv_1"]["kernel"])


def test_penalty_where_predicate_and_per_channel_axis():
    params = make_params()["params"]
    only_convs = lambda path, leaf: path[-1] == "kernel" and leaf.ndim == 4
    got = jax.jit(functools.partial(penalty, where=only_convs, axis=(0, 1, 2)))(params)
    per_channel = [
        np.mean((scipy.stats.kurtosis(w.reshape(-1, w.shape[-1]), axis=0, fisher=False) - 1.8) ** 2)
        for w in (params["Conv_0"]["kernel"], params["Conv_1"]["kernel"])
    ]
    np.testing.assert_allclose(got, np.mean(per_channel), rtol=1e-5)


def test_penalty_vmap_over_stacked_params():
    stacked = jax.tree.map(lambda *xs: np.stack(xs), make_params(0), make_params(1))
    got = jax.vmap(penalty)(stacked)
    np.testing.assert_allclose(got, [penalty(make_params(0)), penalty(make_params(1))], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"where": lambda path, leaf: "nonexistent" in path}, "matched no leaf"),
        ({"reduction": "median"}, "reduction"),
        ({"axis": (0, 1, 2)}, "out of range"),  # fine for convs, not for the rank-2 dense kernel
    ],
)
def test_penalty_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        penalty(make_params(), **kwargs)


def test_penalty_empty_tree_names_what_was_searched():
    with pytest.raises(ValueError, match=r"over 2 leaves.*bias"):
        penalty({"bias": np.zeros(3), "scale": np.ones(3)})


def test_kurtosis_report_matches_scipy_and_runs_under_jit():
    params = make_params()
    report = jax.jit(kurtosis_report)(params)
    assert list(report) == [f"params/{k}/kernel" for k in KERNELS]
    for k in KERNELS:
        expected = scipy.stats.kurtosis(params["params"][k]["kernel"], axis=None, fisher=False)
        np.testing.assert_allclose(report[f"params/{k}/kernel"], expected, rtol=1e-5)


@pytest.mark.parametrize("coeff", [0.0, 0.5])
def test_add_penalty_equals_penalty_in_the_loss(coeff):
    params = jax.tree.map(jnp.asarray, make_params()["params"])
    task_grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)

    chained = optax.chain(add_penalty(coeff), optax.sgd(0.1, momentum=0.9))
    updates, _ = jax.jit(chained.update)(task_grads, chained.init(params), params)

    total_grads = jax.tree.map(
        lambda t, g: t + coeff * g, task_grads, jax.grad(penalty)(params)
    )
    reference = optax.sgd(0.1, momentum=0.9)
    expected, _ = reference.update(total_grads, reference.init(params), params)
    # rtol: jit (chained) vs eager (reference) rounding of the same float32 gradient.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    jax.tree.map(close, updates, expected)


def test_add_penalty_leaves_integer_leaves_alone():
    # e.g. a step counter stored with the params: only float leaves are differentiated.
    params = {"params": jax.tree.map(jnp.asarray, make_params()["params"]),
              "step": jnp.array(3)}
    tx = add_penalty(1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert updates["step"] == 0 and updates["step"].dtype == jnp.int32
    expected = jax.grad(penalty)(params["params"])
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)
    jax.tree.map(close, updates["params"], expected)  # jit vs eager rounding


def test_add_penalty_requires_params():
    tx = add_penalty()
    grads = {"kernel": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="params"):
        tx.update(grads, tx.init(grads))
    with pytest.raises(ValueError, match="reduction"):
        add_penalty(reduction="avg")


def test_training_with_penalty_moves_kurtosis_towards_target():
    """Pure-penalty gradient descent drives a Laplace (kurt ~6) matrix towards 1.8."""
    w = {"kernel": jnp.asarray(np.random.default_rng(8).laplace(size=(32, 32)), jnp.float32)}
    tx = optax.chain(add_penalty(), optax.adam(1e-2))
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
        return optax.apply_updates(w, updates), state

    for _ in range(300):
        w, state = step(w, state)
    assert abs(float(kurtosis(w["kernel"])) - 1.8) < 0.05


def test_public_api_exports():
    # The top level keeps the paper's workflow; the batched moments stay in kure_jax.kurtosis.
    for name in ("kurtosis", "penalty", "kurtosis_report", "add_penalty"):
        assert callable(getattr(kure_jax, name)) and name in kure_jax.__all__
    for fn in (kurtosis_many, tensor_moments, penalty_and_kurtosis):
        assert fn.__module__ == "kure_jax.kurtosis" and fn.__name__ not in kure_jax.__all__
    assert Moments._fields == ("mean", "m2", "m3", "m4", "absmax")


def test_kurtosis_many_and_tensor_moments_match_per_tensor_numpy():
    tensors = [make_params()["params"][k]["kernel"] for k in KERNELS]
    np.testing.assert_allclose(
        kurtosis_many(tensors, ddof=1),
        [scipy.stats.kurtosis(t, axis=None, fisher=False) * ((t.size - 1) / t.size) ** 2
         for t in tensors], rtol=1e-5)
    moments = jax.jit(tensor_moments)(tensors)
    for i, t in enumerate(tensors):
        d = np.asarray(t, np.float64).ravel() - np.mean(t)
        np.testing.assert_allclose(
            [moments.mean[i], moments.m2[i], moments.m4[i], moments.absmax[i]],
            [np.mean(t), np.mean(d**2), np.mean(d**4), np.abs(t).max()], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(moments.m3[i], np.mean(d**3), atol=1e-5 * np.std(d) ** 3)
    with pytest.raises(TypeError, match="list or tuple"):
        kurtosis_many(tensors[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_penalty_and_kurtosis_is_the_penalty_and_its_kurtosis(reduction):
    params = make_params()
    value, kurt = jax.jit(functools.partial(penalty_and_kurtosis,
                                            reduction=reduction))(params)
    # rtol: jit vs eager rounding of the same float32 computation.
    np.testing.assert_allclose(value, penalty(params, reduction=reduction), rtol=1e-5)
    report = kurtosis_report(params)
    np.testing.assert_allclose(kurt, [report[name] for name in report], rtol=1e-5)
    g = jax.grad(lambda p: penalty_and_kurtosis(p, reduction=reduction)[0])(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), g,
                 jax.grad(functools.partial(penalty, reduction=reduction))(params))
