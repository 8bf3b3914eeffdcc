"""Tests for kure_jax.quant.policy: QuantPolicy validation, compute_step and quantize.

References are written here in NumPy/SciPy: the step rules of the policy docstring, np.percentile,
and the ACIQ constants re-derived by minimising the ACIQ MSE expression with scipy.
"""

import dataclasses
import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import np_fake_quant
from hypothesis import given
from hypothesis import strategies as st
from scipy import optimize, special

from kure_jax.quant.ops import ROUNDING_MODES
from kure_jax.quant.policy import CLIP_METHODS, QuantPolicy, compute_step, quantize


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def wrap(request):
    """Calls the function as is or through jax.jit (policies are closed over, hence static)."""
    return jax.jit if request.param else (lambda f: f)


# Jitted entry points with the policy static (it is a hashable frozen dataclass).
_quantize = jax.jit(quantize, static_argnames="policy")
_compute_step = jax.jit(compute_step, static_argnames="policy")


def _gaussian(shape, seed=0, loc=0.0):
    return np.random.default_rng(seed).normal(loc, 1.0, size=shape).astype(np.float32)


def _laplace(shape, seed=0):
    return np.random.default_rng(seed).laplace(0.0, 1.0, size=shape).astype(np.float32)


def _codes(bits, signed=True, narrow=True):
    """Integer range of the test's reference quantizer (2^b or 2^b - 1 codes)."""
    if not signed:
        return 0, 2**bits - 1
    half = 2 ** (bits - 1)
    return (-half + 1 if narrow else -half), half - 1


def _reduce_axes(ndim, axis):
    kept = () if axis is None else tuple(a % ndim for a in np.atleast_1d(axis))
    return tuple(i for i in range(ndim) if i not in kept)


def _np_asym_step(lo, hi, bits, signed=True):
    qmin, qmax = _codes(bits, signed, narrow=False)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = (hi - lo) / (qmax - qmin)
    return scale, np.round(qmin - lo / scale)


@functools.cache
def _aciq_constant(dist, bits):
    """argmin_alpha of ACIQ's clipping + rounding MSE for unit Gaussian / unit-scale Laplace."""
    rounding = lambda a: a * a / (3 * 4.0**bits)  # (2 a / 2^M)^2 / 12
    if dist == "gauss":
        clip_mse = lambda a: ((a * a + 1) * (1 - special.erf(a / math.sqrt(2)))
                              - math.sqrt(2 / math.pi) * a * math.exp(-a * a / 2))
    else:
        clip_mse = lambda a: 2 * math.exp(-a)
    res = optimize.minimize_scalar(lambda a: clip_mse(a) + rounding(a), bounds=(0.1, 40),
                                   method="bounded", options={"xatol": 1e-9})
    return res.x


# ---------------------------------------------------------------------------------------------
# QuantPolicy validation and labels


@pytest.mark.parametrize("bits", [0, 1, 17, 4.0, True, "4"])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match=r"bits.*\[2, 16\]"):
        QuantPolicy(bits=bits)


def test_invalid_clip_lists_methods():
    with pytest.raises(ValueError, match="clip") as info:
        QuantPolicy(clip="minmax")
    assert all(m in str(info.value) for m in CLIP_METHODS)


def test_invalid_rounding_lists_modes():
    with pytest.raises(ValueError) as info:
        QuantPolicy(rounding="round")
    assert all(m in str(info.value) for m in ROUNDING_MODES)


@pytest.mark.parametrize("step_scale", [0, 0.0, -1.0, float("nan"), float("inf"), "1", True])
def test_invalid_step_scale(step_scale):
    with pytest.raises(ValueError, match="step_scale"):
        QuantPolicy(step_scale=step_scale)


@pytest.mark.parametrize("percentile", [0, -5.0, 100.01, float("nan"), "99"])
def test_invalid_percentile(percentile):
    with pytest.raises(ValueError, match=r"percentile.*\(0, 100\]"):
        QuantPolicy(clip="percentile", percentile=percentile)


@pytest.mark.parametrize("axis", ["a", 1.5, True, (), (1, 1), (0, "x"), (0, None)])
def test_invalid_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        QuantPolicy(axis=axis)


@pytest.mark.parametrize("field", ["signed", "symmetric", "pow2_step", "narrow_range",
                                   "bias_correction"])
def test_bool_fields_reject_non_bools(field):
    with pytest.raises(ValueError, match=field):
        QuantPolicy(**{field: 1})


def test_replace_revalidates_and_keeps_fields():
    p = QuantPolicy(bits=3, clip="mse", axis=-1)
    q = dataclasses.replace(p, bits=8)
    assert (q.bits, q.clip, q.axis) == (8, "mse", (-1,))
    with pytest.raises(ValueError, match="bits"):
        dataclasses.replace(p, bits=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.bits = 5


def test_axis_normalised_hash_and_equality():
    assert QuantPolicy(axis=-1) == QuantPolicy(axis=(-1,))
    assert hash(QuantPolicy(axis=-1)) == hash(QuantPolicy(axis=[-1]))
    assert QuantPolicy(axis=[0, 3]).axis == (0, 3)
    assert QuantPolicy(bits=np.int64(5)).bits == 5
    assert QuantPolicy() != QuantPolicy(bits=5)


def test_names():
    assert QuantPolicy().name == "w4 per-tensor sym max nearest"
    full = QuantPolicy(bits=3, axis=(0, 3), symmetric=False, signed=False, clip="percentile",
                       percentile=99.9, rounding="stochastic", step_scale=1.05, pow2_step=True,
                       bias_correction=True)
    assert full.describe("a") == (
        "a3 per-channel(0,3) asym unsigned pct99.9 stochastic step-x1.05 pow2 bias-corr")
    assert QuantPolicy(narrow_range=False).name == "w4 per-tensor sym max nearest full-range"
    # narrow_range only matters for symmetric signed policies, so it is not shown otherwise.
    assert "full-range" not in QuantPolicy(narrow_range=False, symmetric=False).name


# ---------------------------------------------------------------------------------------------
# compute_step against NumPy references


@pytest.mark.parametrize("axis,bits,narrow", [(None, 2, True), (-1, 4, True), (0, 4, False),
                                               ((0, 3), 8, True), (None, 16, False)])
def test_max_symmetric(wrap, axis, bits, narrow):
    x = _gaussian((3, 3, 2, 5))
    policy = QuantPolicy(bits=bits, axis=axis, narrow_range=narrow)
    scale, zp = wrap(lambda v: compute_step(v, policy))(x)
    red = _reduce_axes(x.ndim, axis)
    ref = np.max(np.abs(x), axis=red, keepdims=axis is not None) / (2 ** (bits - 1) - 1)
    np.testing.assert_allclose(scale, ref, rtol=1e-6)
    assert scale.shape == ref.shape and zp.shape == ref.shape
    np.testing.assert_array_equal(zp, 0.0)


def test_max_unsigned_symmetric():
    x = np.abs(_gaussian((6, 4)))
    scale, zp = jax.jit(lambda v: compute_step(v, QuantPolicy(bits=3, signed=False, axis=1)))(x)
    np.testing.assert_allclose(scale, x.max(0, keepdims=True) / 7, rtol=1e-6)
    np.testing.assert_array_equal(zp, 0.0)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0])
def test_max_asymmetric(signed, axis):
    x = _gaussian((5, 7), loc=0.8)
    x[0] = np.abs(x[0]) + 0.5  # One all-positive row: its range must be widened to include 0.
    policy = QuantPolicy(bits=4, symmetric=False, signed=signed, axis=axis)
    scale, zp = jax.jit(lambda v: compute_step(v, policy))(x)
    red, keep = _reduce_axes(x.ndim, axis), axis is not None
    ref_scale, ref_zp = _np_asym_step(x.min(red, keepdims=keep), x.max(red, keepdims=keep), 4,
                                      signed)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(zp, ref_zp)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis,pct", [(None, 99.0), (-1, 90.0), (None, 100.0)])
def test_percentile(symmetric, axis, pct):
    x = _laplace((40, 3))
    policy = QuantPolicy(bits=5, clip="percentile", percentile=pct, symmetric=symmetric, axis=axis)
    scale, zp = jax.jit(lambda v: compute_step(v, policy))(x)
    red, keep = _reduce_axes(x.ndim, axis), axis is not None
    if symmetric:
        ref_scale = np.percentile(np.abs(x), pct, axis=red, keepdims=keep) / 15
        ref_zp = 0.0
    else:
        ref_scale, ref_zp = _np_asym_step(np.percentile(x, 100 - pct, axis=red, keepdims=keep),
                                          np.percentile(x, pct, axis=red, keepdims=keep), 5)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-5)
    np.testing.assert_allclose(zp, ref_zp)


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_published_aciq_constants_are_mse_minimisers(dist):
    published = {"gauss": [1.71, 2.15, 2.55, 2.94, 3.29, 3.61, 3.92],
                 "laplace": [2.83, 3.89, 5.03, 6.2, 7.41, 8.64, 9.89]}[dist]
    derived = [_aciq_constant(dist, bits) for bits in range(2, 9)]
    np.testing.assert_allclose(published, derived, rtol=5e-3)


@pytest.mark.parametrize("clip", ["aciq", "aciq_laplace"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 5, 16])
def test_aciq(clip, symmetric, bits):
    x = (_gaussian((4000,), loc=0.3) if clip == "aciq" else _laplace((4000,)) + 0.3)
    policy = QuantPolicy(bits=bits, clip=clip, symmetric=symmetric)
    scale, zp = jax.jit(lambda v: compute_step(v, policy))(x)
    x64 = x.astype(np.float64)
    mu = x64.mean()
    spread = x64.std() if clip == "aciq" else np.abs(x64 - mu).mean()
    alpha = _aciq_constant("gauss" if clip == "aciq" else "laplace", bits) * spread
    if symmetric:
        clip_value = min(abs(mu) + alpha, np.abs(x64).max())
        ref_scale, ref_zp = clip_value / (2 ** (bits - 1) - 1), 0.0
    else:
        ref_scale, ref_zp = _np_asym_step(max(mu - alpha, x64.min()), min(mu + alpha, x64.max()),
                                          bits)
    np.testing.assert_allclose(scale, ref_scale, rtol=5e-3)
    np.testing.assert_allclose(zp, ref_zp, atol=1.0)  # zp rounding may flip with the 0.5% tol.
    capped = abs(mu) + alpha >= np.abs(x64).max()
    if bits in (2, 16):  # Both regimes are exercised: the cap at max|x| binds only at 16 bits.
        assert capped == (bits == 16)


def _np_mse(x, clip_value, bits):
    qmin, qmax = _codes(bits)
    return np.mean((np_fake_quant(x, clip_value / qmax, 0.0, qmin, qmax, dtype=None) - x) ** 2)


@pytest.mark.parametrize("data", ["gauss", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_mse_clip_beats_max_and_is_near_optimum(data, bits):
    x = (_gaussian if data == "gauss" else _laplace)((4096,), seed=bits)
    mse_of = lambda clip: float(np.mean(
        (np.asarray(jax.jit(quantize, static_argnums=1)(x, QuantPolicy(bits=bits, clip=clip)))
         - x) ** 2))
    mse_search, mse_max = mse_of("mse"), mse_of("max")
    amax = np.abs(x).max()
    brute = min(_np_mse(x, r * amax, bits) for r in np.linspace(0.01, 1.0, 2000))
    assert mse_search <= mse_max * (1 + 1e-6)
    assert brute * (1 - 1e-6) <= mse_search <= brute * 1.02
    if bits <= 4:  # At low bits the optimum clips, so the search must do clearly better.
        assert mse_search < 0.9 * mse_max


def test_mse_asymmetric_beats_max():
    x = np.exp(_gaussian((2048,)))  # Skewed, all positive.
    err = lambda clip: float(np.mean((np.asarray(jax.jit(lambda v: quantize(
        v, QuantPolicy(bits=3, clip=clip, symmetric=False)))(x)) - x) ** 2))
    assert err("mse") < 0.9 * err("max")


@pytest.mark.parametrize("clip", CLIP_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [(0, 2)])
def test_per_channel_equals_per_tensor_on_slices(clip, symmetric, axis):
    x = _laplace((6, 3, 4), seed=3)
    scale, zp = compute_step(x, QuantPolicy(bits=3, clip=clip, symmetric=symmetric, axis=axis))
    expected_shape = tuple(d if i in np.atleast_1d(axis) else 1 for i, d in enumerate(x.shape))
    assert scale.shape == zp.shape == expected_shape
    per_tensor = jax.jit(functools.partial(
        compute_step, policy=QuantPolicy(bits=3, clip=clip, symmetric=symmetric)))
    for idx in np.ndindex(*expected_shape):
        sl = tuple(slice(None) if n == 1 else i for i, n in zip(idx, expected_shape, strict=True))
        s_ref, z_ref = per_tensor(x[sl])
        np.testing.assert_allclose(scale[idx], s_ref, rtol=1e-6)
        np.testing.assert_allclose(zp[idx], z_ref)


def test_per_channel_differs_from_per_tensor():
    x = _gaussian((8, 4)) * np.array([0.1, 1.0, 3.0, 10.0], np.float32)
    per_channel = compute_step(x, QuantPolicy(axis=-1))[0]
    per_tensor = compute_step(x, QuantPolicy())[0]
    np.testing.assert_allclose(per_channel.max(), per_tensor, rtol=1e-6)
    assert per_channel.min() < 0.05 * per_tensor


# ---------------------------------------------------------------------------------------------
# Perturbations: step_scale, step_ratio, pow2


@pytest.mark.parametrize("symmetric", [True, False])
def test_step_scale_and_ratio_multiply(wrap, symmetric):
    x = _gaussian((16, 4))
    base = QuantPolicy(symmetric=symmetric, axis=-1)
    s0, z0 = compute_step(x, base)
    scaled = dataclasses.replace(base, step_scale=1.3)
    s1, z1 = wrap(lambda v, r: compute_step(v, scaled, step_ratio=r))(x, jnp.float32(0.9))
    np.testing.assert_allclose(s1, s0 * 1.3 * 0.9, rtol=1e-6)
    np.testing.assert_array_equal(z1, z0)  # The grid stretches about 0; the zero point stays.


@pytest.mark.parametrize("ratio", [0.55, 0.7, 1.0, 1.41, 2.9])
def test_pow2_step(ratio):
    x = _gaussian((32, 5), seed=1)
    base = compute_step(x, QuantPolicy(axis=-1))[0] * ratio
    pol = QuantPolicy(axis=-1, pow2_step=True)
    scale = jax.jit(lambda v, r: compute_step(v, pol, step_ratio=r)[0])(x, ratio)
    log2 = np.log2(np.asarray(scale, np.float64))
    np.testing.assert_array_equal(log2, np.round(log2))  # Exact powers of two.
    np.testing.assert_array_equal(log2, np.round(np.log2(np.asarray(base, np.float64))))
    assert np.all(np.abs(log2 - np.log2(base)) <= 0.5 + 1e-6)  # Within sqrt(2) of the step.


def test_step_ratio_errors():
    x = _gaussian((8,))
    with pytest.raises(ValueError, match="scalar"):
        compute_step(x, QuantPolicy(), step_ratio=jnp.ones(2))
    with pytest.raises(ValueError, match="step_ratio"):
        compute_step(x, QuantPolicy(), step_ratio=0.0)
    with pytest.raises(ValueError, match="step_ratio must be finite"):  # inf: all-NaN output
        compute_step(x, QuantPolicy(), step_ratio=np.inf)


@pytest.mark.parametrize("clip", ["max", "mse"])
def test_vmap_over_step_ratio_equals_loop(clip):
    x = _gaussian((12, 3))
    pol = QuantPolicy(bits=3, clip=clip, axis=-1)
    ratios = jnp.array([0.5, 0.8, 1.0, 1.25])
    fn = jax.jit(jax.vmap(lambda r: quantize(x, pol, step_ratio=r)))
    steps = jax.vmap(lambda r: compute_step(x, pol, step_ratio=r)[0])(ratios)
    batched = fn(ratios)
    one = jax.jit(lambda r: (quantize(x, pol, step_ratio=r), compute_step(x, pol, step_ratio=r)))
    for i, r in enumerate(ratios):
        q, (step, _) = one(r)
        np.testing.assert_allclose(batched[i], q, rtol=1e-6)
        np.testing.assert_allclose(steps[i], step, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# quantize


@pytest.mark.parametrize("clip,symmetric", [("max", False), ("mse", True), ("aciq", False),
                                            ("aciq_laplace", True), ("percentile", False)])
def test_eager_matches_jit(clip, symmetric):
    x = _laplace((10, 3), seed=4)
    pol = QuantPolicy(bits=3, clip=clip, symmetric=symmetric, axis=-1, percentile=95.0)
    jitted = jax.jit(quantize, static_argnames="policy")
    np.testing.assert_allclose(quantize(x, pol), jitted(x, policy=pol), rtol=1e-6)
    for eager, traced in zip(compute_step(x, pol), jax.jit(compute_step, static_argnums=1)(x, pol),
                             strict=True):
        np.testing.assert_allclose(eager, traced, rtol=1e-6)


@pytest.mark.parametrize("clip", CLIP_METHODS)
@pytest.mark.parametrize("symmetric,signed,bits", [(True, True, 2), (False, True, 5),
                                                   (False, False, 3), (True, False, 4)])
def test_quantize_on_grid(clip, symmetric, signed, bits):
    x = _gaussian((6, 5), seed=bits) + (0.0 if signed else 1.5)
    pol = QuantPolicy(bits=bits, clip=clip, symmetric=symmetric, signed=signed, axis=-1)
    q = np.asarray(jax.jit(lambda v: quantize(v, pol))(x))
    scale, zp = (np.asarray(a) for a in compute_step(x, pol))
    codes = q / scale + zp
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    qmin, qmax = _codes(bits, signed, narrow=symmetric and signed)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    np.testing.assert_allclose(q, np_fake_quant(x, scale, zp, qmin, qmax, dtype=None), atol=1e-6)


def test_quantize_16_bits_is_nearly_identity(wrap):
    x = _gaussian((64, 8))
    q = wrap(lambda v: quantize(v, QuantPolicy(bits=16)))(x)
    step = np.abs(x).max() / (2**15 - 1)
    assert np.max(np.abs(q - x)) <= step / 2 * (1 + 1e-4)
    np.testing.assert_allclose(q, x, atol=1e-4)


@pytest.mark.parametrize("clip", CLIP_METHODS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_and_constant_tensors(clip, symmetric):
    pol = QuantPolicy(bits=3, clip=clip, symmetric=symmetric, axis=0)
    x = np.zeros((3, 4), np.float32)
    x[1] = 2.5  # one constant channel, two all-zero channels
    scale, zp, q, grads = jax.jit(lambda v: (
        *compute_step(v, pol), quantize(v, pol),
        jax.grad(lambda u: jnp.sum(quantize(u, pol, step_ratio=1.0)))(v)))(x)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0) and np.all(np.isfinite(zp))
    q = np.asarray(q)
    np.testing.assert_array_equal(q[[0, 2]], 0.0)
    np.testing.assert_allclose(q[1], 2.5, rtol=1e-6)
    assert np.all(np.isfinite(grads))


@pytest.mark.parametrize("axis", [None, 0, (0, 1)])
def test_bias_correction_restores_channel_means(axis):
    x = _laplace((5, 4, 6), seed=2) + 0.2
    pol = QuantPolicy(bits=2, clip="mse", axis=axis, bias_correction=True)
    q = np.asarray(jax.jit(lambda v: quantize(v, pol))(x), np.float64)
    red = _reduce_axes(x.ndim, -1 if axis is None else axis)  # axis None: the last axis
    np.testing.assert_allclose(q.mean(red), x.mean(red, dtype=np.float64), atol=1e-6)
    plain = np.asarray(jax.jit(quantize, static_argnums=1)(
        x, dataclasses.replace(pol, bias_correction=False)), np.float64)
    assert np.max(np.abs(plain.mean(red) - x.mean(red))) > 1e-3  # ... which plain q does not.


def test_bias_correction_rank1_is_whole_tensor():
    x = _laplace((32,)) + 0.5
    q = quantize(x, QuantPolicy(bits=2, bias_correction=True))
    np.testing.assert_allclose(np.mean(q), np.mean(x), atol=1e-6)
    assert not np.allclose(q, x)


def test_ste_gradient():
    x = _gaussian((256,))
    pol = QuantPolicy(bits=3, clip="percentile", percentile=90.0)
    grad = np.asarray(jax.jit(jax.grad(lambda v: jnp.sum(quantize(v, pol))))(x))
    scale = float(compute_step(x, pol)[0])
    clip_value = scale * 3
    inside, outside = np.abs(x) < clip_value, np.abs(x) > clip_value + scale / 2
    assert inside.sum() > 200 and outside.sum() > 5
    np.testing.assert_array_equal(grad[inside], 1.0)
    np.testing.assert_array_equal(grad[outside], 0.0)


def test_step_ratio_receives_a_gradient():
    x = _gaussian((128,))
    pol = QuantPolicy(bits=2, axis=None)
    loss = jax.jit(lambda r: jnp.sum((quantize(x, pol, step_ratio=r) - x) ** 2))
    g = jax.jit(jax.grad(loss))(jnp.float32(1.0))
    assert np.isfinite(g) and g != 0.0
    # Sign check against a central difference of the (piecewise smooth) loss.
    fd = (loss(jnp.float32(1.05)) - loss(jnp.float32(0.95))) / 0.1
    assert np.sign(g) == np.sign(fd)


def test_stochastic_rounding():
    x = _gaussian((200,))
    pol = QuantPolicy(bits=3, rounding="stochastic")
    with pytest.raises(ValueError, match="key"):
        quantize(x, pol)
    q1 = np.asarray(_quantize(x, policy=pol, key=jax.random.key(1)))
    q2 = _quantize(x, policy=pol, key=jax.random.key(2))
    scale = float(compute_step(x, pol)[0])
    np.testing.assert_allclose(q1 / scale, np.round(q1 / scale), atol=1e-4)
    assert not np.array_equal(q1, q2)
    np.testing.assert_array_equal(q1, _quantize(x, policy=pol, key=jax.random.key(1)))
    # Stochastic rounding moves each value to one of its two neighbouring grid points.
    assert np.all(np.abs(q1 - x) < scale * (1 + 1e-5))


def test_input_errors():
    with pytest.raises(ValueError, match="floating"):
        compute_step(jnp.arange(4), QuantPolicy())
    with pytest.raises(ValueError, match="out of range"):
        compute_step(jnp.ones((3, 4)), QuantPolicy(axis=2))
    with pytest.raises(ValueError, match="same axis"):
        compute_step(jnp.ones((3, 4)), QuantPolicy(axis=(1, -1)))


def test_low_precision_dtype_preserved():
    x = jnp.asarray(_gaussian((8, 4)), jnp.bfloat16)
    q = quantize(x, QuantPolicy(bits=4, axis=-1))
    assert q.dtype == jnp.bfloat16 and q.shape == x.shape
    assert compute_step(x, QuantPolicy())[0].dtype == jnp.float32


@given(
    x=hnp.arrays(np.float32, (4, 6), elements=st.floats(-100, 100, width=32)),
    bits=st.sampled_from([2, 3, 5, 8]),
    axis=st.sampled_from([None, -1]),
)
def test_max_clip_properties(x, bits, axis):
    """Max-abs quantization: error <= step/2 everywhere, and quantizing twice changes nothing."""
    pol = QuantPolicy(bits=bits, axis=axis)
    q = np.asarray(_quantize(x, policy=pol))
    scale = np.asarray(_compute_step(x, policy=pol)[0])
    assert np.all(np.abs(q - x) <= scale / 2 * (1 + 1e-5) + 1e-30)
    np.testing.assert_allclose(_quantize(q, policy=pol), q, rtol=1e-5, atol=1e-30)
