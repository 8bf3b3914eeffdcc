"""Tests for kure_jax.quant.quantizers: DoReFa and the learned-clip ("reference LSQ") quantizer.

References are NumPy implementations written here from the formulas in PAPER.md and the DoReFa
paper; gradients are checked against finite differences (float64) of the straight-through
surrogate, in which the rounding residual is frozen, and against the closed form.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kure_jax.quant.quantizers import dorefa_activation, dorefa_weight, learned_clip_quant

jit_or_not = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


# -------------------------------------------------------------------------------------- DoReFa


def np_dorefa_weight_codes(w):
    """Pre-rounding DoReFa weight value n*u in float64 (u in [0, 1]), without the factor n."""
    t = np.tanh(np.asarray(w, np.float64))
    return t / (2 * np.abs(t).max()) + 0.5


@jit_or_not
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dorefa_weight_matches_numpy(bits, dtype, use_jit):
    n = 2**bits - 1
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 0.5, size=(3, 3, 4, 8)), dtype)
    out = _maybe_jit(functools.partial(dorefa_weight, bits=bits), use_jit)(w)
    assert out.dtype == dtype and out.shape == w.shape
    scaled = n * np_dorefa_weight_codes(np.asarray(w, np.float32))
    expected = 2 * np.round(scaled) / n - 1
    # float32 tanh may differ from float64 by a few ulps: values within 1e-4 of a rounding tie may
    # legitimately land on either neighbour.
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-4
    got = np.asarray(out, np.float64)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16 has 8 significant bits
    np.testing.assert_allclose(got[~near_tie], expected[~near_tie], atol=tol)
    assert np.all(np.abs(got - expected) <= 2 / n + tol)
    assert np.abs(got).max() <= 1.0  # exactly: the extreme codes are -1 and 1, also under jit


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_weight_levels(bits):
    n = 2**bits - 1
    out = np.asarray(dorefa_weight(jnp.linspace(-3.0, 3.0, 4001), bits=bits))
    levels = np.unique(out)
    assert levels.size == 2**bits
    np.testing.assert_allclose(levels, 2 * np.arange(n + 1) / n - 1, atol=1e-6)


def test_dorefa_weight_gradient_is_ste_of_tanh_normalisation():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.7, size=12)
    c = rng.normal(size=12)
    grad = jax.grad(lambda w: jnp.sum(c * dorefa_weight(w, bits=3)))(jnp.asarray(w, jnp.float32))

    # STE surrogate: 2 * (t / (2 max|t|) + 1/2) - 1 = t / max|t|, differentiated numerically.
    def surrogate(w):
        t = np.tanh(w)
        return np.sum(c * t / np.abs(t).max())

    h = 1e-6
    fd = np.array([(surrogate(w + h * e) - surrogate(w - h * e)) / (2 * h) for e in np.eye(12)])
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-4, atol=1e-5)
    assert np.all(np.isfinite(grad))


def test_dorefa_weight_all_zero_is_finite():
    out, grad = jax.value_and_grad(lambda w: dorefa_weight(w, bits=4).sum())(jnp.zeros((3, 2)))
    assert np.isfinite(out) and np.all(np.isfinite(grad))


@jit_or_not
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dorefa_activation_matches_numpy(bits, dtype, use_jit):
    n = 2**bits - 1
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(-0.5, 1.5, size=(4, 64)), dtype)
    out = _maybe_jit(functools.partial(dorefa_activation, bits=bits), use_jit)(x)
    assert out.dtype == dtype and out.shape == x.shape
    x32 = np.asarray(x, np.float32)
    expected = (np.round(np.clip(x32, 0, 1) * np.float32(n)) / np.float32(n)).astype(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(expected, np.float32),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_activation_levels(bits):
    out = np.asarray(dorefa_activation(jnp.linspace(-1.0, 2.0, 3001), bits=bits))
    levels = np.unique(out)
    assert levels.size == 2**bits
    np.testing.assert_allclose(levels, np.arange(2**bits) / (2**bits - 1), atol=1e-7)


@jit_or_not
def test_dorefa_activation_ste_gradient(use_jit):
    x = jnp.array([-1.0, -1e-3, 0.0, 0.2, 0.51, 1.0, 1.001, 4.0])
    grad = _maybe_jit(jax.grad(lambda x: dorefa_activation(x, bits=2).sum()), use_jit)(x)
    np.testing.assert_array_equal(grad, [0, 0, 1, 1, 1, 1, 0, 0])  # [0, 1] inclusive


# ---------------------------------------------------------------------------- learned clip quant


def np_learned_clip(x, alpha, bits, signed):
    """Nearest level of the explicit grid (2^b levels spanning the clip range), float64."""
    n = 2**bits - 1
    x = np.asarray(x, np.float64)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), x.shape)
    k = np.arange(n + 1)
    lo = -alpha if signed else np.zeros_like(alpha)
    xc = np.clip(x, lo, alpha)
    levels = lo[..., None] + (alpha - lo)[..., None] * k / n  # (..., n + 1)
    idx = np.argmin(np.abs(xc[..., None] - levels), axis=-1)
    return np.take_along_axis(levels, idx[..., None], axis=-1)[..., 0]


def np_alpha_grad_closed_form(x, alpha, g, bits, signed, reduce_axes):
    y = np_learned_clip(x, alpha, bits, signed)
    alpha = np.broadcast_to(alpha, x.shape)
    above, below = x > alpha, x < (-alpha if signed else 0)
    per_elem = np.where(above, 1.0, np.where(below, -1.0 if signed else 0.0, (y - x) / alpha))
    return np.sum(g * per_elem, axis=reduce_axes, keepdims=True)


def np_alpha_grad_fd(x, alpha, g, bits, signed, h=1e-7):
    """Central differences of the STE surrogate: rounding residual c = R(u) - u frozen at alpha."""
    n = 2**bits - 1
    x = np.asarray(x, np.float64)

    def parts(a):
        lo = -a if signed else 0.0
        step = (a - lo) / n
        u = (np.clip(x, lo, a) - lo) / step
        return lo, step, u

    _, _, u0 = parts(alpha)
    residual = np.round(u0) - u0

    def surrogate(a):
        lo, step, u = parts(a)
        return np.sum(g * (lo + step * (u + residual)))

    return (surrogate(alpha + h) - surrogate(alpha - h)) / (2 * h)


@jit_or_not
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_learned_clip_forward_matches_numpy(bits, signed, dtype, use_jit):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0, 1.0, size=(8, 16)), dtype)
    alpha = 1.3
    out = _maybe_jit(functools.partial(learned_clip_quant, bits=bits, signed=signed), use_jit)(
        x, alpha
    )
    assert out.dtype == dtype and out.shape == x.shape
    expected = np_learned_clip(np.asarray(x, np.float32), alpha, bits, signed)
    atol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=atol)
    if dtype == jnp.float32:
        assert np.unique(np.asarray(out)).size <= 2**bits


def test_learned_clip_per_channel_forward():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.0, size=(3, 3, 2, 4)).astype(np.float32)
    alpha = np.array([0.5, 1.0, 1.5, 2.0], np.float32).reshape(1, 1, 1, 4)
    out = learned_clip_quant(x, alpha, bits=3)
    np.testing.assert_allclose(out, np_learned_clip(x, alpha, 3, True), atol=1e-6)


@jit_or_not
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_learned_clip_gradients(bits, signed, per_channel, use_jit):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1.0, size=(6, 4)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    if per_channel:
        alpha, reduce_axes = np.array([[0.6, 0.9, 1.2, 1.5]], np.float32), 0
    else:
        alpha, reduce_axes = np.float32(0.9), None

    def loss(x, a):
        return jnp.sum(g * learned_clip_quant(x, a, bits=bits, signed=signed))

    gx, ga = _maybe_jit(jax.grad(loss, (0, 1)), use_jit)(jnp.asarray(x), jnp.asarray(alpha))
    assert ga.shape == np.shape(alpha)
    lo = -alpha if signed else 0.0
    inside = (x >= lo) & (x <= alpha)
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(gx, np.where(inside, g, 0.0))  # clipped STE, exact
    closed = np_alpha_grad_closed_form(x, alpha, g, bits, signed, reduce_axes)
    np.testing.assert_allclose(ga, closed.reshape(np.shape(alpha)), rtol=1e-5, atol=1e-5)
    if not per_channel:
        fd = np_alpha_grad_fd(x, float(alpha), g, bits, signed)
        np.testing.assert_allclose(float(ga), fd, rtol=1e-4, atol=1e-5)


def test_learned_clip_vmap_over_alpha_equals_loop():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    alphas = jnp.array([0.5, 0.8, 1.1, 1.7])
    value_and_grad = jax.value_and_grad(lambda a: learned_clip_quant(x, a, bits=3).sum())
    vs, gs = jax.jit(jax.vmap(value_and_grad))(alphas)
    for i, a in enumerate(alphas):
        v, g = value_and_grad(a)
        # Sums of 35 terms: the batched reduction may associate differently.
        np.testing.assert_allclose(vs[i], v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gs[i], g, rtol=1e-5, atol=1e-5)
    assert np.unique(np.asarray(gs)).size == alphas.size


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, 1, 17, True])
def test_bad_bits_raise(bad):
    for fn in (dorefa_weight, dorefa_activation):
        with pytest.raises(ValueError, match=r"\[2, 16\]"):
            fn(jnp.ones(3), bits=bad)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        learned_clip_quant(jnp.ones(3), 1.0, bits=bad)


@pytest.mark.parametrize("alpha", [0.0, -1.0, np.array([1.0, 0.0, 2.0]), np.inf])
def test_nonpositive_alpha_raises(alpha):
    with pytest.raises(ValueError, match="> 0"):
        learned_clip_quant(jnp.ones(3), alpha, bits=4)


def test_alpha_shape_must_broadcast():
    with pytest.raises(ValueError, match="broadcast"):
        learned_clip_quant(jnp.ones((2, 3)), jnp.ones((2,)), bits=4)
