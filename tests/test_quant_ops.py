"""Tests for kure_jax.quant: fake_quant, rounding, ranges and LSQ gradients.

Expected values come from NumPy quantizers (tests/_references.py, independent of the JAX code),
literal tables, or the LSQ gradient formula of Esser et al. 2020, Eq. 3.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import np_fake_quant, np_round
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kure_jax.quant.ops import (
    MAX_BITS,
    MIN_BITS,
    ROUNDING_MODES,
    fake_quant,
    integer_range,
    lsq_init_scale,
    round_values,
    validate_bits,
    validate_rounding,
)

DETERMINISTIC = ("nearest", "nearest_away", "floor")
jit_or_not = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


# --------------------------------------------------------------------------- validation / ranges


@pytest.mark.parametrize(
    "bits, signed, narrow, expected",
    [
        (2, True, False, (-2, 1)),
        (2, True, True, (-1, 1)),
        (2, False, False, (0, 3)),
        (2, False, True, (0, 2)),
        (4, True, False, (-8, 7)),
        (4, True, True, (-7, 7)),
        (4, False, False, (0, 15)),
        (8, True, False, (-128, 127)),
        (8, True, True, (-127, 127)),
        (8, False, False, (0, 255)),
        (8, False, True, (0, 254)),
        (16, True, False, (-32768, 32767)),
        (16, False, False, (0, 65535)),
    ],
)
def test_integer_range_table(bits, signed, narrow, expected):
    assert integer_range(bits, signed, narrow_range=narrow) == expected


@pytest.mark.parametrize("bits", range(MIN_BITS, MAX_BITS + 1))
def test_integer_range_code_counts(bits):
    for signed in (True, False):
        lo, hi = integer_range(bits, signed)
        assert hi - lo + 1 == 2**bits
        lo_n, hi_n = integer_range(bits, signed, narrow_range=True)
        assert hi_n - lo_n + 1 == 2**bits - 1
        assert lo_n <= 0 <= hi_n
    lo, hi = integer_range(bits, True, narrow_range=True)
    assert lo == -hi


@pytest.mark.parametrize("bad", [0, 1, 17, -4, True, False, 4.0, "4", None])
def test_bad_bits_raise(bad):
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        validate_bits(bad)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        integer_range(bad)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        fake_quant(jnp.ones(3), 0.1, bits=bad)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        lsq_init_scale(jnp.ones(3), bits=bad)


def test_validate_bits_accepts_numpy_ints():
    out = validate_bits(np.int64(4))
    assert out == 4 and type(out) is int


@pytest.mark.parametrize("bad", ["round", "Nearest", "", None, 0])
def test_bad_rounding_raises(bad):
    with pytest.raises(ValueError, match="nearest_away"):
        validate_rounding(bad)
    with pytest.raises(ValueError, match="stochastic"):
        round_values(jnp.ones(2), bad)
    with pytest.raises(ValueError, match="floor"):
        fake_quant(jnp.ones(2), 0.5, bits=4, rounding=bad)


def test_stochastic_without_key_raises():
    with pytest.raises(ValueError, match="key"):
        round_values(jnp.ones(2), "stochastic")
    with pytest.raises(ValueError, match="key"):
        fake_quant(jnp.ones(2), 0.5, bits=4, rounding="stochastic")


@pytest.mark.parametrize(
    "scale", [0.0, -0.1, np.array([0.1, 0.0, 0.2]), np.array([0.1, -1.0, 0.2]), np.nan, np.inf]
)
def test_nonpositive_scale_raises(scale):
    with pytest.raises(ValueError, match="> 0"):
        fake_quant(jnp.ones((2, 3)), scale, bits=4)


@pytest.mark.parametrize("shape", [(2,), (3, 1, 1), (1, 2, 3), (3, 3)])
def test_scale_shape_must_broadcast_to_x(shape):
    with pytest.raises(ValueError, match="broadcast"):
        fake_quant(jnp.ones((2, 3)), jnp.full(shape, 0.5), bits=4)
    with pytest.raises(ValueError, match="broadcast"):
        fake_quant(jnp.ones((2, 3)), 0.5, zero_point=jnp.zeros(shape), bits=4)


# --------------------------------------------------------------------------------- round_values

TIES = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, -0.7, 0.49999997, 3.0], np.float32)
TIES_EXPECTED = {
    "nearest": [-2, -2, -0, 0, 2, 2, -1, 0, 3],
    "nearest_away": [-3, -2, -1, 1, 2, 3, -1, 0, 3],
    "floor": [-3, -2, -1, 0, 1, 2, -1, 0, 3],
}


@jit_or_not
@pytest.mark.parametrize("mode", DETERMINISTIC)
def test_round_values_ties_literal(mode, use_jit):
    fn = _maybe_jit(functools.partial(round_values, rounding=mode), use_jit)
    out = fn(jnp.asarray(TIES))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(TIES_EXPECTED[mode], np.float32))
    np.testing.assert_array_equal(np_round(TIES, mode), TIES_EXPECTED[mode])  # the reference too


@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_values_matches_numpy(mode, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(0, 20, size=500), dtype)
    out = round_values(x, mode)
    assert out.dtype == dtype and out.shape == x.shape
    expected = np_round(np.asarray(x, np.float32), mode)
    np.testing.assert_array_equal(np.asarray(out, np.float32), expected)


def test_round_values_promotes_integers():
    out = round_values(jnp.arange(3))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [0.0, 1.0, 2.0])


# ------------------------------------------------------------------------ fake_quant vs NumPy

RANGES = [(True, False), (True, True), (False, False), (False, True)]  # (signed, narrow)


@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("signed, narrow", RANGES)
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize(
    "dtype, use_jit",
    [(jnp.float32, False), (jnp.float32, True), (jnp.bfloat16, True)],
    ids=["f32-eager", "f32-jit", "bf16-jit"],
)
def test_fake_quant_matches_numpy(mode, signed, narrow, asymmetric, per_channel, dtype, use_jit):
    bits = 4
    qmin, qmax = integer_range(bits, signed, narrow_range=narrow)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0.2, 1.5, size=(3, 3, 2, 4)), dtype)  # HWIO-like kernel
    if per_channel:
        scale = np.array([0.05, 0.1, 0.2, 0.35], np.float32).reshape(1, 1, 1, 4)
        zp = np.array([-2.0, 1.0, 3.0, 0.0], np.float32).reshape(1, 1, 1, 4)
    else:
        scale, zp = np.float32(0.15), np.float32(2.0)
    if not asymmetric:
        zp = np.zeros_like(zp)
    elif not signed:
        zp = np.abs(zp) + 3.0  # unsigned asymmetric: zero maps to a code inside [0, qmax]
    fn = functools.partial(
        fake_quant, bits=bits, signed=signed, narrow_range=narrow, rounding=mode
    )
    out = _maybe_jit(lambda x, s, z: fn(x, s, zero_point=z), use_jit)(x, scale, zp)
    assert out.dtype == dtype and out.shape == x.shape
    expected = np_fake_quant(np.asarray(x, np.float32), scale, zp, qmin, qmax, mode)
    expected = np.asarray(expected.astype(dtype), np.float32)  # final cast, as documented
    np.testing.assert_array_equal(np.asarray(out, np.float32), expected)
    # The data exercise both sides of the clip and the interior.
    codes = np.round(np.asarray(x, np.float32) / scale) + zp
    assert (codes < qmin).any() and (codes > qmax).any() and ((codes > qmin) & (codes < qmax)).any()


def test_fake_quant_float64():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=64), jnp.float64)
        out = jax.jit(functools.partial(fake_quant, bits=6))(x, 0.07)
        assert out.dtype == jnp.float64
        expected = np_fake_quant(np.asarray(x), 0.07, 0.0, -32, 31, "nearest", np.float64)
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_fake_quant_promotes_integer_input():
    out = fake_quant(jnp.arange(-3, 4), 2.0, bits=2)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, [-4.0, -2.0, 0.0, 0.0, 0.0, 2.0, 2.0])  # codes [-2, 1]


# ------------------------------------------------------------------------------------ gradients


@jit_or_not
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("signed", [True, False])
def test_ste_gradient_is_exactly_one_inside_zero_outside(dtype, signed, use_jit):
    scale, zp = 0.25, 1.0
    qmin, qmax = integer_range(3, signed)
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale  # clip limits in x units
    x = jnp.asarray(
        [lo - 1.0, lo - 0.01, lo, lo + 0.3, 0.0, 0.37, hi - 0.1, hi, hi + 0.01, hi + 5.0], dtype
    )
    inside = np.array([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)  # bounds are inclusive
    cot = jnp.asarray(np.linspace(0.5, 5.0, x.size), dtype)

    def loss(x):
        return jnp.sum(cot * fake_quant(x, scale, zero_point=zp, bits=3, signed=signed))

    grad = _maybe_jit(jax.grad(loss), use_jit)(x)
    assert grad.dtype == dtype
    expected = np.asarray(cot, np.float32) * inside
    np.testing.assert_array_equal(np.asarray(grad, np.float32), expected)
    plain = lambda x: fake_quant(x, scale, zero_point=zp, bits=3, signed=signed).sum()
    ones = _maybe_jit(jax.grad(plain), use_jit)(x)
    np.testing.assert_array_equal(np.asarray(ones, np.float32), inside)


def np_lsq_scale_grad(x, scale, zp, g, qmin, qmax, mode, reduce_axes, grad_scale):
    """Esser et al. 2020, Eq. 3 (with a zero point): dy/ds per element, summed to scale's shape."""
    v = x / scale
    code = v + zp
    inside = np_round(v, mode) - v
    dy_ds = np.where(code < qmin, qmin - zp, np.where(code > qmax, qmax - zp, inside))
    total = np.sum(g * dy_ds, axis=reduce_axes, keepdims=True)
    if grad_scale:
        total = total / np.sqrt(x.size / np.size(scale) * qmax)
    return total.reshape(np.shape(scale))


@pytest.mark.parametrize("mode", DETERMINISTIC)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("grad_scale", [False, True])
@pytest.mark.parametrize("signed, zp", [(True, 0.0), (True, -1.0), (False, 3.0)])
def test_lsq_scale_gradient_matches_formula(mode, per_channel, grad_scale, signed, zp):
    bits = 3
    qmin, qmax = integer_range(bits, signed)
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, size=(3, 3, 2, 4)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    if per_channel:
        scale = np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(1, 1, 1, 4)
        reduce_axes = (0, 1, 2)
    else:
        scale, reduce_axes = np.float32(0.2), None

    def loss(s):
        y = fake_quant(x, s, zero_point=zp, bits=bits, signed=signed, rounding=mode,
                       lsq_grad_scale=grad_scale)
        return jnp.sum(g * y)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(scale))  # eager: see the vmap test
    assert grad.shape == np.shape(scale) and grad.dtype == jnp.float32
    expected = np_lsq_scale_grad(x, scale, np.float32(zp), g, qmin, qmax, mode, reduce_axes,
                                 grad_scale)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)


def test_lsq_scale_gradient_in_saturation_equals_true_derivative():
    # Every value clipped above: y = qmax * s, so dy/ds = qmax exactly (no STE involved).
    x = jnp.full((5,), 100.0)
    grad = jax.grad(lambda s: fake_quant(x, s, bits=4).sum())(0.5)
    np.testing.assert_allclose(grad, 5 * 7.0)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_zero_point_gradient_is_minus_scale_outside(per_channel):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.0, size=(6, 3)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    scale = np.array([[0.1, 0.2, 0.3]], np.float32) if per_channel else np.float32(0.2)
    zp = np.array([[1.0, -2.0, 0.0]], np.float32) if per_channel else np.float32(1.0)
    grad = jax.grad(lambda z: jnp.sum(g * fake_quant(x, scale, zero_point=z, bits=3)))(zp)
    code = x / scale + zp
    outside = (code < -4) | (code > 3)
    axis = 0 if per_channel else None
    expected = np.sum(np.where(outside, -g * scale, 0.0), axis=axis, keepdims=True)
    expected = expected.reshape(np.shape(zp))
    assert outside.any() and (~outside).any()
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)


def test_gradient_dtypes_follow_inputs():
    x = jnp.linspace(-1, 1, 8, dtype=jnp.bfloat16)
    gx, gs = jax.grad(lambda x, s: fake_quant(x, s, bits=4).astype(jnp.float32).sum(), (0, 1))(
        x, jnp.float32(0.1)
    )
    assert gx.dtype == jnp.bfloat16 and gs.dtype == jnp.float32


# -------------------------------------------------------------------------- stochastic rounding


@jit_or_not
def test_stochastic_rounding_is_unbiased_and_uses_neighbours(use_jit):
    scale, draws = 0.5, 4000
    frac = np.array([0.0, 0.05, 0.25, 0.5, 0.75, 0.95], np.float32)
    codes = np.array([-3, -1, 0, 2, 5, 7], np.float32) + frac  # mixed signs, no clipping at 8 bits
    x = jnp.asarray(np.broadcast_to(codes * scale, (draws, codes.size)))
    fn = _maybe_jit(functools.partial(fake_quant, bits=8, rounding="stochastic"), use_jit)
    y = np.asarray(fn(x, scale, key=jax.random.key(0))) / scale
    lower = np.floor(codes)
    assert np.all((y == lower) | (y == lower + 1))  # only the two neighbouring grid points
    hits_upper = (y == lower + 1).mean(axis=0)
    assert np.all(hits_upper[frac == 0] == 0)  # grid points are kept exactly
    assert np.all((hits_upper > 0) == (frac > 0))
    # Mean of `draws` Bernoulli(frac) samples: standard error sqrt(f (1 - f) / draws); 5 sigma.
    tol = 5 * np.sqrt(frac * (1 - frac) / draws) + 1e-6
    np.testing.assert_array_less(np.abs(y.mean(axis=0) - codes), tol)


def test_stochastic_rounding_key_determinism():
    x = jnp.full((1000,), 0.5)  # every element a fair coin
    key_a, key_b = jax.random.key(1), jax.random.key(2)
    eager = round_values(x, "stochastic", key=key_a)
    jitted = jax.jit(lambda x, k: round_values(x, "stochastic", key=k))(x, key_a)
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(eager, round_values(x, "stochastic", key=key_a))
    assert not np.array_equal(eager, round_values(x, "stochastic", key=key_b))
    # Legacy uint32 keys work as well.
    legacy = round_values(x, "stochastic", key=jax.random.PRNGKey(1))
    assert set(np.unique(np.asarray(legacy))) == {0.0, 1.0}


def test_stochastic_round_values_bfloat16_unbiased():
    x = jnp.full((20000,), 2.25, jnp.bfloat16)
    out = round_values(x, "stochastic", key=jax.random.key(3))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(np.asarray(out, np.float32).mean()), 2.25,
                               atol=5 * np.sqrt(0.25 * 0.75 / 20000))


def test_stochastic_gradient_is_ste():
    x = jnp.array([0.3, 1.7, 9.0])
    grad = jax.grad(lambda x: fake_quant(x, 0.5, bits=4, rounding="stochastic",
                                         key=jax.random.key(0)).sum())(x)
    np.testing.assert_array_equal(grad, [1.0, 1.0, 0.0])


# ----------------------------------------------------------------------- hypothesis properties

_fq_jit = jax.jit(fake_quant, static_argnames=("bits", "signed", "rounding", "narrow_range"))
_xs = hnp.arrays(np.float32, (16,), elements=st.floats(-40, 40, width=32))
_scales = st.floats(1 / 64, 8.0, width=32)


@given(x=_xs, scale=_scales, bits=st.integers(2, 8), signed=st.booleans(), narrow=st.booleans(),
       zp=st.integers(-3, 3), mode=st.sampled_from(DETERMINISTIC))
def test_property_on_grid_and_in_range(x, scale, bits, signed, narrow, zp, mode):
    qmin, qmax = integer_range(bits, signed, narrow_range=narrow)
    y = np.asarray(_fq_jit(x, scale, zero_point=float(zp), bits=bits, signed=signed,
                           rounding=mode, narrow_range=narrow))
    scale = np.float32(scale)
    k = y / scale + zp
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)  # on the grid (k - z) s
    assert np.all(y >= np.float32(qmin - zp) * scale)
    assert np.all(y <= np.float32(qmax - zp) * scale)


@given(x=_xs, scale=_scales, bits=st.integers(2, 8), signed=st.booleans(), zp=st.integers(-3, 3),
       mode=st.sampled_from(["nearest", "nearest_away"]))
def test_property_idempotent_nearest(x, scale, bits, signed, zp, mode):
    fq = functools.partial(_fq_jit, zero_point=float(zp), bits=bits, signed=signed, rounding=mode)
    once = fq(x, scale)
    np.testing.assert_array_equal(fq(once, scale), once)


@given(x=_xs, exponent=st.integers(-6, 3), bits=st.integers(2, 8), signed=st.booleans(),
       zp=st.integers(-3, 3), mode=st.sampled_from(DETERMINISTIC))
def test_property_idempotent_power_of_two_scale(x, exponent, bits, signed, zp, mode):
    # With a power-of-two step k*s/s == k exactly, so even floor is idempotent. (For a general
    # step, floor(fl(k*s)/s) can be k - 1: floor is only idempotent up to that rounding error.)
    fq = functools.partial(_fq_jit, zero_point=float(zp), bits=bits, signed=signed, rounding=mode)
    once = fq(x, 2.0**exponent)
    np.testing.assert_array_equal(fq(once, 2.0**exponent), once)


@given(x=_xs, scale=_scales, bits=st.integers(2, 8), signed=st.booleans(),
       mode=st.sampled_from(DETERMINISTIC))
def test_property_monotone(x, scale, bits, signed, mode):
    y = np.asarray(_fq_jit(np.sort(x), scale, bits=bits, signed=signed, rounding=mode))
    assert np.all(np.diff(y) >= 0)


# -------------------------------------------------------------------------------- vmap / init


def test_vmap_over_step_ratios_equals_loop():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
    base = jnp.asarray([0.1, 0.2, 0.15, 0.3]).reshape(1, 1, 1, 4)
    ratios = jnp.asarray([0.7, 0.85, 1.0, 1.15, 1.3])

    def quant_and_grad(r):
        fn = lambda s: fake_quant(x, s, bits=4, lsq_grad_scale=True)
        y, vjp = jax.vjp(fn, base / r)
        return y, vjp(jnp.ones_like(y))[0]

    ys, grads = jax.jit(jax.vmap(quant_and_grad))(ratios)
    for i, r in enumerate(ratios):
        y, g = quant_and_grad(r)
        np.testing.assert_array_equal(ys[i], y)
        np.testing.assert_allclose(grads[i], g, rtol=1e-6, atol=1e-6)
    assert len({np.asarray(y).tobytes() for y in ys}) == ratios.size  # the ratios matter


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_init_scale(signed):
    rng = np.random.default_rng(6)
    x = rng.laplace(size=(3, 3, 2, 5)).astype(np.float32)
    qmax = 7 if signed else 15
    s = lsq_init_scale(x, bits=4, signed=signed)
    assert s.shape == ()
    np.testing.assert_allclose(s, 2 * np.abs(x).mean() / np.sqrt(qmax), rtol=1e-6)
    per_channel = lsq_init_scale(x, bits=4, signed=signed, axis=(0, 1, 2))
    assert per_channel.shape == (1, 1, 1, 5)
    expected = 2 * np.abs(x).mean(axis=(0, 1, 2), keepdims=True) / np.sqrt(qmax)
    np.testing.assert_allclose(per_channel, expected, rtol=1e-6)
    fake_quant(x, per_channel, bits=4, signed=signed)  # directly usable as a per-channel scale


def test_lsq_init_scale_all_zero_is_positive():
    s = lsq_init_scale(jnp.zeros((4, 4)), bits=8)
    assert float(s) > 0
    np.testing.assert_array_equal(fake_quant(jnp.zeros((4, 4)), s, bits=8), 0.0)


def test_rounding_modes_constant():
    assert ROUNDING_MODES == ("nearest", "nearest_away", "stochastic", "floor")
    assert (MIN_BITS, MAX_BITS) == (2, 16)
